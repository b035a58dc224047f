"""Evaluation stage: how good are this pipeline's images? -> `evaluation/<key>/evaluation.json`.

Collects each stage's validation numbers, samples candidates for a fixed set of
val captions (and some training captions) to measure the CLIP reranking gain
(best of N vs a random candidate) and, per split (seen captions, each val
subset), CLIP R-precision, Fréchet distance in CLIP space with its real-halves
floor, nearest-training-image memorisation (in CLIP space, and in downsampled
pixel space for the top-1 and a random candidate) and the dVAE's PSNR/SSIM. On the
shapes dataset it also checks caption faithfulness of the top-1 image, a random
candidate, and the dVAE reconstruction of the real image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.config import Config
from dalle_core.evaluation import (
    InceptionFID,
    faithfulness,
    frechet_distance,
    has_pair,
    is_shapes_caption,
    nearest_neighbours,
    own_image_share,
    pixel_features,
    pixel_nearest_neighbours,
    r_precision,
    rerank_gain,
    ssim,
    subset_groups,
)
from dalle_core.generate import DALLEPipeline, prompt_seed, prompts_per_batch
from dalle_core.images import decode_png, grid, png_bytes, psnr, to_tensor, to_uint8
from storage.parquet import GENERATIONS_SCHEMA, iter_batches, shard_paths, write_shard
from storage.store import ArtifactStore
from storage.tracking import StageRun
from tasks.common import (
    ArtifactRef,
    Progress,
    claimed,
    open_store,
    ref,
    reuse,
    stage_keys,
    stage_run,
)
from tasks.generate import candidate_rows, load_pipeline


def _val_rows(store, images_key: str, limit: int) -> tuple[list[str], np.ndarray, list[str]]:
    """The first `limit` val rows: captions, images, and each row's subset label ("val" where the source has none)."""
    captions, images, subsets = [], [], []
    for batch in iter_batches(store, shard_paths(store, "images", images_key, "val"), ["caption", "image", "subset"]):
        captions += batch.column("caption").to_pylist()
        images += [decode_png(b) for b in batch.column("image").to_pylist()]
        subsets += [s or "val" for s in batch.column("subset").to_pylist()]
        if len(captions) >= limit:
            break
    return captions[:limit], np.stack(images[:limit]), subsets[:limit]


@dataclass
class TrainSide:
    """What the evaluation knows of the training images: their captions, CLIP embeddings and downsampled pixels
    (for the nearest-neighbour checks), and a few rows drawn as seen-caption prompts."""

    captions: list[str]
    embeddings: torch.Tensor  # (N, D) unit vectors on the CPU
    pixels: torch.Tensor  # (N, 3 * PIXEL_NN_SIZE ** 2) pixel_features, in [0, 1]
    prompt_captions: list[str]
    prompt_images: np.ndarray  # (P, H, W, 3)


def _train_side(store, images_key: str, reranker, limit: int, prompts: int, seed: int) -> TrainSide:
    """Embed and downsample the first `limit` training images in one pass, a batch at a time; only the drawn
    prompts' full images are kept."""
    total = min(limit, store.manifest("images", images_key)["rows"]["train"])
    rows = sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=min(prompts, total), replace=False))
    captions: list[str] = []
    kept: list[np.ndarray] = []
    embeddings, small = [], []
    for batch in iter_batches(store, shard_paths(store, "images", images_key, "train"), ["caption", "image"],
                              batch_size=256):
        start = len(captions)
        pixels = np.stack([decode_png(b) for b in batch.column("image").to_pylist()[:total - start]])
        captions += batch.column("caption").to_pylist()[:len(pixels)]
        embeddings.append(reranker.embed_images(pixels).cpu())
        small.append(pixel_features(pixels))
        kept += [pixels[i - start] for i in rows if start <= i < len(captions)]
        if len(captions) >= total:
            break
    return TrainSide(captions, torch.cat(embeddings), torch.cat(small), [captions[i] for i in rows],
                     np.stack(kept) if kept else np.zeros((0,)))


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    store, keys = open_store(cfg), stage_keys(cfg)
    key, eval_cfg = keys["evaluation"], cfg.evaluate
    if done := reuse(store, "evaluation", key, cfg, parent_run_id):
        return done
    for stage in ("dvae", "transformer", "clip", "bpe", "images"):
        store.require(stage, keys[stage])
    store.prepare("evaluation", key)
    with claimed(store, "evaluation", key), stage_run(cfg, store, "evaluation", key, eval_cfg.model_dump(mode="json"),
                                                      parent_run_id) as run:
        _evaluate(cfg, store, keys, run)
    return ref(store, "evaluation", key, cached=False)


def _evaluate(cfg: Config, store: ArtifactStore, keys: dict, run: StageRun) -> None:
    """Measure, write `evaluation/<key>/` and log it to the stage's MLflow run."""
    key, eval_cfg, gen_cfg = keys["evaluation"], cfg.evaluate, cfg.generate
    pipe = load_pipeline(cfg)
    report: dict = {"keys": {s: keys[s] for s in ("images", "dvae", "bpe", "tokens", "transformer", "clip")}}
    dvae_m = store.read_json(store.path("dvae", keys["dvae"], "metrics.json"))
    report["dvae"] = {"val_psnr": dvae_m["val_psnr"], "val_code_usage_fraction": dvae_m["val_code_usage_fraction"]}
    tr_m = store.read_json(store.path("transformer", keys["transformer"], "metrics.json"))
    report["transformer"] = {"val_bits_per_image_token": tr_m["val_bits_per_image_token"]}
    if store.exists(store.path("clip", keys["clip"], "metrics.json")):
        clip_m = store.read_json(store.path("clip", keys["clip"], "metrics.json"))
        report["clip"] = {k: clip_m[k] for k in ("val_i2t_recall_at_1", "val_t2i_recall_at_1", "val_chance_recall_at_1")
                          if k in clip_m}

    val_captions, val_real, val_subsets = _val_rows(store, keys["images"], eval_cfg.num_prompts)
    train = _train_side(store, keys["images"], pipe.reranker, eval_cfg.train_images, eval_cfg.train_prompts, eval_cfg.seed)
    # Prompts: the val captions first (their seeds are those of earlier evaluations), then the drawn train rows.
    captions = val_captions + train.prompt_captions
    real = np.concatenate([val_real, train.prompt_images]) if train.prompt_captions else val_real
    n_val, n = len(val_captions), eval_cfg.num_candidates
    scores = np.zeros((len(captions), n), dtype=np.float32)
    top1, random_pick, rows = [], [], []
    progress = Progress("evaluate", len(captions), "prompts")
    t0 = time.perf_counter()
    per_call = prompts_per_batch(n, gen_cfg.batch_size)  # one sampling batch per call
    for first in range(0, len(captions), per_call):
        group = captions[first:first + per_call]
        seeds = [prompt_seed(eval_cfg.seed, first + j) for j in range(len(group))]
        results = pipe.candidates(group, n, seeds, gen_cfg.batch_size, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p, gen_cfg.cond_scale)
        for i, caption, seed, (images, s, _, codes) in zip(range(first, first + len(group)), group, seeds, results):
            scores[i] = s
            top1.append(images[int(np.argmax(s))])
            random_pick.append(images[0])  # candidates are i.i.d. draws, so the first is a random one
            rows += candidate_rows(caption, seed, images, s, codes)
        progress.update(len(group), extra=f"{(first + len(group)) * n / (time.perf_counter() - t0):.0f} images/s")
    report["generation"] = {"prompts": n_val, "candidates": n, **rerank_gain(scores[:n_val]),
                            "images_per_s": len(captions) * n / max(time.perf_counter() - t0, 1e-9)}

    with torch.inference_mode():
        recon = np.concatenate([_reconstruct(pipe, real[i:i + 256]) for i in range(0, len(real), 256)])
    groups = subset_groups(val_subsets, len(train.prompt_captions))
    report["splits"] = _split_metrics(pipe, groups, captions, n_val, real, recon, np.stack(top1),
                                      np.stack(random_pick), train, eval_cfg)

    if all(is_shapes_caption(c) for c in val_captions):
        vc = val_captions
        report["faithfulness"] = {"top1": faithfulness(top1[:n_val], vc), "random": faithfulness(random_pick[:n_val], vc),
                                  "dvae_reconstruction": faithfulness(list(recon[:n_val]), vc),
                                  "real_images": faithfulness(list(val_real), vc)}
        held = cfg.data.shapes.holdout if cfg.data.source == "shapes" else []
        idx = [i for i, c in enumerate(vc) if held and has_pair(c, held)]
        if idx:
            report["faithfulness"]["holdout_pairs"] = {
                "prompts": len(idx), **faithfulness([top1[i] for i in idx], [vc[i] for i in idx])}

    show = list(dict.fromkeys(i for idx in groups.values() for i in idx[:8]))  # a few prompts of every split
    labels = {i: name for name, idx in groups.items() for i in idx}
    sheet = grid([[real[i], top1[i], random_pick[i]] for i in show], [f"[{labels[i]}] {captions[i]}" for i in show],
                 scale=3, header=["real image", f"top-1 of {n} by CLIP", "random candidate"])
    run.log_metrics(flat_metrics(report))
    run.log_image(sheet, "top1_vs_random.png")
    run.log_dict(report, "evaluation.json")
    run.log_text(format_report(report), "evaluation.txt")
    write_shard(store, store.path("evaluation", key, "generations.parquet"),
                pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA))
    store.write_bytes(store.path("evaluation", key, "top1_vs_random.png"), png_bytes(sheet))
    store.write_json(store.path("evaluation", key, "evaluation.json"), report)
    store.finish("evaluation", key, config=eval_cfg.model_dump(mode="json"),
                 inputs={s: keys[s] for s in ("images", "dvae", "bpe", "transformer", "clip")},
                 rows={"generations": len(rows)})


def _reconstruct(pipe: DALLEPipeline, images: np.ndarray) -> np.ndarray:
    x = to_tensor(torch.from_numpy(images).to(pipe.device), pipe.normalization.mean, pipe.normalization.std)
    return to_uint8(pipe.dvae.decode(pipe.dvae.encode(x)), pipe.normalization.mean, pipe.normalization.std)


def _split_metrics(pipe: DALLEPipeline, groups: dict[str, list[int]], captions: list[str], n_val: int, real: np.ndarray,
                   recon: np.ndarray, top1: np.ndarray, random_pick: np.ndarray, train: TrainSide, eval_cfg
                   ) -> dict[str, dict]:
    """Per split: CLIP R-precision (top-1, random candidate, real image), Fréchet distance in CLIP space against
    half of the real images (with the other real half as the floor), nearest-training-image memorisation in CLIP
    space and in downsampled pixel space (the top-1 and, as the baseline, a random candidate), and the dVAE's
    reconstruction PSNR and SSIM."""
    pool = list(dict.fromkeys(captions))  # distinct captions: the R-precision candidates
    truth = [pool.index(c) for c in captions]
    text_emb = torch.cat([pipe.reranker.embed_texts(pool[i:i + 512]).cpu() for i in range(0, len(pool), 512)])

    def embed(images):
        return torch.cat([pipe.reranker.embed_images(images[i:i + 256]).cpu() for i in range(0, len(images), 256)])

    emb = {"top1": embed(top1), "random": embed(random_pick), "real": embed(real)}
    nn_index, nn_sim = {}, {}
    for k in ("top1", "real"):
        nn_index[k], nn_sim[k] = nearest_neighbours(emb[k], train.embeddings)
    pixel_index = {"top1": pixel_nearest_neighbours(top1, train.pixels),
                   "random": pixel_nearest_neighbours(random_pick, train.pixels)}
    in_train = set(train.captions)
    fid = InceptionFID(eval_cfg.inception_weights, pipe.device) if eval_cfg.inception_weights else None
    x, y = (torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255 for a in (real, recon))
    out: dict[str, dict] = {}
    for name, idx in groups.items():
        m: dict = {"prompts": len(idx)}
        truths = [truth[i] for i in idx]
        if len(pool) >= 2:
            for k in ("top1", "random", "real"):
                m[f"r_precision_{k}"], m["r_precision_chance"] = r_precision(emb[k][idx], text_emb, truths,
                                                                             eval_cfg.r_precision_distractors, eval_cfg.seed)
        if len(idx) >= 4:  # Fréchet distance against real half A; real half B is the floor (same sample sizes)
            a, b = idx[0::2], idx[1::2][:len(idx[0::2])]
            m["fd_clip_top1"] = frechet_distance(emb["top1"][b].numpy(), emb["real"][a].numpy())
            m["fd_clip_random"] = frechet_distance(emb["random"][b].numpy(), emb["real"][a].numpy())
            m["fd_clip_real_halves"] = frechet_distance(emb["real"][b].numpy(), emb["real"][a].numpy())
            if fid is not None:
                m["fid_top1"], m["fid_real_halves"] = fid(top1[b], real[a]), fid(real[b], real[a])
        own = [i for i in idx if captions[i] in in_train]
        if own:  # the prompt's own training image is the generated image's nearest training image
            own_captions = [captions[i] for i in own]
            m["nn_own_image_top1"] = own_image_share(nn_index["top1"][own], own_captions, train.captions)
            m["nn_pixel_own_top1"] = own_image_share(pixel_index["top1"][own], own_captions, train.captions)
            m["nn_pixel_own_random"] = own_image_share(pixel_index["random"][own], own_captions, train.captions)
        m["nn_similarity_top1"] = float(nn_sim["top1"][idx].mean())
        fresh = [i for i in idx if i < n_val]  # real val images, not train rows
        if fresh:
            m["nn_similarity_real"] = float(nn_sim["real"][fresh].mean())
        m["dvae_psnr"] = psnr(torch.mean((x[idx] - y[idx]) ** 2).item())
        m["dvae_ssim"] = float(ssim(x[idx], y[idx]).mean())
        out[name] = m
    return out


# The per-split table's rows, in reading order (evaluation.json stores keys sorted).
SPLIT_METRICS = ("prompts", "r_precision_top1", "r_precision_random", "r_precision_real", "r_precision_chance",
                 "fd_clip_top1", "fd_clip_random", "fd_clip_real_halves", "fid_top1", "fid_real_halves",
                 "nn_own_image_top1", "nn_pixel_own_top1", "nn_pixel_own_random", "nn_similarity_top1",
                 "nn_similarity_real", "dvae_psnr", "dvae_ssim")


def flat_metrics(report: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in report.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}".replace("@", "_at_")] = float(v)
    return out


def format_report(report: dict) -> str:
    """The evaluation as a plain-text table."""
    lines = ["evaluation", "-" * 64]
    for section in ("dvae", "transformer", "clip", "generation"):
        for k, v in report.get(section, {}).items():
            lines.append(f"{section + '.' + k:<44} {v:>10.4g}" if isinstance(v, float) else f"{section + '.' + k:<44} {v:>10}")
    splits = report.get("splits")
    if splits:
        names = list(splits)
        lines += ["-" * 64, "per split".ljust(28) + "".join(f"{n[:13]:>14}" for n in names)]
        present = {k for m in splits.values() for k in m}
        metrics = [k for k in SPLIT_METRICS if k in present] + sorted(present - set(SPLIT_METRICS))
        for k in metrics:
            cells = [splits[n].get(k) for n in names]
            lines.append(k.ljust(28) + "".join(f"{'-':>14}" if v is None else f"{v:>14}" if isinstance(v, int)
                                               else f"{v:>14.3f}" for v in cells))
    faith = report.get("faithfulness")
    if faith:
        cols = [c for c in ("top1", "random", "dvae_reconstruction") if c in faith]
        labels = {"top1": "top-1", "random": "random", "dvae_reconstruction": "dVAE recon"}
        lines += ["-" * 64, "caption faithfulness".ljust(28) + "".join(f"{labels[c]:>12}" for c in cols)]
        for k in faith["top1"]:
            lines.append(k.ljust(28) + "".join(f"{faith[c].get(k, float('nan')):>12.3f}" for c in cols))
        if "holdout_pairs" in faith:
            h = faith["holdout_pairs"]
            lines.append(f"held-out colour-shape pairs ({h['prompts']} prompts): all attributes {h.get('overall.all', 0):.3f}")
    return "\n".join(lines)
