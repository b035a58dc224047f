"""Stage 1a: train the dVAE on the image shards -> `dvae/<key>/`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from dalle_core import dvae
from dalle_core.config import Config
from dalle_core.images import decode_png, grid, png_bytes, to_tensor, to_uint8
from dalle_core.train import Norm, evaluate_dvae, make_optimizer, shuffled_batches, skip, train_dvae
from storage.parquet import iter_batches, shard_paths
from storage.store import ArtifactStore
from tasks.common import (
    ArtifactRef,
    Progress,
    drop_checkpoints,
    load_checkpoint,
    load_state_bytes,
    open_store,
    ref,
    reuse,
    save_checkpoint,
    stage_keys,
    stage_run,
    state_bytes,
)


def model_config(cfg: Config) -> dvae.DVAEConfig:
    d = cfg.dvae
    return dvae.DVAEConfig(image_size=cfg.data.image_size, codebook_size=d.codebook_size,
                           codebook_dim=d.codebook_dim, hidden=d.hidden, num_downsamples=d.num_downsamples,
                           num_res_blocks=d.num_res_blocks, quantizer=d.quantizer, commitment=d.commitment,
                           ema_decay=d.ema_decay, dead_code_threshold=d.dead_code_threshold)


def load_dvae(store: ArtifactStore, key: str) -> tuple[dvae.DiscreteVAE, Norm]:
    """A finished dVAE from the store, in eval mode, with its input normalisation."""
    store.require("dvae", key)
    meta = store.read_json(store.path("dvae", key, "config.json"))
    model = dvae.DiscreteVAE(dvae.DVAEConfig(**meta["model"]))
    load_state_bytes(model, store.read_bytes(store.path("dvae", key, "model.safetensors")))
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU; same results
    return model.eval(), Norm(tuple(meta["norm"]["mean"]), tuple(meta["norm"]["std"]))


def decoded_chunks(store: ArtifactStore, paths: list[str], seed: int, epochs: int | None) -> Iterator[dict]:
    """Decoded images (and captions) a row group at a time, shards in a new random order each epoch."""
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = [paths[i] for i in rng.permutation(len(paths))] if epochs is None else paths
        for batch in iter_batches(store, order, ["image", "caption"]):
            images = np.stack([decode_png(b) for b in batch.column("image").to_pylist()])
            yield {"image": images, "caption": np.array(batch.column("caption").to_pylist(), dtype=object)}
        epoch += 1


def image_batches(store: ArtifactStore, paths: list[str], batch_size: int, norm: Norm, seed: int,
                  shuffle: bool = True) -> Iterator[torch.Tensor]:
    """Normalised image tensors: endless and shuffled for training, one pass in order for evaluation."""
    chunks = decoded_chunks(store, paths, seed, None if shuffle else 1)
    if shuffle:
        for b in shuffled_batches(chunks, batch_size, buffer_rows=4 * 1024, seed=seed):
            yield to_tensor(b["image"], norm.mean, norm.std)
    else:
        for c in chunks:
            for i in range(0, len(c["image"]), batch_size):
                yield to_tensor(c["image"][i:i + batch_size], norm.mean, norm.std)


@task(name="train-dvae", cache_policy=NONE)
def train_dvae_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    log = get_run_logger()
    store, keys = open_store(cfg), stage_keys(cfg)
    key = keys["dvae"]
    if done := reuse(store, "dvae", key):
        return done
    store.require("images", keys["images"])
    store.prepare("dvae", key)
    r, t = cfg.dvae, cfg.dvae.train
    torch.manual_seed(t.seed)
    mcfg = model_config(cfg)
    model = dvae.DiscreteVAE(mcfg)
    optimizer = make_optimizer(model, t)
    start, _ = load_checkpoint(store, "dvae", key, model, optimizer)
    norm = Norm(r.norm_mean, r.norm_std)
    train_paths = shard_paths(store, "images", keys["images"], "train")
    val_paths = shard_paths(store, "images", keys["images"], "val")
    with stage_run(cfg, store, "dvae", key, r.model_dump(mode="json"), parent_run_id) as run:
        run.set_tags({"input.images": keys["images"], "resumed_from_step": str(start)})
        progress = Progress("train-dvae", t.max_steps - start, "steps", max_minutes=t.max_minutes)

        def on_log(step: int, metrics: dict) -> None:
            run.log_metrics(metrics, step)
            progress.update(step - start - progress.done, f"loss {metrics['loss']:.4f} psnr {metrics['psnr']:.1f}",
                            force=True)

        batches = skip(image_batches(store, train_paths, t.batch_size, norm, t.seed), start * t.grad_accum)
        step = train_dvae(model, batches, r, optimizer, start, on_log,
                          lambda s: save_checkpoint(store, "dvae", key, model, optimizer, s))
        metrics = evaluate_dvae(model, image_batches(store, val_paths, 256, norm, 0, shuffle=False), norm)
        run.log_metrics(metrics, step)
        log.info("dvae/%s: val PSNR %.2f dB, %.0f%% of codes used", key, metrics["val_psnr"],
                 100 * metrics["val_codes_used"])
        originals = next(image_batches(store, val_paths, 16, norm, 0, shuffle=False))
        with torch.inference_mode():
            recons = model.decode(model.encode(originals))
        sheet = grid([list(to_uint8(originals, norm.mean, norm.std)), list(to_uint8(recons, norm.mean, norm.std))],
                     ["originals", "reconstructions"], scale=3)
        run.log_image(sheet, "reconstructions.png")
        store.write_bytes(store.path("dvae", key, "reconstructions.png"), png_bytes(sheet))
        store.write_bytes(store.path("dvae", key, "model.safetensors"), state_bytes(model))
        store.write_json(store.path("dvae", key, "config.json"),
                         {"model": asdict(mcfg), "norm": {"mean": list(norm.mean), "std": list(norm.std)}})
        store.write_json(store.path("dvae", key, "metrics.json"), {**metrics, "steps": step})
        drop_checkpoints(store, "dvae", key)
        manifest = store.finish("dvae", key, config=r.model_dump(mode="json"), inputs={"images": keys["images"]},
                                grid=[mcfg.grid_size, mcfg.grid_size], codebook_size=mcfg.codebook_size,
                                steps=step, metrics=metrics)
        run.log_dict(manifest, "manifest.json")
    return ref(store, "dvae", key, cached=False)
