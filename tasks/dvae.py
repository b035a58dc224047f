"""The dvae stage: the image tokenizer -> `dvae/<key>/`: trained on the ingested images (a dVAE or VQGAN, as
`dvae.*` says) or fine-tuned from `dvae.init_from` (this project's, OpenAI's or taming's), fitted by k-means
(`pixel-kmeans`), loaded from files (`dvae.pretrained`), or taken from `tokenizers_from`'s model."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core import dvae, pretrained
from dalle_core.device import resolve_device
from dalle_core.dvae import dvae_schedule, dvae_step, evaluate_dvae, fit_kmeans
from dalle_core.images import ImageNormalization, grid, png_bytes, to_tensor, to_uint8
from dalle_core.loader import IN_ORDER, StreamOrder, decode_images
from dalle_core.model_folder import build_dvae, dvae_config, state_bytes
from pipeline.artifacts import ArtifactRef, Work, run_name, run_stage
from pipeline.config import Config
from pipeline.fine_tuning import take_tokenizer
from pipeline.logs import log
from pipeline.model_source import loaded_tokenizer_config
from pipeline.training import StageTrainer, batch_stream, train_stage
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
    return train_stage(cfg, DVAETrainer, inputs)


def _pretrained(w: Work) -> dict:
    section, recipe = w.cfg.dvae, DVAETrainer(w, resolve_device(w.cfg.runner.device))
    kind, paths = pretrained.source_files(section.pretrained, section.pretrained_config)
    files = {role: {"path": str(p), "sha256": file_digest(p)} for role, p in paths.items()}
    model = pretrained.load(section.pretrained, section.pretrained_config, w.cfg.data.image_size, section.norm_mean,
                            section.norm_std).to(recipe.device)
    w.run.set_tags({"pretrained.kind": kind, **{f"pretrained.{role}": f"{f['path']} (sha256 {f['sha256']})"
                                                for role, f in files.items()}})
    log.info("dvae/%s: loaded a pretrained %s tokenizer (%d codes, %dx%d grid) from %s", w.key, model.spec.kind,
             model.c.codebook_size, *model.c.grid_hw, section.pretrained)
    return recipe.finish_untrained(model, 0, {"pretrained": {"kind": kind, "files": files}})


def _kmeans(w: Work) -> dict:
    section, recipe = w.cfg.dvae, DVAETrainer(w, resolve_device(w.cfg.runner.device))
    torch.manual_seed(section.train.seed)
    model = recipe.model().to(recipe.device)
    images = batch_stream(w.cfg, w.store, recipe.paths("train"), ["image"], decode_images, 256, recipe.device,
                          StreamOrder(seed=section.train.seed, window_rows=section.shuffle_buffer))
    with torch.inference_mode():
        pixels = torch.cat([model.encoder(to_tensor(b["image"], recipe.norm.mean, recipe.norm.std))
                            .permute(0, 2, 3, 1).reshape(-1, 3)
                            for b in islice(images, -(-section.kmeans_images // 256))])
    mse = fit_kmeans(model, pixels, section.kmeans_iters, section.train.seed,
                     lambda i, m: w.run.log_metrics({"kmeans_mse": m}, i))
    log.info("dvae/%s: k-means of %d pixels into %d colours, mse %.4f", w.key, len(pixels), section.codebook_size, mse)
    model.eval()
    return recipe.finish_untrained(model, section.kmeans_iters)


class DVAETrainer(StageTrainer):
    """The image tokenizer's recipe: reconstruction (+ commitment, + VQGAN's adversarial and perceptual terms) on
    image batches, the Gumbel temperature and KL schedules, val PSNR and code usage; its validation and files also
    finish a tokenizer made without training (loaded, k-means)."""

    stage = "dvae"

    def __init__(self, w: Work, device, rank: int = 0, world: int = 1):
        super().__init__(w, device, rank, world)
        self.norm = ImageNormalization(self.section.norm_mean, self.section.norm_std)

    def paths(self, split: str) -> list[str]:
        return shard_paths(self.store, "ingest", self.w.inputs["ingest"].key, split)

    def model(self) -> dvae.DiscreteVAE | pretrained.PretrainedDVAE:
        """The section's dVAE; or, when `init_from` is a loaded tokenizer (OpenAI's, taming's), its own
        architecture, with a fresh PatchGAN when `adversarial` (start_model then loads its weights)."""
        section = self.section
        loaded = loaded_tokenizer_config(self.cfg, self.store)
        if loaded is None:
            return dvae.DiscreteVAE(section.dvae_config(self.cfg.data.image_size))
        model = build_dvae(loaded)
        if section.adversarial:
            model.discriminator = dvae.PatchDiscriminator(replace(model.c, disc_layers=section.disc_layers,
                                                                  disc_channels=section.disc_channels))
        return model

    def batches(self, start_step: int):
        return self.stream(self.paths("train"), ["image", "caption"], decode_images, start_step)

    def step(self, model):
        return dvae_step(model.c, self.section.loss_config())

    def fit_hooks(self, model) -> dict:
        before, after = dvae_schedule(model, self.section.loss_config())
        return {"before_step": before, "after_step": after}

    def validate(self, model) -> dict:
        """Hard-code val PSNR and code usage over the val split (the first `train.val_batches` batches)."""
        val = batch_stream(self.cfg, self.store, self.paths("val"), ["image"], decode_images, 256, self.device,
                           IN_ORDER)
        return evaluate_dvae(model, islice(val, self.train_cfg.val_batches), self.norm, self.device)

    def files(self, model, metrics: dict) -> dict:
        """Weights, config (with the input normalisation), and val reconstructions."""
        mean, std = self.norm.mean, self.norm.std
        originals = next(iter(batch_stream(self.cfg, self.store, self.paths("val"), ["image"], decode_images, 16,
                                           self.device, IN_ORDER)))["image"]
        with torch.inference_mode():
            x = to_tensor(originals, mean, std)
            recons = model.decode(model.encode(x))
        sheet = grid([list(to_uint8(x, mean, std)), list(to_uint8(recons, mean, std))],
                     ["originals", "reconstructions"], scale=3)
        return {"reconstructions.png": png_bytes(sheet), "model.safetensors": state_bytes(model),
                "config.json": dvae_config(model, self.norm)}

    def report(self, metrics: dict) -> str:
        return f"val PSNR {metrics['val_psnr']:.2f} dB, {100 * metrics['val_code_usage_fraction']:.0f}% of codes used"

    def describe(self, metrics: dict) -> str:
        return f"psnr {metrics['psnr']:.1f}"

    def manifest(self, model) -> dict:
        return {"grid": list(model.c.grid_hw), "codebook_size": model.c.codebook_size}

    def on_start(self, run) -> None:
        section = self.section
        if section.adversarial:
            lpips = (f"on, weight {section.perceptual_weight}" if section.perceptual_vgg and section.perceptual_weight > 0
                     else "off: dvae.perceptual_vgg is not set (no VGG16 weights on disk, and nothing is downloaded)")
            run.set_tags({"perceptual": lpips})
            log.info("dvae/%s: VQGAN: PatchGAN discriminator from step %d; LPIPS term %s", self.w.key,
                     section.disc_start, lpips)

    def on_end(self, model) -> None:
        model.drop_discriminator()

    def finish_untrained(self, model: dvae.DiscreteVAE, steps: int, extra: dict | None = None) -> dict:
        """A tokenizer made without the training loop (loaded, k-means): validated, its files written; the
        manifest's fields."""
        w, metrics = self.w, self.validate(model)
        w.run.log_metrics(metrics, steps)
        log.info("dvae/%s: %s", w.key, self.report(metrics))
        w.write_files(self.files(model, metrics))
        w.store.write_json(w.path("metrics.json"), {**metrics, "steps": steps})
        return {"config": self.section.model_dump(mode="json"), **self.manifest(model), "steps": steps,
                "world_size": 1, "metrics": metrics, **(extra or {})}
