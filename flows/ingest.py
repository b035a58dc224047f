"""Stage 0: captioned images in, Parquet image shards out."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from tasks.common import ArtifactRef
from tasks.ingest import ingest_images


@flow(name="ingest", log_prints=True)
def ingest_flow(config: str | None = None, overrides: list[str] | None = None,
                parent_run_id: str | None = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    return ingest_images(cfg, parent_run_id)
