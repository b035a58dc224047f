"""The whole pipeline as one flow: each stage a subflow, one parent MLflow run, re-runs from cache."""

from __future__ import annotations

from prefect import flow

from dalle_core.config import load_config
from flows.evaluate import evaluate_flow
from flows.generate import generate_flow
from flows.ingest import ingest_flow
from flows.pretokenize import pretokenize_flow
from flows.stage import run_stage
from flows.train_bpe import train_bpe_flow
from flows.train_clip import train_clip_flow
from flows.train_dvae import train_dvae_flow
from flows.train_transformer import train_transformer_flow
from storage.tracking import one_line_error
from tasks.checks import TRAINED, check_batch_sizes
from tasks.common import ArtifactRef, open_store, stage_keys
from tasks.pipeline import (
    NEEDS,
    Stage,
    end_pipeline_run,
    force_stages,
    select_stages,
    start_pipeline_run,
)

STAGE_FLOWS = {"ingest": ingest_flow, "dvae": train_dvae_flow, "bpe": train_bpe_flow, "pretokenize": pretokenize_flow,
               "transformer": train_transformer_flow, "clip": train_clip_flow, "generate": generate_flow,
               "evaluate": evaluate_flow}


@flow(name="pipeline")
def pipeline_flow(config: str | None = None, overrides: list[str] | None = None, only: list[Stage] | None = None,
                  from_stage: Stage | None = None, force: list[Stage] | None = None) -> dict[str, str]:
    """ingest -> (dvae, bpe) -> pretokenize -> transformer; bpe -> clip; (transformer, clip) -> generate, evaluate.

    The stages run one after another: the independent ones (dVAE and BPE, transformer and CLIP) would
    only compete for the same cores or GPU, since each training stage already uses all of them."""
    cfg = load_config(config, overrides or [])
    stages = select_stages(only, from_stage)
    if force:
        force_stages(cfg, force)
    # A copy of the id that Prefect does not link to the task that made it: the parent MLflow run is
    # bookkeeping, and an edge from start-pipeline-run to every stage would hide the DAG in the run graph.
    run_id = start_pipeline_run(cfg, stages).encode().decode()
    refs: dict[str, ArtifactRef] = {}
    try:
        for stage in stages:  # each stage gets its upstream artifacts: Prefect draws the DAG from them
            if stage in TRAINED and not any(s in TRAINED for s in refs):  # the images exist; nothing trained yet
                check_batch_sizes(cfg, open_store(cfg), stage_keys(cfg), stages)
            inputs = {need: refs[need] for need in NEEDS[stage] if need in refs}
            refs[stage] = run_stage(STAGE_FLOWS[stage], config, overrides, run_id, upstream=False, inputs=inputs)
    except BaseException as err:
        end_pipeline_run(cfg, run_id, refs, error=one_line_error(err))
        raise
    end_pipeline_run(cfg, run_id, refs)
    return {stage: str(r) for stage, r in refs.items()}
