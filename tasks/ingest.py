"""The ingest stage: a captioned-image source -> `ingest/<key>/{train,val}/part-*.parquet`."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.images import grid, png_bytes
from data_sources.reader import DataError, read_source, source_fingerprint
from pipeline.artifacts import ArtifactRef, Work, run_name, run_stage
from pipeline.config import Config
from pipeline.logs import log, progress
from storage.parquet import IMAGES_SCHEMA, image_row_group, shard_name, write_shard

SPLITS = ("train", "val")


@task(name="ingest", task_run_name=run_name("ingest"), cache_policy=NONE)
def ingest(cfg: Config) -> ArtifactRef:
    """Read the configured captioned-image source into `ingest/<key>/{train,val}/part-*.parquet`."""
    return run_stage(cfg, "ingest", {}, _ingest, params=cfg.data.model_dump(mode="json"))


def _ingest(w: Work) -> dict:
    cfg, store, key, run = w.cfg, w.store, w.key, w.run
    fingerprint = source_fingerprint(cfg.data)
    if earlier := _earlier_ingest(store, cfg, key):
        log.info("data source %s at %r changed since ingest/%s was made from it; ingesting it again into "
                 "ingest/%s", cfg.data.source, cfg.data.path, earlier, key)
    buffers: dict[str, list] = {s: [] for s in SPLITS}
    shards: dict[str, int] = dict.fromkeys(SPLITS, 0)
    rows: Counter = Counter()
    skipped: Counter = Counter()
    notes: Counter = Counter()
    subsets: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    samples: list = []
    meter = progress("ingest", cfg.data.shapes.num_images if cfg.data.source == "shapes" else cfg.data.max_images,
                     "images")

    def flush(split: str) -> None:
        buf = buffers[split]
        if not buf:
            return
        table = pa.Table.from_pylist(buf, schema=IMAGES_SCHEMA)
        write_shard(store, w.path(split, shard_name(shards[split])), table, image_row_group(math.prod(cfg.data.image_hw)))
        shards[split] += 1
        buf.clear()

    for rec in read_source(cfg.data):
        meter.update()
        if rec.skip:
            skipped[rec.skip] += 1
            if len(examples[rec.skip]) < 5:
                examples[rec.skip].append(rec.tried or rec.id)  # a missing file: the path looked for
            continue
        buffers[rec.split].append({"id": rec.id, "caption": rec.caption, "image": png_bytes(rec.image),
                                   "subset": rec.subset})
        rows[rec.split] += 1
        if rec.note:
            notes[rec.note] += 1
        if rec.subset is not None:
            subsets[f"{rec.split}.{rec.subset}"] += 1
        if len(samples) < 16:
            samples.append((rec.image, rec.caption))
        if len(buffers[rec.split]) >= cfg.data.shard_size:
            flush(rec.split)
    meter.close()
    for split in SPLITS:
        flush(split)

    for reason, n in skipped.items():
        log.warning("skipped %d rows: %s (e.g. %s)", n, reason, ", ".join(examples[reason]))
    for note, n in notes.items():
        log.warning("%d images: %s", n, note)
    if not rows:
        shown = "; ".join(f"{reason} {n}, e.g. {examples[reason][0]}" for reason, n in skipped.items())
        raise DataError(f"data source {cfg.data.source!r} at {cfg.data.path!r} yielded no usable images "
                        f"(skipped: {shown or 'none'})")
    if not rows["val"] or not rows["train"]:
        raise DataError(f"data source {cfg.data.source!r} gave {dict(rows)} rows; need both train and val "
                        f"(data.val_fraction={cfg.data.val_fraction})")
    run.log_metrics({"rows_train": rows["train"], "rows_val": rows["val"], "skipped": sum(skipped.values()),
                     **{f"skipped_{r}": n for r, n in skipped.items()}})
    run.set_tags({"source": cfg.data.source})
    run.log_image(grid([[img] for img, _ in samples], [c for _, c in samples], scale=3), "samples.png")
    log.info("ingested %s rows into ingest/%s (skipped %s)", dict(rows), key, dict(skipped) or "none")
    return {"config": cfg.data.model_dump(mode="json"), "rows": dict(rows), "subsets": dict(subsets),
            "skipped": dict(skipped), "skipped_examples": dict(examples), "shards": dict(shards),
            "image_size": cfg.data.image_size, "fit": cfg.data.fit, "notes": dict(notes),
            "source_fingerprint": fingerprint}


def _earlier_ingest(store, cfg: Config, key: str) -> str | None:
    """The newest finished images artifact of the same data config under another key: the source has changed."""
    config = cfg.data.model_dump(mode="json")
    if cfg.data.source == "shapes":
        return None
    earlier = [m for a in store.artifacts("ingest") if a.complete and a.key != key
               and (m := store.manifest("ingest", a.key)) is not None and m.get("config") == config]
    return max(earlier, key=lambda m: m["created"])["key"] if earlier else None
