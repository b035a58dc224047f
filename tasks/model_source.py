"""Where a fine-tuned stage starts from (docs/finetuning.md): `<stage>.init_from` or `tokenizers_from` resolved to
a component of an exported model folder or a finished store artifact (`model_source`), its content digest for
the stage key, and the checks, before any work, that it fits the model this run builds (`check_fine_tuning`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from dalle_core.config import ConfigError
from dalle_core.export import INDEX, ModelFolderError
from storage.store import StoreError

# `<stage>/<key>` in the run's own store (a store's keys are 12 hex digits; longer prefixes are not keys)
STORE_SPEC = re.compile(r"(transformer|dvae|clip)/([0-9a-f]{12})")
# The model fields a source must share with the run to load into its model (the others, such as dropout or a
# loss weight, may change in a fine-tune); the vocabularies and the grid are compared apart (`token_shapes`).
SHAPE_FIELDS = {
    "transformer": ("dim", "depth", "heads", "tie_image_embedding"),
    "clip": ("patch_size", "vision_width", "vision_layers", "text_width", "text_heads", "text_layers", "embed_dim"),
    "dvae": ("codebook_size", "codebook_dim", "hidden", "num_downsamples", "num_res_blocks", "channel_mult",
             "attention", "quantizer", "logit_laplace", "norm_mean", "norm_std"),
}


@dataclass
class ModelSource:
    """One component of a trained model that a run starts from (`<stage>.init_from`) or takes as it is
    (`tokenizers_from`): a sub-folder of an exported model folder, or a finished artifact of a store."""

    spec: str  # as the config gives it
    component: str  # transformer | dvae | clip | tokenizer (an export's sub-folder; a store's stage)
    kind: str  # "export" or "store"
    location: str  # the component's folder, or the artifact's URL
    digest: str  # dalle_core.export.content_digest of its CONTENT_FILES: part of the stage key
    made_by: tuple[str, str] | None  # the store stage and key that made it, to find its MLflow run
    read: Callable[[str], bytes]  # a file of the component by name
    where: str = ""  # the config key that names it, for messages

    def record(self) -> dict:
        """What the manifest keeps of it."""
        return {"spec": self.spec, "kind": self.kind, "location": self.location, "digest": self.digest,
                **({"stage": self.made_by[0], "key": self.made_by[1]} if self.made_by else {})}

    def model_config(self) -> dict:
        """The component's config: DALLEConfig's fields (transformer), the dVAE's config.json ({model, norm,
        pretrained?}), CLIPConfig's fields (clip), or the tokenizer's {text_len, pad_id} (tokenizer)."""
        if self.component == "clip":
            from dalle_core.export import safetensors_metadata

            meta = safetensors_metadata(self.read("model.safetensors"))
            if meta.get("format") != "dalle-clip":
                raise ConfigError(f"clip.init_from {self.spec!r} is not this project's CLIP (an open_clip model "
                                  "cannot be fine-tuned here); give a model whose clip is dalle-clip")
            return json.loads(meta["config"])
        try:
            return json.loads(self.read("config.json"))
        except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
            raise ConfigError(f"{self.where} {self.spec!r}: its {self.component}/config.json cannot be read as JSON "
                              f"({err})") from None

    def state_dict(self) -> dict:
        from safetensors.torch import load

        return load(self.read("model.safetensors"))


def model_source(spec: str, component: str, store, where: str) -> ModelSource:
    """Resolve `spec` (an exported model folder, a store artifact folder `<root>/<stage>/<key>`, or
    `<stage>/<key>` in `store`) to the component's files and their content digest; with `store` None (as
    `tokenizers_from` takes them) an exported model folder only. ConfigError (one line, starting with `where`)
    when it is none of these, is incomplete, has an unreadable config, or is another stage's artifact."""
    from dalle_core.export import CONTENT_FILES, content_digest, read_index
    from storage.store import MANIFEST
    from tasks.common import file_digest

    names = CONTENT_FILES[component]
    path = Path(spec).expanduser()
    exported_only = component == "tokenizer" or store is None
    if (path / INDEX).is_file():
        try:
            idx = read_index(path)
        except ModelFolderError as err:
            raise ConfigError(f"{where} {spec!r}: {err}") from None
        sub = (path / component).resolve()
        missing = [n for n in names if not (sub / n).is_file()]
        if missing:
            raise ConfigError(f"{where} {spec!r}: the exported model has no {component}/{missing[0]}")
        stage = "bpe" if component == "tokenizer" else component
        key = ((idx.get("source") or {}).get("stage_keys") or {}).get(stage)
        digests = {n: file_digest(sub / n) for n in names}
        for n, digest in digests.items():  # the checksums the export recorded (older exports have none)
            if idx.get("sha256", {}).get(f"{component}/{n}", digest) != digest:
                raise ConfigError(f"{where} {spec!r}: {component}/{n} is damaged (its sha256 is not the one "
                                  f"{INDEX} records); export the model again")
        return ModelSource(spec, component, "export", str(sub), content_digest(digests),
                           (stage, key) if key else None, lambda name: (sub / name).read_bytes(), where)
    if not exported_only and (path / MANIFEST).is_file():  # a store artifact folder, read where it lies
        folder = path.resolve()
        stage, key = folder.parent.name, folder.name
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            complete = all((folder / rel).is_file() and (folder / rel).stat().st_size == size
                           for rel, size in manifest["files"].items())
        except (OSError, ValueError, KeyError, AttributeError):
            complete = False
        if not complete:
            raise ConfigError(f"{where} {spec!r} is a damaged store artifact (its files are not those its "
                              "manifest lists)")
        digests = {n: file_digest(folder / n) for n in names if (folder / n).is_file()}
        location, read = str(folder), lambda name: (folder / name).read_bytes()
    elif not exported_only and (m := STORE_SPEC.fullmatch(spec)):
        stage, key = m[1], m[2]
        if stage == component and not store.is_complete(stage, key):
            raise ConfigError(f"{where} {spec!r}: this run's store has no finished {stage}/{key} "
                              f"(`dalle ls` lists the finished ones)")
        manifest = store.require(stage, key) if stage == component else {}
        base = store.path(stage, key)
        digests = {n: (file_digest(f"{base}/{n}") if store.local else manifest["sha256"][n][:16])
                   for n in names if n in manifest.get("sha256", {})}
        location, read = store.uri(base), lambda name: store.read_bytes(f"{base}/{name}")
    else:
        forms = (f"an exported model folder (with {INDEX})" if exported_only else
                 f"an exported model folder (with {INDEX}), a store artifact folder (with manifest.json) or "
                 f"{component}/<key> in this run's store")
        raise ConfigError(f"{where} {spec!r} is not {forms}")
    if stage != component:
        raise ConfigError(f"{where} {spec!r} is a {stage} artifact; give a {component} one")
    missing = [n for n in names if n not in digests]
    if missing:
        raise ConfigError(f"{where} {spec!r} has no {missing[0]}")
    return ModelSource(spec, component, "store", location, content_digest(digests), (stage, key), read, where)


def source_digest(spec: str, component: str, store) -> str:
    """The content digest a stage key holds for a source; the spec itself when it cannot be read (the run's
    checks then say why, in one line, before any work)."""
    try:
        return model_source(spec, component, store, "").digest
    except (ConfigError, ModelFolderError, StoreError, OSError):
        return spec


def tokenizers_of(cfg, store) -> tuple[ModelSource, ModelSource]:
    """`tokenizers_from`'s (dVAE, BPE tokenizer) sources."""
    return (model_source(cfg.tokenizers_from, "dvae", None, "tokenizers_from"),
            model_source(cfg.tokenizers_from, "tokenizer", None, "tokenizers_from"))


def token_shapes(cfg, store, keys: dict) -> dict[str, tuple]:
    """{field: (value, where it comes from)} of the sequence a stage's model is built for: text_len, and the
    text vocabulary and pad id, the image codebook and grid as far as they are known now (from the token
    shards, the BPE and dVAE artifacts, tokenizers_from, text.tokenizer_path or the dvae section)."""
    from dalle_core.bpe import TextTokenizer
    from dalle_core.dvae import DVAEConfig

    out: dict[str, tuple] = {"text_len": (cfg.text.text_len, "text.text_len")}

    def text(vocab: int, pad: int, where: str) -> None:
        out.setdefault("text_vocab", (vocab, where))
        out.setdefault("pad_id", (pad, where))

    def image(codes: int, grid: int, where: str, grid_where: str | None = None) -> None:
        out.setdefault("image_vocab", (codes, where))
        out.setdefault("image_grid", (grid, grid_where or where))

    if store.is_complete("tokens", keys["tokens"]):
        m = store.manifest("tokens", keys["tokens"])
        text(m["vocab_size"], m["pad_id"], f"the shards tokens/{keys['tokens']}")
        image(m["codebook_size"], m["grid"][0], f"the shards tokens/{keys['tokens']}")
    if store.is_complete("bpe", keys["bpe"]):
        m = store.manifest("bpe", keys["bpe"])
        text(m["vocab_size"], m["pad_id"], f"the BPE bpe/{keys['bpe']}")
    if store.is_complete("dvae", keys["dvae"]):
        m = store.manifest("dvae", keys["dvae"])
        image(m["codebook_size"], m["grid"][0], f"the dVAE dvae/{keys['dvae']}")
    if cfg.tokenizers_from and not {"text_vocab", "image_vocab"} <= set(out):
        dvae, tokenizer = tokenizers_of(cfg, store)
        tok = TextTokenizer.from_str(tokenizer.read("tokenizer.json").decode(), cfg.text.text_len)
        text(tok.vocab_size, tok.pad_id, "tokenizers_from's tokenizer")
        c = DVAEConfig(**dvae.model_config()["model"])
        image(c.codebook_size, c.grid_size, "tokenizers_from's dVAE")
    elif cfg.text.tokenizer_path and os.path.isfile(cfg.text.tokenizer_path):
        with open(cfg.text.tokenizer_path, encoding="utf-8") as f:
            tok = TextTokenizer.from_str(f.read(), cfg.text.text_len)
        text(tok.vocab_size, tok.pad_id, "text.tokenizer_path")
    if not cfg.dvae.pretrained:
        image(cfg.dvae.codebook_size, cfg.data.image_size // 2 ** cfg.dvae.num_downsamples, "dvae.codebook_size",
              "data.image_size / 2**dvae.num_downsamples")
    return out


def _same(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # (1, 2) and [1, 2] alike


def fit_problems(cfg, stage: str, source: ModelSource, store, keys: dict, weights: bool = False) -> list[str]:
    """One entry per field where `source` differs from the model this run builds for `stage`:
    `dim 128 there, 64 here (transformer.dim)`; with `weights`, also when its weights file does not parse
    (truncated, not safetensors)."""
    if weights:
        try:
            source.state_dict()
        except Exception as err:  # safetensors' own error kinds
            return [f"its {source.component}/model.safetensors does not load: {load_reason(err)}"]
    section = getattr(cfg, stage)
    there = source.model_config()
    here: dict[str, tuple] = {}
    if stage == "dvae":
        if there.get("pretrained"):
            return [f"it is a pretrained {there['pretrained'].get('kind', '')} tokenizer, which does not fine-tune "
                    "here (use it as dvae.pretrained)"]
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
    return [f"{f} {there[f]!r} there, {value!r} here ({where})" for f, (value, where) in here.items()
            if f in there and not _same(there[f], value)]


def tokenizer_problems(cfg, store) -> list[str]:
    """Where `tokenizers_from`'s tokenizers do not fit the run's data and text length."""
    dvae, tokenizer = tokenizers_of(cfg, store)
    text_len = tokenizer.model_config()["text_len"]
    out = []
    if text_len != cfg.text.text_len:
        out.append(f"text_len {text_len} there, {cfg.text.text_len} here (text.text_len)")
    size = dvae.model_config()["model"]["image_size"]
    if size != cfg.data.image_size:
        out.append(f"image_size {size} there, {cfg.data.image_size} here (data.image_size)")
    return out


def load_reason(err: Exception) -> str:
    """The first informative line of a loading error (torch's starts with a header line ending in ':')."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else type(err).__name__)[:300]


def check_fine_tuning(cfg, stages: list[str] | None = None, store=None, keys: dict | None = None) -> None:
    """Before any work: every source the config names (`tokenizers_from`, `<stage>.init_from` of the training
    stages among `stages`, default all) exists and fits the model this run builds, as far as the store and the
    config tell now. ConfigError, one line naming each mismatch of every source and both values. A finished stage is not checked again. Each training stage checks its own source again, with
    its inputs' manifests, before it trains."""
    from tasks.common import open_store, stage_keys

    store = store or open_store(cfg)
    keys = keys or stage_keys(cfg)
    checks = []
    if cfg.tokenizers_from and not all(store.is_complete(s, keys[s]) for s in ("dvae", "bpe")):
        checks.append(("tokenizers_from", cfg.tokenizers_from, lambda: tokenizer_problems(cfg, store)))
    for stage in ("dvae", "transformer", "clip"):
        spec = getattr(cfg, stage).init_from
        if spec and (stages is None or stage in stages) and not store.is_complete(stage, keys[stage]):
            checks.append((f"{stage}.init_from", spec, lambda stage=stage, spec=spec: fit_problems(
                cfg, stage, model_source(spec, stage, store, f"{stage}.init_from"), store, keys, weights=True)))
    misfits = [f"{where} {spec!r} does not fit this run: {'; '.join(found)}"
               for where, spec, problems in checks if (found := problems())]
    if misfits:
        raise ConfigError("; and ".join(misfits))
