import shutil

import pytest
import torch
from mlflow import MlflowClient

from dalle_core.config import load_config
from flows.cli import main
from flows.pipeline import pipeline_flow
from storage.store import StoreError
from tasks.common import open_store, stage_keys
from tasks.pipeline import downstream
from tests.conftest import NO_CUDA, TINY


@pytest.fixture
def generated_copy(generated, tmp_path):
    src, ov, _ = generated
    shutil.copytree(src / "store", tmp_path / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *ov[2:]]


def test_rerun_from_cache_and_only_changed_stages_rerun(generated_copy):
    ov = generated_copy
    first = pipeline_flow(config=str(TINY), overrides=ov)
    assert [s for s, r in first.items() if not r.endswith("(cached)")] == ["evaluate"]
    again = pipeline_flow(config=str(TINY), overrides=ov)
    assert all(r.endswith("(cached)") for r in again.values()), again
    changed = pipeline_flow(config=str(TINY), overrides=[*ov, "transformer.train.max_steps=20"])
    assert [s for s, r in changed.items() if not r.endswith("(cached)")] == ["transformer", "generate", "evaluate"]


def test_pipeline_run_nests_stage_runs_in_mlflow(generated_copy):
    ov = generated_copy
    pipeline_flow(config=str(TINY), overrides=ov)
    cfg = load_config(TINY, ov)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle").experiment_id
    parent = client.search_runs([exp], "tags.stage = 'pipeline'")[0]
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == {"evaluation"}  # the only stage not cached
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"]
    assert parent.data.tags["stage.evaluate"].startswith("evaluation/")
    assert "generation.clip_top1_of_4" in parent.data.metrics


def test_only_a_stage_with_missing_upstream_fails_in_one_line(tiny):
    config, make = tiny
    with pytest.raises(StoreError, match=r"^missing upstream artifact transformer/\w+ in store .*run that stage first$"):
        pipeline_flow(config=config, overrides=make(), only=["generate"])


def test_force_redoes_a_stage_and_everything_downstream(generated_copy):
    ov = generated_copy
    assert downstream("dvae") == ["dvae", "pretokenize", "transformer", "generate", "evaluate"]
    refs = pipeline_flow(config=str(TINY), overrides=ov, only=["ingest", "dvae", "bpe", "clip"], force=["dvae"])
    assert not refs["dvae"].endswith("(cached)") and refs["clip"].endswith("(cached)")
    cfg = load_config(TINY, ov)
    store, keys = open_store(cfg), stage_keys(cfg)
    assert not store.exists(store.path("tokens", keys["tokens"]))
    assert not store.exists(store.path("generations", keys["generations"]))
    assert store.is_complete("clip", keys["clip"])


def test_status_and_gc(generated_copy, capsys):
    ov = generated_copy
    cfg = load_config(TINY, ov)
    store = open_store(cfg)
    store.write_bytes(store.path("dvae", "deadbeef0000", "checkpoints", "latest.json"), b"{}")
    args = sum((["--set", o] for o in ov), [])
    assert main(["status", "-c", str(TINY), *args]) == 0
    out = capsys.readouterr().out
    assert "dvae         deadbeef0000" in out and "INCOMPLETE" in out
    assert f"* transformer  {stage_keys(cfg)['transformer']}" in out
    assert main(["gc", "-c", str(TINY), *args]) == 0
    assert "removing dvae/deadbeef0000 (incomplete)" in capsys.readouterr().out
    assert not store.exists(store.path("dvae", "deadbeef0000"))
    assert store.is_complete("transformer", stage_keys(cfg)["transformer"])


def test_cli_errors_are_one_line(tiny, capsys):
    config, make = tiny
    args = sum((["--set", o] for o in make()), [])
    assert main(["run", "-c", config, *args, "--set", "dvae.codebok_size=3"]) == 2
    assert capsys.readouterr().err == "error: dvae.codebok_size: unknown key; did you mean codebook_size?\n"
    assert main(["run", "-c", config, *args, "--only", "tranformer"]) == 2
    assert "unknown stage 'tranformer'" in capsys.readouterr().err
    assert main(["ingest", "-c", "missing.yaml"]) == 2
    assert capsys.readouterr().err == "error: config file 'missing.yaml' does not exist\n"


def test_unreachable_prefect_server_is_one_line(tiny, capsys, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config, make = tiny
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    assert main(["run", "-c", config, *sum((["--set", o] for o in make()), [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Prefect server at PREFECT_API_URL='http://127.0.0.1:{port}/api' is unreachable")
    assert err.count("\n") == 1


def test_evaluation_table_has_one_column_per_candidate_kind():
    from tasks.evaluate import format_report
    faith = {c: {"single.all": 0.9, "pair.all": 0.8} for c in ("top1", "random", "dvae_reconstruction")}
    text = format_report({"clip": {"val_recall@1": 0.5}, "faithfulness": faith})
    header = next(line for line in text.splitlines() if line.startswith("caption faithfulness"))
    assert header.split()[2:] == ["top-1", "random", "dVAE", "recon"]
    assert text.splitlines()[-1].split() == ["pair.all", "0.800", "0.800", "0.800"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_tiny_pipeline_runs_every_stage_on_cuda(tiny):
    """Every stage on the GPU, sample grids during transformer training included."""
    config, make = tiny
    ov = make("runner.device=cuda", "transformer.sample_every=10", "runner.loader_workers=2")
    refs = pipeline_flow(config=config, overrides=ov)
    assert not any(r.endswith("(cached)") for r in refs.values())
    cfg = load_config(config, ov)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle").experiment_id
    for stage in ("dvae", "transformer", "clip"):
        run = client.search_runs([exp], f"tags.stage = '{stage}'")[0]
        assert run.data.tags["device"] == "cuda:0", stage
    transformer = client.search_runs([exp], "tags.stage = 'transformer'")[0]
    grids = [a.path for a in client.list_artifacts(transformer.info.run_id, "samples")]
    assert "samples/step-0000010.png" in grids  # the grid drawn mid-training, on the GPU
    store, keys = open_store(cfg), stage_keys(cfg)
    assert store.is_complete("evaluation", keys["evaluation"])


def test_tiny_pipeline_at_64_px(tiny):
    """Another image size end to end: 64 px images, 16x16 token grids, 272-token sequences."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    config, make = tiny
    ov = make("data.image_size=64", "data.shapes.num_images=200", "clip.patch_size=8", "evaluate.num_prompts=4")
    pipeline_flow(config=config, overrides=ov)
    cfg = load_config(config, ov)
    store, keys = open_store(cfg), stage_keys(cfg)
    assert store.manifest("tokens", keys["tokens"])["grid"] == [16, 16]
    table = pq.read_table(store.path("generations", keys["generations"], "generations.parquet"))
    assert {Image.open(io.BytesIO(b)).size for b in table.column("image").to_pylist()} == {(64, 64)}
    report = store.read_json(store.path("evaluation", keys["evaluation"], "evaluation.json"))
    assert report["generation"]["prompts"] == 4 and "faithfulness" in report
