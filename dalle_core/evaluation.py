"""What the evaluation stage measures: the gain from CLIP reranking, caption faithfulness on shapes, and for any
data the embedding-space metrics (Fréchet distance, CLIP R-precision, nearest-neighbour memorisation) and SSIM."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from dalle_core import shapes

ATTRIBUTES = ("colour", "shape", "size", "position", "relation")
# Part of the evaluation stage key: bump when what a metric measures changes, so cached evaluations
# are redone (2: the checker places shape templates at whole-pixel corners; 3: per-subset embedding metrics).
METRICS_VERSION = 3


def rerank_gain(scores: np.ndarray, ns=(1, 4, 16)) -> dict[str, float]:
    """scores: (prompts, candidates) CLIP scores in sampling order (so candidate 0 is a random draw).

    Mean score of the best of the first n candidates, for each n, and of a random candidate.
    """
    out = {"clip_random": float(scores[:, 0].mean())}
    for n in ns:
        if n <= scores.shape[1]:
            out[f"clip_top1_of_{n}"] = float(scores[:, :n].max(1).mean())
    return out


def faithfulness(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Share of images that have each attribute their caption names, split by scene kind.

    Keys: `<kind>.<attribute>` and `<kind>.all` for kind in single, pair, overall.
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, caption in zip(images, captions):
        result = shapes.check(image, caption)
        kind = "pair" if "relation" in result else "single"
        for k in (kind, "overall"):
            for attr, ok in result.items():
                hits[f"{k}.{attr}"].append(ok)
            hits[f"{k}.all"].append(all(result.values()))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def is_shapes_caption(caption: str) -> bool:
    return shapes.parse_caption(caption) is not None


def has_pair(caption: str, pairs: list[str]) -> bool:
    parsed = shapes.parse_caption(caption)
    return parsed is not None and any(f"{c} {s}" in pairs for c, s in parsed["objects"])


def subset_groups(val_subsets: list[str], train_prompts: int) -> dict[str, list[int]]:
    """Prompt indices per reported split. `seen`: the drawn train captions and the val rows whose subset starts
    with "seen" (another variant of a trained concept); then each val subset on its own."""
    n_val = len(val_subsets)
    groups: dict[str, list[int]] = {"seen": list(range(n_val, n_val + train_prompts))
                                    + [i for i, s in enumerate(val_subsets) if s.startswith("seen")]}
    for i, s in enumerate(val_subsets):
        groups.setdefault(s, []).append(i)
    return {name: idx for name, idx in groups.items() if idx}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (rows): FID's formula in any space.

    tr(sqrt(C_a C_b)) is the sum of the square roots of the eigenvalues of sqrt(C_a) C_b sqrt(C_a), which is
    symmetric, so it needs only symmetric eigendecompositions (no scipy, stable for rank-deficient covariances).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1] and min(len(a), len(b)) >= 2
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, truth: list[int], distractors: int = 99,
                seed: int = 0) -> tuple[float, float]:
    """CLIP R-precision: for image i, is caption truth[i] more similar than each of `distractors` other captions
    (drawn at random from the rest of the pool)? Returns (hit rate, chance = 1 / (distractors + 1)).

    image_emb (N, D) and text_emb (P, D) are unit vectors; text_emb rows are distinct captions.
    """
    pool = text_emb.shape[0]
    k = min(distractors, pool - 1)
    assert k >= 1, "R-precision needs at least two distinct captions"
    rng = np.random.default_rng(seed)
    sims = (image_emb.float() @ text_emb.float().t()).cpu().numpy()  # (N, P)
    hits = []
    for i, t in enumerate(truth):
        others = rng.choice(pool - 1, size=k, replace=False)
        others = others + (others >= t)  # skip the true caption
        hits.append(sims[i, t] > sims[i, others].max())
    return float(np.mean(hits)), 1.0 / (k + 1)


def nearest_neighbours(query: torch.Tensor, reference: torch.Tensor, chunk: int = 4096
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of the most similar reference row and that cosine similarity."""
    best_sim = torch.full((query.shape[0],), -2.0)
    best_idx = torch.zeros(query.shape[0], dtype=torch.long)
    q = query.float().cpu()
    for start in range(0, reference.shape[0], chunk):
        sims = q @ reference[start:start + chunk].float().cpu().t()
        value, index = sims.max(1)
        better = value > best_sim
        best_sim[better], best_idx[better] = value[better], index[better] + start
    return best_idx.numpy(), best_sim.numpy()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of two (B, 3, H, W) batches in [0, 1], per image: (B,).

    Gaussian window, the paper's constants, valid (unpadded) windows; images smaller than the window use a
    window of their size.
    """
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).to(a.device)

    def blur(x):
        return F.conv2d(x, kernel, groups=x.shape[1])

    a, b = a.float(), b.float()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


class InceptionFID:
    """The standard FID (torchmetrics' FrechetInceptionDistance over torch-fidelity's InceptionV3 pool features)
    from a local weights file: nothing is downloaded. Needs the `fid` extra (torchmetrics, torch-fidelity)."""

    def __init__(self, weights_path: str, device: torch.device | str = "cpu"):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError as err:
            raise ImportError(f"evaluate.inception_weights needs the fid extra ({err.name} is missing): "
                              "pip install -e '.[fid]'") from None
        self.metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights_path,
                                               reset_real_features=True).to(device)  # loads the weights once
        self.device = device

    @torch.inference_mode()
    def __call__(self, fake: np.ndarray, real: np.ndarray, batch: int = 32) -> float:
        """FID of two (N, H, W, 3) uint8 image sets (resized to 299 px inside, as the standard FID does)."""
        metric = self.metric
        metric.reset()
        for images, is_real in ((real, True), (fake, False)):
            for i in range(0, len(images), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).to(self.device)
                metric.update(x, real=is_real)
        return float(metric.compute())
