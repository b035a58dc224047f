"""Every model loader: a stage's finished model from the store (`load_dvae`, `load_tokenizer`,
`load_transformer`, `load_reranker`, and all four as `load_pipeline`), and a trained model from wherever it is:
an exported folder, a registered MLflow model, or a run's store named by its config (`load_model`, the Python
API's one entry point, and what `dalle serve` and `dalle generate --model` read). Where a training stage
starts from when it fine-tunes: pipeline/model_source.py and pipeline/fine_tuning.py."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile

import torch

from dalle_core.bpe import TextTokenizer
from dalle_core.clip import CLIPReranker, load_open_clip
from dalle_core.device import resolve_device, sampling_precision
from dalle_core.errors import ConfigError
from dalle_core.generate import DALLEPipeline
from dalle_core.model_folder import ModelFolderError, read_component
from dalle_core.transformer import DALLE
from pipeline.config import Config, config_from_dict, load_config
from pipeline.model_source import artifact_reader, download_model
from pipeline.stage_table import stage_keys
from storage.store import ArtifactStore

# ------------------------------------------------------------ a stage's model from the store


def load_component(store: ArtifactStore, stage: str, key: str, text_len: int | None = None, cfg: Config | None = None):
    """A finished stage's model from `<stage>/<key>` through the one reader (`read_component`: the artifact
    holds its component folder's files under the same names; a LoRA transformer's adapter on its base), on the CPU; StoreError (one line) for a missing
    artifact or a file that does not parse, naming it and how to redo it."""
    component = "tokenizer" if stage == "bpe" else stage
    read = artifact_reader(store, stage, key, cfg)  # a LoRA transformer's: its base's weights, its own adapter
    with store.reading(store.path(stage, key, "tokenizer.json" if stage == "bpe" else "model.safetensors")):
        return read_component(component, read, text_len)


def load_dvae(store: ArtifactStore, key: str, device: torch.device | str = "cpu"):
    """A finished dVAE from `dvae/<key>`, on `device`, in eval mode, with its input normalisation:
    (DiscreteVAE, ImageNormalization)."""
    model, normalization = load_component(store, "dvae", key)
    return model.to(device, memory_format=torch.channels_last).eval(), normalization  # faster convolutions


def load_tokenizer(store: ArtifactStore, key: str, text_len: int) -> TextTokenizer:
    """The finished BPE tokenizer of `bpe/<key>`, padding or truncating to `text_len` tokens."""
    return load_component(store, "bpe", key, text_len)


def load_transformer(store: ArtifactStore, key: str, device: torch.device | str = "cpu",
                     cfg: Config | None = None) -> DALLE:
    """A finished transformer from `transformer/<key>`, on `device`, in eval mode (a LoRA one's base found through
    `cfg` too: `artifact_reader`)."""
    return load_component(store, "transformer", key, cfg=cfg).to(device).eval()


def load_reranker(cfg: Config, store: ArtifactStore, key: str, device: torch.device | str = "cpu") -> CLIPReranker:
    """The reranking CLIP the config asks for, on `device`: pretrained (an open_clip model with a hub tag or
    a local file, or a checkpoint of this project) or the clip stage's `clip/<key>`."""
    spec = cfg.clip.pretrained
    if spec:
        if os.path.isfile(spec):  # a checkpoint written by this project: its config and tokenizer inside

            def read(name: str) -> bytes:
                if name != "model.safetensors":
                    raise FileNotFoundError(name)
                with open(spec, "rb") as f:
                    return f.read()
            try:
                return read_component("clip", read).to(device)
            except ModelFolderError:
                raise ConfigError("clip.pretrained file is not a CLIP checkpoint written by this project "
                                  "(use '<open_clip model>:<file>' for open_clip checkpoints)") from None
        if spec.endswith(".safetensors") and ":" not in spec:
            raise ConfigError(f"clip.pretrained file {spec!r} does not exist")
        return load_open_clip(spec).to(device)  # "<open_clip model>:<hub tag or local weights file>"
    return load_component(store, "clip", key).to(device)


@functools.lru_cache(maxsize=2)
def _load_pipeline(cfg_json: str, keys_json: str) -> DALLEPipeline:

    cfg, keys = config_from_dict(json.loads(cfg_json)), json.loads(keys_json)
    store, device = cfg.store.open(), resolve_device(cfg.runner.device)
    dvae_model, normalization = load_dvae(store, keys["dvae"], device)
    return DALLEPipeline(load_transformer(store, keys["transformer"], device, cfg), dvae_model, normalization,
                         load_tokenizer(store, keys["bpe"], cfg.text.text_len),
                         load_reranker(cfg, store, keys["clip"], device),
                         sampling_precision(cfg.generate.precision, device))


def load_pipeline(cfg: Config, keys: dict[str, str] | None = None) -> DALLEPipeline:
    """The models of this config (transformer, dVAE, tokenizer, CLIP; `keys` by stage, default the config's own)
    on its device, loaded once per process."""

    keys = {s: (keys or stage_keys(cfg))[s] for s in ("dvae", "bpe", "transformer", "clip")}
    return _load_pipeline(json.dumps(cfg.model_dump(mode="json"), sort_keys=True), json.dumps(keys, sort_keys=True))


# ------------------------------------------------------------ a trained model from anywhere

URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "file://", "http://", "https://")


def load_model(source: str | os.PathLike, *, device: str = "auto", precision: str = "auto",
               overrides: list[str] = (), tracking_uri: str | None = None, fuse_lora: bool = False) -> DALLEPipeline:
    """A `DALLEPipeline` from `source`:

    - an exported folder (`dalle export`): `DALLEPipeline.from_pretrained`, no store, Prefect or MLflow;
    - a registered or logged MLflow model, `models:/<name>/<version>` (or `runs:/<id>/model`), from
      `tracking_uri` (default $MLFLOW_TRACKING_URI): its folder is downloaded, then loaded as above;
    - a run config (`configs/shapes.yaml`, with `--set`-style `overrides`): the models in that run's store.

    `device`: auto | cpu | cuda | cuda:N; `precision`: auto | fp32 | bf16 (for a run config, its
    `runner.device` and `generate.precision` unless given here). A transformer with a LoRA adapter is loaded with
    it, and `fuse_lora` merges it into the weights once (else each sampling call merges a copy). One-line ConfigError / ModelFolderError /
    TrackingError for a source that is none of these or cannot be read."""
    pipe = _load_model(os.fspath(source), device, precision, overrides, tracking_uri)
    return pipe.fuse_lora() if fuse_lora else pipe


def _load_model(text: str, device: str, precision: str, overrides: list[str], tracking_uri: str | None):
    if os.path.isdir(text):
        return DALLEPipeline.from_pretrained(text, device, precision)
    if text.startswith(URI_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="dalle-model-") as tmp:  # loaded into memory, then removed
            return DALLEPipeline.from_pretrained(download_model(text, tracking_uri, tmp), device, precision)
    if text.endswith((".yaml", ".yml")) or os.path.isfile(text):
        cfg = load_config(text, [*overrides, *([f"runner.device={device}"] if device != "auto" else []),
                                 *([f"generate.precision={precision}"] if precision != "auto" else [])])
        return store_model(cfg)
    raise ConfigError(f"model {text!r} is not an exported folder, a models:/ or runs:/ URI, or a run config "
                      "(.yaml); make a folder with `dalle export -c CONFIG --out DIR`")


def store_model(cfg) -> DALLEPipeline:
    """The models of a run's store (`load_pipeline`), with the run's sampling settings as defaults."""
    return dataclasses.replace(load_pipeline(cfg), sampling=cfg.generate.sampling_defaults())
