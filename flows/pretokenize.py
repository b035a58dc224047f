"""Stage 1c: image shards -> token shards, one mapped task per shard (upstream stages first if missing)."""

from __future__ import annotations

import time

from prefect import flow, unmapped

from dalle_core.config import load_config
from flows.runners import task_runner
from flows.stage import Inputs, check_inputs, failing_run, finished
from flows.train_bpe import train_bpe_flow
from flows.train_dvae import train_dvae_flow
from tasks.common import ArtifactRef
from tasks.tokens import encode_shard, finish_pretokenize, plan_pretokenize


@flow(name="encode-shards")
def encode_shards_flow(config: str | None = None, overrides: list[str] | None = None,
                       todo: list[tuple[str, int]] | None = None) -> list[dict]:
    cfg = load_config(config, overrides or [])
    futures = encode_shard.map(unmapped(cfg), [s for s, _ in todo or []], [i for _, i in todo or []])
    return [f.result() for f in futures]


@flow(name="pretokenize")
def pretokenize_flow(config: str | None = None, overrides: list[str] | None = None,
                     parent_run_id: str | None = None, upstream: bool = True, inputs: Inputs = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    check_inputs(cfg, inputs)
    if upstream:
        train_dvae_flow(config, overrides, parent_run_id)
        train_bpe_flow(config, overrides, parent_run_id)
    plan = plan_pretokenize(cfg, parent_run_id)
    if plan.cached:
        return finished(plan.cached)
    start = time.perf_counter()
    with failing_run(cfg, plan):
        results = encode_shards_flow.with_options(task_runner=task_runner(cfg))(config, overrides, plan.todo)
    return finished(finish_pretokenize(cfg, plan, results, time.perf_counter() - start))
