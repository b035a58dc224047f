"""What every bench shares: the shapes measured, the run's settings, the timer and the peak-memory reading."""

from __future__ import annotations

import resource
import statistics
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dalle_core.dvae import DVAEConfig
from dalle_core.transformer import DALLEConfig

# The reference configuration of the performance issue: 32x32 images -> 8x8 tokens, codebook 512 (dim 256,
# hidden 64, 2 downsamples); transformer dim 256, depth 4, 8 heads, text_len 32, text vocab 1000, batch 16.
REF_TRANSFORMER = DALLEConfig(text_vocab=1000, text_len=32, image_vocab=512, image_grid=8, dim=256, depth=4, heads=8)
REF_DVAE = DVAEConfig(image_size=32, codebook_size=512, codebook_dim=256, hidden=64, num_downsamples=2)
# The two tokenizer architectures at 64 px with DALL-E's 8x factor (8x8 tokens): the small net at the OpenMoji
# config's width, and taming's net (docs/tokenizers.md "Architectures").
SMALL_NET_64 = DVAEConfig(image_size=64, codebook_size=1024, codebook_dim=32, hidden=96, num_downsamples=3)
TAMING_NET_64 = DVAEConfig(image_size=64, codebook_size=1024, codebook_dim=32, hidden=32, num_downsamples=3,
                           channel_mult=(1, 2, 2, 4))
# DALL-E's shape at the bench's width (the GPU/scale issue): text_len 256, text vocab 16,384, a 32x32 grid
# (1,024 tokens) from 8,192 codes: 1,280-token sequences, batch 4.
DALLE_SHAPE = DALLEConfig(text_vocab=16384, text_len=256, image_vocab=8192, image_grid=32, dim=256, depth=4, heads=8)


@dataclass(frozen=True)
class Settings:
    """The command line's choices every bench reads."""

    device: torch.device
    repeats: int = 5  # timed calls per measurement, after a warm-up
    pretokenize_images: int = 20000


def seconds(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `repeats` calls of fn() after `warmup` untimed calls.

    The standard library's timeit (as torch.utils.benchmark.Timer, it turns the garbage collector off while it
    times) with a clock that first waits for `device`'s queued kernels, so a GPU call is timed to its end.
    Fixed counts rather than Timer.blocked_autorange's time budget: `--repeats` stays what it says."""

    def clock() -> float:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        return time.perf_counter()

    timer = timeit.Timer(fn, timer=clock)
    timer.timeit(warmup)
    return timer.repeat(repeats, number=1)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Median of `seconds`: the figure every rate in the table is computed from."""
    return statistics.median(seconds(fn, repeats, device, warmup))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config_shape(path: str):
    """(run config, DALLEConfig) of a config file's transformer, with its BPE and dVAE vocabularies at full size."""
    from pipeline.config import load_config

    cfg = load_config(path)
    return cfg, cfg.transformer.dalle_config(text_vocab=cfg.text.vocab_size, text_len=cfg.text.text_len, pad_id=0,
                                             image_vocab=cfg.dvae.codebook_size,
                                             image_grid=cfg.data.image_size // 2 ** cfg.dvae.num_downsamples)
