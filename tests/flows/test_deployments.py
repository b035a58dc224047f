"""The pipeline through Prefect's own API: the run graph's edges are the stage table's, a reused stage shows as
`<stage> (cached)`, the run config is a typed parameter that Prefect checks before any stage runs, and a
deployment run from prefect.yaml with a changed config value re-runs only the stages that value touches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import yaml

from dalle_core.evaluation import flat_metrics
from flows.pipeline_flow import pipeline_flow
from pipeline.config import Config, apply_overrides, load_config
from pipeline.stage_table import STAGES
from tests.conftest import ROOT, TINY
from tests.flows.servers import BIN, copy_store, free_port, get_json, stop, wait_http

TABLE_EDGES = {(i, s.name) for s in STAGES.values() for i in s.inputs}


def stage_runs(task_runs: list[dict]) -> tuple[set[tuple[str, str]], dict[str, str]]:
    """(every edge into a stage task run as (upstream task run's name, stage), {stage: task run name}) of one flow
    run's task runs as Prefect's API returns them; mapped sub-tasks (encode-shard, generate-part) are not stages,
    and an edge from one into a stage is an error the set shows."""
    name = {r["id"]: r["name"].removesuffix(" (cached)") for r in task_runs}
    stage_of = {i: n for i, n in name.items() if n in STAGES}
    edges = {(name.get(i["id"], i["id"]), stage_of[r["id"]]) for r in task_runs if r["id"] in stage_of
             for inputs in r["task_inputs"].values() for i in inputs if i.get("input_type") == "task_run"}
    return edges, {stage_of[r["id"]]: r["name"] for r in task_runs if r["id"] in stage_of}


def read_task_runs(flow_run_id) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r.model_dump(mode="json") for r in runs]


def test_run_graph_edges_are_the_stage_table_and_reused_stages_are_named_cached(generated, tmp_path):
    src, ov, _ = generated
    cfg = load_config(TINY, [*copy_store(src, tmp_path), *ov[2:]])
    shutil.rmtree(tmp_path / "store" / "pretokenize")  # it runs, with its mapped encode-shard tasks, and what follows
    state = pipeline_flow(cfg, return_state=True)
    assert state.is_completed()
    edges, names = stage_runs(read_task_runs(state.state_details.flow_run_id))
    assert edges == TABLE_EDGES
    ran = {"pretokenize", "transformer", "generate", "evaluate"}
    assert names == {s: s if s in ran else f"{s} (cached)" for s in STAGES}
    artifacts = read_artifacts(state.state_details.flow_run_id)
    progress = {a["key"]: a["data"] for a in artifacts if a["type"] == "progress"}
    assert progress["progress-train-transformer"] == 100 and progress["progress-sample"] == 100  # at their ends
    table = next(a for a in artifacts if a["key"] == "evaluation")
    rows = {r["metric"]: r["value"] for r in json.loads(table["data"])}
    report = json.loads(next((tmp_path / "store" / "evaluate").glob("*/evaluation.json")).read_text())
    assert rows == {k: round(v, 4) for k, v in flat_metrics(report).items()} and len(rows) > 50


def read_artifacts(flow_run_id) -> list[dict]:
    """The artifacts one flow run published (its own and its task runs'), latest first, as Prefect's API returns
    them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return [a.model_dump(mode="json") for a in found]


def test_an_invalid_config_value_fails_prefect_parameter_validation_before_any_stage(tmp_path):
    cfg = load_config(TINY, [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    bad = cfg.model_dump(mode="json")
    bad["dvae"]["codebook_size"] = 0  # the config allows 2 or more codes
    state = pipeline_flow(cfg=bad, return_state=True)
    assert state.is_failed()
    assert "Validation of flow parameters failed" in state.message and "codebook_size" in state.message
    assert read_task_runs(state.state_details.flow_run_id) == []
    assert not (tmp_path / "store").exists()


def test_prefect_yaml_configs_are_the_config_files():
    """The deployments' `cfg` parameters are configs/shapes.yaml and configs/tiny.yaml, value for value."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for name in ("shapes", "tiny"):
        given = Config.model_validate(spec["definitions"][name])
        assert given.model_dump() == load_config(ROOT / "configs" / f"{name}.yaml").model_dump() | {
            "tracking": given.tracking.model_dump()}
        assert given.tracking.source == f"configs/{name}.yaml"
    deployed = {d["name"]: d["parameters"] for d in spec["deployments"]}
    assert {p.get("until") for p in deployed.values()} >= set(STAGES)


def test_every_entrypoint_loads_from_a_project_folder_that_holds_a_store(tmp_path):
    """Prefect loads an entrypoint script as a module named after its file, searching the script's folder and the
    working directory for its submodules: a flow file named like one of our packages shadowed it, so after
    `make demo` (store ./artifacts) every deployment run crashed on `pipeline.artifacts`. Here in a project folder
    with an `artifacts/` store, as a worker's pull step leaves it."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (tmp_path / "artifacts" / "logs").mkdir(parents=True)
    for entry in ROOT.iterdir():  # the project, as its folder holds it
        if entry.name != "artifacts":
            (tmp_path / entry.name).symlink_to(entry)
    for entrypoint in sorted({d["entrypoint"] for d in spec["deployments"]}):
        code = ("from prefect.flows import load_flow_from_entrypoint; "
                f"print(load_flow_from_entrypoint({entrypoint!r}, use_placeholder_flow=False).name)")
        out = subprocess.run([str(BIN / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PREFECT_HOME": str(tmp_path / "ph")})
        assert out.returncode == 0 and out.stdout.strip() == "pipeline", (entrypoint, out.stderr[-2000:])


def test_deployment_run_with_a_typed_config_change_reruns_only_what_it_touches(generated, tmp_path):
    """prefect server -> `prefect deploy` (prefect.yaml) -> a run of pipeline-tiny whose `cfg` parameter gives
    only the store, tracking and clip.train: merged over the deployment's own cfg, clip, generate and evaluate run
    and the rest is reused; a value of the wrong type is refused by Prefect's parameter check, and no flow run is
    made."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DALLE_PROJECT_DIR": str(ROOT)}
    env.pop("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", None)
    prefect = str(BIN / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_http(f"{api}/health", server)

        def cli(*args, check=True):
            return subprocess.run([prefect, "--no-prompt", *args], env=env, cwd=ROOT, capture_output=True,
                                  text=True, check=check, timeout=180)

        cli("work-pool", "create", "dalle-process", "--type", "process")
        cli("deploy", "--name", "pipeline-tiny")
        src, ov, _ = generated
        partial = apply_overrides({}, [*copy_store(src, tmp_path), *ov[2:]])  # the store copy and tracking only
        refused = cli("deployment", "run", "pipeline/pipeline-tiny", "--params",
                      json.dumps({"cfg": {**partial, "transformer": {"depth": "deep"}}}), check=False)
        assert refused.returncode != 0 and "depth" in refused.stdout + refused.stderr
        assert get_json(f"{api}/flow_runs/filter", {}) == []

        # only what changes: the rest is the deployment's tiny cfg, not Config's built-in defaults
        partial["clip"]["train"]["lr"] = load_config(TINY).clip.train.lr / 2
        out = cli("deployment", "run", "pipeline/pipeline-tiny", "--params", json.dumps({"cfg": partial})).stdout
        flow_run_id = next(w for line in out.splitlines() if "UUID" in line for w in line.split() if w.count("-") == 4)
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "dalle-process", "--run-once"], env=env,
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline, state = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            state = get_json(f"{api}/flow_runs/{flow_run_id}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        assert state == "COMPLETED"
        task_runs = get_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
        edges, names = stage_runs(task_runs)
        assert edges == TABLE_EDGES
        ran = {"clip", "generate", "evaluate"}
        assert names == {s: s if s in ran else f"{s} (cached)" for s in STAGES}
    finally:
        if worker is not None:
            stop(worker)
        stop(server)


def test_a_training_stage_on_a_gpu_holds_its_slots_of_the_gpu_limit_while_it_trains():
    """Two scheduled runs never share a card: on CUDA a training stage holds train.nproc slots of Prefect's global
    concurrency limit `runner.gpu_slot` (here on the test's Prefect server) until it ends; on a CPU none."""
    import torch
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from pipeline.training import gpu_slot

    cfg = load_config(TINY, ["runner.gpu_slot=test-gpu"])
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="test-gpu", limit=2))
        held = {}
        for device in ("cuda", "cpu"):
            with gpu_slot(cfg, torch.device(device), 2):
                held[device] = client.read_global_concurrency_limit_by_name("test-gpu").active_slots
        after = client.read_global_concurrency_limit_by_name("test-gpu").active_slots
    assert held == {"cuda": 2, "cpu": 0} and after == 0
