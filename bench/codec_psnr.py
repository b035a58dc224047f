"""How many bytes a general image codec needs for a PSNR on a data set's val images: the yardstick for the
image tokenizer's PSNR at a token grid, which carries cells x log2(codebook size) bits per image
(docs/results.md, "The tokenizer's PSNR at 8x").

    python -m bench.codec_psnr data/openmoji-64 [--size 64]

Reads the val rows of an imagefolder (`metadata.jsonl` with `file_name` and `split`) as the pipeline does (a
viewer's sRGB, shorter side resized to `--size` and centre-cropped: `dalle_core.generate.load_image`), encodes
each with Pillow's WebP and JPEG at several qualities, and prints a Markdown table: mean file size in bytes and
PSNR over all pixel values (the dVAE's `val_psnr`: one mean squared error over every value of every image).
Bad input is one line (`error: ...`) naming the file and row.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_core.generate import load_image
from dalle_core.images import psnr
from dalle_core.sampling import GenerationError
from data_sources.reader import DataError, read_metadata

QUALITIES = (0, 1, 5, 10, 20, 30, 50, 70, 90)


def val_images(folder: Path, size: int) -> list[np.ndarray]:
    """The imagefolder's val images as (size, size, 3) uint8 arrays. SystemExit (one line) for a missing folder
    or metadata.jsonl, a row that is not a JSON object with `file_name`, an unreadable image, or no val rows."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise SystemExit(f"error: {meta} does not exist; give an imagefolder (images + metadata.jsonl)")
    try:
        rows = read_metadata(str(meta))  # the pipeline's reader: one line for a bad row
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    out = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("file_name"), str):
            raise SystemExit(f"error: {meta} row {n} has no file_name")
        if row.get("split") == "val":
            try:
                out.append(load_image(str(folder / row["file_name"]), size, what=f"row {n}'s image"))
            except GenerationError as err:
                raise SystemExit(f"error: {meta}: {err}") from None
    if not out:
        raise SystemExit(f"error: {meta} has no rows with split 'val'")
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
    parser.add_argument("--size", type=int, default=64, help="image side in px, as data.image_size (default 64)")
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size {args.size}: give a positive number of pixels")
    images = val_images(args.folder, args.size)
    print(f"{len(images)} val images of {args.folder} at {args.size} px\n")
    print("| codec, quality | bytes per image | PSNR (dB) |\n|---|---|---|")
    for fmt in ("WEBP", "JPEG"):
        for q in QUALITIES:
            size, db = codec_row(images, fmt, q)
            print(f"| {fmt}, {q} | {size:.0f} | {db:.2f} |")


if __name__ == "__main__":
    main()
