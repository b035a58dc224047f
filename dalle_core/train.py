"""Training loops shared by the stages: LR schedule, optimizer, budgets, the dVAE loop.

Loops take iterators of ready batches and two callbacks (`log(step, metrics)`,
`checkpoint(step)`), so they know nothing about where data or checkpoints live.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_core.config import DVAEConfig as DVAERunConfig
from dalle_core.config import TrainConfig
from dalle_core.dvae import DiscreteVAE

LogFn = Callable[[int, dict[str, float]], None]
CheckpointFn = Callable[[int], None]


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


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass (fp32 weights and optimizer), or nothing for fp32.

    On CPU it also picks SDPA's math kernel: the fused CPU flash-attention kernel's bf16
    backward is slow at our sequence lengths (bench transformer_train_bf16 14.3k -> 17.4-18.1k
    tokens/s; bench clip_train_bf16 vs clip_train). In fp32 and on GPU the default kernel is kept.
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=kind, dtype=torch.bfloat16))
    if kind == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


class Budget:
    """Stop at max_steps or when max_minutes of wall-clock time have passed.

    `check(step)` (once per step) also sets `horizon`, the step the run will really end
    at: max_steps, or fewer when the deadline will come first, projected from the step
    rate so far. The LR schedule decays to that horizon, so a run cut short by the
    clock still ends at the low LR instead of mid-schedule; a run whose projection never
    falls short of max_steps (or has no max_minutes) gets exactly the step-based schedule,
    deterministic and resumable. Under torch.distributed the ranks agree on both
    (all-reduce MIN): same LR, same last step.
    """

    MIN_STEPS_TO_PROJECT = 20

    def __init__(self, t: TrainConfig, start_step: int = 0):
        self.max_steps = t.max_steps
        self.horizon = t.max_steps
        self.start_step, self.t0 = start_step, time.monotonic()
        self.deadline = self.t0 + t.max_minutes * 60 if t.max_minutes else None
        self.out_of_time = False

    def check(self, step: int) -> bool:
        """True when training should stop before `step`; updates `horizon`."""
        if self.deadline is not None:
            now, ran = time.monotonic(), step - self.start_step
            projected = self.max_steps
            if ran >= self.MIN_STEPS_TO_PROJECT:
                projected = min(self.max_steps, step + int(ran / (now - self.t0) * max(0.0, self.deadline - now)))
            state = torch.tensor([projected, 0 if now > self.deadline else 1], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
                state = state.to(on)
                torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MIN)
                state = state.cpu()
            self.horizon, self.out_of_time = max(step, int(state[0])), bool(state[1] == 0)
        return step >= self.max_steps or self.out_of_time


def training_state_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    """Optimizer state and the torch RNG state: with the weights, all a run needs to continue exactly."""
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, buf)
    return buf.getvalue()


def load_training_state(optimizer: torch.optim.Optimizer, data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])


def skip(batches: Iterator, n: int) -> Iterator:
    """Fast-forward a seeded batch stream past the n batches a resumed run already consumed."""
    for _ in range(n):
        next(batches)
    return batches


# ------------------------------------------------------------------ the dVAE


def code_stats(tokens: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(perplexity of code usage, fraction of codes used) over a batch of token grids."""
    counts = torch.bincount(tokens.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).float().mean())


@dataclass
class Norm:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised -> [0, 1]."""
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() * s + m).clamp(0, 1)


def psnr_unit(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a, b).item()
    return 99.0 if mse == 0 else 10 * math.log10(1 / mse)


def train_dvae(model: DiscreteVAE, batches: Iterator[torch.Tensor], r: DVAERunConfig,
               optimizer: torch.optim.Optimizer, start_step: int, log: LogFn, checkpoint: CheckpointFn) -> int:
    """Train from `start_step`; returns the step reached. Batches are normalised (B, 3, H, W)."""
    t, norm = r.train, Norm(r.norm_mean, r.norm_std)
    budget = Budget(t, start_step)
    model.train()
    step, seen, t0 = start_step, 0, time.perf_counter()
    done = budget.check(step)
    while not done:
        lr = lr_at(step, t, budget.horizon)
        set_lr(optimizer, lr)
        q = model.quantizer
        if r.quantizer == "gumbel":
            frac = min(1.0, step / r.temp_anneal_steps)
            q.temperature = r.temp_start * (r.temp_end / r.temp_start) ** frac
            q.kl_weight = r.kl_weight * min(1.0, step / r.kl_warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(t.grad_accum):
            x = next(batches)
            with autocast(t.precision):
                recon, idx, q_loss = model(x)
            rec_loss = F.mse_loss(recon.float(), x) if r.recon_loss == "mse" else F.l1_loss(recon.float(), x)
            loss = rec_loss + q_loss
            (loss / t.grad_accum).backward()
            seen += x.shape[0]
        if t.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        step += 1
        done = budget.check(step)
        if r.quantizer == "vq" and step % r.restart_every == 0:
            q.restart_dead_codes()
        if step % t.log_every == 0 or done:
            ppl, used = code_stats(idx, r.codebook_size)
            with torch.no_grad():
                psnr = psnr_unit(norm.to_unit(recon.detach()), norm.to_unit(x))
            elapsed = time.perf_counter() - t0
            log(step, {"loss": loss.item(), "recon_mse": F.mse_loss(recon.detach().float(), x).item(),
                       "psnr": psnr, "perplexity": ppl, "codes_used": used, "quantizer_loss": q_loss.item(),
                       "temperature": getattr(q, "temperature", float("nan")), "lr": lr,
                       "images_per_s": seen / max(elapsed, 1e-9)})
            seen, t0 = 0, time.perf_counter()
        if step % t.checkpoint_every == 0 and not done:
            checkpoint(step)
    return step


@torch.inference_mode()
def evaluate_dvae(model: DiscreteVAE, batches: Iterator[torch.Tensor], norm: Norm) -> dict[str, float]:
    """Validation PSNR (over all pixels of all batches) and codebook usage."""
    model.eval()
    se, n = 0.0, 0
    counts = torch.zeros(model.c.codebook_size)
    for x in batches:
        tokens = model.encode(x)
        recon = model.decode(tokens)
        se += F.mse_loss(norm.to_unit(recon), norm.to_unit(x), reduction="sum").item()
        n += x.numel()
        counts += torch.bincount(tokens.flatten(), minlength=model.c.codebook_size).float().cpu()
    mse = se / max(n, 1)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"val_psnr": 99.0 if mse == 0 else 10 * math.log10(1 / mse), "val_mse": mse,
            "val_codes_used": float((counts > 0).float().mean()), "val_perplexity": float(entropy.exp())}


def shuffled_batches(chunks: Iterator[dict[str, np.ndarray]], batch_size: int, buffer_rows: int,
                     seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Mix incoming column chunks in a buffer of about `buffer_rows` rows; emit full batches."""
    rng = np.random.default_rng(seed)
    buf: dict[str, np.ndarray] | None = None
    for chunk in chunks:
        buf = chunk if buf is None else {k: np.concatenate([buf[k], chunk[k]]) for k in buf}
        n = len(next(iter(buf.values())))
        if n < buffer_rows + batch_size:
            continue
        perm = rng.permutation(n)
        buf = {k: v[perm] for k, v in buf.items()}
        usable = (n - buffer_rows) // batch_size * batch_size
        for i in range(0, usable, batch_size):
            yield {k: v[i:i + batch_size] for k, v in buf.items()}
        buf = {k: v[usable:] for k, v in buf.items()}
    if buf is not None:
        n = len(next(iter(buf.values())))
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield {k: v[perm[i:i + batch_size]] for k, v in buf.items()}


# ----------------------------------------------------------- the transformer


def drop_captions(text: torch.Tensor, p: float, pad_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each caption by the all-padding caption with probability p (for classifier-free guidance)."""
    if p <= 0:
        return text
    drop = torch.rand(text.shape[0], generator=generator) < p
    return torch.where(drop.to(text.device)[:, None], torch.full_like(text, pad_id), text)


def train_transformer(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], t: TrainConfig,
                      caption_dropout: float, pad_id: int, optimizer: torch.optim.Optimizer, start_step: int,
                      log: LogFn, checkpoint: CheckpointFn, every: tuple[int, Callable[[int], None]] | None = None,
                      device: str = "cpu", world_size: int = 1) -> int:
    """Next-token training on cached (text, image) token batches; returns the step reached.

    `model` may be DDP-wrapped; it returns (loss, text_loss, image_loss). `every`
    = (n, fn) calls fn(step) every n steps (sample grids).
    """
    budget = Budget(t, start_step)
    model.train()
    gen = torch.Generator()
    step, tokens, t0 = start_step, 0, time.perf_counter()
    done = budget.check(step)
    while not done:
        lr = lr_at(step, t, budget.horizon)
        set_lr(optimizer, lr)
        gen.manual_seed(t.seed * 1000003 + step)  # caption dropout depends on the step alone: resumable
        optimizer.zero_grad(set_to_none=True)
        for _ in range(t.grad_accum):
            text, image = next(batches)
            text, image = text.to(device, non_blocking=True), image.to(device, non_blocking=True)
            text = drop_captions(text, caption_dropout, pad_id, gen)
            with autocast(t.precision, device):
                loss, text_loss, image_loss = model(text, image)
            (loss / t.grad_accum).backward()
            tokens += text.numel() + image.numel()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
        step += 1
        done = budget.check(step)
        if step % t.log_every == 0 or done:
            elapsed = time.perf_counter() - t0
            log(step, {"loss": loss.item(), "text_loss": text_loss.item(), "image_loss": image_loss.item(),
                       "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": world_size * tokens / max(elapsed, 1e-9)})
            tokens, t0 = 0, time.perf_counter()
        if every and step % every[0] == 0 and not done:
            every[1](step)
            model.train()
        if step % t.checkpoint_every == 0 and not done:
            checkpoint(step)
    return step


@torch.inference_mode()
def evaluate_transformer(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                         precision: str = "fp32", device: str = "cpu") -> dict[str, float]:
    """Mean losses over all batches; image loss also in bits per image token."""
    model.eval()
    sums, n = np.zeros(3), 0
    for text, image in batches:
        text, image = text.to(device), image.to(device)
        with autocast(precision, device):
            losses = model(text, image)
        sums += np.array([x.item() for x in losses]) * text.shape[0]
        n += text.shape[0]
    loss, text_loss, image_loss = sums / max(n, 1)
    return {"val_loss": loss, "val_text_loss": text_loss, "val_image_loss": image_loss,
            "val_bits_per_image_token": image_loss / math.log(2)}


# ------------------------------------------------------------------- CLIP


def train_clip(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], t: TrainConfig,
               optimizer: torch.optim.Optimizer, start_step: int, log: LogFn, checkpoint: CheckpointFn,
               evaluate: Callable[[], dict[str, float]] | None = None, eval_every: int = 0) -> int:
    """Contrastive training on (normalised images, CLIP text ids) batches; returns the step reached."""
    from dalle_core.clip import clamp_logit_scale, contrastive_loss

    budget = Budget(t, start_step)
    model.train()
    step, seen, t0 = start_step, 0, time.perf_counter()
    done = budget.check(step)
    while not done:
        lr = lr_at(step, t, budget.horizon)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(t.grad_accum):
            images, text = next(batches)
            with autocast(t.precision):
                loss, temperature = contrastive_loss(model, images, text)
            (loss / t.grad_accum).backward()
            seen += images.shape[0]
        if t.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        clamp_logit_scale(model)
        step += 1
        done = budget.check(step)
        if step % t.log_every == 0 or done:
            metrics = {"loss": loss.item(), "temperature": temperature, "lr": lr,
                       "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
            if evaluate and eval_every and step % eval_every == 0:
                metrics.update(evaluate())
                model.train()
            log(step, metrics)
            seen, t0 = 0, time.perf_counter()
        if step % t.checkpoint_every == 0 and not done:
            checkpoint(step)
    return step
