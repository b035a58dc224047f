"""What every stage task shares: the store, the stage keys, MLflow runs, progress logs."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.runtime import flow_run

from dalle_core.config import Config, flatten
from dalle_core.evaluation import METRICS_VERSION
from storage.store import ArtifactStore, stage_key
from storage.tracking import StageRun, tracking_uri


def open_store(cfg: Config) -> ArtifactStore:
    return ArtifactStore(cfg.store.root, cfg.store.storage_options)


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def stage_keys(cfg: Config) -> dict[str, str]:
    """The content-addressed key of every stage, from its config section and its inputs' keys."""
    k: dict[str, str] = {}
    k["images"] = stage_key(cfg.data.model_dump(mode="json"))
    dvae = cfg.dvae.model_dump(mode="json", exclude={"encode_precision"})  # how tokens are made, not the model
    k["dvae"] = stage_key(dvae, {"images": k["images"]})
    text = cfg.text.model_dump(mode="json")
    if cfg.text.tokenizer_path:  # a given tokenizer is identified by its content, not its path
        text["tokenizer_path"] = _file_digest(cfg.text.tokenizer_path) if os.path.exists(cfg.text.tokenizer_path) else cfg.text.tokenizer_path
        k["bpe"] = stage_key(text)
    else:
        k["bpe"] = stage_key(text, {"images": k["images"]})
    encode = {} if cfg.dvae.encode_precision == "fp32" else {"encode_precision": cfg.dvae.encode_precision}
    k["tokens"] = stage_key(encode, {"images": k["images"], "dvae": k["dvae"], "bpe": k["bpe"]})
    tr = cfg.transformer.model_dump(mode="json")
    k["transformer"] = stage_key(tr, {"tokens": k["tokens"]})
    k["clip"] = stage_key(cfg.clip.model_dump(mode="json"), {"images": k["images"], "bpe": k["bpe"]})
    k["generations"] = stage_key(cfg.generate.model_dump(mode="json"),
                                 {"transformer": k["transformer"], "dvae": k["dvae"], "clip": k["clip"], "bpe": k["bpe"],
                                  "images": k["images"]})
    sampling = cfg.generate.model_dump(mode="json", exclude={"prompts", "num_val_prompts", "best_k", "batch_size"})
    k["evaluation"] = stage_key({**cfg.evaluate.model_dump(mode="json"), "sampling": sampling,
                                 "metrics_version": METRICS_VERSION},
                                {s: k[s] for s in ("images", "dvae", "bpe", "transformer", "clip")})
    return k


@dataclass
class ArtifactRef:
    """What a stage task returns: where its output is, and whether it was reused."""

    stage: str
    key: str
    cached: bool
    uri: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.key}{' (cached)' if self.cached else ''}"


def ref(store: ArtifactStore, stage: str, key: str, cached: bool) -> ArtifactRef:
    return ArtifactRef(stage, key, cached, store.uri(store.path(stage, key)))


def logger():
    """The Prefect run logger inside a flow/task; a plain logger elsewhere (torchrun workers)."""
    try:
        return get_run_logger()
    except Exception:  # MissingContextError outside a run
        import logging

        log = logging.getLogger("dalle")
        if not log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        return log


def reuse(store: ArtifactStore, stage: str, key: str) -> ArtifactRef | None:
    """A reference to the finished artifact if there is one: a finished stage is never redone."""
    if not store.is_complete(stage, key):
        return None
    logger().info("%s/%s is complete; reusing it", stage, key)
    return ref(store, stage, key, cached=True)


def stage_run(cfg: Config, store: ArtifactStore, stage: str, key: str, params: dict,
              parent_run_id: str | None = None, flow_run_id: str | None = None) -> StageRun:
    """Start the MLflow run of one stage execution, tagged with its key and the Prefect flow run."""
    run = StageRun(tracking_uri(cfg.tracking.uri, store), cfg.tracking.experiment, store, f"{stage}-{key}",
                   stage=stage, key=key, parent_run_id=parent_run_id, flow_run_id=flow_run_id or flow_run.get_id())
    run.log_params(flatten(params))
    logger().info("MLflow run %s (stage %s, key %s)", run.run_id, stage, key)
    return run


class Progress:
    """Progress lines with rate and ETA in the Prefect logs, at most every `every_s` seconds.

    `max_minutes`: a wall-clock cap (training budgets); the ETA is the sooner of the two.
    """

    def __init__(self, what: str, total: int | None, unit: str = "it", every_s: float = 5.0,
                 max_minutes: float | None = None):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.max_s = max_minutes * 60 if max_minutes else float("inf")
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.logger = logger()

    def update(self, n: int = 1, extra: str = "", force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = max(0.0, min(eta, self.max_s - (now - self.start)))
            self.logger.info("%s: %d/%d (%.0f%%) %.1f %s/s ETA %s %s", self.what, self.done, self.total,
                             100 * self.done / self.total, rate, self.unit, _fmt_s(eta), extra)
        else:
            self.logger.info("%s: %d %.1f %s/s %s", self.what, self.done, rate, self.unit, extra)


def _fmt_s(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


# ------------------------------------------------------------ checkpoints

def state_bytes(model) -> bytes:
    """Model weights as safetensors bytes (tied tensors are stored once each)."""
    from safetensors.torch import save

    return save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})


def load_state_bytes(model, data: bytes) -> None:
    from safetensors.torch import load

    model.load_state_dict(load(data))


def save_checkpoint(store: ArtifactStore, stage: str, key: str, model, optimizer, step: int,
                    extra: dict | None = None) -> None:
    """Write `checkpoints/step-N/` and then point `checkpoints/latest.json` at it; drop older ones."""
    from dalle_core.train import training_state_bytes

    name = f"step-{step:08d}"
    store.write_bytes(store.path(stage, key, "checkpoints", name, "model.safetensors"), state_bytes(model))
    store.write_bytes(store.path(stage, key, "checkpoints", name, "training_state.pt"),
                      training_state_bytes(optimizer))
    store.write_json(store.path(stage, key, "checkpoints", "latest.json"), {"step": step, "dir": name, **(extra or {})})
    for old in store.listdir(store.path(stage, key, "checkpoints")):
        if old.startswith("step-") and old != name:
            store.fs.rm(store.path(stage, key, "checkpoints", old), recursive=True)
    logger().info("checkpoint %s/%s at step %d", stage, key, step)


def load_checkpoint(store: ArtifactStore, stage: str, key: str, model, optimizer) -> tuple[int, dict]:
    """Restore weights, optimizer and RNG from the latest checkpoint; returns (step, extra) or (0, {})."""
    from dalle_core.train import load_training_state

    latest = store.path(stage, key, "checkpoints", "latest.json")
    if not store.exists(latest):
        return 0, {}
    info = store.read_json(latest)
    base = store.path(stage, key, "checkpoints", info["dir"])
    load_state_bytes(model, store.read_bytes(f"{base}/model.safetensors"))
    load_training_state(optimizer, store.read_bytes(f"{base}/training_state.pt"))
    logger().info("resuming %s/%s from its checkpoint at step %d", stage, key, info["step"])
    return int(info["step"]), info


def drop_checkpoints(store: ArtifactStore, stage: str, key: str) -> None:
    path = store.path(stage, key, "checkpoints")
    if store.exists(path):
        store.fs.rm(path, recursive=True)
