"""Training throughput: the matmul peak (the MFU denominator), the transformer, CLIP and the dVAE, and the CPU
attention variants behind the transformer's bf16 attention choice."""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.utils.benchmark as benchmark
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import (
    DALLE_SHAPE,
    REF_DVAE,
    REF_TRANSFORMER,
    Settings,
    config_shape,
    median_seconds,
    peak_rss_mb,
)
from dalle_core import cpu_fast
from dalle_core.device import autocast
from dalle_core.dvae import DiscreteVAE, DVAEConfig
from dalle_core.train import TrainConfig, make_optimizer
from dalle_core.transformer import DALLE, DALLEConfig

# A variant of the transformer's training step: (autocast precision, CPU bf16 attention: None for the shipped
# choice, "fp32" at every length, "math" or "flash" in bf16 on that SDPA kernel).
ATTENTION_VARIANTS = {"fp32": ("fp32", None), "bf16_attn_math": ("bf16", "math"),
                      "bf16_attn_flash": ("bf16", "flash"), "bf16_attn_fp32": ("bf16", "fp32")}


def matmul_peak(s: Settings) -> dict:
    """Measured n x n matmul GFLOP/s on this machine in fp32 and bf16 (the MFU denominator; on the CPU)."""
    n, out = 1024, {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        timer = benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
        out[f"{precision}_gflops"] = 2 * n**3 / timer.blocked_autorange(min_run_time=1.0).median / 1e9
    return out


def train_rate(s: Settings, c: DALLEConfig, precision: str, batch: int, repeats: int | None = None, steps: int = 3,
               attention: str | None = None) -> dict:
    """Training tokens/s and seconds per step of an untrained DALLE at config c (AdamW, clipped gradients), with
    the peak memory: GPU memory on CUDA, the process's peak RSS on a CPU. `attention`: see ATTENTION_VARIANTS."""
    torch.manual_seed(0)
    model = DALLE(c).to(s.device)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1, precision=precision))
    text = torch.randint(1, c.text_vocab, (batch, c.text_len), device=s.device)
    image = torch.randint(0, c.image_vocab, (batch, c.image_len), device=s.device)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    kernel = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}.get(attention)

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with (autocast(precision, s.device, c.seq_len), attention_choice(c, attention),
                  sdpa_kernel(kernel) if kernel else contextlib.nullcontext()):
                loss, _, _ = model(text, image)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    sec = median_seconds(run, repeats or s.repeats, s.device)
    out = {"tokens_per_s": steps * batch * (c.text_len + c.image_len) / sec, "seconds_per_step": sec / steps}
    if s.device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    else:
        out["peak_rss_mb"] = peak_rss_mb()
    return out


def attention_choice(c: DALLEConfig, attention: str | None) -> contextlib.AbstractContextManager:
    """The CPU bf16 attention of a variant: fp32 up to the sequence's length for "fp32", bf16 at every length for
    "math" or "flash", the shipped limit for None."""
    if attention is None:
        return contextlib.nullcontext()
    return cpu_fast.fp32_attention_up_to(c.seq_len if attention == "fp32" else 0)


def flops_per_token(model: DALLE) -> float:
    """Training FLOPs per token of a DALLE (PaLM appendix B: 6N + 12 * L * dim * seq, N without embeddings)."""
    c = model.c
    n = model.num_params() - model.text_emb.weight.numel() - model.image_emb.weight.numel()
    return 6 * n + 12 * c.depth * c.dim * c.seq_len


def transformer_train(s: Settings, precision: str, steps: int = 10, batch: int = 16) -> dict:
    """The reference transformer's training tokens/s, samples/s and model GFLOP/s (for the MFU)."""
    res = train_rate(s, REF_TRANSFORMER, precision, batch, steps=steps)
    flops = flops_per_token(DALLE(REF_TRANSFORMER)) * res["tokens_per_s"] / 1e9
    return {"tokens_per_s": res["tokens_per_s"], "samples_per_s": res["tokens_per_s"] / 96, "model_gflops": flops}


def clip_train(s: Settings, precision: str, steps: int = 5, batch: int = 128) -> dict:
    """The demo's small CLIP (configs/shapes.yaml) at batch 128: seconds per step and images/s."""
    from dalle_core.clip import CLIPConfig, build_clip, contrastive_loss

    torch.manual_seed(0)
    model = build_clip(CLIPConfig(vision_layers=3, text_layers=3, text_vocab=512, text_len=12))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    images, text = torch.randn(batch, 3, 32, 32), torch.randint(1, 512, (batch, 13))

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast(precision):
                loss, _ = contrastive_loss(model, images, text)
            loss.backward()
            opt.step()

    sec = median_seconds(run, s.repeats, torch.device("cpu"))
    return {"seconds_per_step": sec / steps, "images_per_s": steps * batch / sec}


def dvae_train(s: Settings, precision: str = "fp32", steps: int = 5, batch: int = 64, c: DVAEConfig = REF_DVAE) -> dict:
    """Training images/s of the dVAE at config c (the reference by default): reconstruction MSE + quantizer loss."""
    torch.manual_seed(0)
    model = DiscreteVAE(c).train()
    opt = make_optimizer(model, TrainConfig())
    x = torch.randn(batch, 3, c.image_size, c.image_size)

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast(precision):
                recon, _, q_loss = model(x)
            (torch.nn.functional.mse_loss(recon.float(), x) + q_loss).backward()
            opt.step()

    return {"images_per_s": steps * batch / median_seconds(run, s.repeats, torch.device("cpu"))}


def alternated(s: Settings, c: DALLEConfig, batch: int, variants: dict[str, tuple[str, str | None]], repeats: int,
               steps: int = 3) -> dict:
    """Median training tokens/s of each variant (precision, attention: see train_rate) at config c, the variants
    run in turn `repeats` times: their gaps are smaller than the machine's drift between two sequential runs."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (precision, attention) in variants.items():
            rates[name].append(train_rate(s, c, precision, batch, 1, steps, attention)["tokens_per_s"])
    return {name: statistics.median(r) for name, r in rates.items()}


def attention_kernel(s: Settings) -> dict:
    """CPU training tokens/s by sequence length (DALL-E's vocabularies, dim 256): fp32, and bf16 with its
    attention in bf16 on SDPA's math or flash kernel or in fp32: the measurement behind the shipped limit."""
    out = {}
    for text_len, grid in ((12, 8), (24, 16), (64, 20), (64, 26), (256, 32)):
        c = DALLEConfig(text_vocab=16384, text_len=text_len, image_vocab=8192, image_grid=grid, dim=256, depth=4,
                        heads=8)
        rates = alternated(s, c, max(4, 4096 // c.seq_len), ATTENTION_VARIANTS, s.repeats)
        out.update({f"T{c.seq_len}_{name}": rate for name, rate in rates.items()})
    return out


def config_attention(s: Settings, path: str = "configs/openmoji.yaml") -> dict:
    """CPU bf16 training tokens/s at a config's transformer shape, at its batch and twice that: the attention
    in bf16 (flash kernel) against fp32 (what ships up to the limit), run in turn at least 3 times."""
    cfg, c = config_shape(path)
    out = {}
    for batch in (cfg.transformer.train.batch_size, 2 * cfg.transformer.train.batch_size):
        rates = alternated(s, c, batch, {k: ATTENTION_VARIANTS[k] for k in ("bf16_attn_flash", "bf16_attn_fp32")},
                           max(s.repeats, 3), steps=5)
        out.update({f"T{c.seq_len}_b{batch}_{name}": rate for name, rate in rates.items()})
        out[f"T{c.seq_len}_b{batch}_speedup"] = rates["bf16_attn_fp32"] / rates["bf16_attn_flash"]
    return out


def max_batch(s: Settings, c: DALLEConfig = DALLE_SHAPE, precision: str = "bf16") -> dict:
    """GPU: the largest power-of-two batch whose training step fits in memory, and its tokens/s."""
    best: dict = {}
    batch = 4
    while batch <= 4096:
        try:
            res = train_rate(s, c, precision, batch, repeats=2, steps=2)
        except torch.OutOfMemoryError:
            break
        best = {"batch": batch, **res}
        batch *= 2
        torch.cuda.empty_cache()
    torch.cuda.empty_cache()
    return best


def config_transformer(s: Settings, path: str = "configs/dalle-256.yaml") -> dict:
    """GPU: the transformer of a config at its own batch size (peak memory and tokens/s)."""
    cfg, c = config_shape(path)
    train = cfg.transformer.train
    res = train_rate(s, c, train.precision, train.batch_size, repeats=2, steps=2)
    return {"batch": train.batch_size, "params_m": DALLE(c).num_params() / 1e6, **res}
