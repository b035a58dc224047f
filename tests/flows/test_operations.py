"""Operating the pipeline: real servers (Prefect, MLflow, S3), Dask, kill -9, bad stores."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flows.pipeline_flow import pipeline_flow
from pipeline.config import load_config
from pipeline.stage_table import stage_keys
from storage.parquet import shard_paths
from storage.store import StoreError
from tests.conftest import TINY, run_stage
from tests.flows.servers import BIN, copy_store, free_port, get_json, stop, wait_http

pytestmark = pytest.mark.slow


def test_killed_stage_rerun_gives_the_same_artifacts(pretokenized, tmp_path):
    """kill -9 a training process after its first checkpoint; the re-run equals an uninterrupted run."""
    from prefect.settings import PREFECT_API_URL

    src, _, _ = pretokenized
    steps = ["transformer.train.max_steps=200", "transformer.train.checkpoint_every=10"]
    clean = copy_store(src, tmp_path / "clean") + steps
    killed = copy_store(src, tmp_path / "killed") + steps
    ref = run_stage("transformer", clean)
    cfg = load_config(TINY, killed)
    store, key = cfg.store.open(), stage_keys(cfg)["transformer"]
    latest = store.path("transformer", key, "checkpoints", "latest.json")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    args = [str(BIN / "dalle"), "train-transformer", "-c", str(TINY), *sum((["--set", o] for o in killed), [])]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(latest) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not store.is_complete("transformer", key), "killed too late: the run had finished"
    again = run_stage("transformer", killed)
    assert again.key == ref.key and not again.cached
    clean_store = (load_config(TINY, clean)).store.open()
    assert (store.read_bytes(store.path("transformer", key, "model.safetensors"))
            == clean_store.read_bytes(clean_store.path("transformer", key, "model.safetensors")))


def test_dvae_resume_is_exact(tiny, tmp_path, monkeypatch):
    import pipeline.training

    config, make = tiny
    clean = [f"store.root={tmp_path / 'clean'}", f"tracking.uri=sqlite:///{tmp_path / 'c.db'}"]
    run_stage("dvae", clean, config)
    real_save = pipeline.training.save_checkpoint

    def save_then_die(*a, **k):
        real_save(*a, **k)
        raise RuntimeError("killed")

    monkeypatch.setattr(pipeline.training, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_stage("dvae", make(), config)
    monkeypatch.setattr(pipeline.training, "save_checkpoint", real_save)
    a = (load_config(config, make())).store.open()
    assert a.exists(a.path("dvae", stage_keys(load_config(config, make()))["dvae"], "checkpoints", "latest.json"))
    ref = run_stage("dvae", make(), config)
    assert not ref.cached
    b = (load_config(config, clean)).store.open()
    assert a.read_bytes(a.path("dvae", ref.key, "model.safetensors")) == \
        b.read_bytes(b.path("dvae", ref.key, "model.safetensors"))


def test_pretokenize_on_a_dask_local_cluster(pretokenized, tmp_path):
    src, _, ref = pretokenized
    ov = copy_store(src, tmp_path)
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
    expected = {p: store.read_bytes(p) for s in ("train", "val") for p in shard_paths(store, "pretokenize", ref.key, s)}
    store.remove("pretokenize", ref.key)
    again = run_stage("pretokenize", [*ov, "runner.kind=dask", "runner.workers=2"])
    assert not again.cached and again.key == ref.key
    got = {p: store.read_bytes(p) for s in ("train", "val") for p in shard_paths(store, "pretokenize", ref.key, s)}
    assert got == expected


def test_ingest_and_pretokenize_on_s3(tiny, tmp_path):
    """The store on a real S3-compatible HTTP server (moto) on 127.0.0.1."""
    import pyarrow.dataset as pads
    import s3fs

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url, server, 60)
        opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"}}
        import boto3

        boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket="dalle-test")
        fs = s3fs.S3FileSystem(**opts)
        config, _ = tiny
        ov = ["store.root=s3://dalle-test/run", f"store.storage_options={json.dumps(opts)}",
              f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
        ref = run_stage("pretokenize", ov, config)
        cfg = load_config(config, ov)
        keys = stage_keys(cfg)
        fs.invalidate_cache()
        assert fs.exists(f"dalle-test/run/ingest/{keys['ingest']}/manifest.json")
        assert fs.exists(f"dalle-test/run/pretokenize/{ref.key}/manifest.json")
        table = pads.dataset(f"dalle-test/run/pretokenize/{ref.key}/train", filesystem=fs, format="parquet").to_table()
        assert table.num_rows == 360
        assert run_stage("pretokenize", ov, config).cached
    finally:
        stop(server)


def test_pipeline_against_a_real_mlflow_server(pretokenized, tmp_path, monkeypatch):
    port = free_port()
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", server)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        src, _, _ = pretokenized
        ov = copy_store(src, tmp_path)[:1]  # no tracking.uri: the environment variable decides
        pipeline_flow(load_config(TINY, ov))
        api = f"{url}/api/2.0/mlflow"
        exp = get_json(f"{api}/experiments/get-by-name?experiment_name=dalle")["experiment"]["experiment_id"]
        runs = get_json(f"{api}/runs/search", {"experiment_ids": [exp], "max_results": 100})["runs"]
        tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        parent = next(rid for rid, t in tags.items() if t.get("stage") == "pipeline")
        children = {t["stage"]: rid for rid, t in tags.items()
                    if t.get("mlflow.parentRunId") == parent and t["cached"] == "false"}
        assert set(children) == {"transformer", "clip", "generate", "evaluate"}  # the rest was cached
        history = get_json(f"{api}/metrics/get-history?run_id={children['transformer']}&metric_key=loss")["metrics"]
        assert [m["step"] for m in history] == [10, 20, 30]
        files = get_json(f"{api}/artifacts/list?run_id={children['generate']}")["files"]
        assert {"contact_sheet.png", "grids", "manifest.json"} <= {f["path"] for f in files}
    finally:
        stop(server)


def test_unreachable_mlflow_server_is_one_line(tiny):
    from storage.tracking import TrackingError

    config, make = tiny
    port = free_port()
    with pytest.raises(TrackingError, match=rf"^MLflow tracking at 'http://127.0.0.1:{port}' is unreachable"):
        pipeline_flow(load_config(config, [*make(), f"tracking.uri=http://127.0.0.1:{port}"]), only=["ingest"])


def test_full_store_is_one_line_and_keeps_finished_work(pretokenized, tmp_path, monkeypatch):
    src, _, ref = pretokenized
    ov = copy_store(src, tmp_path)
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
    store.remove("pretokenize", ref.key)
    real_open = store.fs.__class__.open

    def full_disk(self, path, mode="rb", *a, **k):
        if "w" in mode and "/pretokenize/" in str(path):
            raise OSError(28, "No space left on device")
        return real_open(self, path, mode, *a, **k)

    monkeypatch.setattr(store.fs.__class__, "open", full_disk)
    with pytest.raises(StoreError, match=r"^cannot write '.*/pretokenize/.*part-0000\d\.parquet': No space left on device$"):
        run_stage("pretokenize", ov)
    monkeypatch.undo()
    assert store.is_complete("dvae", stage_keys(cfg)["dvae"]) and not store.is_complete("pretokenize", ref.key)


def test_kill_9_of_a_command_takes_its_prefect_server_along_and_the_next_command_ends_its_runs(tmp_path):
    """`dalle train-dvae` with a fresh PREFECT_HOME starts its own Prefect server (not Prefect's unwatched one);
    kill -9 of the command ends that server, and the next command on the store ends the run left RUNNING."""
    import psutil

    from storage import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ov = [f"store.root={tmp_path / 'store'}", f"tracking.uri={uri}", "dvae.train.max_steps=100000"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "dalle.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "dalle"), "train-dvae", "-c", str(TINY), *sum((["--set", o] for o in ov), [])],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cfg, deadline = load_config(TINY, ov), time.monotonic() + 300
        client = tracking._client(uri)
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
            exp = client.get_experiment_by_name(cfg.tracking.experiment)
            if exp and client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and tags.stage = 'dvae'"):
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        assert not [c for c in children if "uvicorn" in " ".join(c.cmdline())], "Prefect started its own server"
        servers = [c for c in children if "cli.prefect_server" in c.cmdline()]
        assert len(servers) == 1
        # a terminal's Ctrl-C goes to its foreground process group: the command's, not its server's
        assert os.getpgid(servers[0].pid) != os.getpgid(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, "the Prefect server outlived its command"

        tracking.experiment_id(uri, cfg.tracking.experiment, cfg.store.open())  # what the next command does first
        runs = client.search_runs([exp.experiment_id])
        assert not [r for r in runs if r.info.status == "RUNNING"]
        killed = {r.data.tags["stage"]: r.data.tags["end_reason"] for r in runs if r.info.status == "KILLED"}
        gone = f"process {proc.pid} on {socket.gethostname()} is gone"
        assert killed == {"pipeline": gone, "dvae": gone}  # a stage command is the pipeline run up to that stage
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
