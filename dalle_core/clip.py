"""CLIP for reranking, built from open_clip's own model classes.

The default is a small CLIP trained here (no weights can be downloaded): a ViT
with small patches for small images and a text transformer over our BPE ids.
open_clip pools text features at the position of the largest token id (the
OpenAI tokenizer's end-of-text), so we append an end-of-text id one past the
BPE vocabulary at the end of each caption. Users with pretrained weights name
an open_clip model and tag (or a local checkpoint) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from annotated_types import Ge

from dalle_core.bpe import TextTokenizer
from dalle_core.images import compact_size, size_hw
from dalle_core.train import StepFn


@dataclass
class CLIPConfig:
    """The small CLIP's shape (open_clip's CLIP). Each field's type carries its allowed range: the run config's
    `clip` section is built from these fields (`pipeline.config`). `image_size` and the text ids are set by
    the stage from the data and the BPE."""

    image_size: int | tuple[int, int] = 32  # an int for a square, else (height, width)
    patch_size: Annotated[int, Ge(1)] = 4  # 4x4 patches: an 8x8 grid of patches for 32x32 images
    vision_width: Annotated[int, Ge(8)] = 128
    vision_layers: Annotated[int, Ge(1)] = 4
    text_vocab: int = 1000  # BPE vocabulary; the model adds one id for end-of-text
    text_len: int = 32  # BPE tokens; the model's context is text_len + 1
    pad_id: int = 0
    text_width: Annotated[int, Ge(8)] = 128
    text_heads: Annotated[int, Ge(1)] = 4
    text_layers: Annotated[int, Ge(1)] = 4
    embed_dim: Annotated[int, Ge(8)] = 128  # the joint image-text embedding

    def __post_init__(self):
        if not isinstance(self.image_size, int):  # a list when read back from JSON
            self.image_size = compact_size(*size_hw(self.image_size))

    @property
    def patches(self) -> int:
        """Patches per image: the vision tower's sequence length, less its class token."""
        h, w = size_hw(self.image_size)
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def eot_id(self) -> int:
        return self.text_vocab


def build_clip(c: CLIPConfig):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=c.vision_layers, width=c.vision_width, head_width=max(16, c.vision_width // 4),
                           patch_size=c.patch_size, image_size=size_hw(c.image_size))
    text = CLIPTextCfg(context_length=c.text_len + 1, vocab_size=c.text_vocab + 1, width=c.text_width,
                       heads=c.text_heads, layers=c.text_layers, pad_id=c.pad_id, pool_type="argmax")
    return CLIP(embed_dim=c.embed_dim, vision_cfg=vision, text_cfg=text)


def clip_text_ids(text: torch.Tensor, c: CLIPConfig) -> torch.Tensor:
    """(B, text_len) padded BPE ids -> (B, text_len + 1) with end-of-text right after the caption."""
    B, T = text.shape
    out = torch.cat([text, torch.full((B, 1), c.pad_id, dtype=text.dtype, device=text.device)], dim=1)
    is_pad = torch.cat([text == c.pad_id, torch.ones(B, 1, dtype=torch.bool, device=text.device)], dim=1)
    first_pad = is_pad.int().argmax(1)  # == T for a caption that fills text_len
    out[torch.arange(B), first_pad] = c.eot_id
    return out


# CLIP's own image normalisation (the same for the small model, so one preprocessing path serves both)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: np.ndarray | torch.Tensor, size: int | tuple[int, int],
                device: torch.device | str | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 (numpy, or a tensor on any device) -> normalised (B, 3, h, w) float on `device` (default:
    where the images are), resized to `size` (an int: a square; (h, w))."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = x.to(device or x.device).permute(0, 3, 1, 2).float().div(255)
    if tuple(x.shape[-2:]) != size_hw(size):
        x = F.interpolate(x, size=size_hw(size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPReranker:
    """Cosine similarity of images and captions, whichever CLIP is behind it, on the model's device."""

    def __init__(self, model, image_size: int | tuple[int, int], tokenize, spec: dict | None = None):
        self.model = model.eval()
        self.image_size = image_size
        self.tokenize = tokenize  # list[str] -> LongTensor (B, ctx)
        # what saving it needs (model_folder.component_files): {"kind": "dalle-clip", "config", "tokenizer"} or
        # {"kind": "open_clip", "model_name"}
        self.spec = spec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> CLIPReranker:
        self.model.to(device)
        return self

    @classmethod
    def ours(cls, model, c: CLIPConfig, tokenizer: TextTokenizer) -> CLIPReranker:
        def tokenize(captions):
            ids, _ = tokenizer.encode(captions)
            return clip_text_ids(torch.from_numpy(ids), c)
        return cls(model, c.image_size, tokenize, {"kind": "dalle-clip", "config": c, "tokenizer": tokenizer})

    @torch.inference_mode()
    def embed_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, D) unit vectors, on the model's device."""
        return self.model.encode_image(clip_pixels(images, self.image_size, self.device), normalize=True).float()

    @torch.inference_mode()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenize(captions).to(self.device), normalize=True).float()

    def scores(self, images: np.ndarray | torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(B,) cosine similarity of image i with caption i, on the CPU."""
        return (self.embed_images(images) * self.embed_texts(captions)).sum(-1).cpu()


def load_open_clip(spec: str) -> CLIPReranker:
    """`<model>:<pretrained tag or local file>` through open_clip (weights from the hub or a file)."""
    import open_clip

    name, _, pretrained = spec.partition(":")
    return open_clip_reranker(open_clip.create_model(name, pretrained=pretrained or None), name)


def open_clip_reranker(model, name: str) -> CLIPReranker:
    """An open_clip CLIP model named `name` (its weights already in place) as a reranker, with its tokenizer and
    input size."""
    import open_clip

    size = model.visual.image_size
    return CLIPReranker(model, size[0] if isinstance(size, (tuple, list)) else size, open_clip.get_tokenizer(name),
                        {"kind": "open_clip", "model_name": name})


def contrastive_loss(model, images: torch.Tensor, text_ids: torch.Tensor, rank: int = 0,
                     world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ClipLoss (symmetric InfoNCE), over the features of all DDP ranks; returns (loss, logit scale)."""
    from open_clip.loss import ClipLoss

    out = model(images, text_ids)
    if isinstance(out, dict):
        image_features, text_features, logit_scale = out["image_features"], out["text_features"], out["logit_scale"]
    else:
        image_features, text_features, logit_scale = out[:3]
    loss_fn = ClipLoss(gather_with_grad=world_size > 1, rank=rank, world_size=world_size)
    return loss_fn(image_features, text_features, logit_scale), logit_scale.detach()


def clip_step(c: CLIPConfig, rank: int = 0, world_size: int = 1) -> StepFn:
    """Contrastive loss on a batch {"image": (B, H, W, 3) uint8, "text": (B, text_len) BPE ids}. Under DDP the
    features of all ranks are gathered, so every rank contrasts against the global batch."""

    def step_fn(model: nn.Module, batch: dict, step: int):
        pixels, text = clip_pixels(batch["image"], c.image_size), clip_text_ids(batch["text"], c)
        loss, logit_scale = contrastive_loss(model, pixels, text, rank, world_size)
        return loss, text.shape[0], lambda: {"temperature": 1.0 / float(logit_scale)}

    return step_fn


@torch.inference_mode()
def recall_at(image_emb: torch.Tensor, text_emb: torch.Tensor, captions: list[str], ks=(1, 5)) -> dict[str, float]:
    """Retrieval recall where a hit is any item with the same caption (captions repeat in datasets)."""
    sims = image_emb @ text_emb.t()  # (N, N)
    same = torch.tensor([[a == b for b in captions] for a in captions])
    out = {}
    for k in ks:
        k_ = min(k, sims.shape[1])
        i2t = same.gather(1, sims.topk(k_, dim=1).indices).any(1).float().mean()
        t2i = same.t().gather(1, sims.t().topk(k_, dim=1).indices).any(1).float().mean()
        out[f"val_i2t_recall_at_{k}"] = float(i2t)
        out[f"val_t2i_recall_at_{k}"] = float(t2i)
    return out


def chance_recall(captions: list[str]) -> float:
    """Expected recall@1 of a random ranking, given duplicate captions."""
    from collections import Counter

    counts = Counter(captions)
    return sum(n * n for n in counts.values()) / max(1, len(captions)) ** 2


def clamp_logit_scale(model, max_scale: float = 100.0) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))
