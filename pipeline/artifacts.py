"""A stage's artifact: the reference a stage returns, and `run_stage`, the one way a stage does its work
(reuse a finished artifact, else claim the key, do the work inside the stage's MLflow run, write the manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dalle_core.errors import ConfigError
from pipeline.config import Config
from pipeline.logs import log
from pipeline.runs import record_reuse, stage_run
from pipeline.stage_table import STAGES
from storage.store import ArtifactStore, StoreError
from storage.tracking import StageRun


@dataclass
class ArtifactRef:
    """What a stage returns and the stages after it take as arguments: which artifact, and whether this run
    reused it."""

    stage: str
    key: str
    cached: bool
    uri: str

    def __str__(self) -> str:
        return f"{self.stage}/{self.key}{' (cached)' if self.cached else ''}"


def ref(store: ArtifactStore, stage: str, key: str, cached: bool) -> ArtifactRef:
    return ArtifactRef(stage, key, cached, store.uri(store.path(stage, key)))


def stored(cfg: Config, stage: str, key: str) -> ArtifactRef:
    """The finished artifact of `stage/key` (a StoreError in one line when there is none)."""
    store = cfg.store.open()
    store.require(stage, key)
    return ref(store, stage, key, cached=True)


def no_retry_on_user_error(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry storage hiccups, not errors a retry cannot fix (a damaged file)."""
    return not isinstance(state.result(raise_on_failure=False), (StoreError, ConfigError))


@dataclass
class Work:
    """What a stage's work gets: the run config, the store, its own key, its inputs' artifacts by stage name,
    and its open MLflow run."""

    cfg: Config
    store: ArtifactStore
    stage: str
    key: str
    inputs: dict[str, ArtifactRef]
    run: StageRun | None

    def path(self, *parts: str) -> str:
        """A path inside this stage's artifact."""
        return self.store.path(self.stage, self.key, *parts)

    def input_path(self, stage: str, *parts: str) -> str:
        return self.store.path(stage, self.inputs[stage].key, *parts)

    def write_files(self, files: dict[str, bytes | dict], logged_as: Callable[[str], str] = lambda name: name) -> None:
        """Write the artifact's files (a dict as JSON); each PNG is also shown in the stage's MLflow run, at
        `logged_as(name)`."""
        for name, data in files.items():
            if isinstance(data, dict):
                self.store.write_json(self.path(name), data)
                continue
            self.store.write_bytes(self.path(name), data)
            if name.endswith(".png") and self.run is not None:
                self.run.log_file(data, logged_as(name))

    def finish(self, **fields: Any) -> dict:
        """Write the manifest (last: the artifact is complete from then on) with the stage table's inputs;
        `config` defaults to the stage's section of the key. Logged to the stage's MLflow run."""
        spec = STAGES[self.stage]
        manifest = self.store.finish(self.stage, self.key, **{"config": spec.section(self.cfg), **fields},
                                     inputs={s: self.inputs[s].key for s in spec.key_inputs(self.cfg)})
        if self.run is not None:
            self.run.log_dict(manifest, "manifest.json")
        return manifest


def stage_key(cfg: Config, stage: str, inputs: dict[str, ArtifactRef]) -> str:
    return STAGES[stage].key(cfg, {s: r.key for s, r in inputs.items()})


def run_stage(cfg: Config, stage: str, inputs: dict[str, ArtifactRef], work: Callable[[Work], dict[str, Any]],
              params: dict | None = None, mlflow_run: bool = True, claim: bool = True) -> ArtifactRef:
    """Reuse the finished artifact of `stage` for this config and these inputs; else claim its key (a second
    run of the same key waits, then reuses), do `work` inside the stage's MLflow run, and write the manifest.

    `work` writes the artifact's files and returns the manifest's fields (`config` defaults to the stage's
    section of the key; `inputs` are the stage table's). An error closes the MLflow run as FAILED with the
    error in a tag and ends the claim, so a later run redoes the stage. `mlflow_run=False`: the work opens
    its own run (a training stage's rank 0) and writes the manifest itself. `claim=False`: only look (the
    machines of one multi-node training job all run this and meet in torchrun's rendezvous instead)."""
    store, key = cfg.store.open(), stage_key(cfg, stage, inputs)
    if store.begin(stage, key, log.info, claim=claim) is not None:
        log.info("%s/%s is complete; reusing it", stage, key)
        record_reuse(cfg, store, stage, key)
        return ref(store, stage, key, cached=True)
    try:
        for r in inputs.values():
            store.require(r.stage, r.key)
        store.prepare(stage, key)
        if not mlflow_run:
            work(Work(cfg, store, stage, key, inputs, None))
        else:
            with stage_run(cfg, store, stage, key, params or STAGES[stage].section(cfg), inputs) as run:
                w = Work(cfg, store, stage, key, inputs, run)
                w.finish(**work(w))
    finally:
        store.release(stage, key)
    store.require(stage, key)
    return ref(store, stage, key, cached=False)


def run_name(stage: str) -> Callable[..., str]:
    """A stage task's Prefect `task_run_name`: the stage's name, `<stage> (cached)` when this run will reuse its
    finished artifact, so reuse shows in the run graph (the state stays Prefect's own Completed)."""
    def name(parameters: dict) -> str:
        inputs = {s: r for s, r in parameters.items() if isinstance(r, ArtifactRef)}
        cfg = parameters["cfg"]
        cfg = cfg.unquote() if hasattr(cfg, "unquote") else cfg  # the flow passes it quoted
        try:
            done = cfg.store.open().is_complete(stage, stage_key(cfg, stage, inputs))
        except Exception:  # the stage itself reports what is wrong
            done = False
        return f"{stage} (cached)" if done else stage
    return name
