"""Where a fine-tuned stage starts from (docs/finetuning.md): `<stage>.init_from` or `tokenizers_from` resolved to
a component of an exported model folder or a finished store artifact (`model_source`), with its content digest for
the stage key, its config and weights. Whether it fits this run's model: pipeline/source_fit.py."""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dalle_core import pretrained
from dalle_core.errors import ConfigError
from dalle_core.images import ImageNormalization, size_hw
from dalle_core.lora import ADAPTER_FILES, fuse
from dalle_core.model_folder import (
    CONTENT_FILES,
    INDEX,
    ModelFolderError,
    Read,
    content_digest,
    dvae_config,
    folder_reader,
    has_adapter,
    json_bytes,
    read_component,
    read_index,
    safetensors_metadata,
    state_bytes,
)
from storage.store import MANIFEST, StoreError, file_digest, redo_hint
from storage.tracking import TrackingError, one_line_error, tracking_uri

TRACKED_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")  # resolved through a tracking server
# `<stage>/<key>` in the run's own store (a store's keys are 12 hex digits; longer prefixes are not keys)
STORE_SPEC = re.compile(r"(transformer|dvae|clip)/([0-9a-f]{12})")


@dataclass
class ModelSource:
    """One component of a trained model that a run starts from (`<stage>.init_from`) or takes as it is
    (`tokenizers_from`): a sub-folder of an exported model folder, or a finished artifact of a store."""

    spec: str  # as the config gives it
    component: str  # transformer | dvae | clip | tokenizer (an export's sub-folder; a store's stage)
    kind: str  # "export", "store", or "upstream" (a dVAE in OpenAI's or taming's files)
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


def model_source(spec: str, component: str, store, where: str, cfg=None) -> ModelSource:
    """Resolve `spec` (an exported model folder, a registered MLflow model `models:/NAME/VERSION` or
    `models:/NAME@ALIAS` looked up in `cfg`'s tracking store (`registered_folder`), a store artifact folder
    `<root>/<stage>/<key>`, or `<stage>/<key>` in `store`) to the component's files and their content digest; with
    `store` None (as `tokenizers_from` takes them) an exported or registered model only. ConfigError (one line,
    starting with `where`) when it is none of these, is incomplete, has an unreadable config, or is another stage's
    artifact."""

    names = CONTENT_FILES[component]
    if component == "dvae" and store is not None and pretrained.upstream_format(spec):
        return upstream_source(spec, cfg, where)
    folder = spec
    if spec.startswith(TRACKED_SCHEMES):
        uri = tracking_uri(cfg.tracking.uri, store or cfg.store.open()) if cfg is not None else None
        try:
            folder = registered_folder(spec, uri)
        except (ConfigError, TrackingError) as err:
            raise ConfigError(f"{where} {spec!r}: {err}") from None
    path = Path(folder).expanduser()
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
        registered = "a registered model (models:/NAME/VERSION or models:/NAME@ALIAS)"
        forms = (f"an exported model folder (with {INDEX}) or {registered}" if exported_only else
                 f"an exported model folder (with {INDEX}), {registered}, a store artifact folder (with "
                 f"manifest.json) or {component}/<key> in this run's store"
                 + (", or a loaded tokenizer's files (a folder with OpenAI's encoder.pkl and decoder.pkl, or a taming "
                    ".ckpt)" if component == "dvae" else ""))
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


def upstream_source(spec: str, cfg, where: str) -> ModelSource:
    """A tokenizer others trained, in its upstream files (`dalle_core.pretrained`: OpenAI's encoder.pkl and
    decoder.pkl, or a taming VQGAN .ckpt with its yaml at `dvae.pretrained_config` or beside it), as a dVAE source
    to fine-tune: its digest is its files' content, and its config.json and model.safetensors are this project's
    (loaded at `data.image_size` with the `dvae` section's normalisation, once per process). ConfigError (one
    line, starting with `where`) when it cannot be found, read or used."""
    config_path = cfg.dvae.pretrained_config
    try:
        kind, files = pretrained.source_files(spec, config_path, where)
    except pretrained.PretrainedError as err:
        raise ConfigError(str(err)) from None
    digest = content_digest({role: file_digest(p) for role, p in files.items()})
    norm = ImageNormalization(cfg.dvae.norm_mean, cfg.dvae.norm_std)

    def read(name: str) -> bytes:
        try:
            model = _loaded(spec, config_path, digest, size_hw(cfg.data.image_size), norm.mean, norm.std, where)
        except pretrained.PretrainedError as err:
            raise ConfigError(str(err)) from None
        if name == "config.json":
            return json_bytes(dvae_config(model, norm))
        if name == "model.safetensors":
            return state_bytes(model)
        raise FileNotFoundError(f"{spec}: {name}")

    return ModelSource(spec, "dvae", "upstream", str(Path(spec).expanduser().resolve()), digest, None, read, where)


@functools.lru_cache(maxsize=1)
def _loaded(spec: str, config_path: str | None, digest: str, image_size, mean, std, where: str):
    """`pretrained.load`, once per content (`digest`) and shape: a check, the stage key and the stage read it."""
    return pretrained.load(spec, config_path, image_size, mean, std, where)


def loaded_tokenizer_config(cfg, store) -> dict | None:
    """The config.json of `dvae.init_from` when it is a loaded tokenizer (OpenAI's or taming's: its files, or an
    artifact or export made from them), which fine-tunes in its own architecture; else None."""
    if not cfg.dvae.init_from:
        return None
    meta = model_source(cfg.dvae.init_from, "dvae", store, "dvae.init_from", cfg).model_config()
    return meta if meta.get("pretrained") else None


def source_digest(spec: str, component: str, store, cfg=None) -> str:
    """The content digest a stage key holds for a source; the spec itself when it cannot be read (the run's
    checks then say why, in one line, before any work)."""
    try:
        return model_source(spec, component, store, "", cfg).digest
    except (ConfigError, ModelFolderError, StoreError, OSError):
        return spec


def tokenizers_of(cfg, store) -> tuple[ModelSource, ModelSource]:
    """`tokenizers_from`'s (dVAE, BPE tokenizer) sources."""
    return (model_source(cfg.tokenizers_from, "dvae", None, "tokenizers_from", cfg),
            model_source(cfg.tokenizers_from, "tokenizer", None, "tokenizers_from", cfg))


def artifact_reader(store, stage: str, key: str, cfg=None, verify: bool = False) -> Read:
    """`read(name)` for the files of the finished `<stage>/<key>` (FileNotFoundError for one it does not hold;
    with `verify`, StoreError (one line) for one whose sha256 is not the one its manifest recorded). A LoRA
    transformer's artifact holds its adapter alone: its reader gives the base's config.json and model.safetensors
    from the base the manifest records (`init_from`): the config's `transformer.init_from` when it holds the same
    content (a base that moved), else where the base was (a folder), else its key in this store; and the adapter's
    files from the artifact, so it reads as an exported LoRA transformer does. ConfigError (one line) when no
    such base can be read; one whose weights changed is refused when the adapter is put on it."""
    manifest = store.require(stage, key)
    sums = manifest.get("sha256") or {}

    def read(name: str) -> bytes:
        path = store.path(stage, key, name)
        if not store.exists(path):
            raise FileNotFoundError(path)
        data = store.read_bytes(path)
        if verify and name in sums and hashlib.sha256(data).hexdigest() != sums[name]:
            raise StoreError(f"artifact {stage}/{key} in store {store.url!r} is damaged: {name} does not match its "
                             f"recorded sha256; {redo_hint(stage)}")
        return data

    if stage != "transformer" or not manifest.get("lora"):
        return read
    made = manifest["init_from"]
    candidates = [cfg.transformer.init_from] if cfg is not None and cfg.transformer.init_from else []
    candidates.append(str(Path(made["location"]).parent) if made["kind"] == "export" else made["location"])
    if made.get("stage") and made.get("key"):
        candidates.append(f"{made['stage']}/{made['key']}")
    reasons = []
    for spec in dict.fromkeys(candidates):
        try:
            base = model_source(spec, "transformer", store, repr(spec), cfg)
        except ConfigError as err:
            reasons.append(str(err))
            continue
        if base.digest == made["digest"]:
            return lambda name: base.read(name) if name in CONTENT_FILES["transformer"] else read(name)
        reasons.append(f"{spec!r} holds another transformer (digest {base.digest})")
    raise ConfigError(f"transformer/{key} is a LoRA adapter on {made['spec']!r} (digest {made['digest']}), which "
                      f"cannot be read now: {'; '.join(reasons)}; put the base back, or set transformer.init_from to "
                      "where it is now")


def model_cache() -> Path:
    """Where registered models are kept once downloaded: $DALLE_MODEL_CACHE, else ~/.cache/dalle-pipeline/models."""
    return Path(os.environ.get("DALLE_MODEL_CACHE") or "~/.cache/dalle-pipeline/models").expanduser()


@functools.lru_cache(maxsize=64)
def registered_folder(uri: str, tracking: str | None) -> str:
    """The exported folder of a registered model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`), downloaded once
    per version into `model_cache()` (a version's files never change; an alias is resolved to its version again in
    each process, so a moved alias is followed); a `runs:/` or `mlflow-artifacts:/` URI once, by its digest.
    ConfigError or TrackingError (one line) when it cannot be found."""
    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([A-Za-z0-9_-]+))", uri)
    if m is None:  # a run's artifacts never change either: kept by the URI's digest
        return _cached(model_cache() / "uri" / hashlib.sha256(uri.encode()).hexdigest()[:16], uri, tracking)
    name, version, alias = m.groups()
    if alias:
        try:
            version = _mlflow(uri, tracking).MlflowClient().get_model_version_by_alias(name, alias).version
        except Exception as err:
            raise TrackingError(f"no model {name!r} with alias {alias!r} in {tracking!r}: "
                                f"{one_line_error(err)}") from None
    return _cached(model_cache() / name / str(version), f"models:/{name}/{version}", tracking)


def _cached(folder: Path, uri: str, tracking: str | None) -> str:
    """`folder`, holding the exported model of `uri`, downloaded into it first unless it is already there."""
    if not (folder / INDEX).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            found = download_model(uri, tracking, str(tmp))
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(found, folder)  # whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def _mlflow(uri: str, tracking: str | None):
    """mlflow, quiet, pointed at `tracking` (default $MLFLOW_TRACKING_URI); ConfigError (one line) for a URI that
    needs a tracking store when none is configured, rather than MLflow's default of a new ./mlflow.db."""
    import logging

    tracking = tracking or os.environ.get("MLFLOW_TRACKING_URI")
    if uri.startswith(TRACKED_SCHEMES) and not tracking:
        raise ConfigError(f"{uri!r} is looked up in an MLflow tracking store and none is configured; pass "
                          "-c CONFIG (the run whose tracking.uri holds it) or set MLFLOW_TRACKING_URI")
    import mlflow

    for name in ("mlflow", "alembic"):  # their INFO lines (store migrations, downloads) are not this command's
        logging.getLogger(name).setLevel(logging.WARNING)
    if tracking:
        mlflow.set_tracking_uri(tracking)
    return mlflow


def download_model(uri: str, tracking_uri: str | None, dst: str) -> str:
    """The exported folder inside an MLflow model (release/mlflow_model.py's `model_dir` artifact), downloaded under
    `dst` (the caller removes it). A models:/, runs:/ or mlflow-artifacts:/ URI is looked up in `tracking_uri`
    (default $MLFLOW_TRACKING_URI); with neither, ConfigError (one line) rather than MLflow's default of a new
    ./mlflow.db. TrackingError (one line) when MLflow cannot find the model."""
    mlflow = _mlflow(uri, tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    except Exception as err:
        raise TrackingError(f"cannot load MLflow model {uri!r} from {mlflow.get_tracking_uri()!r}: "
                            f"{one_line_error(err)}") from None
    found = sorted(glob.glob(os.path.join(local, "**", INDEX), recursive=True))
    if not found:
        raise TrackingError(f"MLflow model {uri!r} holds no exported model folder ({INDEX}); register one with "
                            "`dalle export -c CONFIG --register NAME`")
    return os.path.dirname(found[0])
