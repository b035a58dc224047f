"""What a pipeline run executes, checked before any work: the selected stages, the finished artifacts the
others must supply, `--force`, and (once the images exist) whether every stage to train can fill a batch."""

from __future__ import annotations

from collections.abc import Callable

from prefect.utilities.annotations import quote

from dalle_core.errors import ConfigError
from pipeline.artifacts import ArtifactRef, stored
from pipeline.checks import check_batch_sizes
from pipeline.config import Config
from pipeline.logs import log
from pipeline.stage_table import STAGES, check_names, downstream, select_stages, stage_keys


class PipelinePlan:
    """The stages to run (`select_stages`), in pipeline order; a stage outside them that one of them reads is
    taken from the store, and must be there (`check_upstream`)."""

    def __init__(self, cfg: Config, only: list[str] | None = None, from_stage: str | None = None,
                 until: str | None = None):
        self.cfg, self.stages = cfg, select_stages(only, from_stage, until)
        self.keys = stage_keys(cfg)
        self.needed = [s for s in STAGES if s in self.stages or any(s in STAGES[t].inputs for t in self.stages)]

    def check_upstream(self, force: list[str] | None = None) -> None:
        """StoreError (one line) when a stage to run reads an artifact that neither exists nor is made by this
        run (`--only generate` on an empty store); ConfigError when `force` would remove one (checked before
        `force` removes anything)."""
        removed, kept = set(self.removed_by(force or [])), [s for s in self.needed if s not in self.stages]
        for stage in kept:
            if stage in removed:
                raise ConfigError(f"--force {' '.join(force)} would remove {stage}/{self.keys[stage]}, which this run "
                                  f"reads but does not redo; run {stage} too (e.g. --from {force[0]})")
        store = self.cfg.store.open()
        for stage in kept:
            store.require(stage, self.keys[stage])

    def removed_by(self, force: list[str]) -> list[str]:
        """The stages `force` redoes: those named and everything downstream of them, in pipeline order."""
        check_names(force, "--force")
        return sorted({d for s in force for d in downstream(s)}, key=list(STAGES).index)

    def stored(self, stage: str) -> ArtifactRef | None:
        """The finished artifact of `stage` under this config, if the store has it."""
        store = self.cfg.store.open()
        return stored(self.cfg, stage, self.keys[stage]) if store.is_complete(stage, self.keys[stage]) else None

    def force(self, stages: list[str]) -> None:
        """Remove the current artifacts of `stages` and of everything downstream of them, so they are redone."""
        store, removed = self.cfg.store.open(), []
        for stage in self.removed_by(stages):
            if store.exists(store.path(stage, self.keys[stage])):
                store.remove(stage, self.keys[stage])
                removed.append(f"{stage}/{self.keys[stage]}")
        log.info("forced: removed %s", ", ".join(removed) or "nothing")

    def runner(self, refs: dict[str, ArtifactRef]) -> Callable[..., ArtifactRef | None]:
        """`stage(task, *inputs)`: run a selected stage's task on its inputs (recorded in `refs`), take an
        unselected stage's artifact from the store where a selected one reads it, else None."""
        def stage(stage_task, *inputs: ArtifactRef | None) -> ArtifactRef | None:
            name = stage_task.name
            if name in self.stages:  # the config is quoted: Prefect would look inside it for upstream results
                refs[name] = stage_task(quote(self.cfg), *inputs)
                return refs[name]
            return stored(self.cfg, name, self.keys[name]) if name in self.needed else None
        return stage

    def check_batches(self, ingest: ArtifactRef | None) -> None:
        """Every stage still to train can fill one batch from the ingested rows (one-line ConfigError)."""
        if ingest is not None:
            check_batch_sizes(self.cfg, self.cfg.store.open(), {**self.keys, "ingest": ingest.key}, self.stages)
