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
from dalle_core.images import grid, png_bytes, to_uint8
from dalle_core.loader import decode_tokens
from dalle_core.model_folder import state_bytes
from dalle_core.sampling import sample
from dalle_core.transformer import DALLE, evaluate_transformer, transformer_step
from pipeline.artifacts import ArtifactRef, Work, run_name
from pipeline.config import Config
from pipeline.fine_tuning import start_model
from pipeline.models import load_dvae
from pipeline.source_fit import check_fine_tuning
from pipeline.stage_table import stage_keys
from pipeline.training import Trainer, batch_stream, train_stage
from storage.parquet import read_shard, shard_paths

TOKEN_COLUMNS = ["text_tokens", "image_tokens"]


@task(name="transformer", task_run_name=run_name("transformer"), cache_policy=NONE)
def train_transformer(cfg: Config, pretokenize: ArtifactRef, dvae: ArtifactRef) -> ArtifactRef:
    """Train the DALL-E transformer on `pretokenize`'s token shards (`dvae` draws its sample sheets)."""
    return train_stage(cfg, "transformer", {"pretokenize": pretokenize, "dvae": dvae})


def sample_sheet(model: DALLE, dvae_model, norm, text: torch.Tensor, captions: list[str], cfg: Config,
                 per_caption: int = 4) -> np.ndarray:
    """A grid: for each caption, `per_caption` sampled images decoded by the dVAE (on the model's device)."""
    gen_cfg = cfg.generate
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(gen_cfg.seed)
    codes = sample(model, text.to(device).repeat_interleave(per_caption, 0), temperature=gen_cfg.temperature,
                   top_k=gen_cfg.top_k, top_p=gen_cfg.top_p, cond_scale=gen_cfg.cond_scale, generator=gen,
                   precision=sampling_precision(gen_cfg.precision, device))
    side = model.c.image_grid
    with torch.inference_mode():
        images = to_uint8(dvae_model.decode(codes.view(-1, side, side)), norm.mean, norm.std)
    model.train(was_training)
    rows = [list(images[i * per_caption:(i + 1) * per_caption]) for i in range(len(captions))]
    return grid(rows, captions, scale=3)


def trainer(w: Work, device, rank: int = 0, world: int = 1) -> Trainer:
    """The transformer's part of the training stage: the model sized to the token shards' vocabularies, next-token
    loss with caption dropout, val loss in bits per image token, sample sheets every `sample_every` steps."""
    cfg, store, section, train_cfg = w.cfg, w.store, w.cfg.transformer, w.cfg.transformer.train
    tokens = w.inputs["pretokenize"].key
    manifest = store.require("pretokenize", tokens)
    check_fine_tuning(cfg, ["transformer"], store, {**stage_keys(cfg), "pretokenize": tokens})  # before any work
    mcfg = section.dalle_config(text_vocab=manifest["vocab_size"], text_len=manifest["text_len"],
                                pad_id=manifest["pad_id"], image_vocab=manifest["codebook_size"],
                                image_grid=manifest["grid"][0])  # the vocabularies the shards were made with
    model = DALLE(mcfg)
    start = start_model(cfg, "transformer", model, store)
    train_paths = shard_paths(store, "pretokenize", tokens, "train")
    val_paths = shard_paths(store, "pretokenize", tokens, "val")
    fixed = read_shard(store, val_paths[0], ["caption", *TOKEN_COLUMNS])
    n_show = min(8, fixed.num_rows)
    captions = fixed.column("caption").to_pylist()[:n_show]
    fixed_text = torch.from_numpy(decode_tokens(fixed.slice(0, n_show))["text"])
    dvae = {}  # the sample sheets' decoder, loaded by rank 0 only

    def sheet(model) -> np.ndarray:
        if not dvae:
            dvae["model"], dvae["norm"] = load_dvae(store, w.inputs["dvae"].key, device)
        return sample_sheet(model, dvae["model"], dvae["norm"], fixed_text, captions, cfg)

    def batches(training) -> object:
        return batch_stream(cfg, store, train_paths, TOKEN_COLUMNS, decode_tokens, train_cfg.batch_size, device,
                            seed=train_cfg.seed, window_rows=section.shuffle_buffer, rank=training.rank,
                            world=training.world, start_batch=training.start * train_cfg.grad_accum)

    def validate(model) -> dict:
        val = batch_stream(cfg, store, val_paths, TOKEN_COLUMNS, decode_tokens, 256, device, shuffle=False)
        return evaluate_transformer(model, islice(val, train_cfg.val_batches), train_cfg.precision, device)

    def every(model, run) -> tuple:
        return ((section.sample_every, lambda step: run.log_image(sheet(model), f"samples/step-{step:07d}.png")),)

    def files(model, metrics) -> dict[str, bytes]:
        return {"samples.png": png_bytes(sheet(model)), "model.safetensors": state_bytes(model),
                "config.json": asdict(mcfg)}

    return Trainer(model, start, batches, transformer_step(section.caption_dropout, mcfg.pad_id, train_cfg.seed),
                   validate, files, lambda m: f"val image loss {m['val_image_loss']:.3f} nats = "
                   f"{m['val_bits_per_image_token']:.3f} bits per image token",
                   lambda m: f"image {m['image_loss']:.3f} {m['tokens_per_s']:.0f} tok/s",
                   {"seq_len": mcfg.seq_len, "unit": "tokens"}, every=every,
                   logged_as=lambda name, step: f"samples/step-{step:07d}.png")  # the last of the sample series
