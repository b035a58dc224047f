"""CLIP stage: train the small reranking CLIP on the ingested images -> `clip/<key>/`,
or record a pretrained one (`clip.pretrained`), which then trains nothing."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.bpe import TextTokenizer
from dalle_core.clip import (
    CLIPConfig,
    Scorer,
    build_clip,
    chance_recall,
    clip_pixels,
    clip_text_ids,
    load_open_clip,
    recall_at,
)
from dalle_core.config import Config, ConfigError
from dalle_core.train import make_optimizer, shuffled_batches, skip, train_clip
from storage.parquet import shard_paths
from storage.store import ArtifactStore
from tasks.common import (
    ArtifactRef,
    Progress,
    drop_checkpoints,
    load_checkpoint,
    logger,
    open_store,
    ref,
    reuse,
    save_checkpoint,
    stage_keys,
    stage_run,
)
from tasks.dvae import decoded_chunks
from tasks.text import load_tokenizer


def model_config(cfg: Config, tokenizer: TextTokenizer) -> CLIPConfig:
    c = cfg.clip
    return CLIPConfig(image_size=cfg.data.image_size, patch_size=c.patch_size, vision_width=c.vision_width,
                      vision_layers=c.vision_layers, text_vocab=tokenizer.vocab_size, text_len=cfg.text.text_len,
                      pad_id=tokenizer.pad_id, text_width=c.text_width, text_heads=c.text_heads,
                      text_layers=c.text_layers, embed_dim=c.embed_dim)


def checkpoint_bytes(model, c: CLIPConfig, tokenizer: TextTokenizer) -> bytes:
    """A self-contained CLIP file: weights, with the model config and the tokenizer in the metadata."""
    from safetensors.torch import save

    meta = {"format": "dalle-clip", "config": json.dumps(asdict(c)), "tokenizer": tokenizer.tokenizer.to_str()}
    return save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, metadata=meta)


def scorer_from_bytes(data: bytes) -> Scorer:
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    if meta.get("format") != "dalle-clip":
        raise ConfigError("clip.pretrained file is not a CLIP checkpoint written by this project "
                          "(use '<open_clip model>:<file>' for open_clip checkpoints)")
    c = CLIPConfig(**json.loads(meta["config"]))
    model = build_clip(c)
    model.load_state_dict(load(data))
    return Scorer.ours(model, c, TextTokenizer.from_str(meta["tokenizer"], c.text_len))


def load_scorer(cfg: Config, store: ArtifactStore | None = None) -> Scorer:
    """The reranking CLIP the config asks for: pretrained (hub tag or file) or this project's stage output."""
    spec = cfg.clip.pretrained
    if spec:
        if spec.endswith(".safetensors"):
            if not os.path.isfile(spec):
                raise ConfigError(f"clip.pretrained file {spec!r} does not exist")
            with open(spec, "rb") as f:
                return scorer_from_bytes(f.read())
        return load_open_clip(spec)
    store = store or open_store(cfg)
    key = stage_keys(cfg)["clip"]
    store.require("clip", key)
    return scorer_from_bytes(store.read_bytes(store.path("clip", key, "model.safetensors")))


def _val_recall(model, c: CLIPConfig, tokenizer: TextTokenizer, store: ArtifactStore, paths: list[str],
                limit: int = 1024) -> dict[str, float]:
    images, captions = [], []
    for chunk in decoded_chunks(store, paths, 0, epochs=1):
        images.append(chunk["image"])
        captions += list(chunk["caption"])
        if len(captions) >= limit:
            break
    images, captions = np.concatenate(images)[:limit], captions[:limit]
    scorer = Scorer.ours(model, c, tokenizer)
    emb_i = torch.cat([scorer.embed_images(images[i:i + 256]) for i in range(0, len(images), 256)])
    emb_t = torch.cat([scorer.embed_texts(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    return {**recall_at(emb_i, emb_t, captions), "val_chance_recall_at_1": chance_recall(captions)}


@task(name="train-clip", cache_policy=NONE)
def train_clip_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    log = logger()
    store, keys = open_store(cfg), stage_keys(cfg)
    key, c, t = keys["clip"], cfg.clip, cfg.clip.train
    if done := reuse(store, "clip", key):
        return done
    store.prepare("clip", key)
    if c.pretrained:  # nothing to train: check it loads, and record which one is used
        load_scorer(cfg)
        store.finish("clip", key, config=c.model_dump(mode="json"), inputs={}, pretrained=c.pretrained)
        log.info("clip/%s: using pretrained %s", key, c.pretrained)
        return ref(store, "clip", key, cached=False)
    store.require("images", keys["images"])
    tokenizer = load_tokenizer(store, keys["bpe"], cfg.text.text_len)
    mcfg = model_config(cfg, tokenizer)
    torch.manual_seed(t.seed)
    model = build_clip(mcfg)
    optimizer = make_optimizer(model, t)
    start, _ = load_checkpoint(store, "clip", key, model, optimizer)
    train_paths = shard_paths(store, "images", keys["images"], "train")
    val_paths = shard_paths(store, "images", keys["images"], "val")

    def batches():
        for b in shuffled_batches(decoded_chunks(store, train_paths, t.seed, None), t.batch_size, 4 * 1024, t.seed):
            ids, _ = tokenizer.encode(list(b["caption"]))
            yield clip_pixels(b["image"], mcfg.image_size), clip_text_ids(torch.from_numpy(ids), mcfg)

    with stage_run(cfg, store, "clip", key, c.model_dump(mode="json"), parent_run_id) as run:
        run.set_tags({"input.images": keys["images"], "input.bpe": keys["bpe"], "resumed_from_step": str(start)})
        progress = Progress("train-clip", t.max_steps - start, "steps", max_minutes=t.max_minutes)

        def on_log(step: int, metrics: dict) -> None:
            run.log_metrics(metrics, step)
            progress.update(step - start - progress.done, f"loss {metrics['loss']:.3f}", force=True)

        step = train_clip(model, skip(batches(), start * t.grad_accum), t, optimizer, start, on_log,
                          lambda s: save_checkpoint(store, "clip", key, model, optimizer, s),
                          lambda: _val_recall(model, mcfg, tokenizer, store, val_paths, 512), t.checkpoint_every)
        metrics = _val_recall(model, mcfg, tokenizer, store, val_paths)
        run.log_metrics(metrics, step)
        log.info("clip/%s: val recall@1 image->text %.2f, text->image %.2f (chance %.3f)", key,
                 metrics["val_i2t_recall_at_1"], metrics["val_t2i_recall_at_1"], metrics["val_chance_recall_at_1"])
        store.write_bytes(store.path("clip", key, "model.safetensors"), checkpoint_bytes(model, mcfg, tokenizer))
        store.write_json(store.path("clip", key, "metrics.json"), {**metrics, "steps": step})
        drop_checkpoints(store, "clip", key)
        manifest = store.finish("clip", key, config=c.model_dump(mode="json"),
                                inputs={"images": keys["images"], "bpe": keys["bpe"]}, steps=step, metrics=metrics)
        run.log_dict(manifest, "manifest.json")
    return ref(store, "clip", key, cached=False)
