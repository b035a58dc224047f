"""dVAE quality sweep: train a config's dVAE (default configs/shapes.yaml) under settings given as `--set`-style
overrides, on the same data and the same number of steps, and report hard-code val PSNR and code usage.

    python -m bench.dvae_sweep --steps 2400 --device cuda --parallel 6 \
        "dvae.quantizer=gumbel" "dvae.quantizer=gumbel;dvae.kl_weight=1" ...
    python -m bench.dvae_sweep --config configs/openmoji.yaml "" "dvae.train.batch_size=16"

Shapes are drawn fresh (train and val from different seeds); any other source is read with its own
train/val split (`data_sources.reader.read_source`).

Each argument is one run: overrides separated by ';'. Only dalle_core is used (no Prefect or MLflow),
so it runs on any machine with torch. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _data(cfg, num: int, split: str, seed: int) -> np.ndarray:
    from data_sources import shapes
    from data_sources.reader import read_source

    if cfg.data.source == "shapes":
        return np.stack([r[3] for r in shapes.generate(num, cfg.data.image_size, seed=seed)])
    images = [r.image for r in read_source(cfg.data) if r.skip is None and r.split == split]
    return np.stack(images[:num])


def run_one(spec: str, steps: int | None, device: str, train_images: int, val_images: int, threads: int,
            config: str = "configs/shapes.yaml") -> dict:
    from dalle_core.dvae import DiscreteVAE, dvae_schedule, dvae_step, evaluate_dvae
    from dalle_core.images import ImageNormalization
    from dalle_core.train import FitHooks, FitState, fit, make_optimizer
    from pipeline.config import load_config

    torch.set_num_threads(threads)
    overrides = [o for o in spec.split(";") if o]
    if steps:
        overrides += [f"dvae.train.max_steps={steps}", "dvae.train.max_minutes=null"]
    cfg = load_config(ROOT / config, overrides)
    d, t = cfg.dvae, cfg.dvae.train
    torch.manual_seed(t.seed)
    model = DiscreteVAE(d.dvae_config(cfg.data.image_size)).to(device)
    train = torch.from_numpy(_data(cfg, train_images, "train", 1))
    val = torch.from_numpy(_data(cfg, val_images, "val", 2))
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield {"image": train[torch.randint(0, len(train), (t.batch_size,), generator=gen)]}

    before, after = dvae_schedule(model, d.loss_config())
    t0 = time.perf_counter()
    result = fit(model, batches(), t, make_optimizer(model, t), dvae_step(model.c, d.loss_config()),
                 FitHooks(before_step=before, after_step=after), FitState(device=device))
    seconds = time.perf_counter() - t0
    with torch.inference_mode():
        m = evaluate_dvae(model, ({"image": val[i:i + 500]} for i in range(0, len(val), 500)),
                          ImageNormalization(d.norm_mean, d.norm_std), device)
    return {"spec": spec, "steps": result.step, "train_s": round(seconds, 1),
            "val_psnr": round(m["val_psnr"], 2), "codes_used": round(m["val_code_usage_fraction"], 3),
            "perplexity": round(m["val_perplexity"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--config", default="configs/shapes.yaml")
    ap.add_argument("--steps", type=int, default=None, help="fixed steps (default: the config's budget)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--val-images", type=int, default=1000)
    a = ap.parse_args()
    args = (a.steps, a.device, a.train_images, a.val_images, a.threads, a.config)
    if a.parallel == 1:
        for s in a.specs:
            print(json.dumps(run_one(s, *args)), flush=True)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(a.parallel, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, s, *args) for s in a.specs]
        for f in futures:
            print(json.dumps(f.result()), flush=True)


if __name__ == "__main__":
    main()
