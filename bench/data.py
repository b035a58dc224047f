"""Data paths: dVAE encoding, end-to-end pre-tokenization (the flow, in a fresh process for its peak memory),
and the token and image loaders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench.common import REF_DVAE, Settings, median_seconds, peak_rss_mb
from dalle_core.dvae import DiscreteVAE


def dvae_encode(s: Settings, precision: str = "fp32", batch: int = 512, batches: int = 8) -> dict:
    """The reference dVAE's encoding images/s on the CPU, channels-last as pipeline.models loads it."""
    model = DiscreteVAE(REF_DVAE).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32)

    def run():
        with torch.inference_mode():
            for _ in range(batches):
                model.encode(x, precision)

    return {"images_per_s": batch * batches / median_seconds(run, s.repeats, torch.device("cpu"))}


def pretokenize(s: Settings, precision: str = "fp32", scale: int = 1) -> dict:
    """End-to-end pre-tokenization (the pipeline's pretokenize stage) of `scale` x --pretokenize-images shapes
    images, with the process's peak RSS. One timed run in a fresh process, not Timer's repeats: a second run would
    find the stage finished, and the peak RSS must be this run's alone."""
    images = scale * s.pretokenize_images
    with tempfile.TemporaryDirectory() as root:
        out = subprocess.run([sys.executable, "-m", "bench.data", str(images), root, precision],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pretokenize_child(num_images: int, root: str, precision: str) -> dict:
    """In the fresh process: ingest shapes, store a reference dVAE + BPE, time pretokenization."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from dataclasses import asdict

    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline_flow import pipeline_flow
    from pipeline.checkpoints import state_bytes
    from pipeline.config import config_from_dict
    from pipeline.stage_table import stage_keys

    overrides = {"data": {"shapes": {"num_images": num_images}, "shard_size": 4096},
                 "dvae": {"codebook_size": 512, "codebook_dim": 256, "hidden": 64, "encode_precision": precision},
                 "store": root, "tracking": {"uri": f"sqlite:///{root}/mlflow.db"}}
    cfg = config_from_dict(overrides)
    with prefect_test_harness(server_startup_timeout=120):
        pipeline_flow(cfg, until="bpe")  # ingests first
        store, keys = cfg.store.open(), stage_keys(cfg)
        model = DiscreteVAE(REF_DVAE)  # untrained weights cost the same to run
        store.write_bytes(store.path("dvae", keys["dvae"], "model.safetensors"), state_bytes(model))
        store.write_json(store.path("dvae", keys["dvae"], "config.json"),
                         {"model": asdict(REF_DVAE), "norm": {"mean": [0.5] * 3, "std": [0.5] * 3}})
        store.finish("dvae", keys["dvae"], config={}, inputs={})
        rss_before = peak_rss_mb()
        t0 = time.perf_counter()
        pipeline_flow(cfg, only=["pretokenize"])
        seconds = time.perf_counter() - t0
    return {"images": num_images, "seconds": seconds, "images_per_s": num_images / seconds,
            "rss_before_mb": rss_before, "peak_rss_mb": peak_rss_mb()}


def token_loader(s: Settings) -> dict:
    """Token shards (8 x 4,096 rows) streamed in batches of 16: tokens/s."""
    import pyarrow as pa

    from dalle_core.loader import ShardStream, StreamOrder, decode_tokens
    from storage.parquet import ParquetShards, shard_name, tokens_schema, write_shard
    from storage.store import ArtifactStore

    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(8):
            n = 4096
            table = pa.table({"id": [str(j) for j in range(n)], "caption": ["c"] * n,
                              "text_tokens": pa.array(list(rng.integers(0, 1000, (n, 32)).astype(np.uint16)),
                                                      type=pa.list_(pa.uint16())),
                              "image_tokens": pa.FixedSizeListArray.from_arrays(
                                  pa.array(rng.integers(0, 512, n * 64).astype(np.uint16)), 64)},
                             schema=tokens_schema(64, 1000))
            paths.append(store.path("pretokenize", "bench", "train", shard_name(i)))
            write_shard(store, paths[-1], table)
        batches = ShardStream(ParquetShards(store), paths, ["text_tokens", "image_tokens"], decode_tokens, 16,
                              StreamOrder(window_rows=8192)).batches()
        n_batches = 2000
        sec = median_seconds(lambda: [next(batches) for _ in range(n_batches)], s.repeats, torch.device("cpu"))
    return {"tokens_per_s": n_batches * 16 * 96 / sec}


def image_loader(s: Settings, workers: int, image_size: int = 256, images: int = 1024) -> dict:
    """Decode + load images/s from PNG image shards at `image_size` (photo-like PNGs: shapes plus noise), with
    `workers` decoding processes. One timed pass after the workers start, not Timer's repeats: the stream is
    endless and its workers' start is not part of the rate."""
    import pyarrow as pa

    from dalle_core.images import png_bytes
    from dalle_core.loader import ShardStream, StreamOrder, decode_images
    from data_sources import shapes
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
            paths.append(store.path("ingest", "bench", "train", shard_name(i // 256)))
            write_shard(store, paths[-1], pa.Table.from_pylist(rows[i:i + 256], schema=IMAGES_SCHEMA),
                        image_row_group(image_size))
        png_kb = sum(len(r["image"]) for r in rows) / len(rows) / 1024
        del rows
        stream = ShardStream(ParquetShards(store), paths, ["image", "caption"], decode_images, 32,
                             StreamOrder(window_rows=256))
        batches = stream.batches(workers, pin_memory=s.device.type == "cuda")
        n = 2 * images // 32
        next(batches)  # workers started
        t0 = time.perf_counter()
        for _ in range(n):
            next(batches)
        sec = time.perf_counter() - t0
    return {"images_per_s": n * 32 / sec, "png_kb": png_kb, "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":  # the fresh process of `pretokenize`: images, store root, encode precision
    print(json.dumps(_pretokenize_child(int(sys.argv[1]), sys.argv[2], sys.argv[3])))
