"""Sampling speed: the reference transformer's 16 candidates, DALL-E's shape with guidance and the KV cache,
where a CPU sampling step's time goes, and a config's transformer on a GPU."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.common import (
    DALLE_SHAPE,
    REF_TRANSFORMER,
    Settings,
    config_shape,
    median_seconds,
    seconds,
)
from dalle_core.sampling import SamplingSettings, sample
from dalle_core.transformer import DALLE


def sample_16(s: Settings, cond_scale: float, prompts: int = 1) -> dict:
    """16 candidates for each of `prompts` prompts in one batch (one seeded generator per prompt), on the CPU."""
    torch.manual_seed(0)
    model = DALLE(REF_TRANSFORMER).eval()
    text = torch.randint(1, 1000, (prompts, 32)).repeat_interleave(16, dim=0)

    def run():
        rngs = [torch.Generator().manual_seed(i) for i in range(prompts)]
        sample(model, text, SamplingSettings(cond_scale=cond_scale), generator=rngs)

    sec = median_seconds(run, s.repeats, torch.device("cpu"), warmup=2)
    return {"seconds": sec, "ms_per_token": 1000 * sec / 64, "images_per_s": 16 * prompts / sec}


def dalle_sample(s: Settings, batch: int = 4, cond_scale: float = 3.0, precision: str = "auto",
                 top_p: float | None = None) -> dict:
    """4 images of 1,024 tokens with classifier-free guidance and the KV cache (untrained weights: near-uniform
    distributions, the worst case for top_p)."""
    from dalle_core.device import sampling_precision

    torch.manual_seed(0)
    model = DALLE(DALLE_SHAPE).to(s.device).eval()
    text = torch.randint(1, DALLE_SHAPE.text_vocab, (batch, DALLE_SHAPE.text_len), device=s.device)
    precision = sampling_precision(precision, s.device)

    def run():
        sample(model, text, SamplingSettings(cond_scale=cond_scale, top_p=top_p), precision=precision,
               generator=torch.Generator(device=s.device).manual_seed(0))

    sec = median_seconds(run, s.repeats, s.device)
    return {"seconds": sec, "ms_per_token": 1000 * sec / DALLE_SHAPE.image_len,
            "precision_bf16": float(precision == "bf16")}


def dalle_sample_parts(s: Settings, rows: int = 8) -> dict:
    """Where a sampling step's time goes at DALL-E's shape (4 images with guidance = 8 rows; CPU), in ms per step
    (the fastest of the repeats): the attention over the KV cache (average cache length, every layer's cache in
    turn, so it is read from memory as in sampling, not from a warm cache) in fp32 SDPA, bf16 SDPA, bf16 matmuls
    and the compiled decode attention (dalle_core.cpu_fast, which sampling uses) over each cache; the 4
    layers' linear layers and the 8,192-code image head in fp32, bf16, and bf16 packed once for oneDNN
    (sampling's CPU bf16)."""
    from dalle_core.cpu_fast import PackedLinear, kernel, packed_linear_works

    c, cpu = DALLE_SHAPE, torch.device("cpu")
    hs = c.dim // c.heads
    shape = (c.depth, rows, c.heads, c.seq_len, hs)
    lengths = range(c.text_len, c.seq_len, 8)
    out: dict[str, float] = {}

    def per_step_ms(fn, calls: int) -> float:
        return 1000 * min(seconds(fn, s.repeats, cpu)) / calls

    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        q = torch.randn(rows, c.heads, 1, hs, dtype=dtype)
        qkv = torch.randn(rows, 1, 3 * c.dim, dtype=dtype)

        def sdpa(k=k, v=v, q=q):
            for n in lengths:
                for layer in range(c.depth):
                    F.scaled_dot_product_attention(q, k[layer, :, :, :n], v[layer, :, :, :n])

        def matmuls(k=k, v=v, q=q):
            for n in lengths:
                for layer in range(c.depth):
                    w = torch.softmax((q @ k[layer, :, :, :n].transpose(-1, -2)).float() * hs ** -0.5, -1)
                    w.to(v.dtype) @ v[layer, :, :, :n]

        def compiled(k=k, v=v, qkv=qkv, step=kernel()):  # with its cache write
            for n in lengths:
                for layer in range(c.depth):
                    step(qkv, k[layer], v[layer], n)

        out[f"attention_sdpa_{name}_ms"] = per_step_ms(sdpa, len(lengths))
        if kernel() is not None:
            out[f"attention_compiled_{name}_ms"] = per_step_ms(compiled, len(lengths))
        if name == "bf16":
            out["attention_matmul_bf16_ms"] = per_step_ms(matmuls, len(lengths))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("packed_bf16", torch.bfloat16)):
        if name == "packed_bf16" and not packed_linear_works():
            continue
        block = nn.ModuleList(nn.Linear(i, o) for i, o in ((c.dim, 3 * c.dim), (c.dim, c.dim), (c.dim, 4 * c.dim),
                                                           (4 * c.dim, c.dim))).to(dtype)
        head = nn.Linear(c.dim, c.image_vocab, bias=False).to(dtype)
        if name == "packed_bf16":  # sampling's CPU bf16 linears
            block = [PackedLinear(lin, rows, gelu=i == 2) for i, lin in enumerate(block)]
            head = PackedLinear(head, rows)
        x, h = torch.randn(rows, 1, c.dim, dtype=dtype), torch.randn(rows, 1, 4 * c.dim, dtype=dtype)

        def linears(block=block, x=x, h=h):
            for _ in range(100):
                for _ in range(c.depth):
                    block[0](x), block[1](x), block[2](x), block[3](h)

        def image_head(head=head, x=x):
            for _ in range(100):
                head(x[:, 0])

        with torch.inference_mode():
            out[f"linears_{name}_ms"] = per_step_ms(linears, 100)
            out[f"image_head_{name}_ms"] = per_step_ms(image_head, 100)
    out["steps"] = c.image_len
    return out


def config_sampling(s: Settings, precision: str, path: str = "configs/dalle-256.yaml", prompts: int = 4,
                    candidates: int = 4) -> dict:
    """GPU: sampling with a config's transformer (untrained), 4 prompts x 4 candidates with guidance 3."""
    _, c = config_shape(path)
    torch.manual_seed(0)
    model = DALLE(c).to(s.device).eval()
    text = torch.randint(1, c.text_vocab, (prompts, c.text_len), device=s.device).repeat_interleave(candidates, 0)
    torch.cuda.reset_peak_memory_stats(s.device)

    def run():
        sample(model, text, SamplingSettings(cond_scale=3.0), precision=precision,
               generator=[torch.Generator(device=s.device).manual_seed(i) for i in range(prompts)])

    sec = median_seconds(run, 2, s.device)
    return {"seconds": sec, "images_per_s": prompts * candidates / sec, "ms_per_token": 1000 * sec / c.image_len,
            "peak_memory_gb": torch.cuda.max_memory_allocated(s.device) / 2**30}
