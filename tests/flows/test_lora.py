"""LoRA fine-tuning (issue 42, item 1): `transformer.train.lora` trains adapters on a frozen `init_from` base, the
stage saves the adapter alone keyed to its base's digest, an export carries base and adapter, every way in loads
them (fused on request), and an adapter never lands on another base silently.

One LoRA run on the shared tiny `generated` store's export, made once for the module."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from cli.main import main
from dalle_core.errors import ConfigError, UserError
from dalle_core.generate import DALLEPipeline
from dalle_core.lora import base_state, fuse, has_lora
from pipeline.config import load_config
from pipeline.model_source import model_source
from pipeline.models import load_transformer
from pipeline.stage_table import stage_keys
from tests.conftest import TINY, run_stage
from tests.flows.exported_model import exported_folder

LORA = ["transformer.train.lora={rank: 4, alpha: 8, targets: [attn.qkv, mlp.fc, text_emb]}",
        "transformer.train.max_steps=8", "transformer.train.warmup_steps=1", "transformer.train.lr=1.0e-2"]


@pytest.fixture(scope="module")
def lora(generated, tmp_path_factory):
    """(overrides of the LoRA run, its transformer key, its base export folder (a copy), the LoRA export folder)."""
    tmp, ov, _ = generated
    home = tmp_path_factory.mktemp("lora")
    base = home / "base"
    shutil.copytree(exported_folder(str(tmp), tuple(ov)), base)
    shutil.copytree(tmp / "store", home / "store", ignore=shutil.ignore_patterns("transformer", "generate"))
    ov = [f"store.root={home / 'store'}", f"tracking.uri=sqlite:///{home / 'mlflow.db'}",
          "clip.train.max_steps=60", "clip.train.checkpoint_every=30", f"transformer.init_from={base}", *LORA]
    ref = run_stage("transformer", ov)
    ov_args = sum((["--set", o] for o in ov), [])
    assert main(["export", "-c", str(TINY), *ov_args, "--out", str(home / "exported")]) == 0
    return ov, ref.key, base, home / "exported"


def _batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Four random (text, image) sequences of `model`'s shape."""
    c, rng = model.c, torch.Generator().manual_seed(0)
    return (torch.randint(0, c.text_vocab, (4, c.text_len), generator=rng),
            torch.randint(0, c.image_vocab, (4, c.image_len), generator=rng))


def _loss(model, batch) -> float:
    with torch.no_grad():
        return model.eval()(*batch)[0].item()


def test_only_the_adapter_trains_and_the_artifact_holds_it_alone(lora):
    ov, key, base, _ = lora
    cfg = load_config(TINY, ov)
    store = cfg.store.open()
    folder = Path(store.path("transformer", key))
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= names
    assert "model.safetensors" not in names  # the base is not saved again
    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (base / "transformer" / "model.safetensors").stat().st_size / 5

    model = load_transformer(store, key)
    assert has_lora(model)
    source = load_file(str(base / "transformer" / "model.safetensors"))
    kept = base_state(model)
    assert set(kept) == set(source)
    assert all(torch.equal(kept[k], source[k]) for k in source), "a base weight changed under LoRA"
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0] for k in adapter} == {
        "text_emb", *(f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc"))}
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k or "embedding_B" in k)

    manifest = store.require("transformer", key)
    want = sum(v.numel() for v in adapter.values())
    assert manifest["trainable_params"] == want and manifest["lora"]["rank"] == 4
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base"]["digest"] == model_source(str(base), "transformer", None, "").digest
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("dalle").experiment_id],
                             "tags.stage = 'transformer' and tags.cached = 'false'")[0]
    assert run.data.params["trainable_params"] == str(want)


def test_the_export_carries_base_and_adapter_and_every_way_in_loads_them(lora, tmp_path):
    ov, key, base, exported = lora
    assert (exported / "transformer" / "model.safetensors").read_bytes() == \
        (base / "transformer" / "model.safetensors").read_bytes()  # the base as it was
    pipe = DALLEPipeline.from_pretrained(exported, device="cpu")
    batch = _batch(pipe.transformer)
    plain = DALLEPipeline.from_pretrained(base, device="cpu")
    stored = load_transformer(load_config(TINY, ov).store.open(), key)
    assert has_lora(pipe.transformer)
    tuned, before = _loss(pipe.transformer, batch), _loss(plain.transformer, batch)
    assert abs(tuned - before) > 1e-4, "the adapter changed nothing"
    assert _loss(stored, batch) == pytest.approx(tuned, abs=1e-6)

    drawn = pipe(["a red circle"], num_candidates=3, seed=5).image_tokens[0]
    pipe.fuse_lora()
    assert not has_lora(pipe.transformer)
    assert _loss(pipe.transformer, batch) == pytest.approx(tuned, abs=1e-5)  # merged: the same model
    assert torch.equal(torch.as_tensor(pipe(["a red circle"], num_candidates=3, seed=5).image_tokens[0]),
                       torch.as_tensor(drawn))

    # save_pretrained keeps the adapter apart while unfused, and writes merged weights once fused
    again = DALLEPipeline.from_pretrained(exported, device="cpu")
    again.save_pretrained(tmp_path / "unfused")
    assert (tmp_path / "unfused" / "transformer" / "adapter_model.safetensors").is_file()
    assert _loss(DALLEPipeline.from_pretrained(tmp_path / "unfused", device="cpu").transformer, batch) == \
        pytest.approx(tuned, abs=1e-6)
    pipe.save_pretrained(tmp_path / "fused")
    assert not (tmp_path / "fused" / "transformer" / "adapter_model.safetensors").exists()
    assert _loss(DALLEPipeline.from_pretrained(tmp_path / "fused", device="cpu").transformer, batch) == \
        pytest.approx(tuned, abs=1e-5)

    out = tmp_path / "out"
    assert main(["generate", "--model", str(exported), "--fuse-lora", "a red circle", "--out", str(out),
                 "--set", "generate.num_candidates=2"]) == 0
    assert (out / "generations.parquet").is_file()


def _other_base(exported: Path, tmp_path: Path) -> Path:
    """A copy of the LoRA export whose base weights differ in one value, its checksum recorded as an export's."""
    import hashlib

    copy = tmp_path / "other-base"
    shutil.copytree(exported, copy)
    weights = copy / "transformer" / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    from safetensors.torch import save_file

    save_file(state, str(weights))
    index = json.loads((copy / "model_index.json").read_text())
    index["sha256"]["transformer/model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def test_an_adapter_on_another_base_is_one_line(lora, tmp_path, capsys):
    _, _, _, exported = lora
    other = _other_base(exported, tmp_path)
    with pytest.raises(UserError, match=r"^'.*/other-base/transformer' does not load into its transformer: the adapter "
                                        r"was trained on the base with content digest [0-9a-f]{16}, and this base is "
                                        r"[0-9a-f]{16}; load it on its own base$"):
        DALLEPipeline.from_pretrained(other, device="cpu")
    assert main(["generate", "--model", str(other), "a red circle", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the adapter was trained on the base with content digest" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out" / "generations.parquet").exists()


def test_a_stored_adapter_whose_base_moved_is_one_line(lora):
    ov, key, base, _ = lora
    store = load_config(TINY, ov).store.open()
    moved = base.with_name("base-moved")
    base.rename(moved)
    try:
        with pytest.raises(ConfigError, match=rf"^transformer/{key} is a LoRA adapter on '{re.escape(str(base))}' "
                                              r"\(digest [0-9a-f]{16}\), which cannot be read now: .*; put the base "
                                              r"back, or set transformer.init_from to where it is now$"):
            load_transformer(store, key)
        # the config's init_from, moved with the base (the same content, so the same key): read from there
        here = [o for o in ov if not o.startswith("transformer.init_from=")] + [f"transformer.init_from={moved}"]
        assert has_lora(load_transformer(store, key, cfg=load_config(TINY, here)))
    finally:
        moved.rename(base)


def test_what_lora_cannot_start_from_is_one_line_before_any_work(lora, capsys):
    ov, key, _, exported = lora
    store = load_config(TINY, ov).store.open()
    before = sorted((Path(store.root) / "transformer").iterdir())
    for init_from, line in [
            (str(exported), f"transformer.init_from '{exported}' does not fit this run: it carries a LoRA adapter, "
                            "and LoRA trains on a plain base"),
            (str(Path(store.root) / "transformer" / key), "is a LoRA adapter without its base; export it")]:
        sets = [o for o in ov if not o.startswith("transformer.init_from=")] + [f"transformer.init_from={init_from}"]
        assert main(["train-transformer", "-c", str(TINY), *sum((["--set", o] for o in sets), [])]) == 2
        err = capsys.readouterr().err.strip()
        assert line in err and len(err.splitlines()) == 1, err
    assert sorted((Path(store.root) / "transformer").iterdir()) == before  # nothing trained


def test_a_full_fine_tune_from_a_lora_export_starts_at_the_fused_weights(lora):
    _, _, _, exported = lora
    source = model_source(str(exported), "transformer", None, "")
    fused = fuse(DALLEPipeline.from_pretrained(exported, device="cpu").transformer)
    state = source.state_dict()
    assert set(state) == set(fused.state_dict())
    assert all(torch.equal(state[k], v) for k, v in fused.state_dict().items())
    plain = model_source(str(lora[2]), "transformer", None, "")
    assert source.digest != plain.digest  # the adapter is part of what the key holds


@pytest.mark.parametrize("sets, message", [
    (["transformer.train.lora={rank: 4}"], "transformer.train.lora trains adapters on a trained transformer; set "
                                           "transformer.init_from to it"),
    (["transformer.init_from=x", "transformer.train.lora={targets: [attn.qkv, head]}"],
     "transformer.train.lora.targets: 'head' is not a target; allowed: a non-empty list of attn.qkv, attn.proj, "
     "mlp.fc, mlp.proj, text_emb"),
    (["transformer.init_from=x", "transformer.train.lora={rank: 0}"],
     "transformer.train.lora.rank: Input should be greater than or equal to 1"),
    (["transformer.init_from=x", "transformer.train.lora={rank: 4}", "transformer.train.freeze=[embeddings]"],
     "transformer.train.lora freezes every base weight already; leave transformer.train.freeze"),
    (["clip.train.lora={rank: 4}"], "clip.train.lora: LoRA adapters are for the transformer"),
    (["transformer.init_from=x", "transformer.train.lora={rank: 4, bogus: 1}"],
     "transformer.train.lora.bogus: unknown key; allowed: rank, alpha, targets, dropout"),
])
def test_lora_settings_are_checked_when_the_config_loads(sets, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(TINY, sets)



def test_lora_starts_from_a_registered_model_by_alias(generated, lora, tmp_path, monkeypatch, capsys):
    """`init_from: models:/NAME@ALIAS` in the run's tracking store: the registered export, downloaded once per
    version into the model cache, is the same source (the same key) as the folder it was exported to."""
    src, src_ov, _ = generated
    ov, _, base, _ = lora
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("DALLE_MODEL_CACHE", str(tmp_path / "cache"))
    sets = [*(o for o in src_ov if not o.startswith("tracking.")), f"tracking.uri={registry}"]
    assert main(["export", "-c", str(TINY), *sum((["--set", o] for o in sets), []), "--register", "tiny-base",
                 "--alias", "champion"]) == 0
    capsys.readouterr()
    mine = [o for o in ov if not o.startswith(("tracking.", "transformer.init_from="))]
    by_alias = [*mine, f"tracking.uri={registry}", "transformer.init_from=models:/tiny-base@champion"]
    by_folder = [*mine, f"tracking.uri={registry}", f"transformer.init_from={base}"]
    assert stage_keys(load_config(TINY, by_alias))["transformer"] == stage_keys(load_config(TINY, by_folder))["transformer"]
    assert (tmp_path / "cache" / "tiny-base" / "1" / "model_index.json").is_file()
    # the LoRA run registered: the MLflow model loads base and adapter, fused when its model_config asks
    lora_sets = [*(o for o in ov if not o.startswith("tracking.")), f"tracking.uri={registry}"]
    assert main(["export", "-c", str(TINY), *sum((["--set", o] for o in lora_sets), []), "--register", "tiny-lora"]) == 0
    import mlflow

    mlflow.set_tracking_uri(registry)
    assert has_lora(mlflow.pyfunc.load_model("models:/tiny-lora/1").unwrap_python_model().pipeline.transformer)
    fused = mlflow.pyfunc.load_model("models:/tiny-lora/1", model_config={"fuse_lora": True})
    assert not has_lora(fused.unwrap_python_model().pipeline.transformer)
    capsys.readouterr()  # MLflow's own warnings while logging
    missing = [*mine, f"tracking.uri={registry}", "transformer.init_from=models:/tiny-base@nobody"]
    assert main(["train-transformer", "-c", str(TINY), *sum((["--set", o] for o in missing), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: transformer.init_from 'models:/tiny-base@nobody': no model 'tiny-base' with alias "
                          "'nobody'") and len(err.splitlines()) == 1, err


def test_a_lora_on_another_stores_artifact_reads_its_base_where_it_lies(generated, tmp_path):
    """The base named by its artifact folder in another store: the adapter's store has no such key, so the base is
    read from the folder the manifest records."""
    src, src_ov, _ = generated
    base_key = stage_keys(load_config(TINY, src_ov))["transformer"]
    shutil.copytree(src / "store", tmp_path / "store", ignore=shutil.ignore_patterns("transformer", "generate"))
    ov = [f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
          f"transformer.init_from={src / 'store' / 'transformer' / base_key}", *LORA]
    ref = run_stage("transformer", ov)
    store = load_config(TINY, ov).store.open()
    assert not store.exists(store.path("transformer", base_key))
    assert has_lora(load_transformer(store, ref.key))


def _rechecksum(folder: Path, rel: str) -> None:
    import hashlib

    index = json.loads((folder / "model_index.json").read_text())
    index["sha256"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()[:16]
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("change, line", [
    (lambda c: {**c, "base": "abc"}, 'adapter_config.json cannot be read: it has no "base": {"digest": ...}'),
    (lambda c: {k: v for k, v in c.items() if k != "lora"}, 'adapter_config.json cannot be read: it has no "lora"'),
    (lambda c: {**c, "lora": {**c["lora"], "alpha": 0}}, "transformer.train.lora.alpha is 0; allowed: more than 0"),
    (lambda c: {**c, "lora": {**c["lora"], "rank": 8}}, "adapter_model.safetensors does not load: size mismatch"),
])
def test_an_edited_adapter_config_is_one_line(lora, tmp_path, change, line):
    _, _, _, exported = lora
    copy = tmp_path / "edited"
    shutil.copytree(exported, copy)
    path = copy / "transformer" / "adapter_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    _rechecksum(copy, "transformer/adapter_config.json")
    with pytest.raises(UserError) as err:
        DALLEPipeline.from_pretrained(copy, device="cpu")
    assert line in str(err.value) and len(str(err.value).splitlines()) == 1, err.value


def test_export_refuses_a_damaged_stored_adapter(lora, tmp_path, capsys):
    ov, key, _, _ = lora
    store_root = Path(load_config(TINY, ov).store.root)
    shutil.copytree(store_root, tmp_path / "store", ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    adapter = tmp_path / "store" / "transformer" / key / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1  # one bit of the last value: the size is the manifest's, the content is not
    adapter.write_bytes(bytes(data))
    sets = [o for o in ov if not o.startswith(("store.", "tracking."))] + [
        f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["export", "-c", str(TINY), *sum((["--set", o] for o in sets), []), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"artifact transformer/{key}" in err and "adapter_model.safetensors does not match its recorded sha256" \
        in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
