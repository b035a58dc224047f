"""A training stage's weights in the store: safetensors files, and the checkpoints a killed run resumes from."""

from __future__ import annotations

from dalle_core.model_folder import state_bytes
from dalle_core.train import load_training_state, training_state_bytes
from pipeline.logs import log
from storage.store import ArtifactStore


def load_state_file(store: ArtifactStore, path: str, model) -> None:
    """Load safetensors weights from the store into `model`; a truncated or mismatched file is a StoreError
    naming it, its stage and how to redo it."""
    from safetensors.torch import load

    data = store.read_bytes(path)
    with store.reading(path):
        model.load_state_dict(load(data))


def save_checkpoint(store: ArtifactStore, stage: str, key: str, model, optimizer, step: int,
                    extra: dict | None = None) -> None:
    """Write `checkpoints/step-N/` and then point `checkpoints/latest.json` at it; drop older ones."""

    name = f"step-{step:08d}"
    store.write_bytes(store.path(stage, key, "checkpoints", name, "model.safetensors"), state_bytes(model))
    store.write_bytes(store.path(stage, key, "checkpoints", name, "training_state.pt"),
                      training_state_bytes(optimizer))
    store.write_json(store.path(stage, key, "checkpoints", "latest.json"), {"step": step, "dir": name, **(extra or {})})
    for old in store.listdir(store.path(stage, key, "checkpoints")):
        if old.startswith("step-") and old != name:
            store.fs.rm(store.path(stage, key, "checkpoints", old), recursive=True)
    log.info("checkpoint %s/%s at step %d", stage, key, step)


def load_checkpoint(store: ArtifactStore, stage: str, key: str, model, optimizer) -> tuple[int, dict]:
    """Restore weights, optimizer and RNG from the latest checkpoint; returns (step, extra) or (0, {})."""

    latest = store.path(stage, key, "checkpoints", "latest.json")
    if not store.exists(latest):
        return 0, {}
    info = store.read_json(latest)
    base = store.path(stage, key, "checkpoints", info["dir"])
    load_state_file(store, f"{base}/model.safetensors", model)
    state = store.read_bytes(f"{base}/training_state.pt")
    with store.reading(f"{base}/training_state.pt"):
        load_training_state(optimizer, state)
    log.info("resuming %s/%s from its checkpoint at step %d", stage, key, info["step"])
    return int(info["step"]), info


def drop_checkpoints(store: ArtifactStore, stage: str, key: str) -> None:
    path = store.path(stage, key, "checkpoints")
    if store.exists(path):
        store.fs.rm(path, recursive=True)


