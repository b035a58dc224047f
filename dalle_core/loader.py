"""The one input pipeline: Parquet shards -> shuffled batches, for image stages and token stages alike.

Shards are read a row group at a time ("units"). Each DDP rank takes a disjoint share of the
units (whole shards when there are at least as many shards as ranks, else row groups, else
interleaved rows of every row group), so every row is seen at most once per epoch of a rank.

An epoch is a seeded permutation of the rank's units, cut into *windows* of about
`window_rows` rows. A window is decoded whole (PNG decode runs here, in DataLoader worker
processes when there are any), its rows permuted, and cut into full batches. Window k of
the sequence goes to worker k % num_workers; the DataLoader hands items back round-robin,
so the batch stream is the same with 0, 1 or 8 workers. Every window's batch count is
known from the Parquet metadata alone, so a resumed run seeks straight to the window and
batch where it stopped instead of replaying what it consumed. Memory is bounded by
`window_rows` decoded rows per worker in flight, never by a shard or a dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dalle_core.images import decode_png

Decode = Callable[[pa.Table], dict[str, np.ndarray]]


class ShardReader(Protocol):
    """What the pipeline needs from storage (implemented by `storage.parquet.ParquetShards`)."""

    def row_groups(self, path: str) -> list[int]:
        """Rows in each row group of the shard."""

    def read(self, path: str, group: int, columns: list[str]) -> pa.Table:
        """One row group."""


@dataclass(frozen=True)
class Unit:
    """Rows r of one row group with r % parts == part."""

    path: str
    group: int
    rows: int
    part: int = 0
    parts: int = 1

    @property
    def size(self) -> int:
        return len(range(self.part, self.rows, self.parts))


@dataclass(frozen=True)
class Window:
    epoch: int
    index: int
    units: tuple[Unit, ...]
    batches: int  # full batches when shuffling; all rows (last batch partial) otherwise


def rank_units(reader: ShardReader, paths: list[str], rank: int, world: int) -> list[Unit]:
    """This rank's share of the shards' row groups: its own whole shards when there are at least as many
    shards as ranks (it then reads only those files); else row groups round-robin; and with fewer row
    groups than ranks, every world-th row of each group."""
    whole_shards = world == 1 or len(paths) >= world
    mine = paths[rank::world] if whole_shards else paths
    units = [Unit(p, g, n) for p in mine for g, n in enumerate(reader.row_groups(p)) if n]
    if whole_shards:
        return units
    if len(units) >= world:
        return units[rank::world]
    return [Unit(u.path, u.group, u.rows, rank, world) for u in units]


def plan_epoch(units: list[Unit], epoch: int, seed: int, shuffle: bool, window_rows: int,
               batch_size: int) -> list[Window]:
    """The windows of one epoch, in order."""
    order = units
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        order = [units[i] for i in rng.permutation(len(units))]
    groups: list[list[Unit]] = []
    current: list[Unit] = []
    rows = 0
    for u in order:
        current.append(u)
        rows += u.size
        if not shuffle or rows >= window_rows:
            groups.append(current)
            current, rows = [], 0
    if current:
        groups.append(current)
    out = []
    for i, g in enumerate(groups):
        n = sum(u.size for u in g)
        out.append(Window(epoch, i, tuple(g), n // batch_size if shuffle else math.ceil(n / batch_size)))
    return out


@dataclass(frozen=True)
class StreamOrder:
    """Which rows a `ShardStream` yields, in what order: shuffled within windows of `window_rows` rows by `seed`
    (training) or in shard order (evaluation: `IN_ORDER`); rank `rank` of `world`'s share; from its
    `start_batch`-th batch on; for `epochs` passes (None: endless when shuffled, else one)."""

    shuffle: bool = True
    seed: int = 0
    window_rows: int = 4096
    rank: int = 0
    world: int = 1
    start_batch: int = 0
    epochs: int | None = None


IN_ORDER = StreamOrder(shuffle=False)


class ShardStream(IterableDataset):
    """Batches of decoded rows from Parquet shards (see the module docstring), in `order` (StreamOrder).

    Iterating it yields one item per window: {"batches": n, "data": {column: tensor or list}}
    with the window's rows already permuted; `batches()` cuts those into batches.
    """

    def __init__(self, reader: ShardReader, paths: list[str], columns: list[str], decode: Decode,
                 batch_size: int, order: StreamOrder = StreamOrder()):
        if not paths:
            raise ValueError("no shards to read")
        self.reader, self.columns, self.decode = reader, columns, decode
        self.batch_size, self.shuffle, self.seed = batch_size, order.shuffle, order.seed
        self.window_rows = max(order.window_rows, batch_size)
        self.epochs = order.epochs if order.epochs is not None else (None if order.shuffle else 1)
        self.units = rank_units(reader, paths, order.rank, order.world)
        self.rows = sum(u.size for u in self.units)
        if order.shuffle and self.rows < batch_size:
            raise ValueError(f"rank {order.rank} of {order.world} has {self.rows} rows, fewer than batch_size "
                             f"{batch_size}")
        self.start = self._seek(order.start_batch)

    def _seek(self, start_batch: int) -> tuple[int, int, int]:
        """(epoch, window, batch within it) of the `start_batch`-th batch of the stream."""
        epoch, left = 0, start_batch
        while True:
            plan = plan_epoch(self.units, epoch, self.seed, self.shuffle, self.window_rows, self.batch_size)
            total = sum(w.batches for w in plan)
            if left < total or (self.epochs is not None and epoch + 1 >= self.epochs):
                for w in plan:
                    if left < w.batches:
                        return epoch, w.index, left
                    left -= w.batches
                return epoch, len(plan), 0  # past the end of a finite stream
            left -= total
            epoch += 1

    def windows(self) -> Iterator[Window]:
        """Every window from the start position on."""
        epoch, first, _ = self.start
        while self.epochs is None or epoch < self.epochs:
            plan = plan_epoch(self.units, epoch, self.seed, self.shuffle, self.window_rows, self.batch_size)
            yield from plan[first:]
            first, epoch = 0, epoch + 1

    def load(self, window: Window) -> dict[str, Any]:
        """Decode a window's rows, permute them (training) and keep whole batches."""
        parts: list[dict[str, np.ndarray]] = []
        for u in window.units:
            table = self.reader.read(u.path, u.group, self.columns)
            if u.parts > 1:
                table = table.take(pa.array(np.arange(u.part, u.rows, u.parts)))
            parts.append(self.decode(table))
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        keep = window.batches * self.batch_size
        if self.shuffle:
            perm = np.random.default_rng([self.seed, window.epoch, window.index, 1]).permutation(len(next(iter(data.values()))))
            data = {k: v[perm[:keep]] for k, v in data.items()}
        out = {k: (torch.from_numpy(np.ascontiguousarray(v)) if v.dtype != object else v.tolist())
               for k, v in data.items()}
        return {"batches": window.batches, "data": out}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for j, window in enumerate(self.windows()):
            if j % workers == worker:  # the DataLoader collects workers round-robin: order is kept
                yield self.load(window) if window.batches else {"batches": 0, "data": {}}

    def batches(self, workers: int = 0, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
        """Batches as dicts of tensors (and lists for text columns), from `workers` decode processes."""
        loader = DataLoader(self, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                            prefetch_factor=2 if workers else None, persistent_workers=False)
        skip = self.start[2]
        B = self.batch_size
        for item in loader:
            for i in range(skip, item["batches"]):
                yield {k: v[i * B:(i + 1) * B] for k, v in item["data"].items()}
            skip = 0


# ------------------------------------------------------- what a row group decodes to


def decode_images(table: pa.Table) -> dict[str, np.ndarray]:
    """Image shard rows -> {"image": (n, H, W, 3) uint8, "caption": (n,) str if read}; runs in loader workers."""

    out = {"image": np.stack([decode_png(b) for b in table.column("image").to_pylist()])}
    if "caption" in table.column_names:
        out["caption"] = np.array(table.column("caption").to_pylist(), dtype=object)
    return out


class DecodeCaptioned:
    """Image rows plus their captions as fixed-length BPE ids ("text"), for CLIP; picklable for workers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        out = decode_images(table)
        out["text"], _ = self.tokenizer.encode(list(out.pop("caption")))
        return out


def decode_tokens(table: pa.Table) -> dict[str, np.ndarray]:
    """Token shard rows -> {"text": (n, text_len), "image": (n, h*w)} int64 ids."""
    n = table.num_rows
    return {k: table.column(col).combine_chunks().flatten().to_numpy().astype(np.int64).reshape(n, -1)
            for k, col in (("text", "text_tokens"), ("image", "image_tokens"))}
