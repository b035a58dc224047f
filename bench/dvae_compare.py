"""Compare finished dVAE artifacts side by side: hard-code val PSNR, sharpness and code usage over the whole val
split, and one grid of the same val images (originals, then each tokenizer's reconstructions).

    python -m bench.dvae_compare -c configs/openmoji.yaml --out docs/vqgan_openmoji.png \
        "vq=store.root=/tmp/cmp/store-a" \
        "vq + PatchGAN=store.root=/tmp/cmp/store-b;dvae.adversarial=true;dvae.disc_start=500"

Each argument is `label=overrides` (overrides separated by ';'), naming a run whose dVAE stage has finished.
"""

from __future__ import annotations

import argparse
import json
from itertools import islice

import numpy as np
import torch

from dalle_core.dvae import evaluate_dvae, laplacian_variance
from dalle_core.images import grid, png_bytes, to_tensor, to_uint8
from dalle_core.loader import IN_ORDER, decode_images
from pipeline.config import load_config
from pipeline.models import load_dvae
from pipeline.stage_table import stage_keys
from pipeline.training import batch_stream
from storage.parquet import shard_paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--out", required=True, help="the grid's PNG path")
    ap.add_argument("--images", type=int, default=10, help="val images in the grid")
    ap.add_argument("runs", nargs="+", metavar="LABEL=OVERRIDES")
    args = ap.parse_args()
    originals, rows, labels = None, [], []
    for spec in args.runs:
        label, _, overrides = spec.partition("=")
        cfg = load_config(args.config, [o for o in overrides.split(";") if o])
        store, keys = cfg.store.open(), stage_keys(cfg)
        model, norm = load_dvae(store, keys["dvae"])
        val = shard_paths(store, "ingest", keys["ingest"], "val")

        def batches(size: int = 256, cfg=cfg, store=store, val=val):
            return batch_stream(cfg, store, val, ["image"], decode_images, size, torch.device("cpu"), IN_ORDER)

        with torch.inference_mode():
            metrics = evaluate_dvae(model, islice(batches(), 1000), norm)
            if originals is None:
                originals = next(iter(batches(args.images)))["image"]
                x = to_tensor(originals, norm.mean, norm.std)
                rows.append(list(to_uint8(x, norm.mean, norm.std)))
                labels.append(f"originals (sharpness {laplacian_variance(norm.to_unit(x)).mean():.3f})")
            recon = model.decode(model.encode(to_tensor(originals, norm.mean, norm.std)))
        manifest = store.manifest("dvae", keys["dvae"])
        rows.append(list(to_uint8(recon, norm.mean, norm.std)))
        labels.append(f"{label}: {metrics['val_psnr']:.2f} dB, sharpness x{metrics['val_sharpness_ratio']:.2f}")
        print(json.dumps({"label": label, "dvae": keys["dvae"], "steps": manifest["steps"],
                          **{k: round(v, 4) for k, v in metrics.items()}}))
    with open(args.out, "wb") as f:
        f.write(png_bytes(grid([list(np.asarray(r)) for r in rows], labels, scale=2)))


if __name__ == "__main__":
    main()
