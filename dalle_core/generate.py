"""Text to image: sample N candidates per prompt, decode them with the dVAE, rank them with CLIP."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dalle_core.bpe import TextTokenizer
from dalle_core.clip import Scorer
from dalle_core.dvae import DiscreteVAE
from dalle_core.images import to_uint8
from dalle_core.sampling import sample
from dalle_core.train import Norm
from dalle_core.transformer import DALLE


@dataclass
class Generator:
    transformer: DALLE
    dvae: DiscreteVAE
    norm: Norm
    tokenizer: TextTokenizer
    scorer: Scorer

    @torch.inference_mode()
    def candidates(self, prompt: str, n: int, seed: int, batch_size: int = 64, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None,
                   cond_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, bool]:
        """(n, H, W, 3) uint8 images, their (n,) CLIP scores, and whether the prompt was truncated."""
        ids, truncated = self.tokenizer.encode([prompt])
        text = torch.from_numpy(ids)
        gen = torch.Generator().manual_seed(seed)
        side = self.transformer.c.image_grid
        images = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            codes = sample(self.transformer, text.expand(b, -1), temperature=temperature, top_k=top_k,
                           top_p=top_p, cond_scale=cond_scale, generator=gen)
            images.append(to_uint8(self.dvae.decode(codes.view(b, side, side)), self.norm.mean, self.norm.std))
        images = np.concatenate(images)
        scores = self.scorer.scores(images, [prompt] * n).float().numpy()
        return images, scores, bool(truncated[0])


def ranks(scores: np.ndarray) -> np.ndarray:
    """rank[i] = 0 for the best score; ties keep candidate order."""
    order = np.argsort(-scores, kind="stable")
    out = np.empty(len(scores), dtype=np.int32)
    out[order] = np.arange(len(scores))
    return out


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the index-th prompt of a run: independent of how prompts are batched."""
    return (seed * 1_000_003 + index) % (2**63)
