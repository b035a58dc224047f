"""What the evaluation stage measures: the gain from CLIP reranking, and caption faithfulness on shapes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from dalle_core import shapes

ATTRIBUTES = ("colour", "shape", "size", "position", "relation")
# Part of the evaluation stage key: bump when what a metric measures changes, so cached evaluations
# are redone (2: the checker places shape templates at whole-pixel corners).
METRICS_VERSION = 2


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
