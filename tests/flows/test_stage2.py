import json
import os

import pytest
from mlflow import MlflowClient

import pipeline.training
from pipeline.artifacts import stored
from pipeline.config import load_config
from pipeline.models import load_transformer
from pipeline.stage_table import stage_keys
from tests.conftest import TINY, run_stage


def _runs(cfg, stage="transformer"):
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle")
    return client, client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'",
                                      order_by=["attributes.start_time ASC"])


def test_trains_on_tokens_and_tracks_everything(store_copy, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    ref = run_stage("transformer", store_copy)
    cfg = load_config(TINY, store_copy)
    store = cfg.store.open()
    m = store.manifest("transformer", ref.key)
    assert m["steps"] == 30 and m["inputs"] == {"pretokenize": stage_keys(cfg)["pretokenize"]}
    assert m["metrics"]["val_bits_per_image_token"] < 6.0  # log2(64) = 6 bits is chance
    model = load_transformer(store, ref.key)
    assert model.c.image_vocab == 64 and model.c.text_len == 16 and model.c.image_grid == 8
    client, runs = _runs(cfg)
    run = runs[0]
    for metric in ("loss", "text_loss", "image_loss", "lr", "tokens_per_s", "grad_norm", "val_bits_per_image_token"):
        assert metric in run.data.metrics, metric
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's system metrics, while it trained
    [data] = run.inputs.dataset_inputs  # the ingested data set it trained on, by the ingest artifact's key
    assert (data.dataset.name, data.dataset.digest) == ("shapes", stage_keys(cfg)["ingest"])
    assert json.loads(data.dataset.profile)["rows"] == store.manifest("ingest", stage_keys(cfg)["ingest"])["rows"]
    assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
    losses = [h.value for h in client.get_metric_history(run.info.run_id, "loss")]
    assert losses[-1] < losses[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/step-0000030.png"]
    # Only the transformer stage ran: everything upstream came from the store.
    ran = client.search_runs([run.info.experiment_id], "tags.cached = 'false' and tags.stage != 'pipeline'")
    assert [r.data.tags["stage"] for r in ran] == ["transformer"]
    reused = client.search_runs([run.info.experiment_id], "tags.cached = 'true'")
    assert sorted(r.data.tags["stage"] for r in reused) == ["bpe", "dvae", "ingest", "pretokenize"]
    assert run_stage("transformer", store_copy).cached
    # how far it got, in the manifest, as MLflow metrics and as one line
    rows = store.manifest("pretokenize", stage_keys(cfg)["pretokenize"])["rows"]["train"]
    far = m["how_far"]
    assert (far["steps"], far["max_steps"], far["stopped_by"]) == (30, 30, "max_steps")
    assert far["epochs"] == pytest.approx(30 * 16 / rows) and far["loss_change_last_tenth"] is not None
    assert run.data.metrics["budget_share"] == 1.0 and run.data.metrics["epochs"] == pytest.approx(far["epochs"])
    assert run.data.tags["how_far"].startswith("ran 30 of 30 steps (100%); ") and "epochs; loss " in run.data.tags["how_far"]


def test_a_stage_the_clock_cuts_short_says_so_with_the_setting_to_raise(store_copy):
    ref = run_stage("transformer", [*store_copy, "transformer.train.max_minutes=0.0005"])  # 30 ms of training
    cfg = load_config(TINY, [*store_copy, "transformer.train.max_minutes=0.0005"])
    far = cfg.store.open().manifest("transformer", ref.key)["how_far"]
    assert far["stopped_by"] == "max_minutes" and far["steps"] < 30
    _, runs = _runs(cfg)
    assert f"ran {far['steps']} of 30 steps" in runs[0].data.tags["how_far"]
    assert "cut short by the clock: raise transformer.train.max_minutes (now 0.0005)" in runs[0].data.tags["how_far"]
    from dalle_core.evaluation import format_report

    text = format_report({"training": {"transformer": far}})
    assert f"NOTE: transformer was cut short by the clock at {far['steps']} of 30 steps" in text


def test_killed_training_resumes_from_checkpoint(store_copy, monkeypatch):
    real_save = pipeline.training.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated kill")

    monkeypatch.setattr(pipeline.training, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_stage("transformer", store_copy)
    monkeypatch.setattr(pipeline.training, "save_checkpoint", real_save)
    ref = run_stage("transformer", store_copy)
    cfg = load_config(TINY, store_copy)
    assert cfg.store.open().manifest("transformer", ref.key)["steps"] == 30
    client, runs = _runs(cfg)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert runs[1].data.tags["resumed_from_step"] == "15"
    assert [h.step for h in client.get_metric_history(runs[1].info.run_id, "loss")] == [20, 30]


def test_ddp_through_torchrun_trains_and_only_rank_zero_reports(store_copy):
    """The real launcher: torchrun, gloo, two ranks reading their own shards (the arithmetic of DDP is
    checked exactly in tests/core/test_ddp.py)."""
    steps = ["transformer.train.max_steps=20", "transformer.train.log_every=10"]
    single_key = stage_keys(load_config(TINY, [*store_copy, *steps])).get("transformer")
    ddp = run_stage("transformer", [*store_copy, *steps, "transformer.train.nproc=2"])
    assert ddp.key != single_key  # the world size is part of what a model is
    cfg = load_config(TINY, store_copy)
    store = cfg.store.open()
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

    from pipeline.torchrun import torchrun_args

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ov = [*store_copy, "transformer.train.max_steps=10", "transformer.train.log_every=5",
          f"runner.rdzv_endpoint=127.0.0.1:{port}", "transformer.train.nnodes=2"]
    cfg = load_config(TINY, ov)
    keys = stage_keys(cfg)
    inputs = {s: stored(cfg, s, keys[s]).__dict__ for s in ("pretokenize", "dvae")}
    spec = tmp_path / "stage.json"  # what `train_stage` writes for torchrun on each machine
    spec.write_text(json.dumps({"trainer": "tasks.transformer:TransformerTrainer", "config": cfg.model_dump(mode="json"), "inputs": inputs,
                                "parent_run": None, "flow_run": None}))
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(cfg, "transformer"),
           "-m", "pipeline.ddp", str(spec)]
    machines = [subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    assert [m.wait(timeout=240) for m in machines] == [0, 0]
    key = keys["transformer"]
    assert key != stage_keys(load_config(TINY, ov[:-1]))["transformer"]  # two machines: a different model
    m = cfg.store.open().manifest("transformer", key)
    assert m["world_size"] == 2 and m["steps"] == 10


def test_a_rank_s_error_comes_back_in_one_line_with_the_ranks_output_in_a_file(store_copy):
    """A diverging DDP run raises the rank's TrainingError itself (the CLI's one-line error class), naming the file
    that holds every rank's output with the traceback."""
    from dalle_core.train import TrainingError
    from pipeline.torchrun import launch_ranks
    from tasks.transformer import TransformerTrainer

    cfg = load_config(TINY, [*store_copy, "transformer.train.nproc=2", "transformer.train.lr=1e12",
                             "transformer.train.warmup_steps=0"])
    keys = stage_keys(cfg)
    with pytest.raises(TrainingError, match=r"^training diverged.*\(every rank's output: (.*)\)$") as caught:
        launch_ranks(cfg, TransformerTrainer, {s: stored(cfg, s, keys[s]) for s in ("pretokenize", "dvae")})
    output = caught.value.args[0].rpartition("every rank's output: ")[2].rstrip(")")
    with open(output) as f:
        assert "Traceback (most recent call last)" in f.read()
    assert "\n" not in str(caught.value)
