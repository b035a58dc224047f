"""The pipeline: one flow, whose body is the DAG. Each stage is a task that takes its upstream artifacts as
arguments and returns its own, so Prefect draws the graph from the data; a stage command (`dalle
train-transformer`) is this flow run up to that stage."""

from __future__ import annotations

from prefect import flow

from pipeline.artifacts import ArtifactRef
from pipeline.config import Config
from pipeline.plan import PipelinePlan
from pipeline.runs import deployment_config, pipeline_run
from pipeline.stage_table import StageName
from tasks.bpe import train_bpe
from tasks.clip import train_clip
from tasks.dvae import train_dvae
from tasks.evaluate import evaluate
from tasks.generate import generate
from tasks.ingest import ingest
from tasks.pretokenize import pretokenize
from tasks.transformer import train_transformer


@flow(name="pipeline", validate_parameters=True)
def pipeline_flow(cfg: Config, only: list[StageName] | None = None, from_stage: StageName | None = None,
                  until: StageName | None = None, force: list[StageName] | None = None) -> dict[str, ArtifactRef]:
    """Train and evaluate a DALL-E-style model under the run config `cfg`: every stage, `only` some, all
    `from_stage` on, or everything `until` reads and `until` itself. Finished stages are reused from the store;
    `force` redoes those stages and everything after them. Returns the artifact of each stage that ran or was
    reused. A deployment's run gives `cfg` in part: what it sets is laid over the deployment's own `cfg`."""
    cfg = deployment_config(cfg)
    plan = PipelinePlan(cfg, only, from_stage, until)
    plan.check_upstream(force)
    if force:
        plan.force(force)
    with pipeline_run(cfg, plan.stages) as refs:
        stage = plan.runner(refs)
        images = stage(ingest)
        plan.check_batches(images)
        dvae = stage(train_dvae, images)
        bpe = stage(train_bpe, images)
        tokens = stage(pretokenize, images, dvae, bpe)
        transformer = stage(train_transformer, tokens, dvae)
        clip = stage(train_clip, images, bpe)
        generations = stage(generate, images, dvae, bpe, transformer, clip)
        stage(evaluate, images, dvae, bpe, transformer, clip, generations)
    return refs
