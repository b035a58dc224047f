"""Checks made from the config and the ingested row counts, run once the images exist and before any stage
trains, so that a setting the data cannot meet fails in one line instead of after hours of earlier stages."""

from __future__ import annotations

from dalle_core.errors import ConfigError
from dalle_core.loader import rank_units
from pipeline.config import Config
from pipeline.stage_table import TRAINED
from storage.parquet import ParquetShards, shard_paths
from storage.store import ArtifactStore


def trains(cfg: Config, stage: str) -> bool:
    """Whether pipeline stage `stage` draws full training batches under this config."""
    if stage not in TRAINED:
        return False
    if stage == "dvae":  # a loaded, k-means or taken (tokenizers_from) dVAE draws no batches
        return not (cfg.dvae.pretrained or cfg.tokenizers_from) and cfg.dvae.quantizer != "pixel-kmeans"
    if stage == "clip":
        return not cfg.clip.pretrained
    return True


def batch_size_problems(cfg: Config, store: ArtifactStore, keys: dict[str, str], stages: list[str]) -> list[str]:
    """One line per stage of `stages` still to train whose `<stage>.train.batch_size` is larger than the
    training rows one of its processes gets (a shuffled stream yields full batches only)."""
    paths = shard_paths(store, "ingest", keys["ingest"], "train")
    reader = ParquetShards(store)
    rows: dict[int, int] = {}  # processes -> the fewest training rows one of them gets
    out = []
    for stage in stages:
        if not trains(cfg, stage) or store.is_complete(stage, keys[stage]):
            continue
        train_cfg = getattr(cfg, stage).train
        world = train_cfg.nproc * train_cfg.nnodes
        if world not in rows:
            rows[world] = min(sum(u.size for u in rank_units(reader, paths, r, world)) for r in range(world))
        if train_cfg.batch_size > rows[world]:
            each = "" if world == 1 else f" each of its {world} processes gets"
            out.append(f"{stage}.train.batch_size={train_cfg.batch_size} is larger than the {rows[world]} training rows"
                       f"{each} of ingest/{keys['ingest']}; use at most {rows[world]}")
    return out


def check_batch_sizes(cfg: Config, store: ArtifactStore, keys: dict[str, str], stages: list[str]) -> None:
    """Raise ConfigError (the first problem, one line) when a stage to train cannot fill one batch; nothing to
    check before the images are ingested."""
    if not store.is_complete("ingest", keys["ingest"]):
        return
    problems = batch_size_problems(cfg, store, keys, stages)
    if problems:
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""))
