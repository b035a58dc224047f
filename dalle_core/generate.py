"""Text to image: sample N candidates per prompt, decode them with the dVAE, rank them with CLIP."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dalle_core.bpe import TextTokenizer
from dalle_core.clip import CLIPReranker
from dalle_core.dvae import DiscreteVAE
from dalle_core.images import ImageNormalization, to_tensor, to_uint8_tensor
from dalle_core.sampling import sample
from dalle_core.transformer import DALLE


@dataclass
class DALLEPipeline:
    """A trained text-to-image model as diffusers bundles one: the transformer, the image tokenizer (dVAE) with
    its pixel normalisation, the text tokenizer and the CLIP reranker, all on one device; `precision` is the
    sampling precision (fp32 or bf16). (Not the Prefect pipeline that trains them.)"""

    transformer: DALLE
    dvae: DiscreteVAE
    normalization: ImageNormalization
    tokenizer: TextTokenizer
    reranker: CLIPReranker
    precision: str = "fp32"

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @torch.inference_mode()
    def prime(self, image: np.ndarray, rows: int) -> tuple[torch.Tensor, np.ndarray]:
        """A (H, W, 3) uint8 image at the dVAE's size -> (its top `rows` rows of codes, flat; its reconstruction)."""
        x = to_tensor(image[None], self.normalization.mean, self.normalization.std).to(self.device)
        codes = self.dvae.encode(x)
        recon = to_uint8_tensor(self.dvae.decode(codes), self.normalization.mean, self.normalization.std)[0].cpu().numpy()
        return codes[0, :rows].flatten(), recon

    @torch.inference_mode()
    def candidates(self, prompts: list[str], n: int, seeds: list[int], batch_size: int = 64,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   cond_scale: float = 1.0, prefix: torch.Tensor | None = None,
                   ) -> list[tuple[np.ndarray, np.ndarray, bool, np.ndarray]]:
        """Per prompt: (n, H, W, 3) uint8 images, their (n,) CLIP scores, whether it was truncated, and the
        (n, tokens) image codes.

        Whole prompts share a sampling batch of about `batch_size` images (bigger batches run
        faster on CPU and GPU alike); each prompt draws from its own generator seeded with its
        seed, so its images do not depend on which prompts it is batched with. `prefix` (codes, flat)
        fixes the first codes of every candidate (image completion, see `prime`).
        """
        ids, truncated = self.tokenizer.encode(prompts)
        device = self.device
        text = torch.from_numpy(ids).to(device)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        side = self.transformer.c.image_grid
        chunk = min(n, batch_size)  # candidates of one prompt per batch (n > batch_size: several batches)
        per_batch = prompts_per_batch(n, batch_size)
        images: list[list[np.ndarray]] = [[] for _ in prompts]
        scores: list[list[np.ndarray]] = [[] for _ in prompts]
        tokens: list[list[np.ndarray]] = [[] for _ in prompts]
        for first in range(0, len(prompts), per_batch):
            group = range(first, min(first + per_batch, len(prompts)))
            for start in range(0, n, chunk):
                b = min(chunk, n - start)
                rows = torch.cat([text[j:j + 1].expand(b, -1) for j in group])
                fixed = None if prefix is None else prefix.to(device)[None].expand(rows.shape[0], -1)
                codes = sample(self.transformer, rows, temperature=temperature, top_k=top_k, top_p=top_p,
                               cond_scale=cond_scale, image_prefix=fixed, generator=[gens[j] for j in group],
                               precision=self.precision)
                pixels = to_uint8_tensor(self.dvae.decode(codes.view(-1, side, side)), self.normalization.mean, self.normalization.std)
                s = self.reranker.scores(pixels, [prompts[j] for j in group for _ in range(b)]).float().numpy()
                decoded, drawn = pixels.cpu().numpy(), codes.cpu().numpy()
                for k, j in enumerate(group):
                    images[j].append(decoded[k * b:(k + 1) * b])
                    scores[j].append(s[k * b:(k + 1) * b])
                    tokens[j].append(drawn[k * b:(k + 1) * b])
        return [(np.concatenate(images[j]), np.concatenate(scores[j]), bool(truncated[j]), np.concatenate(tokens[j]))
                for j in range(len(prompts))]


def prompts_per_batch(n: int, batch_size: int) -> int:
    """How many prompts of n candidates each share one sampling batch of `batch_size` images."""
    return max(1, batch_size // min(n, batch_size))


def ranks(scores: np.ndarray) -> np.ndarray:
    """rank[i] = 0 for the best score; ties keep candidate order."""
    order = np.argsort(-scores, kind="stable")
    out = np.empty(len(scores), dtype=np.int32)
    out[order] = np.arange(len(scores))
    return out


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the index-th prompt of a run: independent of how prompts are batched."""
    return (seed * 1_000_003 + index) % (2**63)
