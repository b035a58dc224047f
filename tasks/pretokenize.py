"""The pretokenize stage: image shards -> `pretokenize/<key>/{train,val}/part-*.parquet` (the dVAE's codes and
the BPE's text tokens of every image).

One mapped task per shard, on the config's task runner: a crash loses at most the shards in flight, and a
re-run writes only the shards that are missing.
"""

from __future__ import annotations

import functools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch
from prefect import task, unmapped
from prefect.cache_policies import NONE

from dalle_core.device import resolve_device
from dalle_core.images import decode_png, to_tensor
from pipeline.artifacts import (
    ArtifactRef,
    Work,
    no_retry_on_user_error,
    run_name,
    run_stage,
)
from pipeline.config import Config
from pipeline.logs import log
from pipeline.models import load_dvae, load_tokenizer
from pipeline.runners import task_runner
from storage.parquet import (
    count_rows,
    read_shard,
    shard_name,
    shard_paths,
    tokens_schema,
    write_shard,
)
from storage.store import ArtifactStore

SPLITS = ("train", "val")
ENCODE_PIXELS = 512 * 32 * 32  # pixels per encoder batch on a CPU (512 images at 32 px); 8x that on a GPU
# A fixed pool, one thread decoding while one encodes: on Prefect's threads RSS grew with shards (docs/benchmarks.md)
_SHARD_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode-shard")


@functools.lru_cache(maxsize=2)
def _encoders(store_url: str, options: str, dvae_key: str, bpe_key: str, text_len: int, device: str):
    store = ArtifactStore(store_url, json.loads(options))
    model, norm = load_dvae(store, dvae_key, device)
    return model, norm, load_tokenizer(store, bpe_key, text_len)


def encoders(cfg: Config, dvae: ArtifactRef, bpe: ArtifactRef):
    """(dVAE on the run's device, its normalisation, the text tokenizer), loaded once per process."""
    return _encoders(cfg.store.root, json.dumps(cfg.store.storage_options, sort_keys=True), dvae.key, bpe.key,
                     cfg.text.text_len, str(resolve_device(cfg.runner.device)))


@task(name="pretokenize", task_run_name=run_name("pretokenize"), cache_policy=NONE)
def pretokenize(cfg: Config, ingest: ArtifactRef, dvae: ArtifactRef, bpe: ArtifactRef) -> ArtifactRef:
    """Encode every image shard of `ingest` with `dvae` and its captions with `bpe`, one mapped task per shard."""
    made = {"text_len": cfg.text.text_len, "encode_precision": cfg.dvae.encode_precision}
    return run_stage(cfg, "pretokenize", {"ingest": ingest, "dvae": dvae, "bpe": bpe}, _pretokenize,
                     {**made, "ingest": ingest.key, "dvae": dvae.key, "bpe": bpe.key})


def _pretokenize(w: Work) -> dict:
    cfg, store, key = w.cfg, w.store, w.key
    ingest, dvae, bpe = (w.inputs[s] for s in ("ingest", "dvae", "bpe"))
    todo = [(split, i) for split in SPLITS for i, _ in enumerate(shard_paths(store, "ingest", ingest.key, split))
            if not store.exists(w.path(split, shard_name(i)))]
    log.info("pretokenize: %d shard(s) to encode", len(todo))
    start = time.perf_counter()
    with task_runner(cfg) as runner:
        futures = runner.map(encode_shard, {"cfg": unmapped(cfg), "ingest": unmapped(ingest), "dvae": unmapped(dvae),
                                            "bpe": unmapped(bpe), "out": unmapped(key),
                                            "split": [s for s, _ in todo], "index": [i for _, i in todo]})
        results = [f.result() for f in futures]
    wall_seconds = time.perf_counter() - start
    model, _, tokenizer = encoders(cfg, dvae, bpe)
    rows = {s: sum(count_rows(store, p) for p in shard_paths(store, "pretokenize", key, s)) for s in SPLITS}
    expected = {s: sum(count_rows(store, p) for p in shard_paths(store, "ingest", ingest.key, s)) for s in SPLITS}
    if rows != expected:
        raise RuntimeError(f"token shards hold {rows} rows but the image shards {expected}")
    encoded = sum(r["rows"] for r in results if r["seconds"] > 0)
    metrics = {"rows_train": rows["train"], "rows_val": rows["val"],
               "truncated_captions": sum(r["truncated"] for r in results), "shards_encoded": len(results)}
    if encoded:
        metrics["images_per_s"] = encoded / max(wall_seconds, 1e-9)
    w.run.log_metrics(metrics)
    log.info("pretokenize/%s: %s rows%s", key, rows, f", {metrics['images_per_s']:.0f} images/s" if encoded else "")
    return {"config": {"text_len": cfg.text.text_len, "encode_precision": cfg.dvae.encode_precision}, "rows": rows,
            "grid": list(model.c.grid_hw), "codebook_size": model.c.codebook_size, "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id, "text_len": cfg.text.text_len, "dvae_key": dvae.key, "bpe_key": bpe.key,
            "truncated_captions": metrics["truncated_captions"]}


@task(name="encode-shard", cache_policy=NONE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=no_retry_on_user_error)
def encode_shard(cfg: Config, ingest: ArtifactRef, dvae: ArtifactRef, bpe: ArtifactRef, out: str, split: str,
                 index: int) -> dict:
    """Decode one image shard's PNGs, encode them with the dVAE, tokenize captions, write one token shard to
    `pretokenize/<out>`."""
    store = cfg.store.open()
    path = store.path("pretokenize", out, split, shard_name(index))
    if store.exists(path):
        return {"rows": count_rows(store, path), "seconds": 0.0, "truncated": 0}
    t0 = time.perf_counter()
    rows, truncated = _on_shard_pool(cfg, store, (ingest, dvae, bpe), split, index, path)
    seconds = time.perf_counter() - t0
    log.info("encoded %s shard %d: %d images in %.2fs (%.0f images/s)", split, index, rows, seconds,
             rows / max(seconds, 1e-9))
    return {"rows": rows, "seconds": seconds, "truncated": truncated}  # numbers only: Prefect links strings by id


def _on_shard_pool(*args) -> tuple[int, int]:
    # A plain function: Prefect/Dask pickle task bodies by value, and a thread pool cannot be pickled.
    return _SHARD_POOL.submit(_encode_shard, *args).result()


def _encode_shard(cfg: Config, store: ArtifactStore, refs: tuple, split: str, index: int, out: str) -> tuple[int, int]:
    """Decode, encode, tokenize and write one shard; returns (rows, truncated captions)."""
    ingest, dvae, bpe = refs
    model, norm, tokenizer = encoders(cfg, dvae, bpe)
    table = read_shard(store, store.path("ingest", ingest.key, split, shard_name(index)))
    captions = table.column("caption").to_pylist()
    pngs = table.column("image").to_pylist()
    device = model.device
    batch = max(1, ENCODE_PIXELS * (8 if device.type == "cuda" else 1) // math.prod(model.c.image_hw))
    codes = []
    with torch.inference_mode():
        for i in range(0, len(pngs), batch):  # PNG decode on the CPU, the encoder on the run's device
            images = torch.from_numpy(np.stack([decode_png(b) for b in pngs[i:i + batch]]))
            x = to_tensor(images.to(device, non_blocking=True), norm.mean, norm.std)
            codes.append(model.encode(x, cfg.dvae.encode_precision).flatten(1).cpu().numpy())
    image_tokens = np.concatenate(codes).astype(np.uint16)
    text_tokens, truncated = tokenizer.encode(captions)
    schema = tokens_schema(image_tokens.shape[1], tokenizer.vocab_size)
    text_type = schema.field("text_tokens").type.value_type
    columns = [
        table.column("id"), table.column("caption"),
        pa.ListArray.from_arrays(pa.array(np.arange(0, text_tokens.size + 1, text_tokens.shape[1], dtype=np.int32)),
                                 pa.array(text_tokens.ravel(), type=text_type)),
        pa.FixedSizeListArray.from_arrays(pa.array(image_tokens.ravel(), type=pa.uint16()), image_tokens.shape[1]),
    ]
    write_shard(store, out, pa.Table.from_arrays(columns, schema=schema))
    return len(pngs), int(truncated.sum())
