"""The one training stage: `train_stage` launches it (in this process, or as DDP ranks through torchrun) and a
`StageTrainer` runs one rank of it: the recipe a trained model names (its model, input stream, step, validation
and files). Checkpoints in pipeline/checkpoints.py; the loop itself in dalle_core/train.py."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from dalle_core.device import prefetch_to_device, resolve_device
from dalle_core.loader import Decode, ShardStream, StreamOrder
from dalle_core.train import FitHooks, FitResult, FitState, StepFn, TrainConfig, fit, make_optimizer
from pipeline.artifacts import ArtifactRef, Work, run_stage
from pipeline.checkpoints import drop_checkpoints, load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.fine_tuning import source_note, source_tags, start_model
from pipeline.logs import log, progress
from pipeline.runs import log_training_data, stage_run
from pipeline.source_fit import check_fine_tuning
from pipeline.stage_table import stage_keys
from pipeline.torchrun import launch_ranks
from storage.parquet import ParquetShards
from storage.store import ArtifactStore
from storage.tracking import StageRun

# ------------------------------------------------------------ input streams

def batch_stream(cfg: Config, store: ArtifactStore, paths: list[str], columns: list[str], decode: Decode,
                 batch_size: int, device, order: StreamOrder = StreamOrder()) -> Iterator[dict]:
    """Batches from Parquet shards on `device`, in `order` (`IN_ORDER` for evaluation): decoded in
    `runner.loader_workers` processes, pinned and copied ahead on GPUs; training streams (shuffled) are endless."""
    stream = ShardStream(ParquetShards(store), paths, columns, decode, batch_size, order)
    return prefetch_to_device(stream.batches(cfg.runner.loader_workers, pin_memory=device.type == "cuda"), device)


# ------------------------------------------------------------ a trained model's recipe

class StageTrainer:
    """One trained model's recipe for the training stage, as minGPT's trainer takes a model and callbacks: a
    subclass per model (`tasks/dvae.py` DVAETrainer, `tasks/transformer.py` TransformerTrainer, `tasks/clip.py`
    CLIPTrainer) names its parts, and `run()` is the same for every stage: every rank trains; rank 0 opens the
    stage's MLflow run, logs, validates every `train.val_every` steps (and at step 0 when fine-tuning),
    checkpoints, and writes the artifact.

    A subclass sets `stage` (and `unit`, what its throughput counts) and defines `model` (built, untrained),
    `batches`, `step`, `validate`, `files` and `report`; `describe`, `fit_hooks`, `every`, `on_start`, `on_end`,
    `logged_as` and `manifest` are optional. `init_from` is checked against the run, then loaded, by `run()`."""

    stage: ClassVar[str]
    unit: ClassVar[str] = "images"
    seq_len: int | None = None  # the longest sequence the model attends over (picks the CPU bf16 attention kernel)

    def __init__(self, w: Work, device, rank: int = 0, world: int = 1):
        self.w, self.cfg, self.store, self.device, self.rank, self.world = w, w.cfg, w.store, device, rank, world
        self.section = getattr(w.cfg, self.stage)
        self.train_cfg: TrainConfig = self.section.train
        self.losses: list[tuple[int, float]] = []  # (step, training loss) at each logged step

    # --- the parts a stage names
    def model(self) -> nn.Module:
        raise NotImplementedError

    def batches(self, start_step: int) -> Iterator[dict]:
        """This rank's endless training stream, from where a run resumed at `start_step`."""
        raise NotImplementedError

    def step(self, model) -> StepFn:
        raise NotImplementedError

    def validate(self, model) -> dict[str, float]:
        raise NotImplementedError

    def files(self, model, metrics: dict) -> dict[str, bytes | dict]:
        """The artifact's files of the trained model: {name: bytes, or a dict written as JSON}."""
        raise NotImplementedError

    def report(self, metrics: dict) -> str:
        """The final val metrics, for the log line."""
        raise NotImplementedError

    def describe(self, metrics: dict) -> str:
        """The training log line's stage-specific part."""
        return ""

    def fit_hooks(self, model) -> dict:
        """`FitHooks`' before_step / after_step for this model."""
        return {}

    def every(self, model, run: StageRun) -> tuple:
        """((every_n_steps, fn(step)), ...) besides validation."""
        return ()

    def on_start(self, run: StageRun) -> None:
        """Extra tags or params, once the stage's MLflow run is open."""

    def on_end(self, model) -> None:
        """Before the final validation (a VQGAN drops its discriminator)."""

    def logged_as(self, name: str, step: int) -> str:
        """A picture's path in the MLflow run."""
        return name

    def manifest(self, model) -> dict:
        return {}

    def stream(self, paths: list[str], columns: list[str], decode: Decode, start_step: int) -> Iterator[dict]:
        """The training stream most stages want: `paths` shuffled within `shuffle_buffer` rows, this rank's share,
        from `start_step` on."""
        t = self.train_cfg
        return batch_stream(self.cfg, self.store, paths, columns, decode, t.batch_size, self.device, StreamOrder(
            seed=t.seed, window_rows=self.section.shuffle_buffer, rank=self.rank, world=self.world,
            start_batch=start_step * t.grad_accum))

    # --- the same for every stage
    def run(self) -> None:
        """Train this rank; on rank 0 also track, validate, checkpoint and write the artifact."""
        w, t = self.w, self.train_cfg
        keys = {**stage_keys(self.cfg), **{stage: ref.key for stage, ref in w.inputs.items()}}
        check_fine_tuning(self.cfg, [self.stage], self.store, keys)  # with the inputs' keys in hand, before any work
        torch.manual_seed(t.seed)
        model = self.model()
        start = self.start = start_model(self.cfg, self.stage, model, self.store)
        model = model.to(self.device)
        optimizer = make_optimizer(model, t)
        start_step, info = load_checkpoint(self.store, self.stage, w.key, model, optimizer)
        wrapped = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        state = FitState(start_step, float(info.get("elapsed_s", 0.0)), self.device, self.seq_len, self.world)
        batches = self.batches(start_step)
        if self.rank != 0:  # workers only train; rank 0 reports and checkpoints
            fit(wrapped, batches, t, optimizer, self.step(model), FitHooks(**self.fit_hooks(model), unit=self.unit),
                state)
            return
        params = {**self.section.model_dump(mode="json"), "num_params": sum(p.numel() for p in model.parameters()),
                  "trainable_params": start.trainable, "world_size": self.world}
        with stage_run(self.cfg, self.store, self.stage, w.key, params, w.inputs) as run:
            w.run = run
            log_training_data(run, self.cfg, self.store, keys["ingest"])
            run.watch_system()
            log.info("%s/%s: %s", self.stage, w.key, start.describe())
            tags = source_tags(self.cfg, start.source, self.store) if start.source else {}
            if tags:
                run.set_tags({**tags, "mlflow.note.content": source_note(tags)})
            self.on_start(run)
            if start.source and start_step == 0:  # the source on this data: where the fine-tune's curve starts
                run.log_metrics(self.validate(model), 0)
            result = self._fit(model, wrapped, optimizer, batches, run, state)
            report = how_far(result, t, self.losses, train_rows(w), self.world)
            log.info("%s/%s: %s", self.stage, w.key, report.line(self.stage))
            run.log_metrics(report.metrics(), result.step)
            run.set_tags({"how_far": report.line(self.stage), "stopped_by": result.stopped_by,
                          "steps_done": str(result.step), "steps_planned": str(t.max_steps),
                          "resumed_from_step": str(start_step), "device": str(self.device),
                          "world_size": str(self.world)})
            self.on_end(model)
            metrics = self.validate(model)
            run.log_metrics(metrics, result.step)
            log.info("%s/%s: %s", self.stage, w.key, self.report(metrics))
            w.write_files(self.files(model, metrics), lambda name: self.logged_as(name, result.step))
            w.store.write_json(w.path("metrics.json"), {**metrics, "steps": result.step})
            drop_checkpoints(w.store, self.stage, w.key)
            w.finish(config=self.section.model_dump(mode="json"), steps=result.step, world_size=self.world,
                     metrics=metrics, num_params=params["num_params"], how_far=asdict(report), **self.manifest(model),
                     **start.manifest(tags))

    def _fit(self, model, wrapped, optimizer, batches, run: StageRun, state: FitState) -> FitResult:
        """Rank 0's loop: MLflow metrics and the log's meter at log steps (a wall-clock budget that ends sooner
        than the steps is named), val metrics every `val_every` steps, checkpoints."""
        t, start_step = self.train_cfg, state.start_step
        meter = progress(f"train-{self.stage}", t.max_steps - start_step, "steps")
        budget_s, began = (t.max_minutes or 0) * 60 - state.elapsed_s, time.perf_counter()

        def log_step(step: int, metrics: dict) -> None:
            run.log_metrics(metrics, step)
            self.losses.append((step, float(metrics["loss"])))
            elapsed = time.perf_counter() - began
            left, steps_left = budget_s - elapsed, meter.total - (step - start_step)
            by_steps = steps_left * elapsed / max(step - start_step, 1)  # the meter's own ETA
            stops = f" (the time budget ends it in {int(left // 60)}m{int(left % 60):02d}s)" \
                if t.max_minutes and left < by_steps else ""
            meter.set_postfix_str(f"loss {metrics['loss']:.4f} {self.describe(metrics)}{stops}", refresh=False)
            meter.update(step - start_step - meter.n)

        def checkpoint(step: int, elapsed_s: float) -> None:
            save_checkpoint(self.store, self.stage, self.w.key, model, optimizer, step, {"elapsed_s": elapsed_s})

        every = self.every(model, run)
        if t.val_every:
            every = (*every, (t.val_every, lambda step: run.log_metrics(self.validate(model), step)))
        hooks = FitHooks(log_step, checkpoint, every=every, unit=self.unit, **self.fit_hooks(model))
        try:
            return fit(wrapped, batches, t, optimizer, self.step(model), hooks, state)
        finally:
            meter.close()


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

def gpu_slot(cfg: Config, device, occupy: int):
    """While a stage trains on CUDA: `occupy` slots of Prefect's global concurrency limit `runner.gpu_slot`
    (default "gpu"), waited for, so two scheduled runs never share a card by accident (prefect.yaml says how to
    create the limit; without one Prefect lets the stage through). Elsewhere, or with gpu_slot null, nothing."""
    if device.type != "cuda" or not cfg.runner.gpu_slot:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    log.info("waiting for %d slot(s) of the Prefect concurrency limit %r (runner.gpu_slot)", occupy,
             cfg.runner.gpu_slot)
    return concurrency(cfg.runner.gpu_slot, occupy=occupy, raise_on_lease_renewal_failure=False)


def train_stage(cfg: Config, trainer: type[StageTrainer], inputs: dict[str, ArtifactRef]) -> ArtifactRef:
    """A training stage: reuse a finished artifact, else run `trainer` in this process, or launch `train.nproc` DDP
    processes per machine through torchrun (pipeline/torchrun.py); rank 0 opens the stage's MLflow run and writes
    the artifact."""
    train_cfg = getattr(cfg, trainer.stage).train

    def launch(w: Work) -> dict:
        device = resolve_device(cfg.runner.device)
        with gpu_slot(cfg, device, train_cfg.nproc):
            if train_cfg.nproc == 1 and train_cfg.nnodes == 1:
                trainer(w, device).run()
            else:
                launch_ranks(cfg, trainer, inputs)
        return {}

    return run_stage(cfg, trainer.stage, inputs, launch, mlflow_run=False, claim=train_cfg.nnodes == 1)
