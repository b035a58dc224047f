"""MLflow runs of the pipeline layer: the pipeline's parent run, one child run per stage execution (opened and
closed in one scope around the stage's work), and a short `(cached)` child run for a reused stage.

The parent run is found through a context variable that `pipeline_run` sets: Prefect runs a flow's tasks
with its context, so no run id is passed through a task's arguments.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from html import escape

from dalle_core.evaluation import flat_metrics
from pipeline.config import Config, flatten, merged_config
from pipeline.logs import log
from storage.store import ArtifactStore
from storage.tracking import StageRun, one_line_error, producer_run, tracking_uri

PARENT_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("dalle_parent_run", default=None)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def _lineage() -> dict[str, str | None]:
    """The tags that link a stage's run to the pipeline's MLflow run and the Prefect flow run (None: not in one)."""
    return {"mlflow.parentRunId": PARENT_RUN.get(), "prefect.flow_run_id": _flow_run_id()}


def deployment_config(cfg: Config) -> Config:
    """In a flow run of a deployment, `cfg` merged over the deployment's own `cfg` parameter; elsewhere `cfg`.
    Prefect replaces a parameter whole, so without this a run that sets only `transformer.depth` would train the
    built-in defaults into `./artifacts` (docs/operations.md). Raises ConfigError if the merge is not valid."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is None or run.deployment_id is None or not isinstance(run.parameters.get("cfg"), dict):
        return cfg
    with get_client(sync_client=True) as client:
        base = client.read_deployment(run.deployment_id).parameters.get("cfg")
    if not isinstance(base, dict):
        return cfg
    given = sorted(flatten(run.parameters["cfg"]))  # as the run gave it: the typed `cfg` has every default filled
    log.info("cfg: this run sets %s; every other value is the deployment's own cfg",
             ", ".join(given[:12]) + (f" and {len(given) - 12} more" if len(given) > 12 else "") or "nothing")
    return merged_config(base, run.parameters["cfg"])


def config_yaml(cfg: Config) -> str:
    """The resolved config (file + --set overrides) as YAML: what the run really used."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def stage_run(cfg: Config, store: ArtifactStore, stage: str, key: str, params: dict, inputs: dict) -> StageRun:
    """Open the MLflow run of one stage execution (a child of the pipeline's run, if any), tagged with its key,
    its inputs' artifacts (`input.<stage>`: key), the Prefect flow run and the code version, with the run's
    resolved config as `config.yaml`. Use it as a context manager: it closes FINISHED, or FAILED with the error
    in its `error` tag."""
    run = StageRun(tracking_uri(cfg.tracking.uri, store), cfg.tracking.experiment, store, f"{stage}-{key}",
                   stage=stage, key=key, source=cfg.tracking.source,
                   tags={"cached": "false", **{f"input.{s}": r.key for s, r in inputs.items()}, **_lineage()})
    run.log_params(flatten(params))
    run.log_text(config_yaml(cfg), "config.yaml")
    log.info("MLflow run %s (stage %s, key %s)", run.run_id, stage, key)
    return run


def log_training_data(run: StageRun, cfg: Config, store: ArtifactStore, ingest_key: str) -> None:
    """The ingested data set as the run's input (MLflow's Datasets): named for its source, with the ingest
    artifact's key (which hashes the data's fingerprint) as digest, the artifact as source, and its rows."""
    manifest = store.manifest("ingest", ingest_key)
    name = cfg.data.source if not cfg.data.path else f"{cfg.data.source}:{os.path.basename(cfg.data.path.rstrip('/'))}"
    run.log_input(name, ingest_key, store.path("ingest", ingest_key),
                  {"source": cfg.data.source, "path": cfg.data.path, "rows": manifest.get("rows"),
                   "subsets": manifest.get("subsets"), "image_size": cfg.data.image_size})


def record_reuse(cfg: Config, store: ArtifactStore, stage: str, key: str) -> None:
    """Inside a pipeline run, a reused stage is a short child run tagged `cached=true` and linked to the run
    that made the artifact (`source_run_id`), so the MLflow run table shows which stages ran."""
    if not PARENT_RUN.get():
        return
    uri = tracking_uri(cfg.tracking.uri, store)
    source = (producer_run(uri, cfg.tracking.experiment, stage, key) or (None,))[0]
    note = f"Reused the finished artifact `{stage}/{key}` " + (
        f"made by run {source}." if source else "(its run is not in this tracking store).")
    StageRun(uri, cfg.tracking.experiment, store, f"(cached) {stage}-{key}", stage=stage, key=key,
             source=cfg.tracking.source, tags={"cached": "true", "source_run_id": source or "not in this tracking store",
                                               "mlflow.note.content": note, **_lineage()}).end()


HEADLINE = ("faithfulness.top1.overall.all", "faithfulness.random.overall.all",
            "faithfulness.holdout_pairs.overall.all", "splits.seen.r_precision_top1", "splits.val.r_precision_top1",
            "splits.unseen.r_precision_top1", "generation.clip_top1_of_", "generation.clip_random",
            "transformer.val_bits_per_image_token", "dvae.val_psnr")  # `_of_`: the largest N the evaluation drew


def headline_metrics(report: dict) -> dict[str, float]:
    """The few numbers a reviewer compares pipeline runs by (those the evaluation has), best first."""

    flat, out = flat_metrics(report), {}
    for h in HEADLINE:
        found = [k for k in flat if k == h or (h.endswith("_") and k.startswith(h) and k[len(h):].isdigit())]
        if found:
            key = max(found, key=lambda k: int(k[len(h):] or 0) if h.endswith("_") else 0)
            out[key] = flat[key]
    return out


def run_link(uri: str, experiment_id: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """Where a person opens this run: on the tracking server, or in `dalle ui` (default port) for sqlite."""
    base = uri.rstrip("/") if uri.startswith("http") else ui
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


@contextlib.contextmanager
def pipeline_run(cfg: Config, stages: list[str]) -> Iterator[dict]:
    """The pipeline's parent MLflow run around a flow's stages; yields the dict the flow fills with each stage's
    ArtifactRef. At the end the run's name says what ran and what was reused; it carries the headline metrics,
    a summary table, evaluation.json and the contact sheet, and a Prefect markdown artifact links to it. An
    error closes it FAILED with the error in its `error` tag."""

    store = cfg.store.open()
    run = StageRun(tracking_uri(cfg.tracking.uri, store), cfg.tracking.experiment, store, "pipeline",
                   stage="pipeline", tags={"stages": ",".join(stages), "prefect.flow_run_id": _flow_run_id()},
                   source=cfg.tracking.source)
    run.log_params(flatten(cfg.model_dump(mode="json")))
    run.log_text(config_yaml(cfg), "config.yaml")
    log.info("MLflow parent run %s (tracking %s)", run.run_id, run.uri)
    refs: dict = {}
    token = PARENT_RUN.set(run.run_id)
    try:
        yield refs
    except BaseException as err:
        _close(store, run, refs, one_line_error(err))
        raise
    finally:
        PARENT_RUN.reset(token)
    _close(store, run, refs, None)


def _close(store: ArtifactStore, run: StageRun, refs: dict, error: str | None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    refs = {s: r for s, r in refs.items() if r is not None}
    ran = [s for s, r in refs.items() if not r.cached]
    cached = [s for s, r in refs.items() if r.cached]
    name = "pipeline" if not cached else "pipeline (all cached)" if not ran else f"pipeline (ran: {', '.join(ran)})"
    if error:
        name = f"pipeline (failed{' after ' + ', '.join(refs) if refs else ''})"
    run.set_tags({"mlflow.runName": name, "stages.ran": ",".join(ran) or "none",
                  "stages.cached": ",".join(cached) or "none", **{f"stage.{k}": str(v) for k, v in refs.items()}})
    headline: dict[str, float] = {}
    if "evaluate" in refs and store.is_complete("evaluate", refs["evaluate"].key):
        evaluation = store.path("evaluate", refs["evaluate"].key)
        report = store.read_json(f"{evaluation}/evaluation.json")
        headline = headline_metrics(report)
        run.log_metrics(headline)
        run.log_dict(report, "evaluation.json")
        run.log_file(store.read_bytes(f"{evaluation}/top1_vs_random.png"), "top1_vs_random.png")
        create_table_artifact(  # the evaluation table beside the run graph in Prefect's UI, as in MLflow
            [{"metric": k, "value": round(v, 4), "headline": k in headline} for k, v in flat_metrics(report).items()],
            key="evaluation", description=f"the evaluation of `evaluate/{refs['evaluate'].key}` (evaluation.json, "
                                          "flattened); the headline metrics are the MLflow run's")
    if "generate" in refs and store.is_complete("generate", refs["generate"].key):
        run.log_file(store.read_bytes(store.path("generate", refs["generate"].key, "contact_sheet.png")),
                     "contact_sheet.png")
    exp = run.client.get_run(run.run_id).info.experiment_id
    children = {}  # stage -> the run that made its artifact (a reused one's original run, when known)
    for c in run.client.search_runs([exp], f"tags.mlflow.parentRunId = '{run.run_id}'"):
        source = c.data.tags.get("source_run_id", "")
        children[c.data.tags.get("stage")] = source if len(source) == 32 else c.info.run_id
    rows = [(stage, ("cached" if r.cached else "ran") + _cut_short(store, r), f"{r.stage}/{r.key}",
             children.get(r.stage)) for stage, r in refs.items()]
    for stage, how, _, _ in rows:
        if "cut short" in how:
            log.warning("%s was %s", stage, how.removeprefix("ran, ").removeprefix("cached, "))
    run.log_text(summary_html(name, rows, headline, run.uri, exp), "summary.html")
    run.end(error=error)
    link = run_link(run.uri, exp, run.run_id)
    table = "\n".join(f"| {s} | {how} | `{art}` | {f'[{rid[:8]}]({run_link(run.uri, exp, rid)})' if rid else ''} |"
                      for s, how, art, rid in rows)
    numbers = "\n".join(f"| {k} | {v:.4g} |" for k, v in headline.items())
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=f"## DALL-E pipeline {'FAILED: ' + error if error else 'finished'}\n\n"
                 f"MLflow run [{name}]({link}) (tracking `{run.uri}`"
                 f"{'; open it with `dalle ui`' if not run.uri.startswith('http') else ''})\n\n"
                 f"| stage | | artifact | MLflow run |\n|---|---|---|---|\n{table}\n\n"
                 + (f"| headline metric | value |\n|---|---|\n{numbers}\n" if headline else ""),
        description="what ran and what was reused, the MLflow run and the headline metrics of this execution")


def _cut_short(store: ArtifactStore, ref) -> str:
    """`, cut short by the clock at 32% of its steps (raise <stage>.train.max_minutes)` for a training stage the
    clock stopped; "" otherwise."""
    if not store.is_complete(ref.stage, ref.key):
        return ""
    far = store.manifest(ref.stage, ref.key).get("how_far") or {}
    if far.get("stopped_by") != "max_minutes":
        return ""
    return (f", cut short by the clock at {far['steps'] / far['max_steps']:.0%} of its steps "
            f"(raise {ref.stage}.train.max_minutes)")


def summary_html(name: str, rows: list[tuple], headline: dict[str, float], uri: str, exp: str) -> str:
    """The parent run's summary.html (MLflow's artifact viewer renders it): stages, then headline metrics."""
    def link(rid: str | None) -> str:
        return f"<a href='{run_link(uri, exp, rid)}' target='_top'>{rid[:8]}</a>" if rid else ""

    stage_rows = "".join(f"<tr><td>{escape(s)}</td><td>{how}</td><td><code>{escape(art)}</code></td>"
                         f"<td>{link(rid)}</td></tr>" for s, how, art, rid in rows)
    metric_rows = "".join(f"<tr><td>{escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in headline.items())
    table = "<table border=1 cellpadding=4 style='border-collapse:collapse'>"
    return (f"<html><body style='font-family:sans-serif'><h3>{escape(name)}</h3>{table}"
            f"<tr><th>stage</th><th></th><th>artifact</th><th>MLflow run</th></tr>{stage_rows}</table>"
            + (f"<h4>headline metrics</h4>{table}<tr><th>metric</th><th>value</th></tr>{metric_rows}</table>"
               if headline else "")
            + "</body></html>")
