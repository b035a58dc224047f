"""Where a fine-tuned stage starts from (docs/finetuning.md): `<stage>.init_from` or `tokenizers_from` resolved to
a component of an exported model folder or a finished store artifact (`model_source`), with its content digest for
the stage key, its config and weights. Whether it fits this run's model: pipeline/source_fit.py."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dalle_core.errors import ConfigError
from dalle_core.lora import ADAPTER_FILES, fuse
from dalle_core.model_folder import (
    CONTENT_FILES,
    INDEX,
    ModelFolderError,
    Read,
    content_digest,
    folder_reader,
    has_adapter,
    read_component,
    read_index,
    safetensors_metadata,
)
from storage.store import MANIFEST, StoreError, file_digest

# `<stage>/<key>` in the run's own store (a store's keys are 12 hex digits; longer prefixes are not keys)
STORE_SPEC = re.compile(r"(transformer|dvae|clip)/([0-9a-f]{12})")


@dataclass
class ModelSource:
    """One component of a trained model that a run starts from (`<stage>.init_from`) or takes as it is
    (`tokenizers_from`): a sub-folder of an exported model folder, or a finished artifact of a store."""

    spec: str  # as the config gives it
    component: str  # transformer | dvae | clip | tokenizer (an export's sub-folder; a store's stage)
    kind: str  # "export" or "store"
    location: str  # the component's folder, or the artifact's URL
    digest: str  # dalle_core.model_folder.content_digest of its CONTENT_FILES: part of the stage key
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
            meta = safetensors_metadata(self.read("model.safetensors"))
            if meta.get("format") != "dalle-clip":
                raise ConfigError(f"clip.init_from {self.spec!r} is not this project's CLIP (an open_clip model "
                                  "cannot be fine-tuned here); give a model whose clip is dalle-clip")
            return json.loads(meta["config"])
        try:
            return json.loads(self.read("config.json"))
        except ModelFolderError as err:  # the reader's own line: damaged, an LFS pointer
            raise ConfigError(f"{self.where} {self.spec!r}: {err}") from None
        except (ValueError, OSError) as err:  # not JSON, not UTF-8, unreadable
            raise ConfigError(f"{self.where} {self.spec!r}: its {self.component}/config.json cannot be read as JSON "
                              f"({err})") from None

    def state_dict(self) -> dict:
        """The component's weights; a transformer exported with a LoRA adapter gives its fused weights."""
        from safetensors.torch import load

        if self.component == "transformer" and has_adapter(self.read):
            return fuse(read_component("transformer", self.read)).state_dict()
        return load(self.read("model.safetensors"))


def model_source(spec: str, component: str, store, where: str) -> ModelSource:
    """Resolve `spec` (an exported model folder, a store artifact folder `<root>/<stage>/<key>`, or
    `<stage>/<key>` in `store`) to the component's files and their content digest; with `store` None (as
    `tokenizers_from` takes them) an exported model folder only. ConfigError (one line, starting with `where`)
    when it is none of these, is incomplete, has an unreadable config, or is another stage's artifact."""

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
        read = folder_reader(path, component, idx)  # what the run reads later is checked as it is read
        names += tuple(n for n in ADAPTER_FILES if component == "transformer" and (sub / n).is_file())
        digests = {n: file_digest(sub / n) for n in names}  # remembered by mtime: stage keys come here often
        sums = idx.get("sha256", {})
        try:
            for n, digest in digests.items():
                if sums.get(f"{component}/{n}") != digest:
                    read(n)  # not what the index records: the reader says why, in one line
        except ModelFolderError as err:
            raise ConfigError(f"{where} {spec!r}: {err}") from None
        return ModelSource(spec, component, "export", str(sub), content_digest(digests),
                           (stage, key) if key else None, read, where)
    if not exported_only and (path / MANIFEST).is_file():  # a store artifact folder, read where it lies
        folder = path.resolve()
        stage, key = folder.parent.name, folder.name
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            manifest = manifest if isinstance(manifest, dict) else {}
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
    if "model.safetensors" not in digests and (manifest or {}).get("lora"):
        raise ConfigError(f"{where} {spec!r} is a LoRA adapter without its base; export it (`dalle export`, which "
                          "writes the base beside it) and give that folder")
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


def load_reason(err: Exception) -> str:
    """The first informative line of a loading error (torch's starts with a header line ending in ':')."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    return (lines[0] if lines else type(err).__name__)[:300]


def artifact_reader(store, stage: str, key: str) -> Read:
    """`read(name)` for the files of the finished `<stage>/<key>` (FileNotFoundError for one it does not hold). A
    LoRA transformer's artifact holds its adapter alone: its reader gives the base's config.json and
    model.safetensors from the source the manifest records (`init_from`), wherever that is read from, and the
    adapter's files from the artifact, so it reads as an exported LoRA transformer does. ConfigError (one line)
    when that base cannot be read; one whose weights changed is refused when the adapter is put on it."""
    manifest = store.require(stage, key)

    def read(name: str) -> bytes:
        path = store.path(stage, key, name)
        if not store.exists(path):
            raise FileNotFoundError(path)
        return store.read_bytes(path)

    if stage != "transformer" or not manifest.get("lora"):
        return read
    made = manifest["init_from"]
    spec = str(Path(made["location"]).parent) if made["kind"] == "export" else f"{made['stage']}/{made['key']}"
    try:
        base = model_source(spec, "transformer", store, "its base")
    except ConfigError as err:
        raise ConfigError(f"transformer/{key} is a LoRA adapter on {made['spec']!r} (digest {made['digest']}), "
                          f"which cannot be read now: {err}") from None
    return lambda name: base.read(name) if name in CONTENT_FILES["transformer"] else read(name)
