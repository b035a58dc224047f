import os

import pytest
from mlflow import MlflowClient

import tasks.common
from dalle_core.config import load_config
from flows.train_transformer import train_transformer_flow
from tasks.common import open_store, stage_keys
from tasks.transformer import load_transformer
from tests.conftest import TINY


def _runs(cfg, stage="transformer"):
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle")
    return client, client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'",
                                      order_by=["attributes.start_time ASC"])


def test_trains_on_tokens_and_tracks_everything(store_copy):
    ref = train_transformer_flow(config=str(TINY), overrides=store_copy)
    cfg = load_config(TINY, store_copy)
    store = open_store(cfg)
    m = store.manifest("transformer", ref.key)
    assert m["steps"] == 30 and m["inputs"] == {"tokens": stage_keys(cfg)["tokens"]}
    assert m["metrics"]["val_bits_per_image_token"] < 6.0  # log2(64) = 6 bits is chance
    model = load_transformer(store, ref.key)
    assert model.c.image_vocab == 64 and model.c.text_len == 16 and model.c.image_grid == 8
    client, runs = _runs(cfg)
    run = runs[0]
    for metric in ("loss", "text_loss", "image_loss", "lr", "tokens_per_s", "grad_norm", "val_bits_per_image_token"):
        assert metric in run.data.metrics, metric
    losses = [h.value for h in client.get_metric_history(run.info.run_id, "loss")]
    assert losses[-1] < losses[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step-0000030.png"]
    # Only the transformer stage ran: everything upstream came from the store.
    assert [r.data.tags["stage"] for r in client.search_runs([run.info.experiment_id])] == ["transformer"]
    assert train_transformer_flow(config=str(TINY), overrides=store_copy).cached


def test_killed_training_resumes_from_checkpoint(store_copy, monkeypatch):
    real_save = tasks.common.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated kill")

    monkeypatch.setattr(tasks.common, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_transformer_flow(config=str(TINY), overrides=store_copy)
    monkeypatch.setattr(tasks.common, "save_checkpoint", real_save)
    ref = train_transformer_flow(config=str(TINY), overrides=store_copy)
    cfg = load_config(TINY, store_copy)
    assert open_store(cfg).manifest("transformer", ref.key)["steps"] == 30
    client, runs = _runs(cfg)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert runs[1].data.tags["resumed_from_step"] == "15"
    assert [h.step for h in client.get_metric_history(runs[1].info.run_id, "loss")] == [20, 30]


def test_ddp_through_torchrun_trains_and_only_rank_zero_reports(store_copy):
    """The real launcher: torchrun, gloo, two ranks reading their own shards (the arithmetic of DDP is
    checked exactly in tests/core/test_ddp.py)."""
    steps = ["transformer.train.max_steps=20", "transformer.train.log_every=10"]
    single_key = stage_keys(load_config(TINY, [*store_copy, *steps])).get("transformer")
    ddp = train_transformer_flow(config=str(TINY), overrides=[*store_copy, *steps, "transformer.train.nproc=2"])
    assert ddp.key != single_key  # the world size is part of what a model is
    cfg = load_config(TINY, store_copy)
    store = open_store(cfg)
    m = store.manifest("transformer", ddp.key)
    assert m["world_size"] == 2 and m["steps"] == 20
    client, runs = _runs(cfg)
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"  # rank 0 alone reports
    losses = [h.value for h in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_two_machines_meet_at_the_rendezvous_endpoint(store_copy, tmp_path):
    """transformer.train.nnodes=2: the launch command of each machine (here two on 127.0.0.1) joins one c10d
    rendezvous; together they train one model."""
    import json
    import socket
    import subprocess
    import sys

    from tasks.common import torchrun_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ov = [*store_copy, "transformer.train.max_steps=10", "transformer.train.log_every=5",
          f"runner.rdzv_endpoint=127.0.0.1:{port}", "transformer.train.nnodes=2"]
    cfg = load_config(TINY, ov)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, "transformer"),
           "-m", "tasks.ddp", "transformer", str(cfg_path), "", ""]
    machines = [subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    assert [m.wait(timeout=240) for m in machines] == [0, 0]
    key = stage_keys(cfg)["transformer"]
    assert key != stage_keys(load_config(TINY, ov[:-1]))["transformer"]  # two machines: a different model
    m = open_store(cfg).manifest("transformer", key)
    assert m["world_size"] == 2 and m["steps"] == 10
