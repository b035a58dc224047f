"""Stage 1a: train the dVAE on the image shards -> `dvae/<key>/`."""

from __future__ import annotations

from dataclasses import asdict
from itertools import islice

import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core import dvae, pretrained
from dalle_core.config import Config
from dalle_core.device import resolve_device
from dalle_core.dvae import dvae_schedule, dvae_step, evaluate_dvae, fit_kmeans
from dalle_core.export import build_dvae
from dalle_core.images import ImageNormalization, grid, png_bytes, to_tensor, to_uint8
from dalle_core.loader import decode_images
from storage.parquet import shard_paths
from storage.store import ArtifactStore
from tasks.common import (
    ArtifactRef,
    Training,
    batch_stream,
    drop_checkpoints,
    load_state_file,
    logger,
    open_store,
    pretrained_source,
    stage_keys,
    stage_run,
    state_bytes,
    train_stage_task,
)
from tasks.fine_tuning import source_note, source_tags, start_model, take_tokenizer
from tasks.model_source import check_fine_tuning


def load_dvae(store: ArtifactStore, key: str, device: torch.device | str = "cpu") -> tuple[dvae.DiscreteVAE, ImageNormalization]:
    """A finished dVAE from the store, on `device`, in eval mode, with its input normalisation."""
    store.require("dvae", key)
    meta = store.read_json(store.path("dvae", key, "config.json"))
    model = build_dvae(meta)
    load_state_file(store, store.path("dvae", key, "model.safetensors"), model)
    model = model.to(device, memory_format=torch.channels_last)  # faster convolutions; same results
    return model.eval(), ImageNormalization(tuple(meta["norm"]["mean"]), tuple(meta["norm"]["std"]))


def run_training(cfg: Config, parent_run_id: str | None, flow_run_id: str | None, rank: int = 0, world: int = 1,
                 device: torch.device | None = None) -> None:
    """The dVAE stage on one rank (world == 1: the single-process case); rank 0 reports and writes."""
    store, keys = open_store(cfg), stage_keys(cfg)
    key, section, train_cfg = keys["dvae"], cfg.dvae, cfg.dvae.train
    device = device or resolve_device(cfg.runner.device)
    torch.manual_seed(train_cfg.seed)
    mcfg = section.dvae_config(cfg.data.image_size)
    norm = ImageNormalization(section.norm_mean, section.norm_std)
    train_paths = shard_paths(store, "images", keys["images"], "train")
    params = {**section.model_dump(mode="json"), "world_size": world}
    if section.pretrained:  # nothing to train: load, validate and store the given tokenizer
        src = pretrained_source(cfg)
        model = pretrained.load(section.pretrained, section.pretrained_config, cfg.data.image_size, section.norm_mean, section.norm_std)
        model = model.to(device)
        with stage_run(cfg, store, "dvae", key, params, parent_run_id, flow_run_id) as run:
            run.set_tags({"pretrained.kind": src["kind"],
                          **{f"pretrained.{role}": f"{f['path']} (sha256 {f['sha256']})"
                             for role, f in src["files"].items()}})
            logger().info("dvae/%s: loaded a pretrained %s tokenizer (%d codes, %dx%d grid) from %s", key,
                          model.spec.kind, model.c.codebook_size, model.c.grid_size, model.c.grid_size, section.pretrained)
            _finish(cfg, store, keys, model, norm, device, run, 0, world,
                    _validate(cfg, store, keys, model, norm, device), source=src)
        return
    if section.quantizer == "pixel-kmeans":  # no gradient training: k-means over training pixels, one process
        model = dvae.DiscreteVAE(mcfg).to(device)
        with stage_run(cfg, store, "dvae", key, params, parent_run_id, flow_run_id) as run:
            images = batch_stream(cfg, store, train_paths, ["image"], decode_images, 256, device, seed=train_cfg.seed,
                                  window_rows=section.shuffle_buffer)
            with torch.inference_mode():
                pixels = torch.cat([model.encoder(to_tensor(b["image"], norm.mean, norm.std)).permute(0, 2, 3, 1)
                                    .reshape(-1, 3) for b in islice(images, -(-section.kmeans_images // 256))])
            mse = fit_kmeans(model, pixels, section.kmeans_iters, train_cfg.seed, lambda i, m: run.log_metrics({"kmeans_mse": m}, i))
            logger().info("dvae/%s: k-means of %d pixels into %d colours, mse %.4f", key, len(pixels),
                          section.codebook_size, mse)
            _finish(cfg, store, keys, model.eval(), norm, device, run, section.kmeans_iters, world,
                    _validate(cfg, store, keys, model, norm, device))
        return
    check_fine_tuning(cfg, ["dvae"], store, keys)  # init_from against this run's dVAE, before any work
    model = dvae.DiscreteVAE(mcfg)
    start = start_model(cfg, "dvae", model, store)
    training = Training.prepare(store, "dvae", key, model, train_cfg, device, rank, world)
    batches = batch_stream(cfg, store, train_paths, ["image", "caption"], decode_images, train_cfg.batch_size, device,
                           seed=train_cfg.seed, window_rows=section.shuffle_buffer, rank=rank, world=world,
                           start_batch=training.start * train_cfg.grad_accum)
    before, after = dvae_schedule(training.model, section)
    fit_args = {"before_step": before, "after_step": after, "unit": "images"}
    step = dvae_step(section)
    if rank != 0:
        training.fit(batches, step, None, **fit_args)
        return
    with stage_run(cfg, store, "dvae", key, params, parent_run_id, flow_run_id) as run:
        model = training.model
        tags = source_tags(cfg, start.source, store) if start.source else {}
        if start.source:
            run.set_tags({**tags, "mlflow.note.content": source_note(tags)})
            logger().info("dvae/%s: %s", key, start.describe())
        run.log_params({"trainable_params": start.trainable})
        if section.adversarial:
            lpips = (f"on, weight {section.perceptual_weight}" if section.perceptual_vgg and section.perceptual_weight > 0 else
                     "off: dvae.perceptual_vgg is not set (no VGG16 weights on disk, and nothing is downloaded)")
            run.set_tags({"perceptual": lpips})
            logger().info("dvae/%s: VQGAN: PatchGAN discriminator from step %d; LPIPS term %s", key, section.disc_start,
                          lpips)

        def validate() -> dict:
            return _validate(cfg, store, keys, model, norm, device)

        if start.source and training.start == 0:  # the source's reconstructions of this data: the curve's start
            run.log_metrics(validate(), 0)
        result = training.fit(batches, step, run, lambda m: f"psnr {m['psnr']:.1f}", validate, **fit_args)
        model.drop_discriminator()
        _finish(cfg, store, keys, model, norm, device, run, result.step, world, validate(), extra=start.manifest(tags))


def _validate(cfg: Config, store: ArtifactStore, keys: dict, model: dvae.DiscreteVAE, norm: ImageNormalization,
              device) -> dict:
    """Hard-code val PSNR and code usage over the val split (the first `train.val_batches` batches)."""
    val = batch_stream(cfg, store, shard_paths(store, "images", keys["images"], "val"), ["image"], decode_images,
                       256, device, shuffle=False)
    return evaluate_dvae(model, islice(val, cfg.dvae.train.val_batches), norm, device)


def _finish(cfg: Config, store: ArtifactStore, keys: dict, model: dvae.DiscreteVAE, norm: ImageNormalization,
            device, run,
            steps: int, world: int, metrics: dict, source: dict | None = None, extra: dict | None = None) -> None:
    """Log the final val metrics, draw reconstructions, write `dvae/<key>/` and its manifest."""
    key, section = keys["dvae"], cfg.dvae
    run.set_tags({"input.images": keys["images"]})
    run.log_metrics(metrics, steps)
    logger().info("dvae/%s: val PSNR %.2f dB, %.0f%% of codes used", key, metrics["val_psnr"],
                  100 * metrics["val_code_usage_fraction"])
    val_paths = shard_paths(store, "images", keys["images"], "val")
    originals = next(iter(batch_stream(cfg, store, val_paths, ["image"], decode_images, 16, device,
                                       shuffle=False)))["image"]
    with torch.inference_mode():
        x = to_tensor(originals, norm.mean, norm.std)
        recons = model.decode(model.encode(x))
    sheet = grid([list(to_uint8(x, norm.mean, norm.std)), list(to_uint8(recons, norm.mean, norm.std))],
                 ["originals", "reconstructions"], scale=3)
    run.log_image(sheet, "reconstructions.png")
    store.write_bytes(store.path("dvae", key, "reconstructions.png"), png_bytes(sheet))
    store.write_bytes(store.path("dvae", key, "model.safetensors"), state_bytes(model))
    spec = {"pretrained": asdict(model.spec)} if source else {}
    store.write_json(store.path("dvae", key, "config.json"),
                     {"model": asdict(model.c), "norm": {"mean": list(norm.mean), "std": list(norm.std)}, **spec})
    store.write_json(store.path("dvae", key, "metrics.json"), {**metrics, "steps": steps})
    drop_checkpoints(store, "dvae", key)
    manifest = store.finish("dvae", key, config=section.model_dump(mode="json"), inputs={"images": keys["images"]},
                            grid=[model.c.grid_size, model.c.grid_size], codebook_size=model.c.codebook_size,
                            steps=steps, world_size=world, metrics=metrics,
                            **({"pretrained": source} if source else {}), **(extra or {}))
    run.log_dict(manifest, "manifest.json")


@task(name="train-dvae", cache_policy=NONE)
def train_dvae_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    if cfg.tokenizers_from:  # an exported model's dVAE, copied as it is
        return take_tokenizer(cfg, "dvae", parent_run_id)
    return train_stage_task(cfg, "dvae", ("images",), run_training, parent_run_id)
