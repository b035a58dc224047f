"""The CLIP stage: train the reranker (ingest and BPE first if needed), or record a pretrained one."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.stage import Inputs, check_inputs, finished
from flows.train_bpe import train_bpe_flow
from tasks.clip import train_clip_task
from tasks.common import ArtifactRef


@flow(name="train-clip")
def train_clip_flow(config: str | None = None, overrides: list[str] | None = None,
                    parent_run_id: str | None = None, upstream: bool = True, inputs: Inputs = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    check_inputs(cfg, inputs)
    if upstream and not cfg.clip.pretrained:
        train_bpe_flow(config, overrides, parent_run_id)
    return finished(train_clip_task(cfg, parent_run_id))
