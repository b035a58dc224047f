"""Whether a fine-tuning source fits this run (docs/finetuning.md): `check_fine_tuning`, before any work, compares
each source the config names with the model this run builds, field by field, against the sequence shape known so
far (`token_shapes`), and fails in one line naming every mismatch with both values."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from dalle_core.bpe import TextTokenizer
from dalle_core.dvae import DVAEConfig
from dalle_core.errors import ConfigError, load_reason
from dalle_core.images import compact_size
from dalle_core.model_folder import CONTENT_FILES, content_digest, has_adapter, read_component
from pipeline.model_source import (
    STORE_SPEC,
    ModelSource,
    loaded_tokenizer_config,
    model_source,
    tokenizers_of,
)
from pipeline.stage_table import stage_keys
from storage.store import ArtifactStore

# The model fields a source must share with the run to load into its model (the others, such as dropout or a
# loss weight, may change in a fine-tune); the vocabularies and the grid are compared apart (`token_shapes`).
SHAPE_FIELDS = {
    "transformer": ("dim", "depth", "heads", "tie_image_embedding"),
    "clip": ("patch_size", "vision_width", "vision_layers", "text_width", "text_heads", "text_layers", "embed_dim"),
    "dvae": ("codebook_size", "codebook_dim", "hidden", "num_downsamples", "num_res_blocks", "channel_mult",
             "attention", "quantizer", "logit_laplace", "norm_mean", "norm_std"),
}


def token_shapes(cfg, store, keys: dict) -> dict[str, tuple]:
    """{field: (value, where it comes from)} of the sequence a stage's model is built for: text_len, and the
    text vocabulary and pad id, the image codebook and grid as far as they are known now (from the token
    shards, the BPE and dVAE artifacts, tokenizers_from, text.tokenizer_path or the dvae section)."""

    out: dict[str, tuple] = {"text_len": (cfg.text.text_len, "text.text_len")}

    def text(vocab: int, pad: int, where: str) -> None:
        out.setdefault("text_vocab", (vocab, where))
        out.setdefault("pad_id", (pad, where))

    def image(codes: int, grid: int, where: str, grid_where: str | None = None) -> None:
        out.setdefault("image_vocab", (codes, where))
        out.setdefault("image_grid", (grid, grid_where or where))

    if store.is_complete("pretokenize", keys["pretokenize"]):
        m = store.manifest("pretokenize", keys["pretokenize"])
        text(m["vocab_size"], m["pad_id"], f"the shards pretokenize/{keys['pretokenize']}")
        image(m["codebook_size"], compact_size(*m["grid"]), f"the shards pretokenize/{keys['pretokenize']}")
    if store.is_complete("bpe", keys["bpe"]):
        m = store.manifest("bpe", keys["bpe"])
        text(m["vocab_size"], m["pad_id"], f"the BPE bpe/{keys['bpe']}")
    if store.is_complete("dvae", keys["dvae"]):
        m = store.manifest("dvae", keys["dvae"])
        image(m["codebook_size"], compact_size(*m["grid"]), f"the dVAE dvae/{keys['dvae']}")
    if cfg.tokenizers_from and not {"text_vocab", "image_vocab"} <= set(out):
        dvae, tokenizer = tokenizers_of(cfg, store)
        tok = read_component("tokenizer", tokenizer.read, cfg.text.text_len)
        text(tok.vocab_size, tok.pad_id, "tokenizers_from's tokenizer")
        c = DVAEConfig(**dvae.model_config()["model"])
        image(c.codebook_size, c.grid, "tokenizers_from's dVAE")
    elif cfg.text.tokenizer_path and os.path.isfile(cfg.text.tokenizer_path):
        with open(cfg.text.tokenizer_path, encoding="utf-8") as f:
            tok = TextTokenizer.from_str(f.read(), cfg.text.text_len)
        text(tok.vocab_size, tok.pad_id, "text.tokenizer_path")
    loaded = loaded_tokenizer_config(cfg, store)
    if loaded:
        c = DVAEConfig(**loaded["model"])
        image(c.codebook_size, c.grid, "dvae.init_from's tokenizer")
    elif not cfg.dvae.pretrained:
        image(cfg.dvae.codebook_size, cfg.dvae.dvae_config(cfg.data.image_size).grid, "dvae.codebook_size",
              "data.image_size / 2**dvae.num_downsamples")
    return out


def _misfits(there: dict, here: dict[str, tuple]) -> list[str]:
    """`<field> <source's value> there, <run's value> here (<config key>)` for each field of `here` that differs."""
    return [f"{f} {there[f]!r} there, {value!r} here ({where})" for f, (value, where) in here.items()
            if f in there and json.loads(json.dumps(there[f])) != json.loads(json.dumps(value))]  # (1, 2) == [1, 2]


def fit_problems(cfg, stage: str, source: ModelSource, store, keys: dict, weights: bool = False) -> list[str]:
    """One entry per field where `source` differs from the model this run builds for `stage`:
    `dim 128 there, 64 here (transformer.dim)`; with `weights`, also when its weights file does not parse
    (truncated, not safetensors)."""
    if weights:
        try:
            source.state_dict()
        except ConfigError:  # a loaded tokenizer's files: their own line, naming the key
            raise
        except Exception as err:  # safetensors' own error kinds
            return [f"its {source.component}/model.safetensors does not load: {load_reason(err)}"]
    section = getattr(cfg, stage)
    there = source.model_config()
    here: dict[str, tuple] = {}
    if stage == "dvae":
        if there.get("pretrained"):
            return _loaded_tokenizer_problems(cfg, there)
        there = there["model"]
        mine = asdict(section.dvae_config(cfg.data.image_size))
        here["image_size"] = (mine["image_size"], "data.image_size")
        here.update({f: (mine[f], "dvae.recon_loss" if f == "logit_laplace" else f"dvae.{f}")
                     for f in SHAPE_FIELDS["dvae"]})
    else:
        here.update({f: (getattr(section, f), f"{stage}.{f}") for f in SHAPE_FIELDS[stage]})
        shapes = token_shapes(cfg, store, keys)
        fields = ("text_len", "text_vocab", "pad_id", *(("image_vocab", "image_grid") if stage == "transformer" else ()))
        here.update({f: shapes[f] for f in fields if f in shapes})
        if stage == "clip":
            here["image_size"] = (cfg.data.image_size, "data.image_size")
    return _misfits(there, here)


def _loaded_tokenizer_problems(cfg, there: dict) -> list[str]:
    """A loaded tokenizer (OpenAI's, taming's) fine-tunes in its own architecture, so only the image size, the
    normalisation and the loss must fit: OpenAI's decoder gives logit-Laplace statistics, taming's pixels."""
    section, m, kind = cfg.dvae, there["model"], there["pretrained"].get("kind", "")
    out = _misfits(m, {"image_size": (cfg.data.image_size, "data.image_size"),
                       "norm_mean": (section.norm_mean, "dvae.norm_mean"), "norm_std": (section.norm_std, "dvae.norm_std")})
    if m.get("logit_laplace") and section.recon_loss != "logit_laplace":
        out.append(f"it is OpenAI's dVAE, whose decoder gives logit-Laplace statistics, and dvae.recon_loss is "
                   f"{section.recon_loss!r}: set dvae.recon_loss=logit_laplace")
    elif not m.get("logit_laplace") and section.recon_loss == "logit_laplace":
        out.append(f"its {kind} decoder gives pixels, and dvae.recon_loss 'logit_laplace' needs logit-Laplace "
                   "statistics: use mse or l1")
    return out


def _artifact_digest(store, stage: str, key: str) -> str | None:
    """The content digest of a finished BPE or dVAE artifact (as an export's component), or None."""

    if store is None or not store.is_complete(stage, key):
        return None
    sums = store.manifest(stage, key).get("sha256", {})
    names = CONTENT_FILES["tokenizer" if stage == "bpe" else stage]
    return content_digest({n: sums[n][:16] for n in names}) if all(n in sums for n in names) else None


def _trained_with(source: ModelSource, store) -> dict[str, str | None]:
    """The content digests of the BPE and dVAE a transformer or CLIP source was trained with ({"bpe", "dvae"}),
    from its export's folder or its store's manifests; a digest that cannot be told is None."""

    if source.kind == "export":
        folder, out = str(Path(source.location).parent), {}
        for stage, component in (("bpe", "tokenizer"), ("dvae", "dvae")):
            try:
                out[stage] = model_source(folder, component, None, "").digest
            except ConfigError:  # an export without it cannot tell
                out[stage] = None
        return out
    stage, key = source.made_by
    home = store if STORE_SPEC.fullmatch(source.spec) else ArtifactStore(str(Path(source.location).parent.parent))
    inputs = home.manifest(stage, key).get("inputs", {})
    if stage == "transformer" and "pretokenize" in inputs and home.is_complete("pretokenize", inputs["pretokenize"]):
        inputs = home.manifest("pretokenize", inputs["pretokenize"]).get("inputs", {})
    return {s: _artifact_digest(home, s, inputs[s]) if s in inputs else None for s in ("bpe", "dvae")}


def meaning_problems(cfg, stage: str, source: ModelSource, store, keys: dict) -> list[str]:
    """Where an id would change its meaning: a transformer or CLIP source trained with another BPE (text ids) or,
    for the transformer, another dVAE (image codes) than this run's, compared by content. A tokenizer trained
    again on other data has the same sizes and other ids, so sizes cannot tell; `tokenizers_from` takes the
    source's own."""
    if cfg.tokenizers_from or stage not in ("transformer", "clip"):
        return []
    theirs = _trained_with(source, store)
    differ = []
    for s, what in (("bpe", "BPE (its text ids)"), ("dvae", "dVAE (its image codes)"))[:2 if stage == "transformer" else 1]:
        mine = _artifact_digest(store, s, keys[s])
        if theirs[s] is None or mine != theirs[s]:
            differ.append(f"{what}: {'this run would train its own' if mine is None else f'{s}/{keys[s]} is another'}")
    if not differ:
        return []
    return [f"it was trained with another {' and '.join(d.split(':')[0] for d in differ)} than this run's "
            f"({'; '.join(d.split(': ', 1)[1] for d in differ)}); set tokenizers_from to the exported model it "
            "came from, so its ids keep their meaning"]


def tokenizer_problems(cfg, store) -> list[str]:
    """Where `tokenizers_from`'s tokenizers do not fit the run's data and text length."""
    dvae, tokenizer = tokenizers_of(cfg, store)
    there = {"text_len": tokenizer.model_config()["text_len"], "image_size": dvae.model_config()["model"]["image_size"]}
    return _misfits(there, {"text_len": (cfg.text.text_len, "text.text_len"),
                            "image_size": (cfg.data.image_size, "data.image_size")})


def check_fine_tuning(cfg, stages: list[str] | None = None, store=None, keys: dict | None = None) -> None:
    """Before any work: every source the config names (`tokenizers_from`, `<stage>.init_from` of the training
    stages among `stages`, default all) exists and fits the model this run builds, as far as the store and the
    config tell now. ConfigError, one line naming each mismatch of every source and both values. A finished stage is not checked again. Each training stage checks its own source again, with
    its inputs' manifests, before it trains."""

    store = store or cfg.store.open()
    keys = keys or stage_keys(cfg)
    checks = []
    if cfg.tokenizers_from and not all(store.is_complete(s, keys[s]) for s in ("dvae", "bpe")):
        checks.append(("tokenizers_from", cfg.tokenizers_from, lambda: tokenizer_problems(cfg, store)))
    for stage in ("dvae", "transformer", "clip"):
        spec = getattr(cfg, stage).init_from
        if spec and (stages is None or stage in stages) and not store.is_complete(stage, keys[stage]):
            checks.append((f"{stage}.init_from", spec, lambda stage=stage, spec=spec: _source_problems(
                cfg, stage, model_source(spec, stage, store, f"{stage}.init_from", cfg), store, keys)))
    misfits = [f"{where} {spec!r} does not fit this run: {'; '.join(found)}"
               for where, spec, problems in checks if (found := problems())]
    if misfits:
        raise ConfigError("; and ".join(misfits))


def _source_problems(cfg, stage: str, source: ModelSource, store, keys: dict) -> list[str]:
    if stage == "transformer" and cfg.transformer.train.lora and has_adapter(source.read):
        return ["it carries a LoRA adapter, and LoRA trains on a plain base: give its base, or a fused copy "
                "(DALLEPipeline.from_pretrained(...).fuse_lora().save_pretrained(DIR))"]
    return fit_problems(cfg, stage, source, store, keys, weights=True) or meaning_problems(cfg, stage, source, store,
                                                                                           keys)
