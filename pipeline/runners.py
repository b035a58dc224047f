"""The task runner a config asks for, for the stages that map tasks over parts (pretokenize, generate): local
threads, or Dask (a LocalCluster or a scheduler address)."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.config import Config


def task_runner(cfg: Config):
    """A Prefect task runner, not yet started: `with task_runner(cfg) as runner: runner.map(task, {...})`."""
    if cfg.runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.runner.address:
            return DaskTaskRunner(address=cfg.runner.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.runner.workers, "threads_per_worker": 1,
                                             "processes": True})
    return ThreadPoolTaskRunner(max_workers=cfg.runner.workers)
