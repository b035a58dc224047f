"""The one training loop (`fit`) and what each stage plugs into it.

`fit` owns everything the stages share: the LR schedule and the step/wall-clock
budget, bf16 autocast on the run's device, gradient accumulation (without DDP
gradient sync on all but the last micro-batch), clipping, logging, checkpoints.
A stage gives it only a model (optionally DDP-wrapped), batches and a step
function `(model, batch, step) -> (loss, items, metrics)`, which lives beside
its model: `dalle_core.dvae.dvae_step`, `dalle_core.transformer.transformer_step`
and `dalle_core.clip.clip_step`. The loop knows nothing about where
data, checkpoints or metrics live: it calls `log(step, metrics)` and
`checkpoint(step, elapsed_s)`. Fine-tuning's `freeze` (named parts of the
transformer or CLIP that keep their weights) is set before the optimizer is made.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
from annotated_types import Ge, Gt, Le

from dalle_core.device import autocast, rng_state, set_rng_state, to_device
from dalle_core.errors import UserError
from dalle_core.lora import LoraConfig


@dataclass
class TrainConfig:
    """Optimisation settings of one trained model, read by `fit`, `lr_at`, `make_optimizer` and `Budget`. Each
    field's type carries its allowed range; the run config's `<stage>.train` sections are this dataclass, so
    this is the one place the fields are declared (as nanoGPT's train settings sit beside its loop)."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the run config: an unknown key is an error, not dropped

    batch_size: Annotated[int, Ge(1)] = 64
    lr: Annotated[float, Gt(0)] = 1e-3
    weight_decay: Annotated[float, Ge(0)] = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: Annotated[int, Ge(0)] = 100
    min_lr_ratio: Annotated[float, Ge(0), Le(1)] = 0.1  # cosine decays to lr * min_lr_ratio
    max_steps: Annotated[int, Ge(1)] = 1000
    max_minutes: Annotated[float, Gt(0)] | None = None  # wall-clock budget: stops early, LR decayed by then
    grad_clip: Annotated[float, Gt(0)] | None = 1.0
    grad_accum: Annotated[int, Ge(1)] = 1
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast on CPU/GPU
    seed: int = 0
    log_every: Annotated[int, Ge(1)] = 50
    val_every: Annotated[int, Ge(1)] | None = 500  # validate every N steps (curves in MLflow); None: at the end
    val_batches: Annotated[int, Ge(1)] | None = None  # cap on val batches per validation (the same ones each time)
    checkpoint_every: Annotated[int, Ge(1)] = 500
    nproc: Annotated[int, Ge(1)] = 1  # >1: DDP processes per machine through torchrun
    nnodes: Annotated[int, Ge(1)] = 1  # >1: machines in the DDP run; they meet at runner.rdzv_endpoint
    # Fine-tuning: parts that keep their (init_from) weights, e.g. [embeddings, blocks.0-5, head] (parse_freeze);
    # transformer and clip only
    freeze: list[str] = field(default_factory=list)
    # LoRA: train low-rank adapters on the frozen init_from weights instead of the weights (dalle_core/lora.py);
    # transformer only
    lora: LoraConfig | None = None


LogFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[[int, float], None]
# A stage's step: (model, batch, step) -> (loss, items in the batch, metrics read only at log steps)
StepFn = Callable[[nn.Module, Any, int], tuple[torch.Tensor, int, Callable[[], dict[str, float]]]]


def lr_at(step: int, t: TrainConfig, horizon: int | None = None) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at `horizon` (default max_steps)."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    end = t.max_steps if horizon is None else horizon
    progress = min(1.0, (step - t.warmup_steps) / max(1, end - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (no decay on biases, norms, embeddings' 1-D params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, fused=True)  # one kernel per step (CPU and GPU)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


class TrainingError(UserError):
    """Training cannot go on for a reason the user can fix (a diverged loss); the message is one line."""


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Budget:
    """Stop at max_steps or when max_minutes of training time have passed.

    `max_minutes` counts the training time of the whole run, across resumes: a resumed run
    starts with the `elapsed_s` its checkpoint recorded, so its deadline and its LR horizon
    are those the run had before it was killed (not a fresh budget).

    `check(step)` (once per step) also sets `horizon`, the step the run will really end
    at: max_steps, or fewer when the deadline will come first, projected from the step
    rate so far. The LR schedule decays to that horizon, so a run cut short by the
    clock still ends at the low LR instead of mid-schedule; a run whose projection never
    falls short of max_steps (or has no max_minutes) gets exactly the step-based schedule,
    deterministic and resumable. Under torch.distributed the ranks agree on both
    (all-reduce MIN): same LR, same last step.
    """

    MIN_STEPS_TO_PROJECT = 20

    def __init__(self, t: TrainConfig, start_step: int = 0, elapsed_s: float = 0.0):
        self.max_steps = t.max_steps
        self.horizon = t.max_steps
        self.start_step, self.t0, self.elapsed_before = start_step, time.monotonic(), elapsed_s
        self.deadline = self.t0 + t.max_minutes * 60 - elapsed_s if t.max_minutes else None
        self.out_of_time = False

    def elapsed(self) -> float:
        """Training seconds of the whole run so far (earlier processes included)."""
        return self.elapsed_before + time.monotonic() - self.t0

    @property
    def stopped_by(self) -> str:
        return "max_minutes" if self.out_of_time else "max_steps"

    def check(self, step: int) -> bool:
        """True when training should stop before `step`; updates `horizon`."""
        if self.deadline is not None:
            now, ran = time.monotonic(), step - self.start_step
            projected = self.max_steps
            if ran >= self.MIN_STEPS_TO_PROJECT:
                projected = min(self.max_steps, step + int(ran / (now - self.t0) * max(0.0, self.deadline - now)))
            state = torch.tensor([projected, 0 if now > self.deadline else 1], dtype=torch.float64)
            if distributed():
                on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
                state = state.to(on)
                torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MIN)
                state = state.cpu()
            self.horizon, self.out_of_time = max(step, int(state[0])), bool(state[1] == 0)
        return step >= self.max_steps or self.out_of_time


def training_state_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """Optimizer state and the RNG states (CPU and CUDA): with the weights, all a run needs to continue exactly."""
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, buf)
    return buf.getvalue()


def load_training_state(optimizer: torch.optim.Optimizer, data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    set_rng_state(rng if isinstance(rng, dict) else {"cpu": rng})  # older checkpoints: CPU state only


@dataclass
class FitResult:
    step: int  # the step training stopped at
    stopped_by: str  # "max_steps" or "max_minutes"
    elapsed_s: float  # training time of the whole run, resumes included


@dataclass
class FitHooks:
    """What a stage plugs into `fit` besides its step function, as minGPT's trainer takes callbacks; each
    optional. `log(step, metrics)` at log steps; `checkpoint(step, elapsed_s)` at checkpoint steps;
    `before_step(step, horizon)` / `after_step(step)` hold per-stage schedules and fix-ups (gumbel temperature,
    dead-code restarts, CLIP's logit-scale clamp); `every` = ((n, fn), ...) calls fn(step) every n steps (sample
    grids, validation); `unit` names the logged throughput `<unit>_per_s`."""

    log: LogFn | None = None
    checkpoint: CheckpointFn | None = None
    before_step: Callable[[int, int], None] | None = None
    after_step: Callable[[int], None] | None = None
    every: tuple[tuple[int, Callable[[int], None]], ...] = ()
    unit: str = "images"


@dataclass
class FitState:
    """Where a `fit` starts and runs: the step and training seconds a resumed run had (its budget counts them),
    the device, the longest sequence the model attends over (it picks the CPU bf16 attention kernel), and the
    DDP ranks the logged throughput counts."""

    start_step: int = 0
    elapsed_s: float = 0.0
    device: torch.device | str = "cpu"
    seq_len: int | None = None
    world_size: int = 1


def fit(model: nn.Module, batches: Iterable, t: TrainConfig, optimizer: torch.optim.Optimizer, step_fn: StepFn,
        hooks: FitHooks | None = None, state: FitState | None = None) -> FitResult:
    """Train from `state.start_step` until the budget says stop (nanoGPT's loop, with minGPT's callbacks).

    `model` may be DDP-wrapped. `batches` yields batches (moved to the device here if they are not there yet).
    `hooks` (FitHooks) are what the stage plugs in, `state` (FitState) where the run starts and runs.
    """
    hooks, state = hooks or FitHooks(), state or FitState()
    start_step, elapsed_s, device, seq_len = state.start_step, state.elapsed_s, state.device, state.seq_len
    log, checkpoint, before_step, after_step, every = (hooks.log, hooks.checkpoint, hooks.before_step,
                                                       hooks.after_step, hooks.every)
    device = torch.device(device)
    batches = iter(batches)
    budget = Budget(t, start_step, elapsed_s)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    model.train()
    step, items, t0 = start_step, 0, time.perf_counter()
    # The first step whose loss or gradient norm was not finite (-1: none), kept on the device so that the
    # check costs no GPU sync per step; it is read before anything is logged, run or saved.
    bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def stop_if_diverged() -> None:
        if (first := int(bad_step)) >= 0:
            raise TrainingError(f"training diverged: the loss or its gradient is not finite at step {first} "
                                f"(learning rate {lr_at(first, t, budget.horizon):.3g}, train.lr={t.lr:g}); "
                                f"lower train.lr; nothing from step {first} on was saved")

    done = budget.check(step)
    while not done:
        lr = lr_at(step, t, budget.horizon)
        set_lr(optimizer, lr)
        if before_step:
            before_step(step, budget.horizon)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(t.grad_accum):
            batch = to_device(next(batches), device)
            last = micro == t.grad_accum - 1
            with model.no_sync() if ddp and not last else contextlib.nullcontext():  # all-reduce once per step
                with autocast(t.precision, device, seq_len):
                    loss, n, metrics = step_fn(model, batch, step)
                (loss / t.grad_accum).backward()
            items += n
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        finite = torch.isfinite(grad_norm).to(device)  # the same on every DDP rank: the gradients are all-reduced
        if not ddp:
            finite &= torch.isfinite(loss.detach()).all()
        bad_step.masked_fill_(~finite & (bad_step < 0), step)
        optimizer.step()
        if after_step:
            after_step(step)
        step += 1
        done = budget.check(step)
        if done or step % t.log_every == 0 or step % t.checkpoint_every == 0 or any(step % n == 0 for n, _ in every):
            stop_if_diverged()
        if log and (step % t.log_every == 0 or done):
            elapsed = time.perf_counter() - t0
            log(step, {"loss": loss.item(), **metrics(), "lr": lr, "grad_norm": float(grad_norm),
                       f"{hooks.unit}_per_s": state.world_size * items / max(elapsed, 1e-9)})
            items, t0 = 0, time.perf_counter()
        hooks_t0 = time.perf_counter()
        for n_steps, fn in every:
            if step % n_steps == 0 and not done:
                fn(step)
                model.train()
        if checkpoint and step % t.checkpoint_every == 0 and not done:
            checkpoint(step, budget.elapsed())
        t0 += time.perf_counter() - hooks_t0  # throughput counts training only, not validation or checkpoints
    return FitResult(step, budget.stopped_by, budget.elapsed())


# ------------------------------------------------------------ fine-tuning: which parameters train

@dataclass(frozen=True)
class Parts:
    """A model's freezable parts by parameter name: a prefix ending in "." names a module, anything else one
    parameter. `blocks` holds one `{i}` pattern per tower (block i of each tower that has one)."""

    embeddings: tuple[str, ...]
    blocks: tuple[str, ...]
    head: tuple[str, ...]


# The parameter names of dalle_core.transformer.DALLE: token and position embeddings, blocks, final norm and heads.
DALLE_PARTS = Parts(embeddings=("text_emb.", "text_pos.", "image_emb.", "row_emb.", "col_emb."), blocks=("blocks.{i}.",),
                    head=("ln_f.", "text_head.", "image_head."))
# open_clip's CLIP (dalle_core.clip.build_clip): patch and token embeddings with their positions (and the norm on
# the patch embeddings), the two towers' residual blocks, and the norms and projections into the joint space.
CLIP_PARTS = Parts(embeddings=("token_embedding.", "positional_embedding", "visual.conv1.", "visual.class_embedding",
                               "visual.positional_embedding", "visual.ln_pre."),
                   blocks=("visual.transformer.resblocks.{i}.", "transformer.resblocks.{i}."),
                   head=("ln_final.", "text_projection", "visual.ln_post.", "visual.proj", "logit_scale"))
_BLOCKS = re.compile(r"blocks\.(\d+)(?:-(\d+))?")


def parse_freeze(names: list[str], depth: int, where: str) -> tuple[set[str], set[int]]:
    """`["embeddings", "blocks.0-5", "head"]` -> ({"embeddings", "head"}, {0, ..., 5}) for a model of `depth`
    blocks. ValueError (one line, starting with `where`) for a name that is none of embeddings, head, blocks.N
    or blocks.A-B (inclusive), or a block outside 0 .. depth-1."""
    allowed = f"embeddings, head, blocks.N or blocks.A-B with 0 <= A <= B <= {depth - 1}"
    parts: set[str] = set()
    blocks: set[int] = set()
    for name in names:
        if name in ("embeddings", "head"):
            parts.add(name)
            continue
        m = _BLOCKS.fullmatch(name)
        if m is None:
            raise ValueError(f"{where}: {name!r} is not a part of the model; allowed: {allowed}")
        first, last = int(m[1]), int(m[2] or m[1])
        if first > last or last >= depth:
            raise ValueError(f"{where}: {name!r} names blocks {first} to {last} but the model has {depth} "
                             f"(blocks.0 to blocks.{depth - 1}); allowed: {allowed}")
        blocks.update(range(first, last + 1))
    return parts, blocks


def _in_part(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in prefixes)


def freeze(model: nn.Module, names: list[str], parts: Parts, depth: int) -> tuple[int, int]:
    """Stop the named parts of `model` training (`requires_grad = False`; `parse_freeze`'s names); returns
    (trainable, total) parameter counts. Call it before `make_optimizer`, which takes the trainable ones only,
    so frozen weights stay bit-identical (no update, no weight decay). A weight tied to a frozen one is frozen."""
    chosen, blocks = parse_freeze(names, depth, "freeze")
    prefixes = tuple(p for part in chosen for p in getattr(parts, part))
    prefixes += tuple(p.format(i=i) for i in sorted(blocks) for p in parts.blocks)
    for name, p in model.named_parameters():
        if _in_part(name, prefixes):
            p.requires_grad_(False)
    params = list(model.parameters())  # each tied tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
