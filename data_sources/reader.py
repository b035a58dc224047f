"""Captioned-image sources: the built-in shapes set, image folders, Parquet, hub datasets, webdataset.

Every source yields `SourceRow`s; a row that cannot be used carries a `skip`
reason instead of an image, so bad data is counted, never fatal.
"""

from __future__ import annotations

import csv
import functools
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dalle_core.errors import UserError
from dalle_core.images import compact_size, size_hw, to_rgb_sized
from data_sources import shapes
from data_sources.shapes import COLOURS, SHAPES

Image.init()
# Pillow identifies these but cannot decode them on its own (stub plugins, video, Windows-only metafiles).

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as the run config's own sections


class ShapesSection(_Section):
    """The built-in procedural dataset (spec in data_sources/shapes.py)."""

    num_images: int = Field(20000, ge=2)
    seed: int = 0
    two_object_fraction: float = Field(0.3, ge=0, le=1)
    holdout: list[str] = []  # colour-shape pairs kept out of train, e.g. "purple triangle"
    colours: list[str] = []  # the palette scenes are drawn from, train and val (empty: all 8)

    @field_validator("holdout")
    @classmethod
    def _known_pairs(cls, pairs: list[str]) -> list[str]:
        for pair in pairs:
            parts = pair.split()
            if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
                raise ValueError(
                    f"{pair!r} is not '<colour> <shape>' with colour in {sorted(COLOURS)} "
                    f"and shape in {list(SHAPES)}"
                )
        return pairs

    @model_validator(mode="after")
    def _known_colours(self) -> ShapesSection:
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"data.shapes.colours: {unknown[0]!r} is not a colour; allowed: {', '.join(COLOURS)}")
        if self.two_object_fraction > 0 and len(set(self.colours)) == 1:
            raise ValueError(f"data.shapes.colours {self.colours} has one colour; two-object scenes need two "
                             "different ones (add one, or set two_object_fraction: 0)")
        return self


def _whole(value) -> bool:
    """A whole number (an int, or a float or string holding one), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        return float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


class DataSection(_Section):
    source: Literal["shapes", "imagefolder", "parquet", "hf", "webdataset"] = "shapes"
    path: str | None = None  # folder / files / hub name, per source
    split: str = "train"  # hub split for source=hf
    image_column: str = "image"
    caption_column: str = "caption"
    # A row's own split, where the source has one (train / val / validation / test; test is evaluated as val);
    # rows without it are split by a hash of their id (val_fraction). subset_column labels val rows (e.g.
    # unseen / seen-variant) so the evaluation reports each label apart.
    split_column: str = "split"
    subset_column: str = "subset"
    # an int for square images, or [height, width] (e.g. [32, 64]); each side at least 8 px
    image_size: int | tuple[int, int] = 32
    fit: Literal["crop", "pad"] = "crop"  # another shape is resized to cover and centre-cropped, or padded with black
    val_fraction: float = Field(0.05, gt=0, lt=1)
    shard_size: int = Field(4096, ge=1)  # rows per Parquet shard
    max_images: int | None = Field(None, ge=1)
    shapes: ShapesSection = ShapesSection()

    @field_validator("image_size", mode="before")
    @classmethod
    def _sides(cls, size):
        pair = isinstance(size, (list, tuple))
        sides = list(size) if pair else [size]
        if len(sides) != (2 if pair else 1) or not all(_whole(v) and int(float(v)) >= 8 for v in sides):
            raise ValueError("allowed: a whole number of pixels (e.g. 32) or [height, width] (e.g. [32, 64]), each "
                             "side at least 8")
        h, w = (int(float(v)) for v in (sides * 2)[:2])
        return compact_size(h, w)  # [32, 32] is 32: the same run, the same keys

    @property
    def image_hw(self) -> tuple[int, int]:
        """The images' (height, width) in pixels."""
        return size_hw(self.image_size)

    @model_validator(mode="after")
    def _path_needed(self) -> DataSection:
        if self.source != "shapes" and not self.path:
            raise ValueError(f"data.path is required for source {self.source!r}")
        return self

_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF"}
# Every extension Pillow can open: what an imagefolder picks up.
IMAGE_EXTS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                          if fmt in Image.OPEN and fmt not in _UNDECODABLE))
# Metadata files of an imagefolder, in the order `datasets` looks for them.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.tsv", "metadata.parquet")


class DataError(UserError):
    """A source that cannot be read at all; one line."""


@dataclass
class SourceRow:
    id: str
    caption: str
    split: str
    image: np.ndarray | None = None  # (H, W, 3) uint8 once decoded and brought to data.image_size
    skip: str | None = None  # reason this record is not usable
    subset: str | None = None  # the source's own label for the row (e.g. unseen / seen-variant); evaluated apart
    note: str | None = None  # what was left out of a usable record (e.g. the later frames of a multi-frame file)
    tried: str | None = None  # the image path looked for, when it was not there (missing_file)


# What a source's own split column may say; anything else is an error naming the value.
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "val"}


def split_of(record_id: str, val_fraction: float) -> str:
    """A stable train/val assignment from the id alone."""
    h = int(hashlib.sha1(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def _load_image(value, size: int | tuple[int, int], fit: str = "crop") -> tuple[np.ndarray, str | None]:
    """Accept PIL images, raw bytes, {"bytes", "path"} dicts or a file path; -> (pixels, note).

    Raises Pillow's errors for undecodable files, `Image.DecompressionBombError` for images over
    twice `Image.MAX_IMAGE_PIXELS`."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        with open(value, "rb") as f:
            value = f.read()
    if isinstance(value, (bytes, bytearray, memoryview)):
        im = Image.open(io.BytesIO(bytes(value)))
        if im.format in ("JPEG", "MPO"):
            side = max(size_hw(size))
            im.draft(None, (side, side))  # decode big JPEGs at 1/2..1/8 scale, still at least the size
        im.load()
    elif isinstance(value, Image.Image):
        im = value
    else:
        raise TypeError(f"unsupported image value of type {type(value).__name__}")
    notes = ["multi_frame_first_used"] if getattr(im, "n_frames", 1) > 1 else []
    h, w = size_hw(size)
    if abs(im.width * h - im.height * w) > max(h, w):  # another shape than the frame: say what was done to it
        notes.append(f"{'centre-cropped' if fit == 'crop' else 'padded'} to the {h}x{w} (height x width) frame "
                     f"(data.fit {fit})")
    return np.asarray(to_rgb_sized(im, size, fit)), "; ".join(notes) or None


def _given_split(row: dict, cfg: DataSection, where: str) -> tuple[str | None, str | None]:
    """(split, subset) from the row's own columns (data.split_column / data.subset_column), if it has them."""
    value, subset = row.get(cfg.split_column), row.get(cfg.subset_column)
    subset = None if subset is None else str(subset)
    if value is None:
        return None, subset
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise DataError(f"{where}: {cfg.split_column} {value!r} is not one of {', '.join(SPLIT_NAMES)}")
    return split, subset


def _record(rid: str, caption, image_value, cfg: DataSection, split: str | None = None,
            subset: str | None = None) -> SourceRow:
    caption = " ".join(str(caption or "").split())
    rec = SourceRow(rid, caption, split or split_of(rid, cfg.val_fraction), subset=subset)
    if not caption:
        rec.skip = "empty_caption"
        return rec
    if image_value is None:
        rec.skip = "missing_file"
        return rec
    try:
        rec.image, rec.note = _load_image(image_value, cfg.image_size, cfg.fit)
    except FileNotFoundError as err:
        rec.skip, rec.tried = "missing_file", err.filename
    except Image.DecompressionBombError:
        rec.skip = "too_large"
    except Exception:  # PIL raises many types for broken files
        rec.skip = "corrupt_image"
    return rec


def _shapes(cfg: DataSection) -> Iterator[SourceRow]:
    s = cfg.shapes
    for rid, split, caption, image in shapes.generate(s.num_images, cfg.image_size, s.seed,
                                                      s.two_object_fraction, s.holdout, cfg.val_fraction, s.colours):
        yield SourceRow(rid, caption, split, image)


def read_metadata(path: str) -> list[dict]:
    """The rows of an imagefolder metadata file (.jsonl, .csv, .tsv or .parquet), as `datasets` reads them.

    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped and header names are stripped; a .csv may
    be separated by commas, semicolons or tabs. Raises DataError for a file that is not UTF-8 or not
    valid JSON lines."""
    name = os.path.basename(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path} is not a readable Parquet file: {str(e).splitlines()[0]}") from None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if name.endswith(".jsonl"):
                rows = []
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path} line {i + 1} is not JSON: {e.msg}") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {i + 1} is a {type(row).__name__}, not a JSON object")
                    rows.append(row)
                return rows
            lines = f.read().splitlines(keepends=True)
            while lines and not lines[0].strip():  # blank lines before the header
                lines.pop(0)
            declared = lines[0].strip() if lines else ""
            if len(declared) == 5 and declared.lower().startswith("sep="):  # Excel's separator line
                delimiter = declared[4]
                lines.pop(0)
            else:
                try:  # Excel writes ";" where "," is the decimal mark
                    delimiter = csv.Sniffer().sniff(lines[0] if lines else "",
                                                    delimiters="\t" if name.endswith(".tsv") else ",;\t").delimiter
                except csv.Error:  # one column, or nothing to tell by
                    delimiter = "\t" if name.endswith(".tsv") else ","
            reader = csv.DictReader(io.StringIO("".join(lines)), delimiter=delimiter)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            return list(reader)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8 (Excel: \"CSV UTF-8\")") from None


def _metadata_columns(rows: list[dict], cfg: DataSection, where: str) -> str:
    """The caption column of metadata rows (data.caption_column, else `text`); DataError naming what is there."""
    cols = list(rows[0]) if rows else []
    cap_col = next((c for c in (cfg.caption_column, "text") if c in cols), None)
    if rows and ("file_name" not in cols or cap_col is None):
        raise DataError(f"{where} has columns {cols}; it needs file_name and a caption column "
                        f"(data.caption_column, now {cfg.caption_column!r}, or text)")
    return cap_col or cfg.caption_column


def _imagefolder(cfg: DataSection) -> Iterator[SourceRow]:
    """`metadata.{jsonl,csv,tsv,parquet}` (file_name + caption column), else `<stem>.txt` beside each image."""
    root = cfg.path
    if not os.path.isdir(root):
        raise DataError(f"data.path {root!r} is not a folder")
    meta = next((os.path.join(root, m) for m in METADATA_FILES if os.path.isfile(os.path.join(root, m))), None)
    if meta is not None:
        meta_name = os.path.basename(meta)
        rows = read_metadata(meta)
        cap_col = _metadata_columns(rows, cfg, meta)
        for i, row in enumerate(rows):
            name = str(row.get("file_name") or "")
            path = os.path.join(root, name)
            split, subset = _given_split(row, cfg, f"{meta_name} row {i + 1}")
            if name and os.path.isfile(path) and not name.lower().endswith(IMAGE_EXTS):
                yield SourceRow(name, "", split or split_of(name, cfg.val_fraction), skip="unsupported_format")
                continue
            rec = _record(name, row.get(cap_col), path if name and os.path.isfile(path) else None, cfg, split, subset)
            if rec.skip == "missing_file" and name:
                rec.tried = path
            yield rec
        return
    # an image file, or any other file with a caption beside it (a format Pillow cannot read: counted, not lost)
    files = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if os.path.isfile(p) and not p.lower().endswith(".txt")
                   and (p.lower().endswith(IMAGE_EXTS) or os.path.isfile(os.path.splitext(p)[0] + ".txt")))
    for path in files:
        rid = os.path.relpath(path, root)
        txt = os.path.splitext(path)[0] + ".txt"
        if not path.lower().endswith(IMAGE_EXTS):
            yield SourceRow(rid, "", split_of(rid, cfg.val_fraction), skip="unsupported_format")
            continue
        if not os.path.exists(txt):
            yield SourceRow(rid, "", split_of(rid, cfg.val_fraction), skip="missing_file")
            continue
        with open(txt, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        yield _record(rid, lines[0] if lines else "", path, cfg)


def _from_datasets(ds, cfg: DataSection, prefix: str, image_col: str, caption_col: str, start: int = 0,
                   base: str | None = None) -> Iterator[SourceRow]:
    """Rows of a `datasets` dataset; ids `<prefix>-<start + i>` where the row has none. `base`: the folder that
    relative image paths are relative to (that of the file naming them)."""
    import datasets

    cols = set(ds.column_names or [])
    if cols and (image_col not in cols or caption_col not in cols):
        raise DataError(f"data source {prefix!r} has columns {sorted(cols)}; "
                        f"set data.image_column/data.caption_column (now {image_col!r}/{caption_col!r})")
    features = getattr(ds, "features", None) or {}
    if isinstance(features.get(image_col), datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # decode ourselves: corrupt files are skipped
    for i, row in enumerate(ds, start):
        rid = str(row.get("id") or row.get("__key__") or f"{prefix}-{i:08d}")
        split, subset = _given_split(row, cfg, f"{prefix} row {i + 1}")
        yield _record(rid, row.get(caption_col), _relative_to(base, row.get(image_col)), cfg, split, subset)


def _relative_to(base: str | None, value):
    """An image value whose path is relative, as a path under `base` (a path with bytes beside it is read from
    the bytes)."""
    if base is None:
        return value
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.join(base, value)
    if isinstance(value, dict) and not value.get("bytes") and isinstance(value.get("path"), str) \
            and not os.path.isabs(value["path"]):
        return {**value, "path": os.path.join(base, value["path"])}
    return value


def _parquet_files(cfg: DataSection) -> list[str]:
    return sorted(glob.glob(os.path.join(cfg.path, "**", "*.parquet"), recursive=True)) \
        if os.path.isdir(cfg.path) else sorted(glob.glob(cfg.path))


def _tar_files(cfg: DataSection) -> list[str]:
    return sorted(glob.glob(os.path.join(cfg.path, "*.tar"))) if os.path.isdir(cfg.path) else sorted(glob.glob(cfg.path))


def _parquet(cfg: DataSection) -> Iterator[SourceRow]:
    import datasets

    files = _parquet_files(cfg)
    if not files:
        raise DataError(f"data.path {cfg.path!r} matches no .parquet files")
    start = 0
    for path in files:  # one file at a time: its image paths are relative to its own folder
        ds = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True)
        for rec in _from_datasets(ds, cfg, "parquet", cfg.image_column, cfg.caption_column, start,
                                  os.path.dirname(os.path.abspath(path))):
            start += 1
            yield rec


def _hf(cfg: DataSection) -> Iterator[SourceRow]:
    import datasets

    if os.path.isdir(cfg.path) and os.path.exists(os.path.join(cfg.path, "dataset_info.json")):
        ds = datasets.load_from_disk(cfg.path)
        ds = ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split, streaming=True)
    yield from _from_datasets(ds, cfg, cfg.path.rstrip("/").split("/")[-1], cfg.image_column, cfg.caption_column)


def _webdataset(cfg: DataSection) -> Iterator[SourceRow]:
    import datasets

    files = _tar_files(cfg)
    if not files:
        raise DataError(f"data.path {cfg.path!r} matches no .tar shards")
    ds = datasets.load_dataset("webdataset", data_files=files, split="train", streaming=True)
    feats = ds.features or {}
    image_col = next((c for c in ("png", "jpg", "jpeg", "webp") if c in feats), cfg.image_column)
    caption_col = next((c for c in ("txt", "caption", "text") if c in feats), cfg.caption_column)
    yield from _from_datasets(ds, cfg, "wds", image_col, caption_col)


def source_fingerprint(cfg: DataSection) -> str | None:
    """A digest of what the configured source holds now, cheap enough for every stage-key computation.

    Local files: each file's path (relative to data.path), size and mtime, with the content of an
    imagefolder's metadata file; image bytes are never read. A hub dataset name (source hf): its current
    revision, when the hub answers. None for the shapes source (its config says all) and for a hub name
    the hub cannot resolve (offline), so the key is then the config's alone. 16 hex digits."""
    if cfg.source == "shapes":
        return None
    if cfg.source == "imagefolder":
        if not os.path.isdir(cfg.path):
            return None  # reading it raises the error
        picked = IMAGE_EXTS + (".txt", *METADATA_FILES)
        files = [p for p in _walk(cfg.path) if p.lower().endswith(picked)]
    elif cfg.source == "parquet":
        files = _parquet_files(cfg)
    elif cfg.source == "webdataset":
        files = _tar_files(cfg)
    elif os.path.exists(cfg.path):  # hf: a save_to_disk folder, or a local dataset script/data folder
        files = list(_walk(cfg.path)) if os.path.isdir(cfg.path) else [cfg.path]
    else:
        revision = _hub_revision(cfg.path)
        return None if revision is None else hashlib.sha256(revision.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    base = cfg.path if os.path.isdir(cfg.path) else ""
    for path in sorted(files):
        st = os.stat(path)
        h.update(json.dumps([os.path.relpath(path, base) if base else path, st.st_size, st.st_mtime_ns]).encode())
        if os.path.basename(path) in METADATA_FILES:  # captions can change within one mtime tick
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _walk(root: str) -> Iterator[str]:
    for folder, dirs, names in os.walk(root, followlinks=True):  # glob, which reads them, follows links too
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .cache, .git: not the data
        for name in names:
            if not name.startswith("."):
                yield os.path.join(folder, name)


@functools.lru_cache(maxsize=8)
def _hub_revision(name: str) -> str | None:
    """The commit a hub dataset name resolves to now; looked up once per process, so all stages of a run agree."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, timeout=10).sha
    except Exception:  # offline, unknown name, no hub client: the key falls back to the config alone
        return None


SOURCES = {"shapes": _shapes, "imagefolder": _imagefolder, "parquet": _parquet, "hf": _hf, "webdataset": _webdataset}


def read_source(cfg: DataSection) -> Iterator[SourceRow]:
    """All records of the configured source, at most `max_images` of them usable."""
    usable = 0
    for rec in SOURCES[cfg.source](cfg):
        if cfg.max_images is not None and usable >= cfg.max_images:
            return
        usable += rec.skip is None
        yield rec
