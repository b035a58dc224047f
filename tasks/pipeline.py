"""Pipeline bookkeeping: which stages run, forced re-runs, the parent MLflow run and the Prefect summary."""

from __future__ import annotations

from typing import Literal

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from dalle_core.config import Config, ConfigError, flatten
from storage.tracking import StageRun, tracking_uri
from tasks.common import logger, open_store, stage_keys

Stage = Literal["ingest", "dvae", "bpe", "pretokenize", "transformer", "clip", "generate", "evaluate"]
STAGES: tuple[str, ...] = ("ingest", "dvae", "bpe", "pretokenize", "transformer", "clip", "generate", "evaluate")
STORE_NAME = {"ingest": "images", "dvae": "dvae", "bpe": "bpe", "pretokenize": "tokens", "transformer": "transformer",
              "clip": "clip", "generate": "generations", "evaluate": "evaluation"}
NEEDS = {"ingest": (), "dvae": ("ingest",), "bpe": ("ingest",), "pretokenize": ("dvae", "bpe"),
         "transformer": ("pretokenize",), "clip": ("bpe",), "generate": ("transformer", "clip"),
         "evaluate": ("transformer", "clip")}


def downstream(stage: str) -> list[str]:
    """`stage` and every stage that (transitively) reads its output, in pipeline order."""
    out = {stage}
    for s in STAGES:
        if any(n in out for n in NEEDS[s]):
            out.add(s)
    return [s for s in STAGES if s in out]


def select_stages(only: list[str] | None, from_stage: str | None) -> list[str]:
    for s in [*(only or []), *([from_stage] if from_stage else [])]:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    if only and from_stage:
        raise ConfigError("use either --only or --from, not both")
    if only:
        return [s for s in STAGES if s in only]
    if from_stage:
        return list(STAGES[STAGES.index(from_stage):])
    return list(STAGES)


def check_upstream(cfg: Config, stages: list[str]) -> None:
    """Fail in one line, before any work, when a stage to run needs an artifact that neither exists nor is made
    by an earlier stage of this run (`--only generate` on an empty store)."""
    store, keys = open_store(cfg), stage_keys(cfg)
    for stage in stages:
        for need in NEEDS[stage]:
            if need == "bpe" and stage == "clip" and cfg.clip.pretrained:
                continue
            if need not in stages:
                store.require(STORE_NAME[need], keys[STORE_NAME[need]])


@task(name="force-stages", cache_policy=NONE)
def force_stages(cfg: Config, stages: list[str]) -> list[str]:
    """Remove the current artifacts of `stages` and of everything downstream, so they are redone."""
    store, keys = open_store(cfg), stage_keys(cfg)
    removed = []
    for stage in sorted({d for s in stages for d in downstream(s)}, key=STAGES.index):
        name = STORE_NAME[stage]
        if store.exists(store.path(name, keys[name])):
            store.remove(name, keys[name])
            removed.append(f"{name}/{keys[name]}")
    logger().info("forced: removed %s", ", ".join(removed) or "nothing")
    return removed


@task(name="start-pipeline-run", cache_policy=NONE)
def start_pipeline_run(cfg: Config, stages: list[str]) -> str:
    store = open_store(cfg)
    run = StageRun(tracking_uri(cfg.tracking.uri, store), cfg.tracking.experiment, store, "pipeline",
                   stage="pipeline", flow_run_id=flow_run.get_id(), tags={"stages": ",".join(stages)})
    run.log_params(flatten(cfg.model_dump(mode="json")))
    logger().info("MLflow parent run %s (tracking %s)", run.run_id, run.uri)
    return run.run_id


@task(name="end-pipeline-run", cache_policy=NONE)
def end_pipeline_run(cfg: Config, run_id: str, refs: dict[str, str], failed: bool = False) -> None:
    store = open_store(cfg)
    uri = tracking_uri(cfg.tracking.uri, store)
    run = StageRun.attach(uri, run_id)
    run.set_tags({f"stage.{k}": v for k, v in refs.items()})
    keys = stage_keys(cfg)
    if not failed and store.is_complete("evaluation", keys["evaluation"]):
        from tasks.evaluate import flat_metrics

        run.log_metrics(flat_metrics(store.read_json(store.path("evaluation", keys["evaluation"], "evaluation.json"))))
    run.end(failed)
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in refs.items())
    link = f"{uri.rstrip('/')}/#/experiments/{run.client.get_run(run_id).info.experiment_id}/runs/{run_id}" \
        if uri.startswith("http") else uri
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=f"## DALL-E pipeline {'FAILED' if failed else 'finished'}\n\nMLflow run `{run_id}` ({link})\n\n"
                 f"| stage | artifact |\n|---|---|\n{rows}\n",
        description="stage artifacts and the MLflow run of this pipeline execution")
