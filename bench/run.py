"""Benchmarks of the hot paths: `make bench` or `python -m bench.run [--only NAME ...]`.

Prints one table and writes JSON (bench/results/<time>.json) so runs compare. Each measurement: warm-up,
then repeats, median reported (bench/common.py). Never part of the tests. The benches, by what they measure:
bench/training.py, bench/sampling.py, bench/data.py, bench/serving.py (using a trained model), and bench/anchor.py
(lucidrains' dalle-pytorch, the reference column). Reference configuration: bench/common.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench import anchor, data, sampling, serving, training
from bench.common import DALLE_SHAPE, SMALL_NET_64, TAMING_NET_64, Settings


@dataclass(frozen=True)
class Bench:
    """One table group: `fn(settings)` returns its `{key: value}` rows, printed as `name.key`."""

    name: str
    fn: Callable[[Settings], dict]
    on: str = "any"  # "cpu" or "cuda": run only on that device


def bench(name: str, fn: Callable[..., dict], on: str = "any", **params) -> Bench:
    return Bench(name, functools.partial(fn, **params) if params else fn, on)


BENCHES = [
    bench("matmul_peak", training.matmul_peak),
    bench("transformer_train_fp32", training.transformer_train, precision="fp32"),
    bench("transformer_train_bf16", training.transformer_train, precision="bf16"),
    bench("sample_16", sampling.sample_16, cond_scale=1.0),
    bench("sample_16_cfg3", sampling.sample_16, cond_scale=3.0),
    bench("sample_4x16_cfg3", sampling.sample_16, cond_scale=3.0, prompts=4),
    bench("clip_train", training.clip_train, precision="fp32"),
    bench("clip_train_bf16", training.clip_train, precision="bf16"),
    bench("dvae_train", training.dvae_train),
    bench("dvae_train_bf16", training.dvae_train, precision="bf16"),
    bench("dvae_train_64px_small_net", training.dvae_train, precision="bf16", batch=8, c=SMALL_NET_64),
    bench("dvae_train_64px_taming_net", training.dvae_train, precision="bf16", batch=8, c=TAMING_NET_64),
    bench("dvae_encode", data.dvae_encode),
    bench("dvae_encode_bf16", data.dvae_encode, precision="bf16"),
    bench("token_loader", data.token_loader),
    bench("pretokenize", data.pretokenize),
    bench("pretokenize_bf16", data.pretokenize, precision="bf16"),
    bench("dalle_anchor", anchor.dalle_anchor),
    bench("dalle_train_fp32", training.train_rate, c=DALLE_SHAPE, precision="fp32", batch=4),
    bench("dalle_train_bf16", training.train_rate, c=DALLE_SHAPE, precision="bf16", batch=4),
    bench("dalle_sample_cfg3", sampling.dalle_sample),
    bench("dalle_sample_cfg3_fp32", sampling.dalle_sample, precision="fp32"),
    bench("dalle_sample_cfg3_bf16", sampling.dalle_sample, precision="bf16"),
    bench("dalle_sample_cfg3_top_p", sampling.dalle_sample, top_p=0.9),
    bench("dalle_sample_parts", sampling.dalle_sample_parts),
    bench("loader_256_workers0", data.image_loader, workers=0),
    bench("loader_256_workers2", data.image_loader, workers=2),
    bench("loader_256_workers8", data.image_loader, workers=8),  # with 8 or more cores
    bench("dalle_attention_kernel", training.attention_kernel, on="cpu"),
    bench("dalle_attention_openmoji", training.config_attention, on="cpu"),
    bench("dalle_max_batch", training.max_batch, on="cuda"),
    bench("dalle_config_256", training.config_transformer, on="cuda"),
    bench("dalle_config_256_sample_fp32", sampling.config_sampling, on="cuda", precision="fp32"),
    bench("dalle_config_256_sample_bf16", sampling.config_sampling, on="cuda", precision="bf16"),
    bench("serve_api_16", serving.api_request),  # `dalle serve`: the page's request, browser excluded
    bench("serve_8_users", serving.concurrent_users),  # 8 visitors at once: one merged batch, or one at a time
    bench("serve_bad_requests", serving.bad_requests),  # RSS and the page under 100 bad requests
    bench("cold_start", serving.cold_generate),  # a fresh process: load an exported model, draw one image
    bench("cold_start_1thread", serving.cold_generate, threads=1),
    bench("pretokenize_10x", data.pretokenize, scale=10),  # the peak-memory check, skipped by --skip-rss
]


def selected(args: argparse.Namespace, device: torch.device) -> list[Bench]:
    """The benches this machine and these flags run, in table order."""
    skipped = set() if (os.cpu_count() or 1) >= 8 else {"loader_256_workers8"}
    if args.skip_rss:
        skipped.add("pretokenize_10x")
    return [b for b in BENCHES if b.name not in skipped and b.on in ("any", device.type)
            and (not args.only or any(b.name.startswith(o) for o in args.only))]


def print_table(results: dict[str, dict]) -> None:
    """One row per `name.key`, with the anchor's value (measured in this run, else the issue's) and the ratio."""
    measured = results.get("dalle_anchor", {})
    same_run = {row: measured[key] for row, key in anchor.SAME_RUN.items() if key in measured}
    print(f"\n{'benchmark':<34}{'value':>14}  {'reference':>10}  note (reference: dalle-pytorch"
          f"{', measured in this run' if same_run else ''})")
    for name, res in results.items():
        for k, v in res.items():
            ref = same_run.get(f"{name}.{k}", anchor.REFERENCE.get(f"{name}.{k}"))
            note = ""
            if ref:
                note = f"{ref / v:.1f}x faster" if k == "seconds" else f"{v / ref:.1f}x"
            print(f"{name + '.' + k:<34}{v:>14.4g}  {f'{ref:.4g}' if ref else '':>10}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pretokenize-images", type=int, default=20000)
    parser.add_argument("--skip-rss", action="store_true", help="skip the 10x pre-tokenization memory check")
    parser.add_argument("--only", nargs="*", help="run only benchmarks whose name starts with one of these")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args()
    from dalle_core.device import resolve_device

    settings = Settings(resolve_device(args.device), args.repeats, args.pretokenize_images)
    results: dict[str, dict] = {}
    for b in selected(args, settings.device):
        print(f"running {b.name} ...", file=sys.stderr, flush=True)
        results[b.name] = b.fn(settings)
        print(f"  {json.dumps(results[b.name])}", file=sys.stderr, flush=True)  # kept if a later bench is cut off
    for precision in ("fp32", "bf16"):  # model FLOPs utilisation against this machine's measured matmul peak
        if "matmul_peak" in results and f"transformer_train_{precision}" in results:
            res = results[f"transformer_train_{precision}"]
            res["mfu"] = res["model_gflops"] / results["matmul_peak"][f"{precision}_gflops"]
    print_table(results)
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/{time.strftime('%Y%m%d-%H%M%S')}.json"
    device = settings.device
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
