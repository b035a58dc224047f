import json
import os
import posixpath
import subprocess
import sys

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from storage.parquet import (
    IMAGES_SCHEMA,
    read_shard,
    shard_name,
    shard_paths,
    tokens_schema,
    write_shard,
)
from storage.store import ArtifactStore, StoreError, content_key


def test_key_ignores_dict_order_and_float_spelling():
    a = content_key({"lr": 0.001, "n": 1, "sub": {"x": 1.0, "y": [1, 2]}}, {"ingest": "abc"})
    b = content_key({"sub": {"y": [1, 2], "x": 1}, "n": 1.0, "lr": 1e-3}, {"ingest": "abc"})
    assert a == b and len(a) == 12
    assert content_key({"lr": 0.002}) != content_key({"lr": 0.001})
    assert content_key({}, {"ingest": "abc"}) != content_key({}, {"ingest": "abd"})


def test_key_stable_across_processes():
    code = "from storage.store import content_key; print(content_key({'b': 2.5, 'a': [1, 'x']}, {'i': 'k'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == content_key({"a": [1, "x"], "b": 2.5}, {"i": "k"})


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "store"))
        return
    s = ArtifactStore(f"memory://test-{os.getpid()}-{id(tmp_path)}")
    yield s
    if s.fs.exists(s.root):
        s.fs.rm(s.root, recursive=True)


def test_manifest_written_last_marks_complete(store):
    assert not store.is_complete("dvae", "k1")
    store.write_bytes(store.path("dvae", "k1", "model.safetensors"), b"x" * 10)
    assert not store.is_complete("dvae", "k1") and store.manifest("dvae", "k1") is None
    m = store.finish("dvae", "k1", config={"a": 1}, inputs={"ingest": "i"}, rows={"train": 3})
    assert store.is_complete("dvae", "k1")
    assert m["files"] == {"model.safetensors": 10} and m["size"] == 10
    assert m["config"] == {"a": 1} and m["inputs"] == {"ingest": "i"} and m["rows"] == {"train": 3}
    assert {"created", "code_version"} <= set(m)
    assert store.manifest("dvae", "k1") == json.loads(json.dumps(m))


def test_interrupted_write_leaves_no_manifest_and_is_cleaned(store):
    # A killed writer leaves a temporary file; the artifact stays incomplete.
    store.write_bytes(store.path("pretokenize", "k", "train", shard_name(0)), b"done")
    tmp = store.path("pretokenize", "k", "train", ".tmp-dead-part-00001.parquet")
    store.fs.makedirs(os.path.dirname(tmp), exist_ok=True)
    with store.fs.open(tmp, "wb") as f:
        f.write(b"half")
    assert not store.is_complete("pretokenize", "k")
    assert list(store.files("pretokenize", "k")) == ["train/part-00000.parquet"]
    store.prepare("pretokenize", "k")
    assert not store.exists(tmp)  # leftovers gone ...
    assert store.exists(store.path("pretokenize", "k", "train", shard_name(0)))  # ... finished parts kept
    infos = store.artifacts()
    assert [(a.stage, a.key, a.complete) for a in infos] == [("pretokenize", "k", False)]


def test_artifacts_lists_the_stages_asked_for(store):
    # `dalle status`/`gc` ask for the stages and the retired folders of older stores (`tokens/` ...), not `notes/`.
    _finished(store, "tokens", "old")
    _finished(store, "pretokenize", "new")
    store.write_bytes(posixpath.join(store.root, "notes", "k", "x.txt"), b"not a stage")
    store.write_bytes(posixpath.join(store.root, "mlartifacts", "0", "r", "x.txt"), b"MLflow's")
    assert sorted((a.stage, a.key, a.complete) for a in store.artifacts(["pretokenize", "tokens"])) == [
        ("pretokenize", "new", True), ("tokens", "old", True)]
    assert {a.stage for a in store.artifacts()} == {"pretokenize", "tokens", "notes"}


def test_missing_upstream_is_one_line(store):
    with pytest.raises(StoreError, match=r"missing upstream artifact dvae/nokey"):
        store.require("dvae", "nokey")


class ReadOnlyMemory(MemoryFileSystem):
    """The shared in-memory filesystem, seen through a mount that refuses every write (as a read-only bucket
    or a read-only mount does; tests run as root, which ignores file permissions)."""

    protocol = "romem"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("romem://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode:
            raise PermissionError(13, "Read-only file system")
        return super()._open(path, mode, **kwargs)

    def makedirs(self, path, exist_ok=False):
        raise PermissionError(13, "Read-only file system")

    def mv(self, *args, **kwargs):
        raise PermissionError(13, "Read-only file system")


def test_read_only_store_is_a_clear_error_and_loses_nothing():
    fsspec.register_implementation("romem", ReadOnlyMemory, clobber=True)
    writable = ArtifactStore("memory://ro-test")
    writable.write_bytes(writable.path("dvae", "k", "model.safetensors"), b"weights")
    writable.finish("dvae", "k", config={}, inputs={})
    before = {p: writable.read_bytes(p) for p in writable.fs.find(writable.path("dvae", "k"))}
    ro = ArtifactStore("romem://ro-test")
    assert ro.is_complete("dvae", "k")  # reading works
    with pytest.raises(StoreError) as err:
        ro.write_bytes(ro.path("dvae", "k", "model.safetensors"), b"other weights")
    assert str(err.value) == "cannot write 'romem://ro-test/dvae/k/model.safetensors': Read-only file system"
    with pytest.raises(StoreError, match="^cannot write .*manifest.json': Read-only file system$"):
        ro.finish("pretokenize", "k2", config={}, inputs={})
    assert {p: writable.read_bytes(p) for p in writable.fs.find(writable.path("dvae", "k"))} == before
    assert not writable.exists(writable.path("pretokenize", "k2"))


def test_parquet_shards_round_trip_with_schema(store):
    table = pa.Table.from_pylist([{"id": "a", "caption": "c", "image": b"png"}] * 5, schema=IMAGES_SCHEMA)
    path = store.path("ingest", "k", "train", shard_name(0))
    write_shard(store, path, table, row_group_size=2)
    assert shard_paths(store, "ingest", "k", "train") == [path]
    back = read_shard(store, path)
    assert back.schema.equals(IMAGES_SCHEMA) and back.num_rows == 5
    # Same table, same bytes.
    write_shard(store, path + "2", table, row_group_size=2)
    assert store.read_bytes(path) == store.read_bytes(path + "2")


def test_token_schema_types(tmp_path):
    schema = tokens_schema(64, 1000)
    assert schema.field("image_tokens").type == pa.list_(pa.uint16(), 64)
    assert schema.field("text_tokens").type == pa.list_(pa.uint16())
    assert tokens_schema(64, 70000).field("text_tokens").type == pa.list_(pa.int32())
    store = ArtifactStore(str(tmp_path))
    t = pa.Table.from_pylist([{"id": "a", "caption": "c", "text_tokens": [1, 2], "image_tokens": list(range(64))}],
                             schema=schema)
    write_shard(store, store.path("pretokenize", "k", "train", shard_name(0)), t)
    ds = pads.dataset(store.path("pretokenize", "k", "train"), format="parquet")
    assert ds.to_table().column("image_tokens").to_pylist()[0] == list(range(64))


# ------------------------------------------------------------- damaged artifacts

def _finished(store, stage="dvae", key="k", data=b"w" * 10):
    store.write_bytes(store.path(stage, key, "model.safetensors"), data)
    return store.finish(stage, key, config={}, inputs={})


def test_invalid_manifest_json_is_damaged_and_redone_not_reused(store):
    _finished(store, "pretokenize")
    with store.fs.open(store.path("pretokenize", "k", "manifest.json"), "wb") as f:
        f.write(b'{"stage": "tok')  # cut off mid-write by a full disk or a copy
    assert not store.is_complete("pretokenize", "k")
    with pytest.raises(StoreError) as err:
        store.require("pretokenize", "k")
    assert "\n" not in str(err.value)
    assert "pretokenize/k" in str(err.value) and "manifest.json is not valid JSON" in str(err.value)
    assert "`dalle run --force pretokenize`" in str(err.value)
    assert [(a.stage, a.key, a.state) for a in store.artifacts()] == [("pretokenize", "k", "DAMAGED")]
    assert store.begin("pretokenize", "k") is None  # not reused: claimed, to be redone
    try:
        assert not store.exists(store.path("pretokenize", "k"))
        (aside,) = [a for a in store.artifacts()]
        assert aside.key.startswith("k.damaged-") and aside.state == "DAMAGED"
        assert store.exists(store.path("pretokenize", aside.key, "model.safetensors"))  # evidence kept
    finally:
        store.release("pretokenize", "k")


def test_file_of_another_size_is_damaged_at_reuse(store):
    _finished(store)
    store.write_bytes(store.path("dvae", "k", "model.safetensors"), b"w" * 4)  # truncated
    assert store.check("dvae", "k")[:2] == ("damaged", "model.safetensors is 4 bytes, the manifest recorded 10")
    store.fs.rm(store.path("dvae", "k", "model.safetensors"))
    assert store.check("dvae", "k")[:2] == ("damaged", "model.safetensors is missing")
    assert store.begin("dvae", "k") is None
    store.release("dvae", "k")


def test_verify_finds_a_changed_byte_that_sizes_miss(store):
    _finished(store, data=b"0123456789")
    store.write_bytes(store.path("dvae", "k", "model.safetensors"), b"0123456780")
    assert store.check("dvae", "k")[0] == "complete"
    assert store.check("dvae", "k", verify=True)[:2] == ("damaged",
                                                         "model.safetensors does not match its recorded sha256")


def test_artifact_made_from_a_redone_input_is_not_reused(store):
    _finished(store, "dvae")
    store.write_bytes(store.path("pretokenize", "t", "train", shard_name(0)), b"codes")
    store.finish("pretokenize", "t", config={}, inputs={"dvae": "k"})
    assert store.is_complete("pretokenize", "t")
    store.remove("dvae", "k")
    _finished(store, "dvae")  # redone: another dVAE under the same key
    assert store.check("pretokenize", "t")[:2] == ("damaged", "made from an earlier dvae/k (it was redone)")


def test_finish_never_rewrites_a_complete_artifact(store):
    first = _finished(store)
    store.write_bytes(store.path("dvae", "k", "model.safetensors"), b"other run!")
    with pytest.raises(StoreError, match=r"^dvae/k is already complete in store .*never rewritten$"):
        store.finish("dvae", "k", config={}, inputs={})
    assert store.manifest("dvae", "k") == first


def test_truncated_parquet_shard_is_one_line_naming_file_and_stage(store):
    from storage.parquet import ParquetShards, count_rows, iter_batches

    schema = tokens_schema(4, 100)
    table = pa.Table.from_pylist([{"id": "a", "caption": "c", "text_tokens": [1], "image_tokens": [1, 2, 3, 4]}],
                                 schema=schema)
    path = store.path("pretokenize", "k", "train", shard_name(0))
    write_shard(store, path, table)
    data = store.read_bytes(path)
    with store.fs.open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    for read in (lambda: read_shard(store, path), lambda: count_rows(store, path),
                 lambda: list(iter_batches(store, [path])), lambda: ParquetShards(store).row_groups(path)):
        with pytest.raises(StoreError) as err:
            read()
        msg = str(err.value)
        assert "\n" not in msg and store.uri(path) in msg and "(pretokenize artifact)" in msg
        assert "ArrowInvalid" in msg and "`dalle run --force pretokenize`" in msg
