"""Stage 1b: train the BPE text tokenizer (ingesting first if needed)."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.ingest import ingest_flow
from flows.stage import Inputs, check_inputs, finished
from tasks.common import ArtifactRef
from tasks.text import train_bpe_task


@flow(name="train-bpe")
def train_bpe_flow(config: str | None = None, overrides: list[str] | None = None,
                   parent_run_id: str | None = None, upstream: bool = True, inputs: Inputs = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    check_inputs(cfg, inputs)
    if upstream and not cfg.text.tokenizer_path:
        ingest_flow(config, overrides, parent_run_id)
    return finished(train_bpe_task(cfg, parent_run_id))
