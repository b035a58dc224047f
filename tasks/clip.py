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
from dalle_core.loader import IN_ORDER, DecodeCaptioned, decode_images
from dalle_core.model_folder import clip_checkpoint
from pipeline.artifacts import ArtifactRef, Work, run_name, run_stage
from pipeline.config import Config
from pipeline.logs import log
from pipeline.models import load_reranker, load_tokenizer
from pipeline.training import StageTrainer, batch_stream, train_stage
from storage.parquet import shard_paths
from storage.store import ArtifactStore


@task(name="clip", task_run_name=run_name("clip"), cache_policy=NONE)
def train_clip(cfg: Config, ingest: ArtifactRef, bpe: ArtifactRef) -> ArtifactRef:
    """Train the reranking CLIP on `ingest`'s images and captions (tokenized by `bpe`), or check and record the
    pretrained one `clip.pretrained` names."""
    inputs = {"ingest": ingest, "bpe": bpe}
    if cfg.clip.pretrained:
        return run_stage(cfg, "clip", inputs, _pretrained, cfg.clip.model_dump(mode="json"))
    return train_stage(cfg, CLIPTrainer, inputs)


def _pretrained(w: Work) -> dict:
    load_reranker(w.cfg, w.store, w.key)  # it loads: a missing file or unknown model fails here
    log.info("clip/%s: using pretrained %s", w.key, w.cfg.clip.pretrained)
    return {"config": w.cfg.clip.model_dump(mode="json"), "pretrained": w.cfg.clip.pretrained}


def _val_recall(model, model_cfg: CLIPConfig, tokenizer: TextTokenizer, cfg: Config, store: ArtifactStore,
                paths: list[str], device, limit: int = 1024) -> dict[str, float]:
    """Image<->caption retrieval recall over the first `limit` val images."""
    reranker = CLIPReranker.ours(model, model_cfg, tokenizer)
    emb_i, captions = [], []
    for batch in batch_stream(cfg, store, paths, ["image", "caption"], decode_images, 256, device, IN_ORDER):
        emb_i.append(reranker.embed_images(batch["image"]))
        captions += batch["caption"]
        if len(captions) >= limit:
            break
    emb_i, captions = torch.cat(emb_i)[:limit], captions[:limit]
    emb_t = torch.cat([reranker.embed_texts(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    return {**recall_at(emb_i.cpu(), emb_t.cpu(), captions), "val_chance_recall_at_1": chance_recall(captions)}


class CLIPTrainer(StageTrainer):
    """CLIP's recipe: the contrastive loss over (image, caption) batches, its logit scale clamped after each step,
    val retrieval recall@1 both ways."""

    stage = "clip"

    def __init__(self, w: Work, device, rank: int = 0, world: int = 1):
        super().__init__(w, device, rank, world)
        self.tokenizer = load_tokenizer(self.store, w.inputs["bpe"].key, self.cfg.text.text_len)
        self.mcfg = self.section.clip_config(self.cfg.data.image_size, self.tokenizer.vocab_size,
                                             self.cfg.text.text_len, self.tokenizer.pad_id)
        self.seq_len = max(self.mcfg.patches + 1, self.mcfg.text_len + 1)

    def paths(self, split: str) -> list[str]:
        return shard_paths(self.store, "ingest", self.w.inputs["ingest"].key, split)

    def model(self):
        return build_clip(self.mcfg)

    def batches(self, start_step: int):
        return self.stream(self.paths("train"), ["image", "caption"], DecodeCaptioned(self.tokenizer), start_step)

    def step(self, model):
        return clip_step(self.mcfg, self.rank, self.world)

    def fit_hooks(self, model) -> dict:
        return {"after_step": lambda step: clamp_logit_scale(model)}

    def validate(self, model) -> dict:
        limit = 256 * self.train_cfg.val_batches if self.train_cfg.val_batches else 1024
        return _val_recall(model, self.mcfg, self.tokenizer, self.cfg, self.store, self.paths("val"), self.device,
                           limit)

    def files(self, model, metrics: dict) -> dict:
        return {"model.safetensors": clip_checkpoint(model, self.mcfg, self.tokenizer)}

    def report(self, metrics: dict) -> str:
        return (f"val recall@1 image->text {metrics['val_i2t_recall_at_1']:.2f}, text->image "
                f"{metrics['val_t2i_recall_at_1']:.2f} (chance {metrics['val_chance_recall_at_1']:.3f})")
