"""Stage 1a: train the dVAE (ingesting first if the images are not there yet)."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from tasks.common import ArtifactRef
from tasks.dvae import train_dvae_task
from tasks.ingest import ingest_images


@flow(name="train-dvae")
def train_dvae_flow(config: str | None = None, overrides: list[str] | None = None,
                    parent_run_id: str | None = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    ingest_images(cfg, parent_run_id)
    return train_dvae_task(cfg, parent_run_id)
