"""Stage 1b: the BPE text tokenizer -> `bpe/<key>/tokenizer.json`."""

from __future__ import annotations

import os

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from dalle_core.bpe import TextTokenizer, train_bpe
from dalle_core.config import Config, ConfigError
from storage.parquet import iter_batches, shard_paths
from storage.store import ArtifactStore
from tasks.common import ArtifactRef, claimed, open_store, ref, reuse, stage_keys, stage_run


def load_tokenizer(store: ArtifactStore, key: str, text_len: int) -> TextTokenizer:
    """The finished BPE tokenizer of `bpe/<key>`; a damaged file is a StoreError naming it."""
    store.require("bpe", key)
    path = store.path("bpe", key, "tokenizer.json")
    data = store.read_bytes(path)
    with store.reading(path):
        return TextTokenizer.from_str(data.decode(), text_len)


def _captions(store: ArtifactStore, images_key: str, split: str):
    for batch in iter_batches(store, shard_paths(store, "images", images_key, split), ["caption"]):
        yield from batch.column("caption").to_pylist()


@task(name="train-bpe", cache_policy=NONE)
def train_bpe_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    log = get_run_logger()
    store, keys = open_store(cfg), stage_keys(cfg)
    key, text = keys["bpe"], cfg.text
    if cfg.tokenizers_from:  # an exported model's BPE, copied as it is
        from tasks.fine_tuning import take_tokenizer

        return take_tokenizer(cfg, "bpe", parent_run_id)
    if done := reuse(store, "bpe", key, cfg, parent_run_id):
        return done
    store.prepare("bpe", key)
    with claimed(store, "bpe", key), stage_run(cfg, store, "bpe", key, text.model_dump(mode="json"),
                                               parent_run_id) as run:
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
            inputs = {}
        else:
            store.require("images", keys["images"])
            json_text = train_bpe(_captions(store, keys["images"], "train"), text.vocab_size,
                                  text.lowercase).to_str()
            inputs = {"images": keys["images"]}
        tokenizer = TextTokenizer.from_str(json_text, text.text_len)
        stats = {"vocab_size": tokenizer.vocab_size}
        if store.is_complete("images", keys["images"]):
            lengths, truncated, n = [], 0, 0
            caps = list(_captions(store, keys["images"], "train"))
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
        run.log_metrics(stats)
        store.write_bytes(store.path("bpe", key, "tokenizer.json"), json_text.encode())
        manifest = store.finish("bpe", key, config=text.model_dump(mode="json"), inputs=inputs,
                                pad_id=tokenizer.pad_id, text_len=text.text_len, **stats)
        run.log_dict(manifest, "manifest.json")
    return ref(store, "bpe", key, cached=False)
