"""Stage 2: train the DALL-E transformer on cached token shards -> `transformer/<key>/`.

With `transformer.train.nproc > 1` (or `train.nnodes > 1`) the task launches PyTorch DDP
through torchrun (`tasks.ddp`); each rank reads its own share of the shards and only
rank 0 writes checkpoints and MLflow.
"""

from __future__ import annotations

from dataclasses import asdict
from itertools import islice

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.config import Config
from dalle_core.device import resolve_device, sampling_precision
from dalle_core.images import grid, png_bytes, to_uint8
from dalle_core.loader import decode_tokens
from dalle_core.sampling import sample
from dalle_core.transformer import DALLE, DALLEConfig, evaluate_transformer, transformer_step
from storage.parquet import read_shard, shard_paths
from storage.store import ArtifactStore
from tasks.common import (
    ArtifactRef,
    Training,
    batch_stream,
    drop_checkpoints,
    load_state_file,
    logger,
    open_store,
    stage_keys,
    stage_run,
    state_bytes,
    train_stage_task,
)
from tasks.dvae import load_dvae
from tasks.fine_tuning import source_note, source_tags, start_model
from tasks.model_source import check_fine_tuning

TOKEN_COLUMNS = ["text_tokens", "image_tokens"]


def load_transformer(store: ArtifactStore, key: str, device: torch.device | str = "cpu") -> DALLE:
    """A finished transformer from the store, on `device`, in eval mode; a damaged file is a StoreError."""
    store.require("transformer", key)
    model = DALLE(DALLEConfig(**store.read_json(store.path("transformer", key, "config.json"))))
    load_state_file(store, store.path("transformer", key, "model.safetensors"), model)
    return model.to(device).eval()


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


def run_training(cfg: Config, parent_run_id: str | None, flow_run_id: str | None, rank: int = 0,
                 world: int = 1, device: torch.device | None = None) -> None:
    """The whole stage on one rank (world == 1 is the single-process case)."""
    store, keys = open_store(cfg), stage_keys(cfg)
    key, section, train_cfg = keys["transformer"], cfg.transformer, cfg.transformer.train
    device = device or resolve_device(cfg.runner.device)
    manifest = store.require("tokens", keys["tokens"])
    check_fine_tuning(cfg, ["transformer"], store, keys)  # init_from against the shards' vocabularies, before work
    torch.manual_seed(train_cfg.seed)
    mcfg = section.dalle_config(text_vocab=manifest["vocab_size"], text_len=manifest["text_len"],
                               pad_id=manifest["pad_id"], image_vocab=manifest["codebook_size"],
                               image_grid=manifest["grid"][0])  # the vocabularies the shards were made with
    model = DALLE(mcfg)
    start = start_model(cfg, "transformer", model, store)
    training = Training.prepare(store, "transformer", key, model, train_cfg, device, rank, world)
    model = training.model
    train_paths = shard_paths(store, "tokens", keys["tokens"], "train")
    val_paths = shard_paths(store, "tokens", keys["tokens"], "val")
    batches = batch_stream(cfg, store, train_paths, TOKEN_COLUMNS, decode_tokens, train_cfg.batch_size, device,
                           seed=train_cfg.seed, window_rows=section.shuffle_buffer, rank=rank, world=world,
                           start_batch=training.start * train_cfg.grad_accum)
    step_fn = transformer_step(section.caption_dropout, mcfg.pad_id, train_cfg.seed)
    fit_args = {"seq_len": mcfg.seq_len, "unit": "tokens"}
    if rank != 0:  # workers only train; rank 0 reports and checkpoints
        training.fit(batches, step_fn, None, **fit_args)
        return
    dvae_model, norm = load_dvae(store, keys["dvae"], device)
    fixed = read_shard(store, val_paths[0], ["caption", *TOKEN_COLUMNS])
    n_show = min(8, fixed.num_rows)
    captions = fixed.column("caption").to_pylist()[:n_show]
    fixed_text = torch.from_numpy(decode_tokens(fixed.slice(0, n_show))["text"])
    params = {**section.model_dump(mode="json"), "num_params": model.num_params(), "trainable_params": start.trainable,
              "world_size": world}
    with stage_run(cfg, store, "transformer", key, params, parent_run_id, flow_run_id) as run:
        run.set_tags({"input.tokens": keys["tokens"]})
        logger().info("transformer/%s: %s", key, start.describe())

        def on_sample(step: int) -> None:
            sheet = sample_sheet(model, dvae_model, norm, fixed_text, captions, cfg)
            run.log_image(sheet, f"samples/step-{step:07d}.png")

        def validate() -> dict:
            val_batches = batch_stream(cfg, store, val_paths, TOKEN_COLUMNS, decode_tokens, 256, device, shuffle=False)
            return evaluate_transformer(model, islice(val_batches, train_cfg.val_batches), train_cfg.precision, device)

        tags = source_tags(cfg, start.source, store) if start.source else {}
        if start.source:
            run.set_tags({**tags, "mlflow.note.content": source_note(tags)})
            if training.start == 0:  # the source's loss on this data: where the fine-tune's curve starts
                run.log_metrics(validate(), 0)
        result = training.fit(batches, step_fn, run, lambda m: f"image {m['image_loss']:.3f} {m['tokens_per_s']:.0f} tok/s",
                        validate, every=((section.sample_every, on_sample),), **fit_args)
        val = validate()
        run.log_metrics(val, result.step)
        logger().info("transformer/%s: val image loss %.3f nats = %.3f bits per image token", key,
                      val["val_image_loss"], val["val_bits_per_image_token"])
        sheet = sample_sheet(model, dvae_model, norm, fixed_text, captions, cfg)
        run.log_image(sheet, f"samples/step-{result.step:07d}.png")
        store.write_bytes(store.path("transformer", key, "samples.png"), png_bytes(sheet))
        store.write_bytes(store.path("transformer", key, "model.safetensors"), state_bytes(model))
        store.write_json(store.path("transformer", key, "config.json"), asdict(mcfg))
        store.write_json(store.path("transformer", key, "metrics.json"), {**val, "steps": result.step})
        drop_checkpoints(store, "transformer", key)
        done = store.finish("transformer", key, config=section.model_dump(mode="json"),
                            inputs={"tokens": keys["tokens"]}, steps=result.step, world_size=world,
                            num_params=model.num_params(), metrics=val, **start.manifest(tags))
        run.log_dict(done, "manifest.json")


@task(name="train-transformer", cache_policy=NONE)
def train_transformer_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    return train_stage_task(cfg, "transformer", ("tokens",), run_training, parent_run_id)
