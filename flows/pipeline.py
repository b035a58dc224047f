"""The whole pipeline as one flow: each stage a subflow, one parent MLflow run, re-runs from cache."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.evaluate import evaluate_flow
from flows.generate import generate_flow
from flows.ingest import ingest_flow
from flows.pretokenize import pretokenize_flow
from flows.train_bpe import train_bpe_flow
from flows.train_clip import train_clip_flow
from flows.train_dvae import train_dvae_flow
from flows.train_transformer import train_transformer_flow
from tasks.pipeline import Stage, end_pipeline_run, force_stages, select_stages, start_pipeline_run

STAGE_FLOWS = {"ingest": ingest_flow, "dvae": train_dvae_flow, "bpe": train_bpe_flow, "pretokenize": pretokenize_flow,
               "transformer": train_transformer_flow, "clip": train_clip_flow, "generate": generate_flow,
               "evaluate": evaluate_flow}


@flow(name="pipeline")
def pipeline_flow(config: str | None = None, overrides: list[str] | None = None, only: list[Stage] | None = None,
                  from_stage: Stage | None = None, force: list[Stage] | None = None) -> dict[str, str]:
    """ingest -> dvae -> bpe -> pretokenize -> transformer -> clip -> generate -> evaluate."""
    cfg = load_config(config, overrides or [])
    stages = select_stages(only, from_stage)
    if force:
        force_stages(cfg, force)
    run_id = start_pipeline_run(cfg, stages)
    refs: dict[str, str] = {}
    try:
        for stage in stages:
            refs[stage] = str(STAGE_FLOWS[stage](config, overrides, run_id, upstream=False))
    except BaseException:
        end_pipeline_run(cfg, run_id, refs, failed=True)
        raise
    end_pipeline_run(cfg, run_id, refs)
    return refs
