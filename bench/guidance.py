"""Whether guidance does what it claims, on a trained shapes model (the demo's store: `dalle run -c
configs/shapes.yaml` first): a negative prompt `red` lowers the share of red images among prompts that name no
colour, and the guidance schedules change how faithful the top-1 image is to a shapes caption (the project's
own checker). `python -m bench.guidance [CONFIG]`; figures in docs/serving.md ("Guidance").
"""

from __future__ import annotations

import sys

import numpy as np

from data_sources import shapes

SEED = 0


def red_share(images: np.ndarray) -> float:
    """The share of (n, H, W, 3) images whose most frequent palette colour (the shapes checker's palette) is red."""
    red = 1 + list(shapes.COLOURS).index("red")
    dominant = []
    for image in images:
        labels = shapes.palette_labels(image)
        counts = np.bincount(labels[labels > 0].ravel(), minlength=len(shapes.COLOURS) + 1)
        dominant.append(counts.argmax() if counts.sum() else 0)
    return float(np.mean(np.array(dominant) == red))


def main(config: str = "configs/shapes.yaml", candidates: int = 16) -> None:
    from pipeline.models import load_model

    pipe = load_model(config)
    uncoloured = [f"a {size} {shape}" for size in shapes.SIZES for shape in shapes.SHAPES] + \
                 [f"a {shape} in the {pos}" for shape in shapes.SHAPES for pos in ("top left", "middle")]
    print(f"{len(uncoloured)} prompts naming no colour x {candidates} candidates, guidance 3:")
    for negative in (None, "red", "not red", "a red shape"):
        out = pipe(uncoloured, num_candidates=candidates, seed=SEED, cond_scale=3.0, negative_prompt=negative)
        every = np.concatenate(out.pixels)
        top1 = np.stack([p[0] for p in out.pixels])
        print(f"  negative_prompt {negative!r:14}: red share {red_share(every):.3f} of all candidates, "
              f"{red_share(top1):.3f} of the top-1 images")
    captions = [c for _, _, c, _ in shapes.generate(64, 32, seed=123, two_object_fraction=0.0)]
    print(f"{len(captions)} single-object shapes captions x {candidates} candidates, the top-1 by CLIP, checker:")
    for name, settings in (("no guidance", {"cond_scale": 1.0}),
                           ("constant 3", {"cond_scale": 3.0}),
                           ("linear 1 -> 3", {"cond_scale": 3.0, "guidance_schedule": "linear"}),
                           ("3 on the first half", {"cond_scale": 3.0, "guidance_end": 0.5}),
                           ("3 on the second half", {"cond_scale": 3.0, "guidance_start": 0.5})):
        out = pipe(captions, num_candidates=candidates, seed=SEED, **settings)
        scores = shapes.faithfulness([p[0] for p in out.pixels], captions)
        print(f"  {name:22}: all attributes right {scores['single.all']:.3f}, colour {scores['single.colour']:.3f}, "
              f"shape {scores['single.shape']:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
