"""Stage 0: captioned images in, Parquet image shards out."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.stage import Inputs, finished
from tasks.common import ArtifactRef
from tasks.ingest import ingest_images


@flow(name="ingest")
def ingest_flow(config: str | None = None, overrides: list[str] | None = None,
                parent_run_id: str | None = None, upstream: bool = True, inputs: Inputs = None) -> ArtifactRef:
    return finished(ingest_images(load_config(config, overrides or []), parent_run_id))
