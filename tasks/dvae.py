"""The dvae stage: the image tokenizer -> `dvae/<key>/`: trained on the ingested images (a dVAE or VQGAN, as
`dvae.*` says), fitted by k-means (`pixel-kmeans`), loaded from files (`dvae.pretrained`), or taken from
`tokenizers_from`'s model."""

from __future__ import annotations

from itertools import islice

import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core import dvae, pretrained
from dalle_core.device import resolve_device
from dalle_core.dvae import dvae_schedule, dvae_step, evaluate_dvae, fit_kmeans
from dalle_core.images import ImageNormalization, grid, png_bytes, to_tensor, to_uint8
from dalle_core.loader import decode_images
from dalle_core.model_folder import dvae_config, state_bytes
from pipeline.artifacts import ArtifactRef, Work, run_name, run_stage
from pipeline.config import Config
from pipeline.fine_tuning import start_model, take_tokenizer
from pipeline.logs import log
from pipeline.source_fit import check_fine_tuning
from pipeline.stage_table import stage_keys
from pipeline.training import Trainer, batch_stream, train_stage
from storage.parquet import shard_paths
from storage.store import file_digest


@task(name="dvae", task_run_name=run_name("dvae"), cache_policy=NONE)
def train_dvae(cfg: Config, ingest: ArtifactRef) -> ArtifactRef:
    """The image tokenizer for `ingest`'s images."""
    inputs, section = {"ingest": ingest}, cfg.dvae
    if cfg.tokenizers_from:  # an exported model's dVAE, copied as it is
        return run_stage(cfg, "dvae", inputs, take_tokenizer, {"tokenizers_from": cfg.tokenizers_from})
    if section.pretrained:  # nothing to train: load, validate and store the given tokenizer
        return run_stage(cfg, "dvae", inputs, _pretrained, section.model_dump(mode="json"))
    if section.quantizer == "pixel-kmeans":  # no gradient training: k-means over training pixels, one process
        return run_stage(cfg, "dvae", inputs, _kmeans, section.model_dump(mode="json"))
    return train_stage(cfg, "dvae", inputs)


def _norm(cfg: Config) -> ImageNormalization:
    return ImageNormalization(cfg.dvae.norm_mean, cfg.dvae.norm_std)


def _pretrained(w: Work) -> dict:
    section, device = w.cfg.dvae, resolve_device(w.cfg.runner.device)
    kind, paths = pretrained.source_files(section.pretrained, section.pretrained_config)
    files = {role: {"path": str(p), "sha256": file_digest(p)} for role, p in paths.items()}
    model = pretrained.load(section.pretrained, section.pretrained_config, w.cfg.data.image_size, section.norm_mean,
                            section.norm_std).to(device)
    w.run.set_tags({"pretrained.kind": kind, **{f"pretrained.{role}": f"{f['path']} (sha256 {f['sha256']})"
                                                for role, f in files.items()}})
    log.info("dvae/%s: loaded a pretrained %s tokenizer (%d codes, %dx%d grid) from %s", w.key, model.spec.kind,
             model.c.codebook_size, model.c.grid_size, model.c.grid_size, section.pretrained)
    return _finish(w, model, _validate(w, model, device), 0, device, {"pretrained": {"kind": kind, "files": files}})


def _kmeans(w: Work) -> dict:
    cfg, section, device = w.cfg, w.cfg.dvae, resolve_device(w.cfg.runner.device)
    torch.manual_seed(section.train.seed)
    norm = _norm(cfg)
    model = dvae.DiscreteVAE(section.dvae_config(cfg.data.image_size)).to(device)
    images = batch_stream(cfg, w.store, shard_paths(w.store, "ingest", w.inputs["ingest"].key, "train"), ["image"],
                          decode_images, 256, device, seed=section.train.seed, window_rows=section.shuffle_buffer)
    with torch.inference_mode():
        pixels = torch.cat([model.encoder(to_tensor(b["image"], norm.mean, norm.std)).permute(0, 2, 3, 1)
                            .reshape(-1, 3) for b in islice(images, -(-section.kmeans_images // 256))])
    mse = fit_kmeans(model, pixels, section.kmeans_iters, section.train.seed,
                     lambda i, m: w.run.log_metrics({"kmeans_mse": m}, i))
    log.info("dvae/%s: k-means of %d pixels into %d colours, mse %.4f", w.key, len(pixels), section.codebook_size, mse)
    model.eval()
    return _finish(w, model, _validate(w, model, device), section.kmeans_iters, device)


def _validate(w: Work, model: dvae.DiscreteVAE, device) -> dict:
    """Hard-code val PSNR and code usage over the val split (the first `train.val_batches` batches)."""
    val = batch_stream(w.cfg, w.store, shard_paths(w.store, "ingest", w.inputs["ingest"].key, "val"), ["image"],
                       decode_images, 256, device, shuffle=False)
    return evaluate_dvae(model, islice(val, w.cfg.dvae.train.val_batches), _norm(w.cfg), device)


def _files(w: Work, model: dvae.DiscreteVAE, device) -> dict:
    """The artifact's files: weights, config (with the input normalisation), and val reconstructions."""
    norm = _norm(w.cfg)
    val_paths = shard_paths(w.store, "ingest", w.inputs["ingest"].key, "val")
    originals = next(iter(batch_stream(w.cfg, w.store, val_paths, ["image"], decode_images, 16, device,
                                       shuffle=False)))["image"]
    with torch.inference_mode():
        x = to_tensor(originals, norm.mean, norm.std)
        recons = model.decode(model.encode(x))
    sheet = grid([list(to_uint8(x, norm.mean, norm.std)), list(to_uint8(recons, norm.mean, norm.std))],
                 ["originals", "reconstructions"], scale=3)
    return {"reconstructions.png": png_bytes(sheet), "model.safetensors": state_bytes(model),
            "config.json": dvae_config(model, norm)}


def _report(metrics: dict) -> str:
    return f"val PSNR {metrics['val_psnr']:.2f} dB, {100 * metrics['val_code_usage_fraction']:.0f}% of codes used"


def _made(model: dvae.DiscreteVAE) -> dict:
    return {"grid": [model.c.grid_size, model.c.grid_size], "codebook_size": model.c.codebook_size}


def _finish(w: Work, model: dvae.DiscreteVAE, metrics: dict, steps: int, device, extra: dict | None = None) -> dict:
    """A dVAE made without the training loop (loaded, k-means): its files and the manifest's fields."""
    w.run.log_metrics(metrics, steps)
    log.info("dvae/%s: %s", w.key, _report(metrics))
    w.write_files(_files(w, model, device))
    w.store.write_json(w.path("metrics.json"), {**metrics, "steps": steps})
    return {"config": w.cfg.dvae.model_dump(mode="json"), **_made(model), "steps": steps, "world_size": 1,
            "metrics": metrics, **(extra or {})}


def trainer(w: Work, device, rank: int = 0, world: int = 1) -> Trainer:
    """The dVAE's part of the training stage: reconstruction (+ commitment, + VQGAN's adversarial and perceptual
    terms) on image batches, the Gumbel temperature and KL schedules, val PSNR and code usage."""
    cfg, section, train_cfg = w.cfg, w.cfg.dvae, w.cfg.dvae.train
    check_fine_tuning(cfg, ["dvae"], w.store, {**stage_keys(cfg), "ingest": w.inputs["ingest"].key})
    model = dvae.DiscreteVAE(section.dvae_config(cfg.data.image_size))
    start = start_model(cfg, "dvae", model, w.store)
    train_paths = shard_paths(w.store, "ingest", w.inputs["ingest"].key, "train")
    before, after = dvae_schedule(model, section.loss_config())

    def batches(training) -> object:
        return batch_stream(cfg, w.store, train_paths, ["image", "caption"], decode_images, train_cfg.batch_size,
                            device, seed=train_cfg.seed, window_rows=section.shuffle_buffer, rank=training.rank,
                            world=training.world, start_batch=training.start * train_cfg.grad_accum)

    def on_start(run) -> None:
        if section.adversarial:
            lpips = (f"on, weight {section.perceptual_weight}" if section.perceptual_vgg and section.perceptual_weight > 0
                     else "off: dvae.perceptual_vgg is not set (no VGG16 weights on disk, and nothing is downloaded)")
            run.set_tags({"perceptual": lpips})
            log.info("dvae/%s: VQGAN: PatchGAN discriminator from step %d; LPIPS term %s", w.key, section.disc_start,
                     lpips)

    return Trainer(model, start, batches, dvae_step(model.c, section.loss_config()), lambda m: _validate(w, m, device),
                   lambda m, metrics: _files(w, m, device), _report, lambda m: f"psnr {m['psnr']:.1f}",
                   {"before_step": before, "after_step": after, "unit": "images"}, _made(model),
                   on_start=on_start, on_end=lambda m: m.drop_discriminator())
