"""Benchmarks of the hot paths at the reference configuration: `make bench` or `python -m bench.run`.

Prints one table and writes JSON (bench/results/<time>.json) so runs compare.
Each measurement: warm-up, then repeats, median reported. Never part of the tests.

Reference configuration (from the performance issue): 32x32 images -> 8x8 tokens,
codebook 512 (dim 256, hidden 64, 2 downsamples); transformer dim 256, depth 4,
heads 8, text_len 32, text vocab 1000, image vocab 512, batch 16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_core.config import TrainConfig
from dalle_core.device import autocast
from dalle_core.dvae import DiscreteVAE, DVAEConfig
from dalle_core.sampling import sample
from dalle_core.train import make_optimizer
from dalle_core.transformer import DALLE, DALLEConfig

REF_TRANSFORMER = DALLEConfig(text_vocab=1000, text_len=32, image_vocab=512, image_grid=8, dim=256, depth=4, heads=8)
REF_DVAE = DVAEConfig(image_size=32, codebook_size=512, codebook_dim=256, hidden=64, num_downsamples=2)
# lucidrains/DALLE-pytorch 1.6.6 at the same configuration, measured on the reference 2-core CPU (issue text)
REFERENCE = {"transformer_train_fp32.tokens_per_s": 3600, "sample_16.seconds": 4.9, "sample_16_cfg3.seconds": 1.1,
             "dvae_train.images_per_s": 280, "dvae_encode.images_per_s": 7500}


DEVICE = torch.device("cpu")  # --device


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak(precision: str, n: int = 1024, repeats: int = 5) -> float:
    """Measured matmul GFLOP/s on this machine (the MFU denominator)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    s = statistics.median(timed(lambda: [a @ b for _ in range(10)], 2, repeats))
    return 10 * 2 * n**3 / s / 1e9


def bench_transformer_train(precision: str, repeats: int, steps: int = 10, batch: int = 16) -> dict:
    res = _train_rate(REF_TRANSFORMER, precision, batch, repeats, steps)
    flops = DALLE(REF_TRANSFORMER).flops_per_token() * res["tokens_per_s"] / 1e9
    return {"tokens_per_s": res["tokens_per_s"], "samples_per_s": res["tokens_per_s"] / 96, "model_gflops": flops}


def bench_sampling(cond_scale: float, repeats: int, prompts: int = 1) -> dict:
    """16 candidates for each of `prompts` prompts in one batch (one seeded generator per prompt)."""
    torch.manual_seed(0)
    model = DALLE(REF_TRANSFORMER).eval()
    text = torch.randint(1, 1000, (prompts, 32)).repeat_interleave(16, dim=0)

    def run():
        gens = [torch.Generator().manual_seed(i) for i in range(prompts)]
        sample(model, text, cond_scale=cond_scale, generator=gens)

    s = statistics.median(timed(run, 2, repeats))
    return {"seconds": s, "ms_per_token": 1000 * s / 64, "images_per_s": 16 * prompts / s}


def bench_dvae_train(repeats: int, precision: str = "fp32", steps: int = 5, batch: int = 64) -> dict:
    torch.manual_seed(0)
    model = DiscreteVAE(REF_DVAE).train()
    opt = make_optimizer(model, TrainConfig())
    x = torch.randn(batch, 3, 32, 32)

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast(precision):
                recon, _, q_loss = model(x)
            (torch.nn.functional.mse_loss(recon.float(), x) + q_loss).backward()
            opt.step()

    return {"images_per_s": steps * batch / statistics.median(timed(run, 1, repeats))}


def bench_clip_train(precision: str, repeats: int, steps: int = 5, batch: int = 128) -> dict:
    """The demo's small CLIP (configs/shapes.yaml) at batch 128."""
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

    s = statistics.median(timed(run, 1, repeats))
    return {"seconds_per_step": s / steps, "images_per_s": steps * batch / s}


def bench_dvae_encode(repeats: int, precision: str = "fp32", batch: int = 512, batches: int = 8) -> dict:
    model = DiscreteVAE(REF_DVAE).eval().to(memory_format=torch.channels_last)  # as tasks.dvae.load_dvae
    x = torch.randn(batch, 3, 32, 32)

    def run():
        with torch.inference_mode():
            for _ in range(batches):
                model.encode(x, precision)

    return {"images_per_s": batch * batches / statistics.median(timed(run, 1, repeats))}


def _pretokenize_child(num_images: int, root: str, precision: str) -> dict:
    """Run in a fresh process: ingest shapes, store a reference dVAE + BPE, time pretokenization."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from dataclasses import asdict

    from prefect.testing.utilities import prefect_test_harness

    from dalle_core.config import config_from_dict
    from flows.pretokenize import encode_shards_flow
    from flows.train_bpe import train_bpe_flow
    from tasks.common import open_store, stage_keys, state_bytes

    overrides = {"data": {"shapes": {"num_images": num_images}, "shard_size": 4096},
                 "dvae": {"codebook_size": 512, "codebook_dim": 256, "hidden": 64, "encode_precision": precision},
                 "store": root, "tracking": {"uri": f"sqlite:///{root}/mlflow.db"}}
    cfg = config_from_dict(overrides)
    cfg_path = os.path.join(root, "bench.yaml")
    with open(cfg_path, "w") as f:
        json.dump(cfg.model_dump(mode="json"), f)
    with prefect_test_harness(server_startup_timeout=120):
        train_bpe_flow(config=cfg_path)  # ingests first
        store, keys = open_store(cfg), stage_keys(cfg)
        model = DiscreteVAE(REF_DVAE)  # untrained weights cost the same to run
        store.write_bytes(store.path("dvae", keys["dvae"], "model.safetensors"), state_bytes(model))
        store.write_json(store.path("dvae", keys["dvae"], "config.json"),
                         {"model": asdict(REF_DVAE), "norm": {"mean": [0.5] * 3, "std": [0.5] * 3}})
        store.finish("dvae", keys["dvae"], config={}, inputs={})
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        encode_shards_flow(config=cfg_path)
        seconds = time.perf_counter() - t0
    return {"images": num_images, "seconds": seconds, "images_per_s": num_images / seconds,
            "rss_before_mb": rss_before / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_pretokenize(num_images: int, precision: str = "fp32") -> dict:
    with tempfile.TemporaryDirectory() as root:
        out = subprocess.run([sys.executable, "-m", "bench.run", "--pretokenize-child", str(num_images), root,
                              precision],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_token_loader(repeats: int) -> dict:
    import pyarrow as pa

    from dalle_core.loader import ShardStream, decode_tokens
    from storage.parquet import ParquetShards, shard_name, tokens_schema, write_shard
    from storage.store import ArtifactStore

    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(8):
            n = 4096
            t = pa.table({"id": [str(j) for j in range(n)], "caption": ["c"] * n,
                          "text_tokens": pa.array(list(rng.integers(0, 1000, (n, 32)).astype(np.uint16)),
                                                  type=pa.list_(pa.uint16())),
                          "image_tokens": pa.FixedSizeListArray.from_arrays(
                              pa.array(rng.integers(0, 512, n * 64).astype(np.uint16)), 64)},
                         schema=tokens_schema(64, 1000))
            paths.append(store.path("tokens", "bench", "train", shard_name(i)))
            write_shard(store, paths[-1], t)
        batches = ShardStream(ParquetShards(store), paths, ["text_tokens", "image_tokens"], decode_tokens, 16,
                              window_rows=8192).batches()
        n_batches = 2000
        s = statistics.median(timed(lambda: [next(batches) for _ in range(n_batches)], 1, repeats))
    return {"tokens_per_s": n_batches * 16 * 96 / s}


# ------------------------------------------------------------------ DALL-E's shape
# The bench shape of the GPU/scale issue: transformer dim 256, depth 4, 8 heads, text_len 256, text vocab 16,384,
# a 32x32 image grid (1,024 tokens) from 8,192 codes: 1,280-token sequences, batch 4.
DALLE_SHAPE = DALLEConfig(text_vocab=16384, text_len=256, image_vocab=8192, image_grid=32, dim=256, depth=4, heads=8)
# lucidrains' dalle-pytorch 1.6.6 at this shape, one run on the reference 2-core CPU (issue text)
REFERENCE.update({"dalle_train_fp32.tokens_per_s": 507, "dalle_train_bf16.tokens_per_s": 915,
                  "dalle_sample_cfg3.seconds": 34.8})


def _train_rate(c: DALLEConfig, precision: str, batch: int, repeats: int, steps: int = 3,
                attention: str | None = None) -> dict:
    """Training tokens/s of a DALLE at config c. On a CPU in bf16, `attention` overrides the shipped choice
    (dalle_core.transformer.causal_attention): "fp32" attends in fp32 at every length, "math" or "flash" in
    bf16 on that SDPA kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import dalle_core.transformer as transformer

    torch.manual_seed(0)
    model = DALLE(c).to(DEVICE)
    t = TrainConfig(weight_decay=0.1, precision=precision)
    opt = make_optimizer(model, t)
    text = torch.randint(1, c.text_vocab, (batch, c.text_len), device=DEVICE)
    image = torch.randint(0, c.image_vocab, (batch, c.image_len), device=DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    kernel = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}.get(attention)

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with autocast(precision, DEVICE, c.seq_len), sdpa_kernel(kernel) if kernel else contextlib.nullcontext():
                loss, _, _ = model(text, image)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    limit = transformer.CPU_FP32_ATTENTION_MAX_LEN
    transformer.CPU_FP32_ATTENTION_MAX_LEN = {None: limit, "fp32": c.seq_len}.get(attention, 0)
    try:
        s = statistics.median(timed(run, 1, repeats))
    finally:
        transformer.CPU_FP32_ATTENTION_MAX_LEN = limit
    out = {"tokens_per_s": steps * batch * (c.text_len + c.image_len) / s, "seconds_per_step": s / steps}
    if DEVICE.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(DEVICE) / 2**30
    else:
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _import_dalle_pytorch():
    """lucidrains' dalle_pytorch, or None when it is not installed. Its 1.6.6 imports taming's `main`, which wants
    pytorch-lightning's old `utilities.distributed` module: an alias to the current one is put in its place."""
    import importlib.util
    import types

    if importlib.util.find_spec("dalle_pytorch") is None:
        return None
    if importlib.util.find_spec("pytorch_lightning") is not None:
        import pytorch_lightning.utilities as plu

        if importlib.util.find_spec("pytorch_lightning.utilities.distributed") is None:
            shim = types.ModuleType("pytorch_lightning.utilities.distributed")
            shim.rank_zero_only = plu.rank_zero_only
            sys.modules["pytorch_lightning.utilities.distributed"] = shim
    import dalle_pytorch

    return dalle_pytorch


def bench_dalle_anchor(repeats: int) -> dict:
    """The issue's anchor measured in this run, so the comparison does not depend on which machine this is:
    lucidrains' dalle-pytorch 1.6.6 at DALL-E's bench shape (same widths, dim_head 32), training tokens/s in fp32
    and under bf16 autocast, and 4 images with cond_scale 3 and its KV cache (its final dVAE decode left out, as
    ours is). Needs `pip install --no-deps dalle-pytorch==1.6.6 axial_positional_embedding rotary-embedding-torch
    ftfy regex 'setuptools<81'` next to the `reference` extra; {} when it is not installed."""
    if DEVICE.type != "cpu":  # the anchor is the CPU measurement; a CPU anchor against a GPU run says nothing
        return {}
    dp = _import_dalle_pytorch()
    if dp is None:
        print("  dalle_pytorch is not installed: the table compares with the issue's numbers", file=sys.stderr)
        return {}
    c, batch = DALLE_SHAPE, 4
    torch.manual_seed(0)
    vae = dp.DiscreteVAE(image_size=8 * c.image_grid, num_layers=3, num_tokens=c.image_vocab, codebook_dim=256,
                         hidden_dim=64)
    model = dp.DALLE(dim=c.dim, vae=vae, num_text_tokens=c.text_vocab, text_seq_len=c.text_len, depth=c.depth,
                     heads=c.heads, dim_head=c.dim // c.heads)
    text = torch.randint(1, c.text_vocab, (batch, c.text_len))
    image = torch.randint(0, c.image_vocab, (batch, c.image_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        def step(precision=precision):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(text, image, return_loss=True)
            loss.backward()
            opt.step()

        s = statistics.median(timed(step, 1, repeats))
        out[f"train_{precision}_tokens_per_s"] = batch * (c.text_len + c.image_len) / s
    model.eval()
    model.vae.decode = lambda codes: codes  # time the token sampling only

    def generate():
        with torch.no_grad():
            model.generate_images(text, cond_scale=3.0, use_cache=True)

    out["sample_cfg3_seconds"] = statistics.median(timed(generate, 0, max(1, repeats // 2)))  # ~40 s a run
    return out


def bench_dalle_sample(repeats: int, batch: int = 4, cond_scale: float = 3.0, precision: str = "auto",
                       top_p: float | None = None) -> dict:
    """4 images of 1,024 tokens with classifier-free guidance and the KV cache (untrained weights: near-uniform
    distributions, the worst case for top_p)."""
    from dalle_core.device import sampling_precision

    torch.manual_seed(0)
    model = DALLE(DALLE_SHAPE).to(DEVICE).eval()
    text = torch.randint(1, DALLE_SHAPE.text_vocab, (batch, DALLE_SHAPE.text_len), device=DEVICE)
    precision = sampling_precision(precision, DEVICE)

    def run():
        sample(model, text, cond_scale=cond_scale, top_p=top_p, precision=precision,
               generator=torch.Generator(device=DEVICE).manual_seed(0))

    s = statistics.median(timed(run, 1, repeats))
    return {"seconds": s, "ms_per_token": 1000 * s / DALLE_SHAPE.image_len, "precision_bf16": float(precision == "bf16")}


def bench_dalle_sample_parts(repeats: int, rows: int = 8) -> dict:
    """Where a sampling step's time goes at DALL-E's shape (4 images with guidance = 8 rows; CPU): ms per step of
    the attention over the KV cache (average cache length, every layer's cache in turn, so it is read from
    memory as in sampling, not from a warm cache) in fp32 SDPA, bf16 SDPA, bf16 matmuls and the compiled decode
    attention (dalle_core.cpu_attention, which sampling uses) over each cache; of the 4 layers' linear layers and of
    the 8,192-code image head in fp32, bf16, and bf16 packed once for oneDNN (sampling's CPU bf16)."""
    from dalle_core.cpu_attention import kernel
    from dalle_core.sampling import PackedLinear, packed_linear_works

    c = DALLE_SHAPE
    hs, n_steps = c.dim // c.heads, c.image_len
    shape = (c.depth, rows, c.heads, c.seq_len, hs)
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        q = torch.randn(rows, c.heads, 1, hs, dtype=dtype)
        lengths = range(c.text_len, c.seq_len, 8)

        def sdpa(k=k, v=v, q=q, lengths=lengths):
            for n in lengths:
                for layer in range(c.depth):
                    F.scaled_dot_product_attention(q, k[layer, :, :, :n], v[layer, :, :, :n])

        def matmuls(k=k, v=v, q=q, lengths=lengths):
            for n in lengths:
                for layer in range(c.depth):
                    w = torch.softmax((q @ k[layer, :, :, :n].transpose(-1, -2)).float() * hs ** -0.5, -1)
                    w.to(v.dtype) @ v[layer, :, :, :n]

        qkv = torch.randn(rows, 1, 3 * c.dim, dtype=dtype)

        def compiled(k=k, v=v, qkv=qkv, lengths=lengths, step=kernel()):  # with its cache write
            for n in lengths:
                for layer in range(c.depth):
                    step(qkv, k[layer], v[layer], n)

        out[f"attention_sdpa_{name}_ms"] = 1000 * min(timed(sdpa, 1, repeats)) / len(lengths)
        if kernel() is not None:
            out[f"attention_compiled_{name}_ms"] = 1000 * min(timed(compiled, 1, repeats)) / len(lengths)
        if name == "bf16":
            out["attention_matmul_bf16_ms"] = 1000 * min(timed(matmuls, 1, repeats)) / len(lengths)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("packed_bf16", torch.bfloat16)):
        if name == "packed_bf16" and not packed_linear_works():
            continue
        block = nn.ModuleList(nn.Linear(i, o) for i, o in ((c.dim, 3 * c.dim), (c.dim, c.dim), (c.dim, 4 * c.dim),
                                                           (4 * c.dim, c.dim))).to(dtype)
        head = nn.Linear(c.dim, c.image_vocab, bias=False).to(dtype)
        if name == "packed_bf16":  # sampling's CPU bf16 linears (dalle_core.sampling.PackedLinear)
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
            out[f"linears_{name}_ms"] = 10 * min(timed(linears, 1, repeats))
            out[f"image_head_{name}_ms"] = 10 * min(timed(image_head, 1, repeats))
    out["steps"] = n_steps
    return out


def _alternated(c: DALLEConfig, batch: int, variants: dict[str, tuple[str, str | None]], repeats: int,
                steps: int = 3) -> dict:
    """Median training tokens/s of each variant (precision, attention: see _train_rate) at config c, the variants
    run in turn `repeats` times: their gaps are smaller than the machine's drift between two sequential runs."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (precision, attention) in variants.items():
            rates[name].append(_train_rate(c, precision, batch, 1, steps, attention)["tokens_per_s"])
    return {name: statistics.median(r) for name, r in rates.items()}


ATTENTION_VARIANTS = {"fp32": ("fp32", None), "bf16_attn_math": ("bf16", "math"),
                      "bf16_attn_flash": ("bf16", "flash"), "bf16_attn_fp32": ("bf16", "fp32")}


def bench_attention_kernel(repeats: int) -> dict:
    """CPU training tokens/s by sequence length (DALL-E's vocabularies, dim 256): fp32, and bf16 with its
    attention in bf16 on SDPA's math or flash kernel or in fp32. Picks CPU_FP32_ATTENTION_MAX_LEN."""
    out = {}
    for text_len, grid in ((12, 8), (24, 16), (64, 20), (64, 26), (256, 32)):
        c = DALLEConfig(text_vocab=16384, text_len=text_len, image_vocab=8192, image_grid=grid, dim=256, depth=4,
                        heads=8)
        rates = _alternated(c, max(4, 4096 // c.seq_len), ATTENTION_VARIANTS, repeats)
        out.update({f"T{c.seq_len}_{name}": rate for name, rate in rates.items()})
    return out


def bench_config_attention(repeats: int, path: str = "configs/openmoji.yaml") -> dict:
    """CPU bf16 training tokens/s at a config's transformer shape, at its batch and twice that: the attention
    in bf16 (flash kernel) against fp32 (what ships up to CPU_FP32_ATTENTION_MAX_LEN tokens)."""
    cfg, c = _config_transformer(path)
    out = {}
    for batch in (cfg.transformer.train.batch_size, 2 * cfg.transformer.train.batch_size):
        rates = _alternated(c, batch, {k: ATTENTION_VARIANTS[k] for k in ("bf16_attn_flash", "bf16_attn_fp32")},
                            repeats, steps=5)
        out.update({f"T{c.seq_len}_b{batch}_{name}": rate for name, rate in rates.items()})
        out[f"T{c.seq_len}_b{batch}_speedup"] = rates["bf16_attn_fp32"] / rates["bf16_attn_flash"]
    return out


def bench_max_batch(c: DALLEConfig = DALLE_SHAPE, precision: str = "bf16") -> dict:
    """GPU: the largest power-of-two batch whose training step fits in memory, and its tokens/s."""
    best: dict = {}
    batch = 4
    while batch <= 4096:
        try:
            res = _train_rate(c, precision, batch, repeats=2, steps=2)
        except torch.OutOfMemoryError:
            break
        best = {"batch": batch, **res}
        batch *= 2
        torch.cuda.empty_cache()
    torch.cuda.empty_cache()
    return best


def _config_transformer(path: str):
    """(run config, DALLEConfig) of a config file's transformer, with its BPE and dVAE vocabularies at full size."""
    from dalle_core.config import load_config

    cfg = load_config(path)
    tr = cfg.transformer
    return cfg, DALLEConfig(text_vocab=cfg.text.vocab_size, text_len=cfg.text.text_len,
                            image_vocab=cfg.dvae.codebook_size,
                            image_grid=cfg.data.image_size // 2 ** cfg.dvae.num_downsamples, dim=tr.dim,
                            depth=tr.depth, heads=tr.heads)


def bench_config_transformer(path: str = "configs/dalle-256.yaml", batch: int | None = None) -> dict:
    """The transformer of a config at its own batch size (peak memory and tokens/s; GPU)."""
    cfg, c = _config_transformer(path)
    tr = cfg.transformer
    res = _train_rate(c, tr.train.precision, batch or tr.train.batch_size, repeats=2, steps=2)
    return {"batch": batch or tr.train.batch_size, "params_m": DALLE(c).num_params() / 1e6, **res}


def bench_config_sampling(precision: str, path: str = "configs/dalle-256.yaml", prompts: int = 4,
                          candidates: int = 4) -> dict:
    """GPU: sampling with a config's transformer (untrained), 4 prompts x 4 candidates with guidance 3."""
    _, c = _config_transformer(path)
    torch.manual_seed(0)
    model = DALLE(c).to(DEVICE).eval()
    text = torch.randint(1, c.text_vocab, (prompts, c.text_len), device=DEVICE).repeat_interleave(candidates, 0)
    torch.cuda.reset_peak_memory_stats(DEVICE)

    def run():
        sample(model, text, cond_scale=3.0, precision=precision,
               generator=[torch.Generator(device=DEVICE).manual_seed(i) for i in range(prompts)])

    s = statistics.median(timed(run, 1, 2))
    return {"seconds": s, "images_per_s": prompts * candidates / s, "ms_per_token": 1000 * s / c.image_len,
            "peak_memory_gb": torch.cuda.max_memory_allocated(DEVICE) / 2**30}


def bench_image_loader(workers: int, image_size: int = 256, images: int = 1024) -> dict:
    """Decode + load images/s from PNG image shards at `image_size` (photo-like PNGs: shapes plus noise)."""
    import pyarrow as pa

    from dalle_core import shapes
    from dalle_core.images import png_bytes
    from dalle_core.loader import ShardStream, decode_images
    from storage.parquet import (
        IMAGES_SCHEMA,
        ParquetShards,
        image_row_group,
        shard_name,
        write_shard,
    )
    from storage.store import ArtifactStore

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        rows = []
        for rid, _, caption, image in shapes.generate(images, image_size, seed=0):
            noisy = np.clip(image.astype(np.int16) + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
            rows.append({"id": rid, "caption": caption, "image": png_bytes(noisy)})
        paths = []
        for i in range(0, images, 256):
            paths.append(store.path("images", "bench", "train", shard_name(i // 256)))
            write_shard(store, paths[-1], pa.Table.from_pylist(rows[i:i + 256], schema=IMAGES_SCHEMA),
                        image_row_group(image_size))
        png_kb = sum(len(r["image"]) for r in rows) / len(rows) / 1024
        del rows
        stream = ShardStream(ParquetShards(store), paths, ["image", "caption"], decode_images, 32, window_rows=256,
                             epochs=None)
        batches = stream.batches(workers, pin_memory=DEVICE.type == "cuda")
        n = 2 * images // 32
        next(batches)  # workers started
        t0 = time.perf_counter()
        for _ in range(n):
            next(batches)
        seconds = time.perf_counter() - t0
    return {"images_per_s": n * 32 / seconds, "png_kb": png_kb,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pretokenize-images", type=int, default=20000)
    parser.add_argument("--skip-rss", action="store_true", help="skip the 10x pre-tokenization memory check")
    parser.add_argument("--only", nargs="*", help="run only benchmarks whose name starts with one of these")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--pretokenize-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    from dalle_core.device import resolve_device

    DEVICE = resolve_device(args.device)
    if args.pretokenize_child:
        n, root, precision = args.pretokenize_child
        print(json.dumps(_pretokenize_child(int(n), root, precision)))
        return
    r = args.repeats
    results: dict[str, dict] = {}
    benches = {
        "matmul_peak": lambda: {"fp32_gflops": matmul_peak("fp32"), "bf16_gflops": matmul_peak("bf16")},
        "transformer_train_fp32": lambda: bench_transformer_train("fp32", r),
        "transformer_train_bf16": lambda: bench_transformer_train("bf16", r),
        "sample_16": lambda: bench_sampling(1.0, r),
        "sample_16_cfg3": lambda: bench_sampling(3.0, r),
        "sample_4x16_cfg3": lambda: bench_sampling(3.0, r, prompts=4),
        "clip_train": lambda: bench_clip_train("fp32", r),
        "clip_train_bf16": lambda: bench_clip_train("bf16", r),
        "dvae_train": lambda: bench_dvae_train(r),
        "dvae_train_bf16": lambda: bench_dvae_train(r, "bf16"),
        "dvae_encode": lambda: bench_dvae_encode(r),
        "dvae_encode_bf16": lambda: bench_dvae_encode(r, "bf16"),
        "token_loader": lambda: bench_token_loader(r),
        "pretokenize": lambda: bench_pretokenize(args.pretokenize_images),
        "pretokenize_bf16": lambda: bench_pretokenize(args.pretokenize_images, "bf16"),
        "dalle_anchor": lambda: bench_dalle_anchor(r),
        "dalle_train_fp32": lambda: _train_rate(DALLE_SHAPE, "fp32", 4, r),
        "dalle_train_bf16": lambda: _train_rate(DALLE_SHAPE, "bf16", 4, r),
        "dalle_sample_cfg3": lambda: bench_dalle_sample(r),
        "dalle_sample_cfg3_fp32": lambda: bench_dalle_sample(r, precision="fp32"),
        "dalle_sample_cfg3_bf16": lambda: bench_dalle_sample(r, precision="bf16"),
        "dalle_sample_cfg3_top_p": lambda: bench_dalle_sample(r, top_p=0.9),
        "dalle_sample_parts": lambda: bench_dalle_sample_parts(r),
        "loader_256_workers0": lambda: bench_image_loader(0),
        "loader_256_workers2": lambda: bench_image_loader(2),
    }
    if (os.cpu_count() or 1) >= 8:
        benches["loader_256_workers8"] = lambda: bench_image_loader(8)
    if DEVICE.type == "cpu":
        benches["dalle_attention_kernel"] = lambda: bench_attention_kernel(r)
        benches["dalle_attention_openmoji"] = lambda: bench_config_attention(max(r, 3))
    else:
        benches["dalle_max_batch"] = bench_max_batch
        benches["dalle_config_256"] = bench_config_transformer
        benches["dalle_config_256_sample_fp32"] = lambda: bench_config_sampling("fp32")
        benches["dalle_config_256_sample_bf16"] = lambda: bench_config_sampling("bf16")
    if not args.skip_rss:
        benches["pretokenize_10x"] = lambda: bench_pretokenize(10 * args.pretokenize_images)
    for name, fn in benches.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = fn()
        print(f"  {json.dumps(results[name])}", file=sys.stderr, flush=True)  # kept if a later bench is cut off
    if "matmul_peak" in results:
        for prec in ("fp32", "bf16"):
            if f"transformer_train_{prec}" in results:
                res = results[f"transformer_train_{prec}"]
                res["mfu"] = res["model_gflops"] / results["matmul_peak"][f"{prec}_gflops"]
    anchor = results.get("dalle_anchor", {})
    same_run = {key: anchor[a] for key, a in (("dalle_train_fp32.tokens_per_s", "train_fp32_tokens_per_s"),
                                              ("dalle_train_bf16.tokens_per_s", "train_bf16_tokens_per_s"),
                                              ("dalle_sample_cfg3.seconds", "sample_cfg3_seconds")) if a in anchor}
    print(f"\n{'benchmark':<34}{'value':>14}  {'reference':>10}  note (reference: dalle-pytorch"
          f"{', measured in this run' if same_run else ''})")
    for name, res in results.items():
        for k, v in res.items():
            ref = same_run.get(f"{name}.{k}", REFERENCE.get(f"{name}.{k}"))
            note = ""
            if ref:
                note = f"{ref / v:.1f}x faster" if k == "seconds" else f"{v / ref:.1f}x"
            print(f"{name + '.' + k:<34}{v:>14.4g}  {f'{ref:.4g}' if ref else '':>10}  {note}")
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "device": str(DEVICE),
            "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
