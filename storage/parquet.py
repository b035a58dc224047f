"""Parquet shards with explicit schemas: images, tokens and generations.

A shard is written whole (atomically) from one batch of rows and read back a
row group at a time, so memory is bounded by the shard size, not the dataset.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.store import ArtifactStore

ROW_GROUP = 1024

IMAGES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),  # PNG bytes
    pa.field("subset", pa.string()),  # the source's label for the row (e.g. unseen / seen-variant), else null
])

GENERATIONS_SCHEMA = pa.schema([
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("candidate", pa.int32(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),  # 0 = best by CLIP
    pa.field("clip_score", pa.float32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("image_tokens", pa.list_(pa.uint16())),  # the sampled codes (the dVAE decodes them to `image`)
    pa.field("prime", pa.string()),  # image completion: the prime image's file and its rows, else null
    # editing (priming too): the edit (prime, inpaint, outpaint, variations), its source image's file and sha256,
    # and the candidate's token mask in raster order, 1 = sampled, 0 = the source's code kept; else null
    pa.field("edit", pa.string()),
    pa.field("source", pa.string()),
    pa.field("mask", pa.string()),
])


def tokens_schema(grid_tokens: int, text_vocab: int) -> pa.Schema:
    """Token shards: text ids as uint16 (int32 when the vocab needs it), image codes as uint16."""
    text_type = pa.uint16() if text_vocab <= 65536 else pa.int32()
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("text_tokens", pa.list_(text_type), nullable=False),
        pa.field("image_tokens", pa.list_(pa.uint16(), grid_tokens), nullable=False),
    ])


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_shard(store: ArtifactStore, path: str, table: pa.Table, row_group_size: int = ROW_GROUP) -> int:
    """Write one shard atomically; returns bytes written. Same table, same bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd",
                   write_statistics=False, store_schema=True)
    return store.write_bytes(path, buf.getvalue())


def shard_paths(store: ArtifactStore, stage: str, key: str, split: str) -> list[str]:
    base = store.path(stage, key, split)
    return [f"{base}/{n}" for n in store.listdir(base) if n.startswith("part-") and n.endswith(".parquet")]


def read_shard(store: ArtifactStore, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole shard (memory-mapped when the store is local); a damaged one is a StoreError naming it."""
    with store.reading(path):
        if store.local:
            return pq.read_table(path, columns=columns, memory_map=True)
        with store.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)


def iter_batches(store: ArtifactStore, paths: list[str], columns: list[str] | None = None,
                 batch_size: int = ROW_GROUP) -> Iterator[pa.RecordBatch]:
    """Stream record batches over shards, one row group at a time."""
    for path in paths:
        with store.reading(path), store.fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


def count_rows(store: ArtifactStore, path: str) -> int:
    with store.reading(path), store.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def image_row_group(pixels: int) -> int:
    """Rows per row group of image shards of `pixels` (height x width) each: 1,024 at 32x32, fewer for big images
    (64 at 128x128 and up), so the input pipeline decodes a few MB per read, not a shard's worth."""
    return max(64, min(ROW_GROUP, ROW_GROUP * 32 * 32 // pixels))


class ParquetShards:
    """Row-group access to the shards of one store (the reader `dalle_core.loader.ShardStream` takes).

    Picklable, so DataLoader worker processes read the shards themselves.
    """

    def __init__(self, store: ArtifactStore):
        self.store = store
        self._groups: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def _file(self, path: str) -> Iterator[pq.ParquetFile]:
        """The shard, closed (and its store file with it) when the block ends."""
        if self.store.local:
            with pq.ParquetFile(path, memory_map=True) as f:
                yield f
        else:
            with self.store.fs.open(path, "rb") as raw, pq.ParquetFile(raw) as f:
                yield f

    def row_groups(self, path: str) -> list[int]:
        if path not in self._groups:
            with self.store.reading(path), self._file(path) as f:
                meta = f.metadata
            self._groups[path] = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return self._groups[path]

    def read(self, path: str, group: int, columns: list[str]) -> pa.Table:
        with self.store.reading(path), self._file(path) as f:
            return f.read_row_group(group, columns=columns)


def val_rows(store: ArtifactStore, ingest_key: str, limit: int, columns: tuple[str, ...] = ("caption",),
             distinct: bool = False) -> dict[str, list]:
    """`limit` val rows of `ingest/<ingest_key>`, taken in turn from each val subset (e.g. unseen, seen-variant;
    in the order the subsets first appear), each subset's in its stored order, so every subset is measured on a
    like share of the prompts; a source with one subset gets its first `limit` rows. `distinct`: a repeated
    caption is skipped. Returns the asked columns plus `subset` ("val" where the source has none)."""
    paths = shard_paths(store, "ingest", ingest_key, "val")
    per_subset: dict[str, list[int]] = {}
    seen: set[str] = set()
    index = 0
    for batch in iter_batches(store, paths, ["caption", "subset"]):  # every row: a subset may start late
        for caption, subset in zip(batch.column("caption").to_pylist(), batch.column("subset").to_pylist()):
            kept = per_subset.setdefault(subset, [])
            if not (distinct and caption in seen) and len(kept) < limit:
                kept.append(index)
                seen.add(caption)  # only a kept row's caption: a full subset's row takes no other's
            index += 1
    taken = [i for turn in itertools.zip_longest(*per_subset.values()) for i in turn if i is not None][:limit]
    cols = list(dict.fromkeys([*columns, "subset"]))
    rows: dict[int, dict] = {}
    index, wanted = 0, set(taken)
    for batch in iter_batches(store, paths, cols):
        here = sorted(i for i in wanted if index <= i < index + batch.num_rows)
        rows |= dict(zip(here, batch.take([i - index for i in here]).to_pylist()))
        index += batch.num_rows
        if len(rows) == len(wanted):
            break
    out = {c: [rows[i][c] for i in taken] for c in cols}
    out["subset"] = [s or "val" for s in out["subset"]]
    return out
