"""Generation: N CLIP-ranked candidates per prompt, parts of prompts mapped over the task runner."""

from __future__ import annotations

import time

from prefect import flow, unmapped

from dalle_core.config import load_config
from flows.runners import task_runner
from flows.stage import Inputs, check_inputs, failing_run, finished
from flows.train_clip import train_clip_flow
from flows.train_transformer import train_transformer_flow
from tasks.common import ArtifactRef
from tasks.generate import finish_generation, generate_part, plan_generation


@flow(name="generate-parts")
def generate_parts_flow(config: str | None = None, overrides: list[str] | None = None,
                        todo: list[tuple[int, list[str]]] | None = None) -> list[dict]:
    cfg = load_config(config, overrides or [])
    futures = generate_part.map(unmapped(cfg), [i for i, _ in todo or []], [p for _, p in todo or []])
    return [f.result() for f in futures]


@flow(name="generate")
def generate_flow(config: str | None = None, overrides: list[str] | None = None,
                  parent_run_id: str | None = None, upstream: bool = True, inputs: Inputs = None) -> ArtifactRef:
    cfg = load_config(config, overrides or [])
    check_inputs(cfg, inputs)
    if upstream:
        train_transformer_flow(config, overrides, parent_run_id)
        train_clip_flow(config, overrides, parent_run_id)
    plan = plan_generation(cfg, parent_run_id)
    if plan.cached:
        return finished(plan.cached)
    start = time.perf_counter()
    with failing_run(cfg, plan):
        results = generate_parts_flow.with_options(task_runner=task_runner(cfg))(config, overrides, plan.todo)
    return finished(finish_generation(cfg, plan, results, time.perf_counter() - start))
