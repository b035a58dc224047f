"""Stage 1c: image shards -> token shards, one mapped task per shard (upstream stages first if missing)."""

from __future__ import annotations

import time

from prefect import flow, unmapped

from dalle_core.config import load_config
from flows.runners import task_runner
from flows.train_bpe import train_bpe_flow
from flows.train_dvae import train_dvae_flow
from tasks.common import ArtifactRef
from tasks.tokens import encode_shard, finish_pretokenize, plan_pretokenize


@flow(name="encode-shards")
def encode_shards_flow(config: str | None = None, overrides: list[str] | None = None) -> list[dict]:
    cfg = load_config(config, overrides or [])
    todo = plan_pretokenize(cfg)
    futures = encode_shard.map(unmapped(cfg), [s for s, _ in todo], [i for _, i in todo])
    return [f.result() for f in futures]


@flow(name="pretokenize")
def pretokenize_flow(config: str | None = None, overrides: list[str] | None = None,
                     parent_run_id: str | None = None, upstream: bool = True) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    if upstream:
        train_dvae_flow(config, overrides, parent_run_id)
        train_bpe_flow(config, overrides, parent_run_id)
    start = time.perf_counter()
    results = encode_shards_flow.with_options(task_runner=task_runner(cfg))(config, overrides)
    return finish_pretokenize(cfg, results, time.perf_counter() - start, parent_run_id)
