import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.schemas.filters import FlowRunFilter

from cli.main import main
from flows.pipeline_flow import pipeline_flow
from pipeline.config import load_config
from pipeline.stage_table import NAMES, downstream, stage_keys
from storage.store import StoreError
from tests.conftest import NO_CUDA, TINY


@pytest.fixture
def generated_copy(generated, tmp_path):
    src, ov, _ = generated
    shutil.copytree(src / "store", tmp_path / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *ov[2:]]


def _children(client, exp, parent):
    return {c.data.tags["stage"]: c for c in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")}


def _duration_s(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def test_rerun_from_cache_and_only_changed_stages_rerun(generated_copy):
    """Re-runs from cache, as Prefect and the MLflow UI show them: parent runs named by what ran, cached stages
    as child runs linked to the run that made the artifact, reused stages named `(cached)` and DAG edges in
    Prefect, stage runs that last as long as their work, validation curves, code version and the headline
    numbers on the parent."""
    from prefect import get_client

    ov = generated_copy
    cfg = load_config(TINY, ov)
    first = pipeline_flow(cfg)
    assert [s for s, r in first.items() if not r.cached] == ["evaluate"]
    state = pipeline_flow(cfg, return_state=True)
    assert all(r.cached for r in state.result().values())
    changed = pipeline_flow(load_config(TINY, [*ov, "transformer.train.max_steps=20"]))
    assert [s for s, r in changed.items() if not r.cached] == ["transformer", "generate", "evaluate"]

    client = MlflowClient(load_config(TINY, ov).tracking.uri)
    exp = client.get_experiment_by_name("dalle")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI view
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'", order_by=["attributes.start_time"])
    assert [p.info.run_name for p in parents] == [
        "pipeline (ran: evaluate)", "pipeline (all cached)", "pipeline (ran: transformer, generate, evaluate)"]
    runs = [_children(client, exp.experiment_id, p.info.run_id) for p in parents]
    assert runs[1]["evaluate"].data.tags["cached"] == "true"
    assert runs[1]["evaluate"].data.tags["source_run_id"] == runs[0]["evaluate"].info.run_id
    assert runs[2]["transformer"].data.tags["cached"] == "false"
    assert runs[2]["ingest"].data.tags["cached"] == "true"
    assert runs[0]["evaluate"].info.run_name == f"evaluate-{first['evaluate'].key}"

    top = parents[0]
    assert top.data.tags["mlflow.source.name"] == str(TINY)
    assert len(top.data.tags["mlflow.source.git.commit"]) == 40 and top.data.tags["git_dirty"] in ("true", "false")
    assert top.data.tags["stages.cached"].startswith("ingest,dvae,bpe")
    assert "splits.seen.r_precision_top1" in top.data.metrics and len(top.data.metrics) <= 10
    arts = {a.path for a in client.list_artifacts(top.info.run_id)}
    assert {"summary.html", "evaluation.json", "contact_sheet.png", "top1_vs_random.png", "config.yaml"} <= arts
    summary = client.download_artifacts(top.info.run_id, "summary.html")
    assert runs[0]["evaluate"].info.run_id[:8] in open(summary).read()

    for stage in ("generate", "evaluate"):  # opened when the work started, not when its results were logged
        run = runs[2][stage]
        metrics = run.data.metrics
        work_s = metrics["images"] / metrics["images_per_s"] if stage == "generate" else \
            metrics["generation.sampled_for_evaluation"] * metrics["generation.candidates"] \
            / metrics["generation.images_per_s"]
        assert _duration_s(run) >= work_s, (stage, _duration_s(run), work_s)
    # evaluation takes the generate stage's candidates for the prompts generate sampled (tiny: 2 of them)
    assert runs[2]["evaluate"].data.metrics["generation.from_generate_stage"] == cfg.generate.num_val_prompts
    history = client.get_metric_history(runs[2]["transformer"].info.run_id, "val_loss")
    assert [m.step for m in history] == [10, 20]  # a curve: every val_every=10 steps

    with get_client(sync_client=True) as prefect:
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
        by_name = {t.name.removesuffix(" (cached)"): t for t in tasks}
        assert set(by_name) == set(NAMES)  # one task run per stage, no nested flow runs
        assert by_name["transformer"].name == "transformer (cached)"  # reuse shows in the run graph
        assert by_name["transformer"].state.name == "Completed"
        stage_of = {t.id: name for name, t in by_name.items()}

        def upstream(name):
            return {stage_of[i.id] for inputs in by_name[name].task_inputs.values() for i in inputs
                    if i.input_type == "task_run"}

        assert upstream("transformer") == {"pretokenize", "dvae"}
        assert upstream("generate") == {"ingest", "dvae", "bpe", "transformer", "clip"}
        assert upstream("pretokenize") == {"ingest", "dvae", "bpe"}


def test_failed_stage_shows_failed_in_mlflow(generated_copy, monkeypatch):
    import tasks.generate

    def broken(cfg, keys=None):
        raise RuntimeError("out of GPU memory (on purpose)")

    monkeypatch.setattr(tasks.generate, "load_pipeline", broken)
    cfg = load_config(TINY, generated_copy)
    with pytest.raises(RuntimeError, match="on purpose"):
        pipeline_flow(cfg, only=["generate"], force=["generate"])
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle").experiment_id
    parent = client.search_runs([exp], "tags.stage = 'pipeline'")[0]
    run = _children(client, exp, parent.info.run_id)["generate"]
    assert (run.info.status, parent.info.status) == ("FAILED", "FAILED")
    assert run.data.tags["error"] == "RuntimeError: out of GPU memory (on purpose)"
    assert parent.info.run_name == "pipeline (failed)"


def test_only_a_stage_with_missing_upstream_fails_in_one_line(store_copy):
    # the store has ingest..pretokenize: the first stage generate reads that is missing is the transformer
    cfg = load_config(TINY, store_copy)
    with pytest.raises(StoreError, match=r"^missing upstream artifact transformer/\w+ in store .*run that stage first$"):
        pipeline_flow(cfg, only=["generate"])
    assert MlflowClient(cfg.tracking.uri).get_experiment_by_name("dalle") is None  # checked before any run opened


def test_force_redoes_a_stage_and_everything_downstream(generated_copy):
    ov = generated_copy
    assert downstream("dvae") == ["dvae", "pretokenize", "transformer", "generate", "evaluate"]
    cfg = load_config(TINY, ov)
    refs = pipeline_flow(cfg, only=["ingest", "dvae", "bpe", "clip"], force=["dvae"])
    assert not refs["dvae"].cached and refs["clip"].cached
    store, keys = cfg.store.open(), stage_keys(cfg)
    assert not store.exists(store.path("pretokenize", keys["pretokenize"]))
    assert not store.exists(store.path("generate", keys["generate"]))
    assert store.is_complete("clip", keys["clip"])


def test_status_and_gc(generated_copy, capsys):
    ov = generated_copy
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
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
    cfg = load_config(config, ov)
    refs = pipeline_flow(cfg)
    assert not any(r.cached for r in refs.values())
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle").experiment_id
    for stage in ("dvae", "transformer", "clip"):
        run = client.search_runs([exp], f"tags.stage = '{stage}'")[0]
        assert run.data.tags["device"] == "cuda:0", stage
    transformer = client.search_runs([exp], "tags.stage = 'transformer'")[0]
    grids = [a.path for a in client.list_artifacts(transformer.info.run_id, "samples")]
    assert "samples/step-0000010.png" in grids  # the grid drawn mid-training, on the GPU
    store, keys = cfg.store.open(), stage_keys(cfg)
    assert store.is_complete("evaluate", keys["evaluate"])


def test_openmoji_subset_end_to_end_at_64_px(tiny, openmoji_subset):
    """Real pictures through a user's path (an imagefolder) at 64 px with 16x16 token grids: the folder's own
    splits reach the image shards, and the evaluation reports its metrics per split; R-precision of the real
    images falls to chance when their captions are shuffled."""
    import io
    import json

    import pyarrow.parquet as pq
    from PIL import Image

    from dalle_core.evaluation import r_precision
    from dalle_core.images import decode_png
    from pipeline.models import load_pipeline
    from storage.parquet import iter_batches, shard_paths
    from tasks.evaluate import format_report
    from tests.core.test_evaluation import statistics_inception

    folder, _, _ = openmoji_subset
    config, make = tiny
    inception = statistics_inception(folder.parent / "inception.pt")
    ov = make("data.source=imagefolder", f"data.path={folder}", "data.image_size=64", "clip.patch_size=8",
              "evaluate.num_prompts=16", "evaluate.train_prompts=8", "clip.train.max_steps=60",
              f"evaluate.inception_weights={inception}")
    cfg = load_config(config, ov)
    pipeline_flow(cfg)
    store, keys = cfg.store.open(), stage_keys(cfg)
    assert store.manifest("pretokenize", keys["pretokenize"])["grid"] == [16, 16]
    with open(folder / "metadata.jsonl") as f:
        subsets = Counter(f"{r['split']}.{r['subset']}" for r in map(json.loads, f))
    assert store.manifest("ingest", keys["ingest"])["subsets"] == dict(subsets)
    table = pq.read_table(store.path("generate", keys["generate"], "generations.parquet"))
    assert {Image.open(io.BytesIO(b)).size for b in table.column("image").to_pylist()} == {(64, 64)}

    report = store.read_json(store.path("evaluate", keys["evaluate"], "evaluation.json"))
    assert "faithfulness" not in report  # no shapes checker for real pictures
    splits = report["splits"]
    assert set(splits) == {"seen", "unseen", "seen-variant"}
    assert splits["seen"]["prompts"] == 8 + splits["seen-variant"]["prompts"]
    for m in splits.values():
        assert {"r_precision_top1", "r_precision_random", "r_precision_real", "dvae_psnr", "dvae_ssim"} <= set(m)
        assert m["dvae_rfid"] > 0 and m["dvae_fd_clip"] > 0 and "fid_top1" in m  # the tokenizer's rFID, per split
    assert splits["seen"]["nn_own_image_top1"] >= 0 and "fd_clip_real_halves" in splits["seen"]
    client = MlflowClient(cfg.tracking.uri)
    logged = client.search_runs([client.get_experiment_by_name("dalle").experiment_id],
                                "tags.stage = 'evaluate'")[0].data.metrics
    for k in ("nn_pixel_own_top1", "nn_pixel_own_random", "dvae_rfid"):  # json, table and MLflow
        assert k == "dvae_rfid" or 0 <= splits["seen"][k] <= 1 and k not in splits["unseen"]
        assert k in format_report(report) and logged[f"splits.seen.{k}"] == splits["seen"][k]

    scorer = load_pipeline(cfg).reranker
    captions, images = [], []
    for split in ("train", "val"):
        for batch in iter_batches(store, shard_paths(store, "ingest", keys["ingest"], split), ["caption", "image"]):
            captions += batch.column("caption").to_pylist()
            images += [decode_png(b) for b in batch.column("image").to_pylist()]
    pool = list(dict.fromkeys(captions))
    text = scorer.embed_texts(pool).cpu()
    emb = scorer.embed_images(np.stack(images)).cpu()
    truth = [pool.index(c) for c in captions]
    true_hit, chance = r_precision(emb, text, truth, distractors=99)
    shuffled = [truth[i] for i in np.random.default_rng(0).permutation(len(truth))]
    shuffled_hit, _ = r_precision(emb, text, shuffled, distractors=99)
    assert shuffled_hit < chance + 0.1 < true_hit
