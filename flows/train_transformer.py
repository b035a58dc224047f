"""Stage 2: train the transformer on cached token shards (pre-tokenizing first if needed)."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.pretokenize import pretokenize_flow
from flows.stage import Inputs, check_inputs, finished
from tasks.common import ArtifactRef
from tasks.transformer import train_transformer_task


@flow(name="train-transformer")
def train_transformer_flow(config: str | None = None, overrides: list[str] | None = None,
                           parent_run_id: str | None = None, upstream: bool = True,
                           inputs: Inputs = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    check_inputs(cfg, inputs)
    if upstream:
        pretokenize_flow(config, overrides, parent_run_id)
    return finished(train_transformer_task(cfg, parent_run_id))
