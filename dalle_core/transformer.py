"""The DALL-E transformer (stage 2): a decoder-only model of `[text ; image]` token sequences.

Sequence layout, for text_len = T and an h x w grid of image codes (N = h*w; h != w for images that are not
square):

    position  0 .. T-1          T .. T+N-2
    input     text[0 .. T-1]    image[0 .. N-2]
    predicts  text[1 .. T-1], image[0]  |  image[1 .. N-1]

Text positions predict only text ids (text head), image positions only image
codes (image head). The loss weighs text 1/8 and image 7/8 (DALL-E). A padding
token at text position i gets its own learned embedding (DALL-E's per-position
padding), and image positions are row + column embeddings (axial), so the
grid shape is explicit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn as nn
import torch.nn.functional as F
from annotated_types import Ge, Lt

from dalle_core import cpu_fast
from dalle_core.device import autocast, to_device
from dalle_core.images import compact_size, size_hw
from dalle_core.train import StepFn


@dataclass
class DALLEConfig:
    """The transformer's shape. Each field's type carries its allowed range: the run config's `transformer`
    section is built from these fields (`pipeline.config`). The vocabularies and the sequence shape
    (`text_vocab` .. `image_grid`) are set by the stage from the token shards."""

    text_vocab: int = 1000  # BPE vocabulary, pad included
    text_len: int = 32  # captions are padded/truncated to this many tokens
    pad_id: int = 0
    image_vocab: int = 512  # dVAE codebook size
    image_grid: int | tuple[int, int] = 8  # the dVAE's token grid: an int for a square, else (rows, cols)
    dim: Annotated[int, Ge(8)] = 256
    depth: Annotated[int, Ge(1)] = 4
    heads: Annotated[int, Ge(1)] = 8
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.0
    tie_image_embedding: bool = False  # image head shares the image token embedding
    text_loss_weight: Annotated[float, Ge(0)] = 1 / 8  # DALL-E: 1/8 text, 7/8 image

    def __post_init__(self):
        if not isinstance(self.image_grid, int):  # a list when read back from config.json
            self.image_grid = compact_size(*size_hw(self.image_grid))

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The token grid as (rows, cols)."""
        return size_hw(self.image_grid)

    @property
    def image_len(self) -> int:
        rows, cols = self.grid_hw
        return rows * cols

    @property
    def seq_len(self) -> int:  # tokens the model reads: the last image token is only predicted
        return self.text_len + self.image_len - 1


class CausalSelfAttention(nn.Module):
    def __init__(self, c: DALLEConfig):
        super().__init__()
        assert c.dim % c.heads == 0
        self.heads, self.dropout = c.heads, c.dropout
        self.qkv = nn.Linear(c.dim, 3 * c.dim)  # fused q, k, v
        self.proj = nn.Linear(c.dim, c.dim)
        self.resid_drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, pos: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:  # sampling: write this step's keys/values, attend over everything so far
            y = cache.attend(layer, pos, q, k, v)
        elif x.device.type == "cpu":  # the CPU picks bf16 attention's precision and kernel (dalle_core.cpu_fast)
            y = cpu_fast.causal_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, c: DALLEConfig):
        super().__init__()
        self.fc = nn.Linear(c.dim, 4 * c.dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * c.dim, c.dim)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.drop(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, c: DALLEConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.dim)
        self.attn = CausalSelfAttention(c)
        self.ln2 = nn.LayerNorm(c.dim)
        self.mlp = MLP(c)

    def forward(self, x, cache=None, layer=0, pos=0):
        x = x + self.attn(self.ln1(x), cache, layer, pos)
        return x + self.mlp(self.ln2(x))


class KVCache:
    """Preallocated keys/values for every layer: (depth, B, nh, max_len, hs); no per-step allocation.

    Its dtype is the attention's: keys and values written in another dtype are cast on the way in, and the
    query too (outside autocast).
    """

    def __init__(self, c: DALLEConfig, batch: int, device=None, dtype=torch.float32):
        shape = (c.depth, batch, c.heads, c.seq_len, c.dim // c.heads)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    def attend(self, layer: int, pos: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write k, v (B, nh, T, hs) at positions pos .. pos+T-1, then causal attention of q over the cache."""
        T = k.shape[2]
        self.k[layer, :, :, pos:pos + T] = k
        self.v[layer, :, :, pos:pos + T] = v
        k, v = self.k[layer, :, :, :pos + T], self.v[layer, :, :, :pos + T]
        with torch.autocast(q.device.type, enabled=False) if k.dtype != q.dtype else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q.to(k.dtype), k, v, is_causal=T > 1)


class DALLE(nn.Module):
    def __init__(self, c: DALLEConfig):
        super().__init__()
        self.c = c
        self.text_emb = nn.Embedding(c.text_vocab + c.text_len, c.dim)  # last text_len rows: per-position pads
        self.text_pos = nn.Embedding(c.text_len, c.dim)
        self.image_emb = nn.Embedding(c.image_vocab, c.dim)
        self.row_emb = nn.Embedding(c.grid_hw[0], c.dim)  # axial image positions
        self.col_emb = nn.Embedding(c.grid_hw[1], c.dim)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.depth)])
        self.ln_f = nn.LayerNorm(c.dim)
        self.text_head = nn.Linear(c.dim, c.text_vocab, bias=False)
        self.image_head = nn.Linear(c.dim, c.image_vocab, bias=False)
        if c.tie_image_embedding:
            self.image_head.weight = self.image_emb.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.depth))
        self.register_buffer("text_positions", torch.arange(c.text_len), persistent=False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def image_pos(self, start: int, n: int) -> torch.Tensor:
        """(n, dim) position embeddings of image tokens start .. start+n-1 (row-major)."""
        idx = torch.arange(start, start + n, device=self.row_emb.weight.device)
        cols = self.c.grid_hw[1]
        return self.row_emb(idx // cols) + self.col_emb(idx % cols)

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, text_len) ids -> (B, text_len, dim); each pad position has its own embedding."""
        ids = torch.where(text == self.c.pad_id, self.c.text_vocab + self.text_positions, text)
        return self.text_emb(ids) + self.text_pos(self.text_positions)

    def embed_image(self, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.image_emb(image) + self.image_pos(start, image.shape[1])

    def hidden(self, x: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, pos)
        return self.ln_f(x)

    def forward(self, text: torch.Tensor, image: torch.Tensor):
        """Training losses for (B, text_len) text ids and (B, N) image codes: (loss, text_loss, image_loss)."""
        T = self.c.text_len
        x = torch.cat([self.embed_text(text), self.embed_image(image[:, :-1])], dim=1)  # (B, T+N-1, dim)
        h = self.hidden(x)
        text_logits = self.text_head(h[:, : T - 1])  # predicts text[1:]
        image_logits = self.image_head(h[:, T - 1:])  # predicts image[0:]
        text_loss = F.cross_entropy(text_logits.flatten(0, 1).float(), text[:, 1:].flatten())
        image_loss = F.cross_entropy(image_logits.flatten(0, 1).float(), image.flatten())
        w = self.c.text_loss_weight
        return w * text_loss + (1 - w) * image_loss, text_loss, image_loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------ training objective


def drop_captions(text: torch.Tensor, p: float, pad_id: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each caption by the all-padding caption with probability p (for classifier-free guidance)."""
    if p <= 0:
        return text
    drop = torch.rand(text.shape[0], generator=generator) < p
    return torch.where(drop.to(text.device)[:, None], torch.full_like(text, pad_id), text)


def transformer_step(caption_dropout: float, pad_id: int, seed: int) -> StepFn:
    """Next-token loss (`DALLE.forward`) on a batch {"text": (B, text_len), "image": (B, N)} of ids, captions
    dropped for classifier-free guidance.

    Which captions are dropped depends on the seed and the step alone, so a resumed run drops the same.
    """
    rng, seeded = torch.Generator(), [-1]

    def step_fn(model: nn.Module, batch: dict, step: int):
        if seeded[0] != step:  # once per step: micro-batches of one step draw on from there
            rng.manual_seed(seed * 1000003 + step)
            seeded[0] = step
        text, image = batch["text"], batch["image"]
        text = drop_captions(text, caption_dropout, pad_id, rng)
        loss, text_loss, image_loss = model(text, image)
        return loss, text.numel() + image.numel(), lambda: {"text_loss": text_loss.item(),
                                                           "image_loss": image_loss.item()}

    return step_fn


@torch.inference_mode()
def evaluate_transformer(model: nn.Module, batches: Iterable[dict], precision: str = "fp32",
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean losses over all batches; image loss also in bits per image token."""
    model.eval()
    device = torch.device(device)
    sums, n = torch.zeros(3, device=device), 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(precision, device, model.c.seq_len):
            losses = model(batch["text"], batch["image"])
        sums += torch.stack([x.float() for x in losses]) * batch["text"].shape[0]
        n += batch["text"].shape[0]
    loss, text_loss, image_loss = (sums / max(n, 1)).tolist()
    return {"val_loss": loss, "val_text_loss": text_loss, "val_image_loss": image_loss,
            "val_bits_per_image_token": image_loss / math.log(2)}
