"""The one training loop (`fit`) and what each stage plugs into it.

`fit` owns everything the stages share: the LR schedule and the step/wall-clock
budget, bf16 autocast on the run's device, gradient accumulation (without DDP
gradient sync on all but the last micro-batch), clipping, logging, checkpoints.
A stage gives it only a model (optionally DDP-wrapped), batches and a step
function `(model, batch, step) -> (loss, items, metrics)`: `dvae_step`,
`transformer_step` and `clip_step` below. The loop knows nothing about where
data, checkpoints or metrics live: it calls `log(step, metrics)` and
`checkpoint(step, elapsed_s)`.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_core.config import DVAESection, TrainConfig
from dalle_core.device import autocast, rng_state, set_rng_state, to_device
from dalle_core.dvae import logit_laplace_nll
from dalle_core.images import to_tensor

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


class TrainingError(ValueError):
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


def fit(model: nn.Module, batches: Iterable, t: TrainConfig, optimizer: torch.optim.Optimizer, step_fn: StepFn, *,
        start_step: int = 0, elapsed_s: float = 0.0, device: torch.device | str = "cpu", seq_len: int | None = None,
        log: LogFn | None = None, checkpoint: CheckpointFn | None = None,
        before_step: Callable[[int, int], None] | None = None, after_step: Callable[[int], None] | None = None,
        every: tuple[tuple[int, Callable[[int], None]], ...] = (), world_size: int = 1,
        unit: str = "images") -> FitResult:
    """Train from `start_step` until the budget says stop.

    `model` may be DDP-wrapped. `batches` yields batches (moved to `device` here if they are not
    there yet). `before_step(step, horizon)` / `after_step(step)` hold per-stage schedules and fix-ups
    (gumbel temperature, dead-code restarts, CLIP's logit-scale clamp); `every` = ((n, fn), ...)
    calls fn(step) every n steps (sample grids, validation). `seq_len` is the longest sequence the
    model attends over (it picks the CPU bf16 attention kernel). Logged throughput,
    `<unit>_per_s`, counts all `world_size` ranks.
    """
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
                       f"{unit}_per_s": world_size * items / max(elapsed, 1e-9)})
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


def dvae_step(r: DVAESection) -> StepFn:
    """The dVAE's loss on a batch {"image": (B, H, W, 3) uint8}: reconstruction + quantizer loss, and for VQGAN
    (`r.adversarial`) the LPIPS term when it has weights, the adaptive-weight generator term and the
    discriminator's hinge loss."""
    norm = Norm(r.norm_mean, r.norm_std)
    lpips = None
    if r.adversarial and r.perceptual_vgg and r.perceptual_weight > 0:
        from dalle_core.perceptual import load_lpips

        lpips = load_lpips(r.perceptual_vgg, r.perceptual_lpips)

    def step_fn(model: nn.Module, batch: dict, step: int):
        x = to_tensor(batch["image"], norm.mean, norm.std)
        out, idx, q_loss = model(x)
        if r.recon_loss == "logit_laplace":
            rec_loss = logit_laplace_nll(out, norm.to_unit(x))
            recon = unwrap(model).to_image(out if lpips is not None or r.adversarial else out.detach())
        else:
            recon = out.float()
            rec_loss = F.mse_loss(recon, x) if r.recon_loss == "mse" else F.l1_loss(recon, x)
        adv: dict[str, torch.Tensor] = {}
        if lpips is not None:
            lpips.to(x.device)  # in place; nothing moves after the first step
            adv["perceptual"] = lpips(2 * norm.to_unit(x) - 1, 2 * norm.to_unit(recon) - 1).mean()
            rec_loss = rec_loss + r.perceptual_weight * adv["perceptual"]
        loss = rec_loss + q_loss
        if r.adversarial and step >= r.disc_start:
            ramp = min(1.0, (step - r.disc_start + 1) / r.disc_ramp) if r.disc_ramp else 1.0
            adv.update(vqgan_losses(unwrap(model), x, recon, rec_loss, r.disc_weight * ramp))
            loss = loss + adv["adaptive_weight"] * adv["generator_loss"] + adv["discriminator_loss"]
        elif r.adversarial and distributed():  # every parameter gets a gradient each step, as DDP expects
            loss = loss + 0 * sum(p.sum() for p in unwrap(model).discriminator.parameters())

        def metrics() -> dict[str, float]:
            ppl, used = code_stats(idx, r.codebook_size)
            with torch.no_grad():
                psnr = psnr_unit(norm.to_unit(recon.detach()), norm.to_unit(x))
            return {"recon_mse": F.mse_loss(recon.detach().float(), x).item(), "psnr": psnr, "perplexity": ppl,
                    "code_usage_fraction": used, "quantizer_loss": q_loss.item(),
                    "temperature": getattr(unwrap(model).quantizer, "temperature", float("nan")),
                    "kl_per_cell": float(getattr(unwrap(model).quantizer, "last_kl", float("nan"))),
                    **{k: float(v.detach()) for k, v in adv.items()}}

        return loss, x.shape[0], metrics

    return step_fn


def vqgan_losses(model: nn.Module, x: torch.Tensor, recon: torch.Tensor, rec_loss: torch.Tensor,
                 disc_weight: float) -> dict[str, torch.Tensor]:
    """Taming-transformers' adversarial terms for normalised images `x` and reconstructions `recon`.

    generator_loss = -D(recon), to be weighted by adaptive_weight = disc_weight x |grad rec_loss| /
    |grad generator_loss| at the decoder's last layer (so neither term drowns the other); its gradient reaches
    the dVAE only (D's parameters are detached for it). discriminator_loss = hinge on D(x) and D(recon.detach()),
    its gradient reaches D only."""
    d = model.discriminator
    frozen = {name: p.detach() for name, p in d.named_parameters()}
    generator_loss = -torch.func.functional_call(d, frozen, (recon,)).float().mean()
    last = model.decoder.net[-1].weight
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(generator_loss, last, retain_graph=True)[0]
    weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * disc_weight
    real, fake = d(x).float(), d(recon.detach()).float()
    disc_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    return {"generator_loss": generator_loss, "adaptive_weight": weight, "discriminator_loss": disc_loss,
            "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}


def dvae_schedule(model: nn.Module, r: DVAESection) -> tuple[Callable[[int, int], None], Callable[[int], None]]:
    """(before_step, after_step): the gumbel temperature and KL ramps over the run's horizon (the step the
    budget says it will end at); VQ dead-code restarts."""
    q = unwrap(model).quantizer

    c = unwrap(model).c
    cells_per_value = c.grid_size ** 2 / (3 * c.image_size ** 2)  # KL summed over cells, recon over pixel values

    def before(step: int, horizon: int) -> None:
        if r.quantizer == "gumbel":
            frac = min(1.0, step / max(1.0, r.temp_anneal * horizon))
            q.temperature = r.temp_start * (r.temp_end / r.temp_start) ** frac
            q.kl_weight = r.kl_weight * cells_per_value * min(1.0, step / max(1.0, r.kl_warmup * horizon))

    def after(step: int) -> None:
        if r.quantizer == "vq" and (step + 1) % r.restart_every == 0:
            q.restart_dead_codes()

    return before, after


@torch.inference_mode()
def evaluate_dvae(model: nn.Module, batches: Iterable[dict], norm: Norm,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Validation PSNR of the hard-code reconstruction (over all pixels of all batches), codebook usage, and
    sharpness: the variance of the reconstructions' Laplacian over the originals' (1 = as sharp; blur < 1)."""
    model.eval()
    se, n, lap_recon, lap_real = 0.0, 0, 0.0, 0.0
    counts = torch.zeros(model.c.codebook_size, device=device)
    for batch in batches:
        x = to_tensor(to_device(batch["image"], torch.device(device)), norm.mean, norm.std)
        tokens = model.encode(x)
        recon = model.decode(tokens)
        se += F.mse_loss(norm.to_unit(recon), norm.to_unit(x), reduction="sum").item()
        n += x.numel()
        lap_recon += laplacian_variance(norm.to_unit(recon)).sum().item()
        lap_real += laplacian_variance(norm.to_unit(x)).sum().item()
        counts += torch.bincount(tokens.flatten(), minlength=model.c.codebook_size).float()
    mse = se / max(n, 1)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"val_psnr": 99.0 if mse == 0 else 10 * math.log10(1 / mse), "val_mse": mse,
            "val_code_usage_fraction": float((counts > 0).float().mean()), "val_perplexity": float(entropy.exp()),
            "val_sharpness_ratio": lap_recon / max(lap_real, 1e-12)}


def laplacian_variance(unit: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B,) variance of the 3x3 Laplacian of their luma: a standard focus
    measure, high for sharp edges and fine texture, low for blur."""
    luma = (unit.float() * torch.tensor([0.299, 0.587, 0.114], device=unit.device).view(1, 3, 1, 1)).sum(1, True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=unit.device).view(1, 1, 3, 3)
    return F.conv2d(luma, kernel).flatten(1).var(1)


# ----------------------------------------------------------- the transformer


def drop_captions(text: torch.Tensor, p: float, pad_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each caption by the all-padding caption with probability p (for classifier-free guidance)."""
    if p <= 0:
        return text
    drop = torch.rand(text.shape[0], generator=generator) < p
    return torch.where(drop.to(text.device)[:, None], torch.full_like(text, pad_id), text)


def transformer_step(caption_dropout: float, pad_id: int, seed: int) -> StepFn:
    """Next-token loss on a batch {"text": (B, text_len), "image": (B, N)} of ids, captions dropped for CFG.

    Which captions are dropped depends on the seed and the step alone, so a resumed run drops the same.
    """
    gen, seeded = torch.Generator(), [-1]

    def step_fn(model: nn.Module, batch: dict, step: int):
        if seeded[0] != step:  # once per step: micro-batches of one step draw on from there
            gen.manual_seed(seed * 1000003 + step)
            seeded[0] = step
        text, image = batch["text"], batch["image"]
        text = drop_captions(text, caption_dropout, pad_id, gen)
        loss, text_loss, image_loss = model(text, image)
        return loss, text.numel() + image.numel(), lambda: {"text_loss": text_loss.item(),
                                                           "image_loss": image_loss.item()}

    return step_fn


@torch.inference_mode()
def evaluate_transformer(model: nn.Module, batches: Iterable[dict], precision: str = "fp32",
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean losses over all batches; image loss also in bits per image token."""
    model.eval()
    device = torch.device(device)
    sums, n = torch.zeros(3, device=device), 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(precision, device, model.c.seq_len):
            losses = model(batch["text"], batch["image"])
        sums += torch.stack([x.float() for x in losses]) * batch["text"].shape[0]
        n += batch["text"].shape[0]
    loss, text_loss, image_loss = (sums / max(n, 1)).tolist()
    return {"val_loss": loss, "val_text_loss": text_loss, "val_image_loss": image_loss,
            "val_bits_per_image_token": image_loss / math.log(2)}


# ------------------------------------------------------------------- CLIP


def clip_step(c, rank: int = 0, world_size: int = 1) -> StepFn:
    """Contrastive loss on a batch {"image": (B, H, W, 3) uint8, "text": (B, text_len) BPE ids} for a CLIP of
    `dalle_core.clip.CLIPConfig` c. Under DDP the features of all ranks are gathered, so every rank
    contrasts against the global batch."""
    from dalle_core.clip import clip_pixels, clip_text_ids, contrastive_loss

    def step_fn(model: nn.Module, batch: dict, step: int):
        pixels, text = clip_pixels(batch["image"], c.image_size), clip_text_ids(batch["text"], c)
        loss, logit_scale = contrastive_loss(model, pixels, text, rank, world_size)
        return loss, text.shape[0], lambda: {"temperature": 1.0 / float(logit_scale)}

    return step_fn
