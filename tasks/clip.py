"""CLIP stage: train the small reranking CLIP on the ingested images -> `clip/<key>/`,
or record a pretrained one (`clip.pretrained`), which then trains nothing."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict

import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.bpe import TextTokenizer
from dalle_core.clip import (
    CLIPConfig,
    CLIPReranker,
    build_clip,
    chance_recall,
    clamp_logit_scale,
    clip_step,
    load_open_clip,
    recall_at,
)
from dalle_core.config import Config, ConfigError
from dalle_core.device import resolve_device
from dalle_core.loader import DecodeCaptioned, decode_images
from storage.parquet import shard_paths
from storage.store import ArtifactStore
from tasks.common import (
    ArtifactRef,
    Training,
    batch_stream,
    claimed,
    drop_checkpoints,
    logger,
    open_store,
    ref,
    reuse,
    stage_keys,
    stage_run,
    train_stage_task,
)
from tasks.fine_tuning import source_note, source_tags, start_model
from tasks.model_source import check_fine_tuning
from tasks.text import load_tokenizer


def checkpoint_bytes(model, model_cfg: CLIPConfig, tokenizer: TextTokenizer) -> bytes:
    """A self-contained CLIP file: weights, with the model config and the tokenizer in the metadata."""
    from safetensors.torch import save

    meta = {"format": "dalle-clip", "config": json.dumps(asdict(model_cfg)), "tokenizer": tokenizer.tokenizer.to_str()}
    return save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, metadata=meta)


def reranker_from_bytes(data: bytes) -> CLIPReranker:
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    if meta.get("format") != "dalle-clip":
        raise ConfigError("clip.pretrained file is not a CLIP checkpoint written by this project "
                          "(use '<open_clip model>:<file>' for open_clip checkpoints)")
    model_cfg = CLIPConfig(**json.loads(meta["config"]))
    model = build_clip(model_cfg)
    model.load_state_dict(load(data))
    return CLIPReranker.ours(model, model_cfg, TextTokenizer.from_str(meta["tokenizer"], model_cfg.text_len))


def load_reranker(cfg: Config, store: ArtifactStore | None = None, device: torch.device | str = "cpu") -> CLIPReranker:
    """The reranking CLIP the config asks for, on `device`: pretrained (an open_clip model with a hub tag or
    a local file, or a checkpoint of this project) or this project's stage output."""
    spec = cfg.clip.pretrained
    if spec:
        if os.path.isfile(spec):  # a checkpoint written by this project
            with open(spec, "rb") as f:
                return reranker_from_bytes(f.read()).to(device)
        if spec.endswith(".safetensors") and ":" not in spec:
            raise ConfigError(f"clip.pretrained file {spec!r} does not exist")
        return load_open_clip(spec).to(device)  # "<open_clip model>:<hub tag or local weights file>"
    store = store or open_store(cfg)
    key = stage_keys(cfg)["clip"]
    store.require("clip", key)
    path = store.path("clip", key, "model.safetensors")
    data = store.read_bytes(path)
    with store.reading(path):
        reranker = reranker_from_bytes(data)
    return reranker.to(device)


def _val_recall(model, model_cfg: CLIPConfig, tokenizer: TextTokenizer, cfg: Config, store: ArtifactStore,
                paths: list[str], device, limit: int = 1024) -> dict[str, float]:
    """Image<->caption retrieval recall over the first `limit` val images."""
    reranker = CLIPReranker.ours(model, model_cfg, tokenizer)
    emb_i, captions = [], []
    for batch in batch_stream(cfg, store, paths, ["image", "caption"], decode_images, 256, device, shuffle=False):
        emb_i.append(reranker.embed_images(batch["image"]))
        captions += batch["caption"]
        if len(captions) >= limit:
            break
    emb_i, captions = torch.cat(emb_i)[:limit], captions[:limit]
    emb_t = torch.cat([reranker.embed_texts(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    return {**recall_at(emb_i.cpu(), emb_t.cpu(), captions), "val_chance_recall_at_1": chance_recall(captions)}


def run_training(cfg: Config, parent_run_id: str | None, flow_run_id: str | None, rank: int = 0, world: int = 1,
                 device: torch.device | None = None) -> None:
    """The CLIP stage on one rank (world == 1: the single-process case); rank 0 reports and writes."""
    store, keys = open_store(cfg), stage_keys(cfg)
    key, section, train_cfg = keys["clip"], cfg.clip, cfg.clip.train
    device = device or resolve_device(cfg.runner.device)
    tokenizer = load_tokenizer(store, keys["bpe"], cfg.text.text_len)
    check_fine_tuning(cfg, ["clip"], store, keys)  # init_from against the BPE's vocabulary, before any work
    mcfg = section.clip_config(cfg.data.image_size, tokenizer.vocab_size, cfg.text.text_len, tokenizer.pad_id)
    torch.manual_seed(train_cfg.seed)
    model = build_clip(mcfg)
    start = start_model(cfg, "clip", model, store)
    training = Training.prepare(store, "clip", key, model, train_cfg, device, rank, world)
    train_paths = shard_paths(store, "images", keys["images"], "train")
    val_paths = shard_paths(store, "images", keys["images"], "val")
    batches = batch_stream(cfg, store, train_paths, ["image", "caption"], DecodeCaptioned(tokenizer), train_cfg.batch_size,
                           device, seed=train_cfg.seed, window_rows=section.shuffle_buffer, rank=rank, world=world,
                           start_batch=training.start * train_cfg.grad_accum)
    seq_len = max((mcfg.image_size // mcfg.patch_size) ** 2 + 1, mcfg.text_len + 1)

    def clamp(step: int) -> None:
        clamp_logit_scale(training.model)

    fit_args = {"after_step": clamp, "seq_len": seq_len, "unit": "images"}
    if rank != 0:
        training.fit(batches, clip_step(mcfg, rank, world), None, **fit_args)
        return
    params = {**section.model_dump(mode="json"), "trainable_params": start.trainable, "world_size": world}
    with stage_run(cfg, store, "clip", key, params, parent_run_id, flow_run_id) as run:
        run.set_tags({"input.images": keys["images"], "input.bpe": keys["bpe"]})
        logger().info("clip/%s: %s", key, start.describe())
        tags = source_tags(cfg, start.source, store) if start.source else {}
        if start.source:
            run.set_tags({**tags, "mlflow.note.content": source_note(tags)})

        def validate() -> dict:
            limit = 256 * train_cfg.val_batches if train_cfg.val_batches else 1024
            return _val_recall(training.model, mcfg, tokenizer, cfg, store, val_paths, device, limit)

        if start.source and training.start == 0:  # the source's recall on this data: where the curve starts
            run.log_metrics(validate(), 0)

        result = training.fit(batches, clip_step(mcfg, rank, world), run, validate=validate, **fit_args)
        metrics = validate()
        run.log_metrics(metrics, result.step)
        logger().info("clip/%s: val recall@1 image->text %.2f, text->image %.2f (chance %.3f)", key,
                      metrics["val_i2t_recall_at_1"], metrics["val_t2i_recall_at_1"], metrics["val_chance_recall_at_1"])
        store.write_bytes(store.path("clip", key, "model.safetensors"), checkpoint_bytes(training.model, mcfg, tokenizer))
        store.write_json(store.path("clip", key, "metrics.json"), {**metrics, "steps": result.step})
        drop_checkpoints(store, "clip", key)
        manifest = store.finish("clip", key, config=section.model_dump(mode="json"),
                                inputs={"images": keys["images"], "bpe": keys["bpe"]}, steps=result.step,
                                world_size=world, metrics=metrics, **start.manifest(tags))
        run.log_dict(manifest, "manifest.json")


@task(name="train-clip", cache_policy=NONE)
def train_clip_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    section = cfg.clip
    if not section.pretrained:
        return train_stage_task(cfg, "clip", ("images", "bpe"), run_training, parent_run_id)
    store, key = open_store(cfg), stage_keys(cfg)["clip"]  # a pretrained CLIP: check it loads, record which
    if done := reuse(store, "clip", key, cfg, parent_run_id):
        return done
    with claimed(store, "clip", key):
        store.prepare("clip", key)
        load_reranker(cfg)
        store.finish("clip", key, config=section.model_dump(mode="json"), inputs={}, pretrained=section.pretrained)
    logger().info("clip/%s: using pretrained %s", key, section.pretrained)
    return ref(store, "clip", key, cached=False)
