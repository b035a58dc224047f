"""Captioned-image sources: the built-in shapes set, image folders, Parquet, hub datasets, webdataset.

Every source yields `Record`s; a record that cannot be used carries a `skip`
reason instead of an image, so bad data is counted, never fatal.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dalle_core import shapes
from dalle_core.config import DataConfig
from dalle_core.images import to_rgb_square

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class DataError(ValueError):
    """A source that cannot be read at all; one line."""


@dataclass
class Record:
    id: str
    caption: str
    split: str
    image: np.ndarray | None = None  # (S, S, 3) uint8 once decoded and cropped
    skip: str | None = None  # reason this record is not usable
    subset: str | None = None  # the source's own label for the row (e.g. unseen / seen-variant); evaluated apart


# What a source's own split column may say; anything else is an error naming the value.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "val"}


def split_of(record_id: str, val_fraction: float) -> str:
    """A stable train/val assignment from the id alone."""
    h = int(hashlib.sha1(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def _load_image(value, size: int) -> np.ndarray:
    """Accept PIL images, raw bytes, {"bytes", "path"} dicts or a file path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        with open(value, "rb") as f:
            value = f.read()
    if isinstance(value, (bytes, bytearray, memoryview)):
        im = Image.open(io.BytesIO(bytes(value)))
        im.load()
    elif isinstance(value, Image.Image):
        im = value
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    return np.asarray(to_rgb_square(im, size))


def _given_split(row: dict, cfg: DataConfig, where: str) -> tuple[str | None, str | None]:
    """(split, subset) from the row's own columns (data.split_column / data.subset_column), if it has them."""
    value, subset = row.get(cfg.split_column), row.get(cfg.subset_column)
    subset = None if subset is None else str(subset)
    if value is None:
        return None, subset
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise DataError(f"{where}: {cfg.split_column} {value!r} is not one of {', '.join(SPLIT_NAMES)}")
    return split, subset


def _record(rid: str, caption, image_value, cfg: DataConfig, split: str | None = None,
            subset: str | None = None) -> Record:
    caption = " ".join(str(caption or "").split())
    rec = Record(rid, caption, split or split_of(rid, cfg.val_fraction), subset=subset)
    if not caption:
        rec.skip = "empty_caption"
        return rec
    if image_value is None:
        rec.skip = "missing_file"
        return rec
    try:
        rec.image = _load_image(image_value, cfg.image_size)
    except FileNotFoundError:
        rec.skip = "missing_file"
    except Exception:  # PIL raises many types for broken files
        rec.skip = "corrupt_image"
    return rec


def _shapes(cfg: DataConfig) -> Iterator[Record]:
    s = cfg.shapes
    for rid, split, caption, image in shapes.generate(s.num_images, cfg.image_size, s.seed,
                                                      s.two_object_fraction, s.holdout, cfg.val_fraction):
        yield Record(rid, caption, split, image)


def _imagefolder(cfg: DataConfig) -> Iterator[Record]:
    """`metadata.jsonl`/`metadata.csv` (file_name + caption column), else `<stem>.txt` beside each image."""
    root = cfg.path
    if not os.path.isdir(root):
        raise DataError(f"data.path {root!r} is not a folder")
    meta_jsonl, meta_csv = os.path.join(root, "metadata.jsonl"), os.path.join(root, "metadata.csv")
    if os.path.exists(meta_jsonl) or os.path.exists(meta_csv):
        meta_name = os.path.basename(meta_jsonl if os.path.exists(meta_jsonl) else meta_csv)
        if os.path.exists(meta_jsonl):
            with open(meta_jsonl) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        else:
            with open(meta_csv, newline="") as f:
                rows = list(csv.DictReader(f))
        cap_col = cfg.caption_column if rows and cfg.caption_column in rows[0] else "text"
        for i, row in enumerate(rows):
            name = row.get("file_name", "")
            path = os.path.join(root, name)
            split, subset = _given_split(row, cfg, f"{meta_name} row {i + 1}")
            yield _record(name, row.get(cap_col), path if os.path.isfile(path) else None, cfg, split, subset)
        return
    files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTS))
    for path in files:
        rid = os.path.relpath(path, root)
        txt = os.path.splitext(path)[0] + ".txt"
        if not os.path.exists(txt):
            yield Record(rid, "", split_of(rid, cfg.val_fraction), skip="missing_file")
            continue
        with open(txt, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        yield _record(rid, lines[0] if lines else "", path, cfg)


def _from_datasets(ds, cfg: DataConfig, prefix: str, image_col: str, caption_col: str) -> Iterator[Record]:
    import datasets

    cols = set(ds.column_names or [])
    if cols and (image_col not in cols or caption_col not in cols):
        raise DataError(f"data source {prefix!r} has columns {sorted(cols)}; "
                        f"set data.image_column/data.caption_column (now {image_col!r}/{caption_col!r})")
    features = getattr(ds, "features", None) or {}
    if isinstance(features.get(image_col), datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: corrupt files are skipped
    for i, row in enumerate(ds):
        rid = str(row.get("id") or row.get("__key__") or f"{prefix}-{i:08d}")
        split, subset = _given_split(row, cfg, f"{prefix} row {i + 1}")
        yield _record(rid, row.get(caption_col), row.get(image_col), cfg, split, subset)


def _parquet(cfg: DataConfig) -> Iterator[Record]:
    import datasets

    files = sorted(glob.glob(os.path.join(cfg.path, "**", "*.parquet"), recursive=True)) \
        if os.path.isdir(cfg.path) else sorted(glob.glob(cfg.path))
    if not files:
        raise DataError(f"data.path {cfg.path!r} matches no .parquet files")
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    yield from _from_datasets(ds, cfg, "parquet", cfg.image_column, cfg.caption_column)


def _hf(cfg: DataConfig) -> Iterator[Record]:
    import datasets

    if os.path.isdir(cfg.path) and os.path.exists(os.path.join(cfg.path, "dataset_info.json")):
        ds = datasets.load_from_disk(cfg.path)
        ds = ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split, streaming=True)
    yield from _from_datasets(ds, cfg, cfg.path.rstrip("/").split("/")[-1], cfg.image_column, cfg.caption_column)


def _webdataset(cfg: DataConfig) -> Iterator[Record]:
    import datasets

    files = sorted(glob.glob(os.path.join(cfg.path, "*.tar"))) if os.path.isdir(cfg.path) else sorted(glob.glob(cfg.path))
    if not files:
        raise DataError(f"data.path {cfg.path!r} matches no .tar shards")
    ds = datasets.load_dataset("webdataset", data_files=files, split="train", streaming=True)
    feats = ds.features or {}
    image_col = next((c for c in ("png", "jpg", "jpeg", "webp") if c in feats), cfg.image_column)
    caption_col = next((c for c in ("txt", "caption", "text") if c in feats), cfg.caption_column)
    yield from _from_datasets(ds, cfg, "wds", image_col, caption_col)


SOURCES = {"shapes": _shapes, "imagefolder": _imagefolder, "parquet": _parquet, "hf": _hf, "webdataset": _webdataset}


def read_source(cfg: DataConfig) -> Iterator[Record]:
    """All records of the configured source, at most `max_images` of them usable."""
    usable = 0
    for rec in SOURCES[cfg.source](cfg):
        if cfg.max_images is not None and usable >= cfg.max_images:
            return
        usable += rec.skip is None
        yield rec
