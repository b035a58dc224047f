"""Evaluation: stage metrics, CLIP reranking gain, and caption faithfulness on shapes."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.stage import Inputs, check_inputs, finished
from flows.train_clip import train_clip_flow
from flows.train_transformer import train_transformer_flow
from tasks.common import ArtifactRef
from tasks.evaluate import evaluate_task


@flow(name="evaluate")
def evaluate_flow(config: str | None = None, overrides: list[str] | None = None,
                  parent_run_id: str | None = None, upstream: bool = True, inputs: Inputs = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    check_inputs(cfg, inputs)
    if upstream:
        train_transformer_flow(config, overrides, parent_run_id)
        train_clip_flow(config, overrides, parent_run_id)
    return finished(evaluate_task(cfg, parent_run_id))
