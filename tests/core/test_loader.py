"""The input pipeline: disjoint rank shares, seeking on resume, the same stream with any worker count."""

import numpy as np
import pyarrow as pa
import pytest

from dalle_core.loader import ShardStream, StreamOrder, plan_epoch

GROUP_ROWS = (10, 10, 7)  # three row groups per shard, the last one short


class FakeShards:
    """Shards named "s0", "s1", ...; row i of group g of shard s has id "s/g/i". Picklable for workers."""

    def row_groups(self, path):
        return list(GROUP_ROWS)

    def read(self, path, group, columns):
        ids = [f"{path}/{group}/{i}" for i in range(GROUP_ROWS[group])]
        return pa.table({"id": ids, "x": np.arange(len(ids), dtype=np.int64) + 100 * group})


def decode(table):
    return {"id": np.array(table.column("id").to_pylist(), dtype=object), "x": table.column("x").to_numpy()}


def stream(paths, **kw):
    kw = {"batch_size": 4, "window_rows": 16, "seed": 3, **kw}
    return ShardStream(FakeShards(), paths, ["id", "x"], decode, kw.pop("batch_size"), StreamOrder(**kw))


def take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("shards,world", [(5, 2), (4, 4), (2, 3), (1, 4)])
def test_ranks_read_disjoint_rows_that_cover_the_data(shards, world):
    """Uneven shard counts, as many shards as ranks, fewer shards (row groups are split), fewer row
    groups than ranks (every rank takes every world-th row of each group)."""
    paths = [f"s{i}" for i in range(shards)]
    seen = [[r for b in stream(paths, rank=k, world=world, shuffle=False).batches() for r in b["id"]]
            for k in range(world)]
    everything = [f"{p}/{g}/{i}" for p in paths for g, n in enumerate(GROUP_ROWS) for i in range(n)]
    assert sorted(sum(seen, [])) == sorted(everything)  # every row, none twice across ranks
    assert all(seen)  # no rank is left without rows


@pytest.mark.parametrize("world", [1, 2])
def test_no_row_repeats_within_a_rank_epoch(world):
    s = stream([f"s{i}" for i in range(3)], rank=world - 1, world=world)
    per_epoch = sum(w.batches for w in plan_epoch(s.units, 0, s.seed, True, s.window_rows, s.batch_size))
    rows = [r for b in take(s.batches(), per_epoch) for r in b["id"]]
    assert len(rows) == len(set(rows)) and len(rows) >= s.rows - len(plan_epoch(s.units, 0, 3, True, 16, 4)) * 4
    nxt = [r for b in take(s.batches(), 2 * per_epoch)[per_epoch:] for r in b["id"]]
    assert nxt != rows  # the next epoch is shuffled anew


def test_resume_seeks_to_the_batch_where_training_stopped():
    paths = ["s0", "s1"]
    full = take(stream(paths).batches(), 20)  # crosses epoch boundaries (11 batches per epoch)
    for k in (0, 3, 11, 13):
        resumed = take(stream(paths, start_batch=k).batches(), 5)
        assert [b["id"] for b in resumed] == [b["id"] for b in full[k:k + 5]], k


def test_the_stream_is_the_same_with_worker_processes():
    paths = ["s0", "s1", "s2"]
    inline = take(stream(paths, start_batch=2).batches(workers=0), 25)
    workers = take(stream(paths, start_batch=2).batches(workers=2), 25)
    assert [b["id"] for b in workers] == [b["id"] for b in inline]
    assert all(np.array_equal(a["x"].numpy(), b["x"].numpy()) for a, b in zip(workers, inline))


def test_a_rank_with_fewer_rows_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="rank 0 of 1 has 27 rows, fewer than batch_size 32"):
        stream(["s0"], batch_size=32)
