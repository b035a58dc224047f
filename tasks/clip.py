"""CLIP stage: train the small reranking CLIP on the ingested images -> `clip/<key>/`,
or record a pretrained one (`clip.pretrained`), which then trains nothing."""

from __future__ import annotations

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
    recall_at,
)
from dalle_core.loader import DecodeCaptioned, decode_images
from dalle_core.model_folder import clip_checkpoint
from pipeline.artifacts import ArtifactRef, Work, run_name, run_stage
from pipeline.config import Config
from pipeline.fine_tuning import start_model
from pipeline.logs import log
from pipeline.models import load_reranker, load_tokenizer
from pipeline.source_fit import check_fine_tuning
from pipeline.stage_table import stage_keys
from pipeline.training import Trainer, batch_stream, train_stage
from storage.parquet import shard_paths
from storage.store import ArtifactStore


@task(name="clip", task_run_name=run_name("clip"), cache_policy=NONE)
def train_clip(cfg: Config, ingest: ArtifactRef, bpe: ArtifactRef) -> ArtifactRef:
    """Train the reranking CLIP on `ingest`'s images and captions (tokenized by `bpe`), or check and record the
    pretrained one `clip.pretrained` names."""
    inputs = {"ingest": ingest, "bpe": bpe}
    if cfg.clip.pretrained:
        return run_stage(cfg, "clip", inputs, _pretrained, cfg.clip.model_dump(mode="json"))
    return train_stage(cfg, "clip", inputs)


def _pretrained(w: Work) -> dict:
    load_reranker(w.cfg, w.store, w.key)  # it loads: a missing file or unknown model fails here
    log.info("clip/%s: using pretrained %s", w.key, w.cfg.clip.pretrained)
    return {"config": w.cfg.clip.model_dump(mode="json"), "pretrained": w.cfg.clip.pretrained}


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


def trainer(w: Work, device, rank: int = 0, world: int = 1) -> Trainer:
    """CLIP's part of the training stage: the contrastive loss over (image, caption) batches, its logit scale
    clamped after each step, val retrieval recall@1 both ways."""
    cfg, store, section, train_cfg = w.cfg, w.store, w.cfg.clip, w.cfg.clip.train
    tokenizer = load_tokenizer(store, w.inputs["bpe"].key, cfg.text.text_len)
    check_fine_tuning(cfg, ["clip"], store, {**stage_keys(cfg), "bpe": w.inputs["bpe"].key})  # before any work
    mcfg = section.clip_config(cfg.data.image_size, tokenizer.vocab_size, cfg.text.text_len, tokenizer.pad_id)
    model = build_clip(mcfg)
    start = start_model(cfg, "clip", model, store)
    train_paths = shard_paths(store, "ingest", w.inputs["ingest"].key, "train")
    val_paths = shard_paths(store, "ingest", w.inputs["ingest"].key, "val")
    seq_len = max((mcfg.image_size // mcfg.patch_size) ** 2 + 1, mcfg.text_len + 1)

    def batches(training) -> object:
        return batch_stream(cfg, store, train_paths, ["image", "caption"], DecodeCaptioned(tokenizer),
                            train_cfg.batch_size, device, seed=train_cfg.seed, window_rows=section.shuffle_buffer,
                            rank=training.rank, world=training.world, start_batch=training.start * train_cfg.grad_accum)

    def validate(model) -> dict:
        limit = 256 * train_cfg.val_batches if train_cfg.val_batches else 1024
        return _val_recall(model, mcfg, tokenizer, cfg, store, val_paths, device, limit)

    return Trainer(model, start, batches, clip_step(mcfg, rank, world), validate,
                   lambda model, m: {"model.safetensors": clip_checkpoint(model, mcfg, tokenizer)},
                   lambda m: f"val recall@1 image->text {m['val_i2t_recall_at_1']:.2f}, text->image "
                   f"{m['val_t2i_recall_at_1']:.2f} (chance {m['val_chance_recall_at_1']:.3f})",
                   fit_args={"after_step": lambda step: clamp_logit_scale(model), "seq_len": seq_len,
                             "unit": "images"})
