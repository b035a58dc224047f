"""How many bytes a general image codec needs for a PSNR on a data set's val images: the yardstick for the
image tokenizer's PSNR at a token grid, which carries cells x log2(codebook size) bits per image
(docs/results.md, "The tokenizer's PSNR at 8x").

    python -m bench.codec_psnr data/openmoji-64

Reads the val rows of an imagefolder (`metadata.jsonl` with `file_name` and `split`), encodes each with Pillow's
WebP and JPEG at several qualities, and prints a Markdown table: mean file size in bytes and PSNR over all pixel
values (the dVAE's `val_psnr`: one mean squared error over every value of every image).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_core.images import psnr

QUALITIES = (1, 5, 10, 20, 30, 50, 70, 90)


def val_images(folder: Path) -> list[np.ndarray]:
    """The imagefolder's val images as (H, W, 3) uint8 arrays, composited on white where they have alpha."""
    with open(folder / "metadata.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r.get("split") == "val"]
    if not rows:
        raise SystemExit(f"error: {folder}/metadata.jsonl has no rows with split 'val'")
    out = []
    for r in rows:
        with Image.open(folder / r["file_name"]) as im:
            rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out.append(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    return out


def codec_row(images: list[np.ndarray], fmt: str, quality: int) -> tuple[float, float]:
    """(mean bytes per image, PSNR in dB over all values) of `images` through `fmt` at `quality`."""
    sizes, sq_err, values = [], 0.0, 0
    for x in images:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, fmt, quality=quality)
        sizes.append(buf.tell())
        buf.seek(0)
        y = np.asarray(Image.open(buf).convert("RGB"))
        sq_err += float(((x.astype(np.float64) - y) / 255.0).__pow__(2).sum())
        values += x.size
    return float(np.mean(sizes)), psnr(sq_err / values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an imagefolder (e.g. data/openmoji-64)")
    args = parser.parse_args(argv)
    images = val_images(args.folder)
    print(f"{len(images)} val images of {args.folder}\n")
    print("| codec, quality | bytes per image | PSNR (dB) |\n|---|---|---|")
    for fmt in ("WEBP", "JPEG"):
        for q in QUALITIES:
            size, db = codec_row(images, fmt, q)
            print(f"| {fmt}, {q} | {size:.0f} | {db:.2f} |")


if __name__ == "__main__":
    main()
