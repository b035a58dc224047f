"""Fine-tuning (issue 31, part 2): `<stage>.init_from` an exported folder or a store artifact, its content digest in
the stage key, the compatibility checks before any work, `train.freeze`, and `tokenizers_from`.

Every run here starts from the shared tiny `generated` store and its export (read-only) and trains a few steps."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from cli.main import main
from dalle_core.errors import ConfigError
from dalle_core.images import decode_png, to_tensor
from pipeline.config import load_config
from pipeline.stage_table import stage_keys
from pipeline.training import batch_stream
from storage.parquet import read_shard, shard_paths
from tests.conftest import TINY, run_stage
from tests.flows.exported_model import exported_folder

EMBEDDINGS = ("text_emb.", "text_pos.", "image_emb.", "row_emb.", "col_emb.")  # DALLE's, spelled out apart


@pytest.fixture(scope="module")
def source(generated):
    """(the generated store's folder, its overrides, its exported model folder): the model every test starts from."""
    tmp, ov, _ = generated
    return tmp, list(ov), exported_folder(str(tmp), tuple(ov))


def _source_transformer(source) -> tuple[str, Path]:
    """(key, artifact folder) of the transformer the source run trained."""
    tmp, ov, _ = source
    key = stage_keys(load_config(TINY, ov))["transformer"]
    return key, tmp / "store" / "transformer" / key


def _tracked(tmp_path: Path, source) -> list[str]:
    """Overrides for a copy of the source run's MLflow database, with an experiment of its own (so the source's
    runs are in the same tracking store, and nothing is written beside the shared store)."""
    shutil.copy(source[0] / "mlflow.db", tmp_path / "mlflow.db")
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=finetune"]


def _run(uri: str, stage: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("finetune")
    runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}' and tags.cached = 'false'")
    assert len(runs) == 1
    return client, runs[0]


def _val_loss(cfg, model) -> float:
    """The val loss of `model` on the run's token shards, computed here as the stage's validation does."""
    from dalle_core.loader import IN_ORDER, decode_tokens
    from dalle_core.transformer import evaluate_transformer

    store, keys = cfg.store.open(), stage_keys(cfg)
    batches = batch_stream(cfg, store, shard_paths(store, "pretokenize", keys["pretokenize"], "val"),
                           ["text_tokens", "image_tokens"], decode_tokens, 256, torch.device("cpu"), IN_ORDER)
    return evaluate_transformer(model, batches)["val_loss"]


# ------------------------------------------------------------ keys


def test_the_key_holds_the_sources_content_not_its_path(source, tmp_path):
    tmp, ov, folder = source
    base = [f"store.root={tmp / 'store'}"]  # read only: keys read the sources, nothing is written

    def key(*extra):
        return stage_keys(load_config(TINY, [*base, *extra]))["transformer"]

    shutil.copytree(folder, tmp_path / "a")
    first = key(f"transformer.init_from={tmp_path / 'a'}")
    (tmp_path / "a").rename(tmp_path / "moved")
    assert key(f"transformer.init_from={tmp_path / 'moved'}") == first
    src_key, artifact = _source_transformer(source)
    # the same weights in the store (a folder path, or <stage>/<key> in the run's store) are the same source
    assert key(f"transformer.init_from={artifact}") == first
    assert key(f"transformer.init_from=transformer/{src_key}") == first
    assert key() != first
    shutil.copytree(tmp_path / "moved", tmp_path / "changed")
    weights = tmp_path / "changed" / "transformer" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    _rechecksum(tmp_path / "changed", "transformer/model.safetensors")
    changed = key(f"transformer.init_from={tmp_path / 'changed'}")
    shutil.copytree(tmp_path / "changed", tmp_path / "changed-copy")
    assert changed != first and key(f"transformer.init_from={tmp_path / 'changed-copy'}") == changed
    clip = stage_keys(load_config(TINY, [*base, f"clip.init_from={tmp_path / 'moved'}"]))["clip"]
    assert clip == stage_keys(load_config(TINY, [*base, f"clip.init_from={tmp_path / 'changed'}"]))["clip"]


# ------------------------------------------------------------ checks before any work


@pytest.mark.parametrize("override, line", [
    ("transformer.dim=32", "dim 64 there, 32 here (transformer.dim)"),
    ("transformer.depth=3", "depth 2 there, 3 here (transformer.depth)"),
    ("transformer.heads=2", "heads 4 there, 2 here (transformer.heads)"),
    ("text.text_len=12", "text_len 16 there, 12 here (text.text_len)"),
    ("dvae.codebook_size=32", "image_vocab 64 there, 32 here (dvae.codebook_size)"),
    ("dvae.num_downsamples=1", "image_grid 8 there, 16 here (data.image_size / 2**dvae.num_downsamples)"),
])
def test_each_mismatch_is_one_line_before_any_work(source, tiny, override, line, capsys):
    config, make = tiny
    ov = make(f"transformer.init_from={source[2]}", override)
    assert main(["run", "-c", config, *sum((["--set", o] for o in ov), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: transformer.init_from '{source[2]}' does not fit this run: ") and line in err
    assert len(err.splitlines()) == 1 and err.count(" there, ") == 1
    store = (load_config(config, ov)).store.open()
    assert not [s for s in store.listdir(store.root) if not s.startswith(".")]  # nothing ingested or trained


def _rechecksum(folder: Path, name: str) -> None:
    """Record `name`'s new sha256 in the export's model_index.json, as an export of that content would."""
    index = json.loads((folder / "model_index.json").read_text())
    index["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()[:16]
    (folder / "model_index.json").write_text(json.dumps(index))


def _damaged_copy(folder: str, tmp_path: Path, how: str) -> Path:
    """A copy of the export with one file damaged: `zeroed` weights (the size kept), `truncated` weights, or a
    `config` that is not JSON."""
    copy = tmp_path / how
    shutil.copytree(folder, copy)
    weights, config = copy / "transformer" / "model.safetensors", copy / "transformer" / "config.json"
    if how == "zeroed":
        data = bytearray(weights.read_bytes())
        data[-100:] = bytes(100)
        weights.write_bytes(bytes(data))
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        config.write_text("{bad json")
    return copy


@pytest.mark.parametrize("how, line", [
    ("zeroed", "transformer/model.safetensors is damaged"),
    ("truncated", "transformer/model.safetensors is damaged"),
    ("config", "transformer/config.json is damaged"),
])
def test_a_damaged_source_is_one_line_before_any_work(source, tiny, tmp_path, how, line, capsys):
    config, make = tiny
    ov = make(f"transformer.init_from={_damaged_copy(source[2], tmp_path, how)}")
    assert main(["run", "-c", config, *sum((["--set", o] for o in ov), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: transformer.init_from ") and line in err and len(err.splitlines()) == 1, err
    store = (load_config(config, ov)).store.open()
    assert not [s for s in store.listdir(store.root) if not s.startswith(".")]  # nothing ingested or trained


def test_tokenizers_from_takes_an_exported_folder_only(source, tiny, capsys):
    config, make = tiny
    dvae_key = stage_keys(load_config(TINY, source[1]))["dvae"]
    ov = make(f"tokenizers_from=dvae/{dvae_key}")
    assert main(["run", "-c", config, *sum((["--set", o] for o in ov), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: tokenizers_from 'dvae/{dvae_key}' is not an exported model folder (with "
                   "model_index.json) or a registered model (models:/NAME/VERSION or models:/NAME@ALIAS)"), err


def test_init_from_without_tokenizers_from_never_changes_what_an_id_means(source, tiny, store_copy, capsys):
    """init_from an export on new data without tokenizers_from: the run would train its own BPE and dVAE, of the
    same sizes, whose ids mean other things to the loaded weights. Refused before any work, in one line that
    says to set tokenizers_from; with it, or where this run's tokenizers are the source's own, it goes on."""
    from pipeline.source_fit import check_fine_tuning

    config, make = tiny
    refused = Path(store_copy[0].split("=", 1)[1]).parent / "refused"  # a store of its own, beside store_copy's
    ov = make(f"transformer.init_from={source[2]}", "data.shapes.seed=7", f"store.root={refused}")
    assert main(["run", "-c", config, *sum((["--set", o] for o in ov), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: transformer.init_from '{source[2]}' does not fit")
    assert "BPE (its text ids)" in err and "dVAE (its image codes)" in err and "set tokenizers_from" in err
    store = load_config(config, ov).store.open()
    assert not [s for s in store.listdir(store.root) if not s.startswith(".")]  # nothing ingested or trained
    clip = make(f"clip.init_from={source[2]}", "data.shapes.seed=7")
    with pytest.raises(ConfigError, match="clip.init_from .* BPE \\(its text ids\\)"):
        check_fine_tuning(load_config(config, clip))
    check_fine_tuning(load_config(config, [*ov, f"tokenizers_from={source[2]}"]))
    check_fine_tuning(load_config(TINY, [*store_copy, f"transformer.init_from={source[2]}"]))  # the same tokenizers


def test_tokenizers_from_and_init_from_must_agree(source, tiny, tmp_path, capsys):
    config, make = tiny
    other = tmp_path / "other"
    shutil.copytree(source[2], other)
    meta = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(json.dumps({**meta, "text_vocab": meta["text_vocab"] + 7}))
    _rechecksum(other, "transformer/config.json")  # another model's export, not a damaged copy
    ov = make(f"tokenizers_from={source[2]}", f"transformer.init_from={other}")
    assert main(["run", "-c", config, *sum((["--set", o] for o in ov), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (f"text_vocab {meta['text_vocab'] + 7} there, {meta['text_vocab']} here (tokenizers_from's tokenizer)"
            in err)
    ov = make(f"tokenizers_from={source[2]}", "text.text_len=20")
    assert main(["run", "-c", config, *sum((["--set", o] for o in ov), [])]) == 2
    assert "tokenizers_from" in (err := capsys.readouterr().err) and "text_len 16 there, 20 here (text.text_len)" in err
    # inside the stage, the shards' own vocabularies are what the source must fit
    from pipeline.source_fit import check_fine_tuning

    tmp, gov, _ = source
    cfg = load_config(TINY, [*gov, f"transformer.init_from={other}", f"store.root={tmp / 'store'}"])
    with pytest.raises(ConfigError, match=rf"text_vocab {meta['text_vocab'] + 7} there, {meta['text_vocab']} here "
                                          rf"\(the shards pretokenize/{stage_keys(cfg)['pretokenize']}\)"):
        check_fine_tuning(cfg, ["transformer"])
    for spec, says in (("no/such/folder", "is not an exported model folder"),
                       ("dvae/" + stage_keys(cfg)["dvae"], "is a dvae artifact; give a transformer one")):
        with pytest.raises(ConfigError, match=f"transformer.init_from '{spec}' {says}"):
            check_fine_tuning(load_config(TINY, [*gov, f"transformer.init_from={spec}",
                                                 f"store.root={tmp / 'store'}"]), ["transformer"])


def test_freeze_names_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"^transformer.train.freeze: 'blocks.0-9' names blocks 0 to 9 but the model "
                                          r"has 2 \(blocks.0 to blocks.1\); allowed: embeddings, head, blocks.N or "
                                          r"blocks.A-B with 0 <= A <= B <= 1$"):
        load_config(TINY, ["transformer.train.freeze=[embeddings, blocks.0-9]"])
    with pytest.raises(ConfigError, match="'attention' is not a part of the model"):
        load_config(TINY, ["transformer.train.freeze=[attention]"])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        load_config(TINY, ["transformer.train.freeze=[embeddings, blocks.0-1, head]"])
    with pytest.raises(ConfigError, match="the dVAE trains whole"):
        load_config(TINY, ["dvae.train.freeze=[head]"])
    with pytest.raises(ConfigError, match="clip.train.freeze: 'blocks.1'"):  # tiny's CLIP towers have one block
        load_config(TINY, ["clip.train.freeze=[blocks.1]"])


# ------------------------------------------------------------ training from a source


def test_clip_and_dvae_start_from_the_sources_weights(source, tiny):
    from dalle_core.clip import build_clip
    from dalle_core.dvae import DiscreteVAE
    from pipeline.fine_tuning import start_model

    config, make = tiny
    folder = source[2]
    cfg = load_config(config, make(f"clip.init_from={folder}", f"dvae.init_from={folder}",
                                   "clip.train.freeze=[embeddings]"))
    store = cfg.store.open()
    meta = json.loads((folder / "clip" / "config.json").read_text())["model"]
    clip = build_clip(cfg.clip.clip_config(cfg.data.image_size, meta["text_vocab"], meta["text_len"], meta["pad_id"]))
    start = start_model(cfg, "clip", clip, store)
    want = load_file(folder / "clip" / "model.safetensors")
    assert all(torch.equal(p, want[n]) for n, p in clip.state_dict().items())
    frozen = {n for n, p in clip.named_parameters() if not p.requires_grad}
    assert frozen == {"token_embedding.weight", "positional_embedding", "visual.conv1.weight",
                      "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                      "visual.ln_pre.bias"}
    assert start.trainable == sum(p.numel() for n, p in clip.named_parameters() if n not in frozen)
    dvae = DiscreteVAE(cfg.dvae.dvae_config(cfg.data.image_size))
    start_model(cfg, "dvae", dvae, store)
    want = load_file(folder / "dvae" / "model.safetensors")
    assert all(torch.equal(t, want[n]) for n, t in dvae.state_dict().items())


def test_fine_tune_from_an_export_starts_at_its_weights_and_links_its_run(source, store_copy, tmp_path):
    from dalle_core.generate import DALLEPipeline
    from pipeline.model_source import model_source

    _, _, folder = source
    tracked = _tracked(tmp_path, source)
    ov = [*store_copy, *tracked, f"transformer.init_from={folder}", "transformer.train.max_steps=3",
          "transformer.train.warmup_steps=1"]
    ref = run_stage("transformer", ov)
    cfg = load_config(TINY, ov)
    client, run = _run(cfg.tracking.uri, "transformer")
    # step 0 is the source itself: its val loss on these shards, computed here from the exported folder
    at_start = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "val_loss")}[0]
    assert at_start == pytest.approx(_val_loss(cfg, DALLEPipeline.from_pretrained(folder, device="cpu").transformer), abs=1e-6)
    digest = model_source(str(folder), "transformer", None, "").digest
    src_runs = MlflowClient(cfg.tracking.uri).search_runs(
        [MlflowClient(cfg.tracking.uri).get_experiment_by_name("dalle").experiment_id],
        f"tags.stage = 'transformer' and tags.stage_key = '{_source_transformer(source)[0]}' and tags.cached = 'false'")
    assert len(src_runs) == 1
    tags = run.data.tags
    assert tags["init_from"] == str(folder) and tags["init_from.digest"] == digest
    assert tags["init_from.run_id"] == src_runs[0].info.run_id and src_runs[0].info.run_id in tags["init_from.run_url"]
    manifest = cfg.store.open().require("transformer", ref.key)
    assert manifest["init_from"]["digest"] == digest and manifest["init_from"]["run_id"] == src_runs[0].info.run_id
    assert manifest["init_from"]["kind"] == "export"


def test_freeze_keeps_frozen_weights_and_trains_the_rest(source, store_copy, tmp_path):
    from pipeline.models import load_transformer

    src_key, artifact = _source_transformer(source)
    ov = [*store_copy, f"transformer.init_from={artifact}", "transformer.train.freeze=[embeddings, blocks.0]",
          "transformer.train.max_steps=3", "transformer.train.warmup_steps=1"]
    ref = run_stage("transformer", ov)
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
    before = load_transformer((load_config(TINY, [f"store.root={source[0] / 'store'}"])).store.open(), src_key)
    after = load_transformer(store, ref.key)
    frozen = EMBEDDINGS + ("blocks.0.",)
    want_trainable = 0
    src = dict(before.named_parameters())
    for name, p in after.named_parameters():
        if name.startswith(frozen):
            assert torch.equal(p, src[name]), f"{name} changed though frozen"
        else:
            assert not torch.equal(p, src[name]), f"{name} did not train"
            want_trainable += p.numel()
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("dalle").experiment_id],
                             "tags.stage = 'transformer' and tags.cached = 'false'")[0]
    assert run.data.params["trainable_params"] == str(want_trainable)
    assert store.require("transformer", ref.key)["trainable_params"] == want_trainable
    at_start = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "val_loss")}[0]
    assert at_start == pytest.approx(_val_loss(cfg, before), abs=1e-6)
    assert run.data.tags["init_from.kind"] == "store"
    assert run.data.tags["init_from.run_id"] == "not in this tracking store"  # store_copy has a fresh database


# ------------------------------------------------------------ tokenizers_from


def _imagefolder(path: Path, n: int = 48) -> None:
    """A new captioned imagefolder of shapes drawn with another seed."""
    from PIL import Image

    from data_sources.shapes import generate

    path.mkdir()
    rows = []
    for i, (_, _, caption, image) in enumerate(generate(n, 32, seed=9, val_fraction=0.25)):
        Image.fromarray(image).save(path / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "caption": caption})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_tokenizers_from_encodes_new_data_with_the_exported_tokenizers(source, tiny, tmp_path):
    from dalle_core.bpe import TextTokenizer
    from dalle_core.model_folder import build_dvae
    from pipeline.source_fit import check_fine_tuning

    config, make = tiny
    folder = source[2]
    _imagefolder(tmp_path / "new")
    ov = make("data.source=imagefolder", f"data.path={tmp_path / 'new'}", f"tokenizers_from={folder}")
    ref = run_stage("pretokenize", ov, config)
    cfg = load_config(config, ov)
    store, keys = cfg.store.open(), stage_keys(cfg)
    # the dVAE and the BPE are the export's files, not trained: no steps, no training curve
    assert store.read_bytes(store.path("dvae", keys["dvae"], "model.safetensors")) == \
        (folder / "dvae" / "model.safetensors").read_bytes()
    assert store.read_bytes(store.path("bpe", keys["bpe"], "tokenizer.json")) == \
        (folder / "tokenizer" / "tokenizer.json").read_bytes()
    assert store.require("dvae", keys["dvae"])["steps"] == 0
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle").experiment_id
    for stage in ("dvae", "bpe"):
        (run,) = client.search_runs([exp], f"tags.stage = '{stage}'")
        assert run.data.tags["tokenizers_from"] == str(folder) and not run.data.metrics
    # every token is what the exported tokenizers make of the new images and captions
    meta = json.loads((folder / "dvae" / "config.json").read_text())
    dvae = build_dvae(meta)
    dvae.load_state_dict(load_file(folder / "dvae" / "model.safetensors"))
    dvae = dvae.to(memory_format=torch.channels_last).eval()  # the layout the stage encodes in
    tokenizer = TextTokenizer.from_str((folder / "tokenizer" / "tokenizer.json").read_text(), cfg.text.text_len)
    rows = 0
    for split in ("train", "val"):
        for images_path, tokens_path in zip(shard_paths(store, "ingest", keys["ingest"], split),
                                            shard_paths(store, "pretokenize", ref.key, split), strict=True):
            images, tokens = read_shard(store, images_path), read_shard(store, tokens_path)
            pixels = torch.from_numpy(np.stack([decode_png(b) for b in images.column("image").to_pylist()]))
            with torch.inference_mode():
                codes = dvae.encode(to_tensor(pixels, meta["norm"]["mean"], meta["norm"]["std"])).flatten(1)
            assert np.array_equal(np.stack(tokens.column("image_tokens").to_numpy(zero_copy_only=False)),
                                  codes.numpy())
            text, _ = tokenizer.encode(images.column("caption").to_pylist())
            assert [list(t) for t in text] == tokens.column("text_tokens").to_pylist()
            rows += tokens.num_rows
    assert rows == 48
    check_fine_tuning(load_config(config, [*ov, f"transformer.init_from={folder}"]))  # the source's transformer fits


def test_shapes_colours_keep_a_colour_out_of_every_image_and_caption():
    from data_sources.shapes import COLOURS, generate

    kept = [c for c in COLOURS if c != "purple"]
    for _, _, caption, image in generate(300, 32, seed=3, two_object_fraction=0.5, colours=kept):
        assert "purple" not in caption and not (image == COLOURS["purple"]).all(-1).any()
    assert any("purple" in c for _, _, c, _ in generate(100, 32, seed=3))  # without the option it is drawn
    with pytest.raises(ConfigError, match="data.shapes.colours: 'pink' is not a colour"):
        load_config(TINY, ["data.shapes.colours=[red, pink]"])
