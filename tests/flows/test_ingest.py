import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from PIL import Image

from dalle_core.images import decode_png
from data_sources.reader import DataError
from pipeline.config import load_config
from pipeline.stage_table import stage_keys
from storage.parquet import IMAGES_SCHEMA, read_shard, shard_paths
from tests.conftest import run_stage

N_GOOD = 20


def _image_bytes(i: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, size=(40 + i % 3, 50, 3), dtype=np.uint8)  # not square: resized + cropped
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _check_ingest(config, overrides, expect_skipped):
    ref = run_stage("ingest", overrides, config)
    cfg = load_config(config, overrides)
    store = cfg.store.open()
    m = store.manifest("ingest", ref.key)
    assert m is not None and not ref.cached
    assert sum(m["rows"].values()) == N_GOOD
    assert m["skipped"] == expect_skipped
    for split in ("train", "val"):
        for path in shard_paths(store, "ingest", ref.key, split):
            t = read_shard(store, path)
            assert t.schema.equals(IMAGES_SCHEMA)
            assert decode_png(t.column("image")[0].as_py()).shape == (32, 32, 3)
    return ref, cfg, store


def test_shapes_ingest_then_rerun_is_cached_and_tracked(tiny):
    config, ov = tiny
    ref = run_stage("ingest", ov(), config)
    cfg = load_config(config, ov())
    store = cfg.store.open()
    m = store.manifest("ingest", ref.key)
    assert ref.key == stage_keys(cfg)["ingest"]
    assert m["rows"] == {"train": 360, "val": 40} and m["skipped"] == {}
    assert len(shard_paths(store, "ingest", ref.key, "train")) == 3  # 128 rows per shard
    again = run_stage("ingest", ov(), config)
    assert again.cached and again.key == ref.key
    # The MLflow run is there with params, counts and a sample grid.
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("dalle")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'ingest' and tags.cached = 'false'")
    assert len(runs) == 1
    run = runs[0]
    # The rerun is a short `(cached)` run linked to the run that made the artifact.
    reused = client.search_runs([exp.experiment_id], "tags.stage = 'ingest' and tags.cached = 'true'")
    assert [r.data.tags["source_run_id"] for r in reused] == [run.info.run_id]
    assert run.data.tags["stage_key"] == ref.key and run.data.tags["prefect.flow_run_id"]
    assert run.data.params["shapes.num_images"] == "400"
    assert run.data.metrics["rows_train"] == 360
    assert "samples.png" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_imagefolder_txt_convention_skips_bad_rows(tiny, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(N_GOOD):
        fmt = "JPEG" if i % 2 else "PNG"
        (folder / f"img{i}.{fmt.lower()}").write_bytes(_image_bytes(i, fmt))
        (folder / f"img{i}.txt").write_text(f"caption number {i}\n")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("a broken image")
    (folder / "empty.png").write_bytes(_image_bytes(99))
    (folder / "empty.txt").write_text("   \n")
    (folder / "nocaption.png").write_bytes(_image_bytes(98))
    config, ov = tiny
    _check_ingest(config, ov("data.source=imagefolder", f"data.path={folder}", "data.val_fraction=0.3"),
                  {"corrupt_image": 1, "empty_caption": 1, "missing_file": 1})


def test_imagefolder_metadata_jsonl(tiny, tmp_path):
    folder = tmp_path / "meta"
    folder.mkdir()
    rows = []
    for i in range(N_GOOD):
        (folder / f"{i}.png").write_bytes(_image_bytes(i))
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (folder / "bad.png").write_bytes(b"garbage")
    rows += [{"file_name": "bad.png", "text": "bad"}, {"file_name": "gone.png", "text": "missing"},
             {"file_name": "0.png", "text": ""}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config, ov = tiny
    _check_ingest(config, ov("data.source=imagefolder", f"data.path={folder}", "data.val_fraction=0.3"),
                  {"corrupt_image": 1, "missing_file": 1, "empty_caption": 1})


def test_parquet_source_with_custom_columns(tiny, tmp_path):
    images = [_image_bytes(i) for i in range(N_GOOD)] + [b"corrupt", _image_bytes(50)]
    captions = [f"row {i}" for i in range(N_GOOD)] + ["corrupt", ""]
    pq.write_table(pa.table({"jpg": images, "txt": captions}), tmp_path / "data.parquet")
    config, ov = tiny
    _check_ingest(config, ov("data.source=parquet", f"data.path={tmp_path}/data.parquet", "data.image_column=jpg",
                             "data.caption_column=txt", "data.val_fraction=0.3"),
                  {"corrupt_image": 1, "empty_caption": 1})


def test_hf_source_from_local_path(tiny, tmp_path):
    import datasets

    images = [{"bytes": _image_bytes(i), "path": None} for i in range(N_GOOD)] + [{"bytes": b"bad", "path": None}]
    ds = datasets.Dataset.from_dict({"image": images, "caption": [f"hf {i}" for i in range(N_GOOD)] + ["x"]})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hfds"))
    config, ov = tiny
    _check_ingest(config, ov("data.source=hf", f"data.path={tmp_path}/hfds", "data.val_fraction=0.3"),
                  {"corrupt_image": 1})


def test_webdataset_tar_shards(tiny, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(N_GOOD):
            add(f"{i:04d}.png", _image_bytes(i))
            add(f"{i:04d}.txt", f"wds caption {i}".encode())
        add("9999.png", b"not a png")
        add("9999.txt", b"corrupt one")
    config, ov = tiny
    _check_ingest(config, ov("data.source=webdataset", f"data.path={shards}", "data.val_fraction=0.3"),
                  {"corrupt_image": 1})


def test_source_with_no_usable_rows_fails_clearly(tiny, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"junk")
    (folder / "a.txt").write_text("junk")
    config, ov = tiny
    with pytest.raises(DataError, match="yielded no usable images"):
        run_stage("ingest", ov("data.source=imagefolder", f"data.path={folder}"), config)


def test_changed_folder_is_ingested_again(tiny, tmp_path, caplog):
    """30 captioned images in an Excel "CSV UTF-8" metadata.csv (BOM); 30 more and one caption edited -> all 60
    rows with the new caption, and one line saying the source changed."""
    folder = tmp_path / "grow"
    folder.mkdir()

    def write(n: int, captions: dict[int, str]) -> None:
        for i in range(n):
            if not (folder / f"{i}.png").exists():
                (folder / f"{i}.png").write_bytes(_image_bytes(i))
        lines = ["file_name,caption"] + [f"{i}.png,{captions.get(i, f'picture {i}')}" for i in range(n)]
        (folder / "metadata.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))

    config, ov = tiny
    overrides = ov("data.source=imagefolder", f"data.path={folder}", "data.val_fraction=0.3")
    write(30, {})
    first = run_stage("ingest", overrides, config)
    store = (load_config(config, overrides)).store.open()
    assert sum(store.manifest("ingest", first.key)["rows"].values()) == 30
    write(60, {3: "an edited caption"})
    caplog.clear()
    second = run_stage("ingest", overrides, config)
    assert not second.cached and second.key != first.key
    m = store.manifest("ingest", second.key)
    assert sum(m["rows"].values()) == 60 and m["skipped"] == {}
    captions = {}
    for split in ("train", "val"):
        for path in shard_paths(store, "ingest", second.key, split):
            t = read_shard(store, path)
            captions.update(zip(t.column("id").to_pylist(), t.column("caption").to_pylist()))
    assert captions["3.png"] == "an edited caption" and captions["59.png"] == "picture 59"
    changed = [r.getMessage() for r in caplog.records if "changed since" in r.getMessage()]
    assert len(changed) == 1 and f"ingest/{first.key}" in changed[0]
