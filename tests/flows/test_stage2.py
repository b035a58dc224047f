import pytest
from mlflow import MlflowClient

import tasks.transformer
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
    real_save = tasks.transformer.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated kill")

    monkeypatch.setattr(tasks.transformer, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_transformer_flow(config=str(TINY), overrides=store_copy)
    monkeypatch.setattr(tasks.transformer, "save_checkpoint", real_save)
    ref = train_transformer_flow(config=str(TINY), overrides=store_copy)
    cfg = load_config(TINY, store_copy)
    assert open_store(cfg).manifest("transformer", ref.key)["steps"] == 30
    client, runs = _runs(cfg)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert runs[1].data.tags["resumed_from_step"] == "15"
    assert [h.step for h in client.get_metric_history(runs[1].info.run_id, "loss")] == [20, 30]


def test_two_process_ddp_matches_single_process_trend(store_copy):
    steps = ["transformer.train.max_steps=40", "transformer.train.log_every=20"]
    single = train_transformer_flow(config=str(TINY), overrides=[*store_copy, *steps])
    ddp = train_transformer_flow(config=str(TINY), overrides=[*store_copy, *steps, "transformer.nproc=2"])
    assert single.key != ddp.key
    cfg = load_config(TINY, store_copy)
    store = open_store(cfg)
    assert store.manifest("transformer", ddp.key)["world_size"] == 2
    client, runs = _runs(cfg)
    assert len(runs) == 2  # rank 0 alone reports
    curves = {r.data.params["nproc"]: [h.value for h in client.get_metric_history(r.info.run_id, "loss")]
              for r in runs}
    one, two = curves["1"], curves["2"]
    assert one[-1] < one[0] and two[-1] < two[0]
    assert abs(two[-1] - one[-1]) < 0.25 * one[-1], curves
