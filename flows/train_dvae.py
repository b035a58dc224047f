"""Stage 1a: train the dVAE (ingesting first if the images are not there yet)."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.ingest import ingest_flow
from flows.stage import Inputs, check_inputs, finished
from tasks.common import ArtifactRef
from tasks.dvae import train_dvae_task


@flow(name="train-dvae")
def train_dvae_flow(config: str | None = None, overrides: list[str] | None = None,
                    parent_run_id: str | None = None, upstream: bool = True, inputs: Inputs = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    check_inputs(cfg, inputs)
    if upstream:
        ingest_flow(config, overrides, parent_run_id)
    return finished(train_dvae_task(cfg, parent_run_id))
