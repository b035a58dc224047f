"""The transformer stage: train the DALL-E transformer on the token shards -> `transformer/<key>/`.

With `transformer.train.nproc > 1` (or `train.nnodes > 1`) the task launches PyTorch DDP
through torchrun (`pipeline.ddp`); each rank reads its own share of the shards and only
rank 0 writes checkpoints and MLflow.
"""

from __future__ import annotations

from dataclasses import asdict
from itertools import islice

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.device import sampling_precision
from dalle_core.images import compact_size, grid, png_bytes, to_uint8
from dalle_core.loader import IN_ORDER, decode_tokens
from dalle_core.model_folder import adapter_files, state_bytes
from dalle_core.sampling import sample
from dalle_core.transformer import DALLE, evaluate_transformer, transformer_step
from pipeline.artifacts import ArtifactRef, Work, run_name
from pipeline.config import Config
from pipeline.models import load_dvae
from pipeline.training import StageTrainer, batch_stream, train_stage
from storage.parquet import read_shard, shard_paths

TOKEN_COLUMNS = ["text_tokens", "image_tokens"]


@task(name="transformer", task_run_name=run_name("transformer"), cache_policy=NONE)
def train_transformer(cfg: Config, pretokenize: ArtifactRef, dvae: ArtifactRef) -> ArtifactRef:
    """Train the DALL-E transformer on `pretokenize`'s token shards (`dvae` draws its sample sheets)."""
    return train_stage(cfg, TransformerTrainer, {"pretokenize": pretokenize, "dvae": dvae})


def sample_sheet(model: DALLE, dvae_model, norm, text: torch.Tensor, captions: list[str], cfg: Config,
                 per_caption: int = 4) -> np.ndarray:
    """A grid: for each caption, `per_caption` sampled images decoded by the dVAE (on the model's device)."""
    gen_cfg = cfg.generate
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(gen_cfg.seed)
    codes = sample(model, text.to(device).repeat_interleave(per_caption, 0), gen_cfg.sampling(),
                   generator=gen, precision=sampling_precision(gen_cfg.precision, device))
    with torch.inference_mode():
        images = to_uint8(dvae_model.decode(codes.view(-1, *model.c.grid_hw)), norm.mean, norm.std)
    model.train(was_training)
    rows = [list(images[i * per_caption:(i + 1) * per_caption]) for i in range(len(captions))]
    return grid(rows, captions, scale=3)


class TransformerTrainer(StageTrainer):
    """The transformer's recipe: the model sized to the token shards' vocabularies, next-token loss with caption
    dropout, val loss in bits per image token, sample sheets every `sample_every` steps."""

    stage, unit = "transformer", "tokens"

    def __init__(self, w: Work, device, rank: int = 0, world: int = 1):
        super().__init__(w, device, rank, world)
        m = self.store.require("pretokenize", w.inputs["pretokenize"].key)
        self.mcfg = self.section.dalle_config(text_vocab=m["vocab_size"], text_len=m["text_len"], pad_id=m["pad_id"],
                                              image_vocab=m["codebook_size"], image_grid=compact_size(*m["grid"]))  # the shards'
        self.seq_len = self.mcfg.seq_len
        self._dvae: tuple | None = None  # the sample sheets' decoder, loaded by rank 0 when first drawn

    def paths(self, split: str) -> list[str]:
        return shard_paths(self.store, "pretokenize", self.w.inputs["pretokenize"].key, split)

    def model(self) -> DALLE:
        return DALLE(self.mcfg)

    def batches(self, start_step: int):
        return self.stream(self.paths("train"), TOKEN_COLUMNS, decode_tokens, start_step)

    def step(self, model):
        return transformer_step(self.section.caption_dropout, self.mcfg.pad_id, self.train_cfg.seed)

    def validate(self, model) -> dict:
        val = batch_stream(self.cfg, self.store, self.paths("val"), TOKEN_COLUMNS, decode_tokens, 256, self.device,
                           IN_ORDER)
        return evaluate_transformer(model, islice(val, self.train_cfg.val_batches), self.train_cfg.precision,
                                    self.device)

    def sheet(self, model) -> np.ndarray:
        """Samples for the first val captions (up to 8), four each."""
        if self._dvae is None:
            fixed = read_shard(self.store, self.paths("val")[0], ["caption", *TOKEN_COLUMNS])
            n = min(8, fixed.num_rows)
            self._dvae = (*load_dvae(self.store, self.w.inputs["dvae"].key, self.device),
                          torch.from_numpy(decode_tokens(fixed.slice(0, n))["text"]),
                          fixed.column("caption").to_pylist()[:n])
        dvae_model, norm, text, captions = self._dvae
        return sample_sheet(model, dvae_model, norm, text, captions, self.cfg)

    def every(self, model, run) -> tuple:
        return ((self.section.sample_every,
                 lambda step: run.log_image(self.sheet(model), f"samples/step-{step:07d}.png")),)

    def files(self, model, metrics: dict) -> dict:
        if self.start.lora:  # the adapter alone, keyed to its base (read from init_from when loaded)
            weights = adapter_files(model, self.start.source.digest)
        else:
            weights = {"model.safetensors": state_bytes(model)}
        return {"samples.png": png_bytes(self.sheet(model)), **weights, "config.json": asdict(self.mcfg)}

    def logged_as(self, name: str, step: int) -> str:
        return f"samples/step-{step:07d}.png"  # the last of the sample series

    def report(self, metrics: dict) -> str:
        return (f"val image loss {metrics['val_image_loss']:.3f} nats = {metrics['val_bits_per_image_token']:.3f} "
                "bits per image token")

    def describe(self, metrics: dict) -> str:
        return f"image {metrics['image_loss']:.3f} {metrics['tokens_per_s']:.0f} tok/s"
