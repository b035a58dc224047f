"""The bpe stage: the BPE text tokenizer -> `bpe/<key>/tokenizer.json` (trained on the ingested captions, read
from `text.tokenizer_path`, or taken from `tokenizers_from`'s model)."""

from __future__ import annotations

import os

import numpy as np
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.bpe import TextTokenizer
from dalle_core.bpe import train_bpe as train_bpe_model
from dalle_core.errors import ConfigError
from pipeline.artifacts import ArtifactRef, Work, run_name, run_stage
from pipeline.config import Config
from pipeline.fine_tuning import take_tokenizer
from pipeline.logs import log
from storage.parquet import iter_batches, shard_paths
from storage.store import ArtifactStore


def _captions(store: ArtifactStore, ingest_key: str, split: str):
    for batch in iter_batches(store, shard_paths(store, "ingest", ingest_key, split), ["caption"]):
        yield from batch.column("caption").to_pylist()


@task(name="bpe", task_run_name=run_name("bpe"), cache_policy=NONE)
def train_bpe(cfg: Config, ingest: ArtifactRef) -> ArtifactRef:
    """The text tokenizer for `ingest`'s captions (or the given one), with its caption-length statistics."""
    if cfg.tokenizers_from:  # an exported model's BPE, copied as it is

        return run_stage(cfg, "bpe", {"ingest": ingest}, take_tokenizer, {"tokenizers_from": cfg.tokenizers_from})
    return run_stage(cfg, "bpe", {"ingest": ingest}, _train, cfg.text.model_dump(mode="json"))


def _train(w: Work) -> dict:
    text, images = w.cfg.text, w.inputs["ingest"].key
    if text.tokenizer_path:
        if not os.path.isfile(text.tokenizer_path):
            raise ConfigError(f"text.tokenizer_path {text.tokenizer_path!r} does not exist")
        with open(text.tokenizer_path) as f:
            json_text = f.read()
        try:
            TextTokenizer.from_str(json_text, text.text_len)
        except Exception as err:
            raise ConfigError(f"text.tokenizer_path {text.tokenizer_path!r} is not a tokenizers JSON file: "
                              f"{str(err).splitlines()[0]}") from None
    else:
        json_text = train_bpe_model(_captions(w.store, images, "train"), text.vocab_size, text.lowercase).to_str()
    tokenizer = TextTokenizer.from_str(json_text, text.text_len)
    stats = {"vocab_size": tokenizer.vocab_size}
    lengths, truncated, n = [], 0, 0
    caps = list(_captions(w.store, images, "train"))
    for i in range(0, len(caps), 4096):
        ids, trunc = tokenizer.encode(caps[i:i + 4096])
        lengths.append((ids != tokenizer.pad_id).sum(1))
        truncated += int(trunc.sum())
        n += len(ids)
    lengths = np.concatenate(lengths) if lengths else np.zeros(1)
    stats.update(mean_caption_tokens=float(lengths.mean()), max_caption_tokens=int(lengths.max()),
                 truncated_captions=truncated, truncated_fraction=truncated / max(n, 1))
    if truncated:
        log.warning("%d of %d train captions are longer than text_len=%d and will be truncated",
                    truncated, n, text.text_len)
    w.run.log_metrics(stats)
    w.store.write_bytes(w.path("tokenizer.json"), json_text.encode())
    return {"config": text.model_dump(mode="json"), "pad_id": tokenizer.pad_id, "text_len": text.text_len, **stats}
