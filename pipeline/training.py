"""The one training stage: `train_stage` launches it (in this process, or as DDP ranks through torchrun) and
`train_rank` runs one rank of it, with what a stage supplies as a `Trainer` (its model, step, input stream,
validation and files). Checkpoints in pipeline/checkpoints.py; the loop itself in dalle_core/train.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from dalle_core.device import prefetch_to_device, resolve_device
from dalle_core.loader import Decode, ShardStream
from dalle_core.train import FitHooks, FitResult, FitState, StepFn, TrainConfig, fit, make_optimizer
from pipeline.artifacts import ArtifactRef, Work, run_stage
from pipeline.checkpoints import drop_checkpoints, load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.fine_tuning import source_note, source_tags
from pipeline.logs import log, progress
from pipeline.runs import stage_run
from pipeline.torchrun import launch_ranks
from storage.parquet import ParquetShards
from storage.store import ArtifactStore
from storage.tracking import StageRun

# ------------------------------------------------------------ input streams

def batch_stream(cfg: Config, store: ArtifactStore, paths: list[str], columns: list[str], decode: Decode,
                 batch_size: int, device, *, shuffle: bool = True, seed: int = 0, window_rows: int = 4096,
                 rank: int = 0, world: int = 1, start_batch: int = 0) -> Iterator[dict]:
    """Batches from Parquet shards on `device`: decoded in `runner.loader_workers` processes, pinned
    and copied ahead on GPUs; training streams (shuffle) are endless and start at `start_batch`."""
    stream = ShardStream(ParquetShards(store), paths, columns, decode, batch_size, shuffle=shuffle, seed=seed,
                         window_rows=window_rows, rank=rank, world=world, start_batch=start_batch)
    return prefetch_to_device(stream.batches(cfg.runner.loader_workers, pin_memory=device.type == "cuda"), device)


# ------------------------------------------------------------ one rank's training

@dataclass
class Training:
    """One rank's side of a training stage: the model (and its DDP wrapper), optimizer, where it resumes."""

    store: ArtifactStore
    stage: str
    key: str
    model: object
    wrapped: object
    optimizer: object
    train_cfg: TrainConfig
    device: object
    rank: int
    world: int
    start: int
    elapsed_s: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss) at each log step

    @classmethod
    def prepare(cls, store: ArtifactStore, stage: str, key: str, model, train_cfg: TrainConfig,
                device, rank: int = 0, world: int = 1) -> Training:
        """Model to the device, optimizer, resume from the latest checkpoint, DDP wrapper when world > 1."""
        model = model.to(device)
        optimizer = make_optimizer(model, train_cfg)
        start, info = load_checkpoint(store, stage, key, model, optimizer)
        wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        return cls(store, stage, key, model, wrapped, optimizer, train_cfg, device, rank, world, start,
                   float(info.get("elapsed_s", 0.0)))

    def fit(self, batches, step_fn: StepFn, run: StageRun | None, describe: Callable[[dict], str] = lambda m: "",
            validate: Callable[[], dict] | None = None, every: tuple = (), **kwargs) -> FitResult:
        """Run the training loop; rank 0 logs to MLflow and the Prefect log and writes checkpoints.

        `validate()` -> val metrics, logged every `train.val_every` steps, so they are curves in MLflow. The
        log line's meter counts the steps to `max_steps`; a wall-clock budget that ends sooner is named."""
        import time

        log_fn = checkpoint = None
        if validate is not None and run is not None and self.train_cfg.val_every:
            every = (*every, (self.train_cfg.val_every, lambda step: run.log_metrics(validate(), step)))
        if self.rank == 0:
            assert run is not None
            meter = progress(f"train-{self.stage}", self.train_cfg.max_steps - self.start, "steps")
            budget_s = (self.train_cfg.max_minutes or 0) * 60 - self.elapsed_s
            began = time.perf_counter()

            def log_fn(step: int, metrics: dict) -> None:
                run.log_metrics(metrics, step)
                self.losses.append((step, float(metrics["loss"])))
                elapsed = time.perf_counter() - began
                left, steps_left = budget_s - elapsed, meter.total - (step - self.start)
                by_steps = steps_left * elapsed / max(step - self.start, 1)  # the meter's own ETA
                stops = f" (the time budget ends it in {int(left // 60)}m{int(left % 60):02d}s)" \
                    if self.train_cfg.max_minutes and left < by_steps else ""
                meter.set_postfix_str(f"loss {metrics['loss']:.4f} {describe(metrics)}{stops}", refresh=False)
                meter.update(step - self.start - meter.n)

            def checkpoint(step: int, elapsed_s: float) -> None:
                save_checkpoint(self.store, self.stage, self.key, self.model, self.optimizer, step,
                                {"elapsed_s": elapsed_s})

        hooks = FitHooks(log_fn, checkpoint, every=every, **{k: v for k, v in kwargs.items() if k != "seq_len"})
        state = FitState(self.start, self.elapsed_s, self.device, kwargs.get("seq_len"), self.world)
        result = fit(self.wrapped, batches, self.train_cfg, self.optimizer, step_fn, hooks, state)
        if self.rank == 0:
            meter.close()
        if run is not None:
            run.set_tags({"stopped_by": result.stopped_by, "steps_done": str(result.step),
                          "steps_planned": str(self.train_cfg.max_steps), "resumed_from_step": str(self.start),
                          "device": str(self.device), "world_size": str(self.world)})
        return result


# ------------------------------------------------------------ one training stage

@dataclass
class Trainer:
    """What a training stage supplies to `train_rank`: its model (built, with `init_from`'s weights and
    `train.freeze` applied: `start`), the rank's input stream from where the run resumes, the step, the val
    metrics of a model, and the artifact's files; the rest is the same for every stage."""

    model: Any
    start: Any  # pipeline.fine_tuning.Start
    batches: Callable[[Training], Iterator[dict]]
    step: StepFn
    validate: Callable[[Any], dict]
    files: Callable[[Any, dict], dict[str, bytes | dict]]  # (trained model, final val metrics) -> {name: content}
    report: Callable[[dict], str]  # the final val metrics, for the log line
    describe: Callable[[dict], str] = lambda m: ""  # the training log line's stage-specific part
    fit_args: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    every: Callable[[Any, StageRun], tuple] = lambda model, run: ()  # (every_n_steps, fn(step)) pairs
    on_start: Callable[[StageRun], None] = lambda run: None  # extra tags or params
    on_end: Callable[[Any], None] = lambda model: None  # before the final validation (drop a discriminator)
    logged_as: Callable[[str, int], str] = lambda name, step: name  # a picture's path in the MLflow run


def train_rank(w: Work, build: Callable[..., Trainer], rank: int = 0, world: int = 1, device=None) -> None:
    """One rank of a training stage (world == 1: the single-process case): `build(work, device, rank, world)` gives the
    stage's Trainer; every rank trains, rank 0 opens the stage's MLflow run, logs, validates every
    `train.val_every` steps (and at step 0 when fine-tuning), checkpoints, and writes the artifact."""
    import torch

    section = getattr(w.cfg, w.stage)
    device = device or resolve_device(w.cfg.runner.device)
    torch.manual_seed(section.train.seed)
    t = build(w, device, rank, world)
    training = Training.prepare(w.store, w.stage, w.key, t.model, section.train, device, rank, world)
    batches = t.batches(training)
    if rank != 0:  # workers only train; rank 0 reports and checkpoints
        training.fit(batches, t.step, None, **t.fit_args)
        return
    model = training.model
    params = {**section.model_dump(mode="json"), "num_params": sum(p.numel() for p in model.parameters()),
              "trainable_params": t.start.trainable, "world_size": world}
    with stage_run(w.cfg, w.store, w.stage, w.key, params, w.inputs) as run:
        w.run = run
        log.info("%s/%s: %s", w.stage, w.key, t.start.describe())
        tags = source_tags(w.cfg, t.start.source, w.store) if t.start.source else {}
        if tags:
            run.set_tags({**tags, "mlflow.note.content": source_note(tags)})
        t.on_start(run)
        if t.start.source and training.start == 0:  # the source on this data: where the fine-tune's curve starts
            run.log_metrics(t.validate(model), 0)
        result = training.fit(batches, t.step, run, t.describe, lambda: t.validate(model), every=t.every(model, run),
                              **t.fit_args)
        report = how_far(result, section.train, training.losses, train_rows(w), world)
        log.info("%s/%s: %s", w.stage, w.key, report.line(w.stage))
        run.log_metrics(report.metrics(), result.step)
        run.set_tags({"how_far": report.line(w.stage)})
        t.on_end(model)
        metrics = t.validate(model)
        run.log_metrics(metrics, result.step)
        log.info("%s/%s: %s", w.stage, w.key, t.report(metrics))
        w.write_files(t.files(model, metrics), lambda name: t.logged_as(name, result.step))
        w.store.write_json(w.path("metrics.json"), {**metrics, "steps": result.step})
        drop_checkpoints(w.store, w.stage, w.key)
        w.finish(config=section.model_dump(mode="json"), steps=result.step, world_size=world, metrics=metrics,
                 num_params=params["num_params"], how_far=asdict(report), **t.manifest, **t.start.manifest(tags))


@dataclass
class HowFar:
    """Where a training stage ended: the steps run of its budget, what stopped it, the epochs of the training set
    it saw, and whether its loss was still falling (the fitted change of the training loss over the last tenth of
    the steps, as a share of the loss: below -1% counts as still falling)."""

    steps: int
    max_steps: int
    stopped_by: str  # max_steps or max_minutes
    max_minutes: float | None
    epochs: float | None  # None where the training set's size is not known
    loss_change_last_tenth: float | None  # None with fewer than two logged losses there

    @property
    def budget_share(self) -> float:
        return self.steps / self.max_steps

    @property
    def still_falling(self) -> bool:
        return self.loss_change_last_tenth is not None and self.loss_change_last_tenth < -0.01

    def line(self, stage: str) -> str:
        """One line for the log and the MLflow run: `ran 5200 of 5200 steps (100%); 41.6 epochs; loss flat...`."""
        cut = (f", cut short by the clock: raise {stage}.train.max_minutes (now {self.max_minutes:g}) or remove it to "
               "run every step" if self.stopped_by == "max_minutes" else "")
        epochs = f"; {self.epochs:.1f} epochs" if self.epochs is not None else ""
        change = "" if self.loss_change_last_tenth is None else \
            f"; loss {'still falling' if self.still_falling else 'flat'} over the last tenth ({self.loss_change_last_tenth:+.1%})"
        return f"ran {self.steps} of {self.max_steps} steps ({self.budget_share:.0%}){cut}{epochs}{change}"

    def metrics(self) -> dict[str, float]:
        out = {"budget_share": self.budget_share}
        if self.epochs is not None:
            out["epochs"] = self.epochs
        if self.loss_change_last_tenth is not None:
            out["loss_change_last_tenth"] = self.loss_change_last_tenth
        return out


def how_far(result: FitResult, train_cfg: TrainConfig, losses: list[tuple[int, float]], rows: int | None,
            world: int = 1) -> HowFar:
    """`HowFar` of a finished fit: the epochs from the examples drawn (steps x batch x accumulation x ranks) over
    `rows` training rows, the loss change from a least-squares line through the losses logged in the last tenth
    (or the last two logged, where the log is sparser than that)."""
    seen = result.step * train_cfg.batch_size * train_cfg.grad_accum * world
    tail = [(s, v) for s, v in losses if s >= result.step * 0.9]
    tail = tail if len(tail) >= 2 else losses[-2:]  # logged too sparsely for a tenth: the last two logged losses
    change = None
    if len(tail) >= 2 and all(math.isfinite(v) for _, v in tail):
        steps, values = zip(*tail)
        mean_s, mean_v = sum(steps) / len(steps), sum(values) / len(values)
        var = sum((s - mean_s) ** 2 for s in steps)
        if var > 0 and mean_v != 0:
            slope = sum((s - mean_s) * (v - mean_v) for s, v in tail) / var
            change = slope * (0.1 * result.step) / abs(mean_v)
    return HowFar(result.step, train_cfg.max_steps, result.stopped_by, train_cfg.max_minutes,
                  seen / rows if rows else None, change)


def train_rows(w: Work) -> int | None:
    """The training rows a stage draws from: its token shards' or its images' (their manifests count them)."""
    for stage in ("pretokenize", "ingest"):
        if stage in w.inputs:
            return w.store.manifest(stage, w.inputs[stage].key).get("rows", {}).get("train")
    return None


# ------------------------------------------------------------ the launch

def train_stage(cfg: Config, stage: str, inputs: dict[str, ArtifactRef]) -> ArtifactRef:
    """A training stage: reuse a finished artifact, else train in this process, or launch `train.nproc` DDP
    processes per machine through torchrun (pipeline/torchrun.py); rank 0 opens the stage's MLflow run and writes the
    artifact."""
    train_cfg = getattr(cfg, stage).train

    def launch(w: Work) -> dict:
        if train_cfg.nproc == 1 and train_cfg.nnodes == 1:
            train_rank(w, trainer_of(stage))
        else:
            launch_ranks(cfg, stage, inputs)
        return {}

    return run_stage(cfg, stage, inputs, launch, mlflow_run=False, claim=train_cfg.nnodes == 1)


def trainer_of(stage: str) -> Callable[..., Trainer]:
    """The stage module's `trainer(work, device, rank, world) -> Trainer`."""
    import importlib

    return importlib.import_module(f"tasks.{stage}").trainer
