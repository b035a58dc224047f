"""Pipeline bookkeeping: which stages run, forced re-runs, the parent MLflow run and the Prefect summary."""

from __future__ import annotations

from typing import Literal

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from dalle_core.config import Config, ConfigError, flatten
from storage.tracking import StageRun, tracking_uri
from tasks.common import config_yaml, logger, open_store, stage_keys

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


def check_inputs(cfg: Config, inputs: dict | None) -> None:
    """The upstream artifacts a pipeline hands a stage flow must be the ones this config reads (they are passed
    so that Prefect draws the DAG; a mismatch means the flows were called with different configs)."""
    keys = stage_keys(cfg)
    for stage, given in (inputs or {}).items():
        want = keys[STORE_NAME[stage]]
        if given.key != want and stage == "ingest":  # the source's fingerprint is part of the images key
            raise ConfigError(f"the data at data.path={cfg.data.path!r} changed during this run (ingested as "
                              f"images/{given.key}, now images/{want}); run the command again to use the new data")
        if given.key != want:
            raise ConfigError(f"upstream {stage} artifact {given.key!r} is not the one this config reads ({want!r})")


@task(name="fail-stage-run", cache_policy=NONE)
def fail_stage_run(cfg: Config, run_id: str, error: str) -> None:
    """Close a stage's MLflow run as FAILED, with the error in its `error` tag."""
    StageRun.attach(tracking_uri(cfg.tracking.uri, open_store(cfg)), run_id).end(error=error)


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
                   stage="pipeline", flow_run_id=flow_run.get_id(), tags={"stages": ",".join(stages)},
                   source=cfg.tracking.source)
    run.log_params(flatten(cfg.model_dump(mode="json")))
    run.log_text(config_yaml(cfg), "config.yaml")
    logger().info("MLflow parent run %s (tracking %s)", run.run_id, run.uri)
    return run.run_id


HEADLINE = ("faithfulness.top1.overall.all", "faithfulness.random.overall.all",
            "faithfulness.holdout_pairs.overall.all", "splits.seen.r_precision_top1", "splits.val.r_precision_top1",
            "splits.unseen.r_precision_top1", "generation.clip_top1_of_16", "generation.clip_random",
            "transformer.val_bits_per_image_token", "dvae.val_psnr")


def headline_metrics(report: dict) -> dict[str, float]:
    """The few numbers a reviewer compares pipeline runs by (those the evaluation has), best first."""
    from tasks.evaluate import flat_metrics

    flat = flat_metrics(report)
    return {k: flat[k] for k in HEADLINE if k in flat}


def run_link(uri: str, experiment_id: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """Where a person opens this run: on the tracking server, or in `dalle ui` (default port) for sqlite."""
    base = uri.rstrip("/") if uri.startswith("http") else ui
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@task(name="end-pipeline-run", cache_policy=NONE)
def end_pipeline_run(cfg: Config, run_id: str, refs: dict, error: str | None = None) -> None:
    """Close the parent run: its name says what ran and what was reused; it carries the headline metrics, a
    summary table, evaluation.json and the contact sheet; the Prefect summary artifact links to it."""
    store, keys = open_store(cfg), stage_keys(cfg)
    uri = tracking_uri(cfg.tracking.uri, store)
    run = StageRun.attach(uri, run_id)
    ran = [s for s, r in refs.items() if not r.cached]
    cached = [s for s, r in refs.items() if r.cached]
    name = "pipeline" if not cached else "pipeline (all cached)" if not ran else f"pipeline (ran: {', '.join(ran)})"
    if error:
        name = f"pipeline (failed{' after ' + ', '.join(refs) if refs else ''})"
    run.set_tags({"mlflow.runName": name, "stages.ran": ",".join(ran) or "none",
                  "stages.cached": ",".join(cached) or "none", **{f"stage.{k}": str(v) for k, v in refs.items()}})
    headline: dict[str, float] = {}
    if store.is_complete("evaluation", keys["evaluation"]) and "evaluate" in refs:
        report = store.read_json(store.path("evaluation", keys["evaluation"], "evaluation.json"))
        headline = headline_metrics(report)
        run.log_metrics(headline)
        run.log_dict(report, "evaluation.json")
        run.log_file(store.read_bytes(store.path("evaluation", keys["evaluation"], "top1_vs_random.png")),
                     "top1_vs_random.png")
    if store.is_complete("generations", keys["generations"]) and "generate" in refs:
        run.log_file(store.read_bytes(store.path("generations", keys["generations"], "contact_sheet.png")),
                     "contact_sheet.png")
    exp = run.client.get_run(run_id).info.experiment_id
    children = {}  # stage -> the run that made its artifact (a reused one's original run, when known)
    for c in run.client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'"):
        source = c.data.tags.get("source_run_id", "")
        children[c.data.tags.get("stage")] = source if len(source) == 32 else c.info.run_id
    rows = [(stage, "cached" if r.cached else "ran", f"{r.stage}/{r.key}", children.get(r.stage))
            for stage, r in refs.items()]
    run.log_text(summary_html(name, rows, headline, uri, exp), "summary.html")
    run.end(error=error)
    link = run_link(uri, exp, run_id)
    table = "\n".join(f"| {s} | {how} | `{art}` | {f'[{rid[:8]}]({run_link(uri, exp, rid)})' if rid else ''} |"
                      for s, how, art, rid in rows)
    numbers = "\n".join(f"| {k} | {v:.4g} |" for k, v in headline.items())
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=f"## DALL-E pipeline {'FAILED: ' + error if error else 'finished'}\n\n"
                 f"MLflow run [{name}]({link}) (tracking `{uri}`"
                 f"{'; open it with `dalle ui`' if not uri.startswith('http') else ''})\n\n"
                 f"| stage | | artifact | MLflow run |\n|---|---|---|---|\n{table}\n\n"
                 + (f"| headline metric | value |\n|---|---|\n{numbers}\n" if headline else ""),
        description="what ran and what was reused, the MLflow run and the headline metrics of this execution")


def summary_html(name: str, rows: list[tuple], headline: dict[str, float], uri: str, exp: str) -> str:
    """The parent run's summary.html (MLflow's artifact viewer renders it): stages, then headline metrics."""
    from html import escape

    def link(rid: str | None) -> str:
        return f"<a href='{run_link(uri, exp, rid)}' target='_top'>{rid[:8]}</a>" if rid else ""

    stage_rows = "".join(f"<tr><td>{escape(s)}</td><td>{how}</td><td><code>{escape(art)}</code></td>"
                         f"<td>{link(rid)}</td></tr>" for s, how, art, rid in rows)
    metric_rows = "".join(f"<tr><td>{escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in headline.items())
    return (f"<html><body style='font-family:sans-serif'><h3>{escape(name)}</h3>"
            f"<table border=1 cellpadding=4 style='border-collapse:collapse'>"
            f"<tr><th>stage</th><th></th><th>artifact</th><th>MLflow run</th></tr>{stage_rows}</table>"
            + (f"<h4>headline metrics</h4><table border=1 cellpadding=4 style='border-collapse:collapse'>"
               f"<tr><th>metric</th><th>value</th></tr>{metric_rows}</table>" if headline else "")
            + "</body></html>")
