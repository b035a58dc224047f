"""Stage 2: train the DALL-E transformer on cached token shards -> `transformer/<key>/`.

With `transformer.nproc > 1` the task launches PyTorch DDP through torchrun
(`tasks.transformer_ddp`); each rank reads its own share of the shards and only
rank 0 writes checkpoints and MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from dalle_core.config import Config
from dalle_core.images import grid, png_bytes, to_uint8
from dalle_core.sampling import sample
from dalle_core.train import (
    evaluate_transformer,
    make_optimizer,
    shuffled_batches,
    skip,
    train_transformer,
)
from dalle_core.transformer import DALLE, DALLEConfig
from storage.parquet import read_shard, shard_paths
from storage.store import ArtifactStore
from tasks.common import (
    ArtifactRef,
    Progress,
    drop_checkpoints,
    load_checkpoint,
    load_state_bytes,
    logger,
    open_store,
    ref,
    reuse,
    save_checkpoint,
    stage_keys,
    stage_run,
    state_bytes,
)
from tasks.dvae import load_dvae


def read_tokens(store: ArtifactStore, path: str) -> dict[str, np.ndarray]:
    """One token shard as int64 arrays: text (n, text_len), image (n, h*w), plus captions."""
    t = read_shard(store, path, ["caption", "text_tokens", "image_tokens"])
    n = t.num_rows
    text = t.column("text_tokens").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(n, -1)
    image = t.column("image_tokens").combine_chunks().flatten().to_numpy().astype(np.int64).reshape(n, -1)
    return {"text": text, "image": image}


def token_batches(store: ArtifactStore, paths: list[str], batch_size: int, seed: int, buffer_rows: int,
                  rank: int = 0, world: int = 1, shuffle: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(text, image) LongTensor batches. Training: endless, shuffled, this rank's shards only."""
    mine = paths[rank::world] or paths[rank % len(paths)::len(paths)]

    def chunks():
        rng = np.random.default_rng(seed + rank)
        while True:
            for i in rng.permutation(len(mine)) if shuffle else range(len(mine)):
                yield read_tokens(store, mine[i])
            if not shuffle:
                return

    if shuffle:
        for b in shuffled_batches(chunks(), batch_size, buffer_rows, seed + rank):
            yield torch.from_numpy(b["text"]), torch.from_numpy(b["image"])
    else:
        for c in chunks():
            for i in range(0, len(c["text"]), batch_size):
                yield torch.from_numpy(c["text"][i:i + batch_size]), torch.from_numpy(c["image"][i:i + batch_size])


def model_config(cfg: Config, manifest: dict) -> DALLEConfig:
    """The transformer's shape from the config and what the token shards say about their vocabularies."""
    tr = cfg.transformer
    return DALLEConfig(text_vocab=manifest["vocab_size"], text_len=manifest["text_len"], pad_id=manifest["pad_id"],
                       image_vocab=manifest["codebook_size"], image_grid=manifest["grid"][0], dim=tr.dim,
                       depth=tr.depth, heads=tr.heads, dropout=tr.dropout, tie_image_embedding=tr.tie_image_embedding,
                       text_loss_weight=tr.text_loss_weight)


def load_transformer(store: ArtifactStore, key: str) -> DALLE:
    store.require("transformer", key)
    model = DALLE(DALLEConfig(**store.read_json(store.path("transformer", key, "config.json"))))
    load_state_bytes(model, store.read_bytes(store.path("transformer", key, "model.safetensors")))
    return model.eval()


def sample_sheet(model: DALLE, dvae_model, norm, text: torch.Tensor, captions: list[str], cfg: Config,
                 per_caption: int = 4) -> np.ndarray:
    """A grid: for each caption, `per_caption` sampled images decoded by the dVAE."""
    g = cfg.generate
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(g.seed)
    codes = sample(model, text.repeat_interleave(per_caption, 0), temperature=g.temperature, top_k=g.top_k,
                   top_p=g.top_p, cond_scale=g.cond_scale, generator=gen)
    side = model.c.image_grid
    with torch.inference_mode():
        images = to_uint8(dvae_model.decode(codes.view(-1, side, side)), norm.mean, norm.std)
    model.train(was_training)
    rows = [list(images[i * per_caption:(i + 1) * per_caption]) for i in range(len(captions))]
    return grid(rows, captions, scale=3)


def run_training(cfg: Config, parent_run_id: str | None, flow_run_id: str | None, rank: int = 0,
                 world: int = 1, device: str = "cpu") -> None:
    """The whole stage on one rank (world == 1 is the single-process case)."""
    store, keys = open_store(cfg), stage_keys(cfg)
    key, tr, t = keys["transformer"], cfg.transformer, cfg.transformer.train
    manifest = store.require("tokens", keys["tokens"])
    torch.manual_seed(t.seed)
    mcfg = model_config(cfg, manifest)
    model = DALLE(mcfg).to(device)
    optimizer = make_optimizer(model, t)
    start, _ = load_checkpoint(store, "transformer", key, model, optimizer)
    wrapped = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    train_paths = shard_paths(store, "tokens", keys["tokens"], "train")
    val_paths = shard_paths(store, "tokens", keys["tokens"], "val")
    batches = skip(token_batches(store, train_paths, t.batch_size, t.seed, tr.shuffle_buffer, rank, world),
                   start * t.grad_accum)
    log = logger()
    if rank != 0:  # workers only train; rank 0 reports and checkpoints
        train_transformer(wrapped, batches, t, tr.caption_dropout, mcfg.pad_id, optimizer, start,
                          lambda s, m: None, lambda s: None, None, device, world)
        return
    dvae_model, norm = load_dvae(store, keys["dvae"])
    val_fixed = read_tokens(store, val_paths[0])
    n_show = min(8, len(val_fixed["text"]))
    captions = [r.as_py() for r in read_shard(store, val_paths[0], ["caption"]).column("caption")[:n_show]]
    fixed_text = torch.from_numpy(val_fixed["text"][:n_show])
    params = {**tr.model_dump(mode="json"), "num_params": model.num_params(), "world_size": world}
    with stage_run(cfg, store, "transformer", key, params, parent_run_id, flow_run_id) as run:
        run.set_tags({"input.tokens": keys["tokens"], "resumed_from_step": str(start)})
        progress = Progress("train-transformer", t.max_steps - start, "steps", max_minutes=t.max_minutes)

        def on_log(step: int, metrics: dict) -> None:
            run.log_metrics(metrics, step)
            progress.update(step - start - progress.done, f"loss {metrics['loss']:.3f} "
                            f"image {metrics['image_loss']:.3f} {metrics['tokens_per_s']:.0f} tok/s", force=True)

        def on_sample(step: int) -> None:
            sheet = sample_sheet(model, dvae_model, norm, fixed_text, captions, cfg)
            run.log_image(sheet, f"samples/step-{step:07d}.png")

        step = train_transformer(wrapped, batches, t, tr.caption_dropout, mcfg.pad_id, optimizer, start, on_log,
                                 lambda s: save_checkpoint(store, "transformer", key, model, optimizer, s),
                                 (tr.sample_every, on_sample), device, world)
        val = evaluate_transformer(model, token_batches(store, val_paths, 256, 0, 0, shuffle=False), t.precision,
                                   device)
        run.log_metrics(val, step)
        log.info("transformer/%s: val image loss %.3f nats = %.3f bits per image token", key,
                 val["val_image_loss"], val["val_bits_per_image_token"])
        sheet = sample_sheet(model, dvae_model, norm, fixed_text, captions, cfg)
        run.log_image(sheet, f"samples/step-{step:07d}.png")
        store.write_bytes(store.path("transformer", key, "samples.png"), png_bytes(sheet))
        store.write_bytes(store.path("transformer", key, "model.safetensors"), state_bytes(model))
        store.write_json(store.path("transformer", key, "config.json"), asdict(mcfg))
        store.write_json(store.path("transformer", key, "metrics.json"), {**val, "steps": step})
        drop_checkpoints(store, "transformer", key)
        done = store.finish("transformer", key, config=tr.model_dump(mode="json"), inputs={"tokens": keys["tokens"]},
                            steps=step, world_size=world, num_params=model.num_params(), metrics=val)
        run.log_dict(done, "manifest.json")


@task(name="train-transformer", cache_policy=NONE)
def train_transformer_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    store, keys = open_store(cfg), stage_keys(cfg)
    key = keys["transformer"]
    if done := reuse(store, "transformer", key):
        return done
    store.require("tokens", keys["tokens"])
    store.prepare("transformer", key)
    nproc = cfg.transformer.nproc
    if nproc == 1:
        run_training(cfg, parent_run_id, flow_run.get_id(), device="cuda" if torch.cuda.is_available() else "cpu")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cfg_path = os.path.join(tmp, "config.json")
            with open(cfg_path, "w") as f:
                json.dump(cfg.model_dump(mode="json"), f)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "tasks.transformer_ddp", cfg_path, parent_run_id or "", flow_run.get_id() or ""]
            logger().info("launching DDP: %s", " ".join(cmd))
            code = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            if code != 0:
                raise RuntimeError(f"torchrun with {nproc} processes exited with code {code}; see the log above")
    store.require("transformer", key)
    return ref(store, "transformer", key, cached=False)
