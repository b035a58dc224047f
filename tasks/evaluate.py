"""The evaluate stage: how good are this pipeline's images? -> `evaluate/<key>/evaluation.json`.

Takes candidates for a fixed set of val captions (and some training captions): the generate stage's own where it
sampled the same prompt with the same settings, the rest made by its `sample_candidates`. Measures the CLIP
reranking gain (best of N vs a random candidate) and, per split (seen captions, each val subset), CLIP
R-precision, Fréchet distance in CLIP space with its real-halves floor, nearest-training-image memorisation (in
CLIP space, and in downsampled pixel space) and the dVAE's PSNR/SSIM; on shapes, caption faithfulness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.evaluation import (  # noqa: F401  (the table's one implementation)
    InceptionFID,
    flat_metrics,
    format_report,
    frechet_distance,
    nearest_neighbours,
    own_image_share,
    pixel_features,
    pixel_nearest_neighbours,
    r_precision,
    rerank_gain,
    ssim,
    subset_groups,
)
from dalle_core.generate import DALLEPipeline, prompt_seed
from dalle_core.images import decode_png, grid, png_bytes, psnr, to_tensor, to_uint8
from data_sources.shapes import faithfulness, has_pair, is_shapes_caption
from pipeline.artifacts import ArtifactRef, Work, run_name, run_stage
from pipeline.config import Config
from pipeline.models import load_pipeline
from storage.parquet import (
    GENERATIONS_SCHEMA,
    iter_batches,
    read_shard,
    shard_paths,
    val_rows,
    write_shard,
)
from tasks.generate import MODELS, sample_candidates


@dataclass
class TrainSide:
    """What the evaluation knows of the training images: their captions, CLIP embeddings and downsampled pixels
    (for the nearest-neighbour checks), and a few rows drawn as seen-caption prompts."""

    captions: list[str]
    embeddings: torch.Tensor  # (N, D) unit vectors on the CPU
    pixels: torch.Tensor  # (N, 3 * PIXEL_NN_SIZE ** 2) pixel_features, in [0, 1]
    prompt_captions: list[str]
    prompt_images: np.ndarray  # (P, H, W, 3)


def _train_side(store, ingest_key: str, reranker, limit: int, prompts: int, seed: int) -> TrainSide:
    """Embed and downsample the first `limit` training images in one pass, a batch at a time; only the drawn
    prompts' full images are kept."""
    total = min(limit, store.manifest("ingest", ingest_key)["rows"]["train"])
    rows = sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=min(prompts, total), replace=False))
    captions: list[str] = []
    kept: list[np.ndarray] = []
    embeddings, small = [], []
    for batch in iter_batches(store, shard_paths(store, "ingest", ingest_key, "train"), ["caption", "image"],
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


@task(name="evaluate", task_run_name=run_name("evaluate"), cache_policy=NONE)
def evaluate(cfg: Config, ingest: ArtifactRef, dvae: ArtifactRef, bpe: ArtifactRef, transformer: ArtifactRef,
             clip: ArtifactRef, generate: ArtifactRef) -> ArtifactRef:
    """The evaluation table of this pipeline's models, on `generate`'s candidates and more."""
    inputs = dict(ingest=ingest, dvae=dvae, bpe=bpe, transformer=transformer, clip=clip, generate=generate)
    return run_stage(cfg, "evaluate", inputs, _evaluate, cfg.evaluate.model_dump(mode="json"))


def _evaluate(w: Work) -> dict:
    """Measure, write `evaluate/<key>/` and log it to the stage's MLflow run; the manifest's fields."""
    cfg, store, run, eval_cfg = w.cfg, w.store, w.run, w.cfg.evaluate
    keys = {s: r.key for s, r in w.inputs.items()}
    pipe = load_pipeline(cfg, keys)
    report: dict = {"keys": keys}
    report["training"] = {s: far for s in ("dvae", "transformer", "clip")  # how far each model's training got
                          if (far := store.manifest(s, keys[s]).get("how_far"))}
    dvae_m = store.read_json(store.path("dvae", keys["dvae"], "metrics.json"))
    report["dvae"] = {"val_psnr": dvae_m["val_psnr"], "val_code_usage_fraction": dvae_m["val_code_usage_fraction"]}
    tr_m = store.read_json(store.path("transformer", keys["transformer"], "metrics.json"))
    report["transformer"] = {"val_bits_per_image_token": tr_m["val_bits_per_image_token"]}
    if store.exists(store.path("clip", keys["clip"], "metrics.json")):
        clip_m = store.read_json(store.path("clip", keys["clip"], "metrics.json"))
        report["clip"] = {k: clip_m[k] for k in ("val_i2t_recall_at_1", "val_t2i_recall_at_1", "val_chance_recall_at_1")
                          if k in clip_m}

    val = val_rows(store, keys["ingest"], eval_cfg.num_prompts, ("caption", "image"))
    val_captions, val_subsets = val["caption"], val["subset"]
    val_real = np.stack([decode_png(b) for b in val["image"]])
    train = _train_side(store, keys["ingest"], pipe.reranker, eval_cfg.train_images, eval_cfg.train_prompts,
                        eval_cfg.seed)
    # Prompts: the val captions first (their seeds are those of earlier evaluations), then the drawn train rows.
    captions = val_captions + train.prompt_captions
    real = np.concatenate([val_real, train.prompt_images]) if train.prompt_captions else val_real
    n_val, n = len(val_captions), eval_cfg.num_candidates
    rows, generation = _candidates(w, keys, captions, n)
    scores = np.array([[r["clip_score"] for r in p] for p in rows], dtype=np.float32)
    top1 = [decode_png(next(r for r in p if r["rank"] == 0)["image"]) for p in rows]
    random_pick = [decode_png(p[0]["image"]) for p in rows]  # candidates are i.i.d. draws: the first is a random one
    report["generation"] = {"prompts": n_val, "candidates": n, **rerank_gain(scores[:n_val]), **generation}

    with torch.inference_mode():
        recon = np.concatenate([_reconstruct(pipe, real[i:i + 256]) for i in range(0, len(real), 256)])
    groups = subset_groups(val_subsets, len(train.prompt_captions))
    images = {"real": real, "recon": recon, "top1": np.stack(top1), "random": np.stack(random_pick)}
    report["splits"] = _split_metrics(pipe, groups, captions, n_val, images, train, eval_cfg)

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
    table = pa.Table.from_pylist([r for p in rows for r in p], schema=GENERATIONS_SCHEMA)
    write_shard(store, w.path("generations.parquet"), table)
    store.write_bytes(w.path("top1_vs_random.png"), png_bytes(sheet))
    store.write_json(w.path("evaluation.json"), report)
    if store.exists(w.path("parts")):
        store.fs.rm(w.path("parts"), recursive=True)
    return {"config": eval_cfg.model_dump(mode="json"), "rows": {"generations": table.num_rows}}


def _candidates(w: Work, keys: dict[str, str], captions: list[str], n: int) -> tuple[list[list[dict]], dict]:
    """Per caption, its `n` candidates' rows in candidate order: the generate stage's own where it sampled that
    prompt with these settings (the first time a caption appears), the rest sampled now by the generate stage's
    `sample_candidates` (prompt i with seed `prompt_seed(evaluate.seed, i)`). And how many came from where."""
    cfg, gen = w.cfg, w.cfg.generate
    reused: dict[str, list[dict]] = {}
    if n == gen.num_candidates and gen.prime_image is None and gen.edit_mode is None:
        made = read_shard(w.store, w.input_path("generate", "generations.parquet"),
                          ["prompt", "candidate", "rank", "clip_score", "seed", "image", "image_tokens"]).to_pylist()
        for r in made:
            reused.setdefault(r["prompt"], []).append(r)
    take = {}
    for i, c in enumerate(captions):
        if c in reused and c not in take.values() and len(reused[c]) == n:
            take[i] = c
    todo = [i for i in range(len(captions)) if i not in take]
    began = time.perf_counter()
    table, _ = sample_candidates(cfg, {s: keys[s] for s in MODELS}, w.path("parts"), [captions[i] for i in todo],
                                 [prompt_seed(cfg.evaluate.seed, i) for i in todo], n)
    sampled = table.to_pylist()
    rows: list[list[dict]] = []
    for i in range(len(captions)):
        if i in take:
            rows.append(sorted(reused[take[i]], key=lambda r: r["candidate"]))
        else:
            j = todo.index(i)
            rows.append(sampled[j * n:(j + 1) * n])
    speed = {"images_per_s": len(todo) * n / max(time.perf_counter() - began, 1e-9)} if todo else {}
    return rows, {"from_generate_stage": len(take), "sampled_for_evaluation": len(todo), **speed}


def _reconstruct(pipe: DALLEPipeline, images: np.ndarray) -> np.ndarray:
    x = to_tensor(torch.from_numpy(images).to(pipe.device), pipe.normalization.mean, pipe.normalization.std)
    return to_uint8(pipe.dvae.decode(pipe.dvae.encode(x)), pipe.normalization.mean, pipe.normalization.std)


def _split_metrics(pipe: DALLEPipeline, groups: dict[str, list[int]], captions: list[str], n_val: int,
                   images: dict[str, np.ndarray], train: TrainSide, eval_cfg) -> dict[str, dict]:
    """`images`: (n, H, W, 3) uint8 per prompt: `real`, its dVAE reconstruction `recon`, the `top1` candidate and a
    `random` one. Per split: CLIP R-precision (top-1, random candidate, real image), Fréchet distance in CLIP space against
    half of the real images (with the other real half as the floor), nearest-training-image memorisation in CLIP
    space and in downsampled pixel space (the top-1 and, as the baseline, a random candidate), and the dVAE's
    reconstruction PSNR, SSIM and Fréchet distance to the real images (rFID in CLIP space, and in Inception's with
    `evaluate.inception_weights`), each over the split's real images and their own reconstructions."""
    pool = list(dict.fromkeys(captions))  # distinct captions: the R-precision candidates
    truth = [pool.index(c) for c in captions]
    text_emb = torch.cat([pipe.reranker.embed_texts(pool[i:i + 512]).cpu() for i in range(0, len(pool), 512)])

    def embed(images):
        return torch.cat([pipe.reranker.embed_images(images[i:i + 256]).cpu() for i in range(0, len(images), 256)])

    real, recon = images["real"], images["recon"]
    emb = {k: embed(images[k]) for k in ("top1", "random", "real", "recon")}
    nn_index, nn_sim = {}, {}
    for k in ("top1", "real"):
        nn_index[k], nn_sim[k] = nearest_neighbours(emb[k], train.embeddings)
    pixel_index = {"top1": pixel_nearest_neighbours(images["top1"], train.pixels),
                   "random": pixel_nearest_neighbours(images["random"], train.pixels)}
    in_train = set(train.captions)
    inception = None
    if eval_cfg.inception_weights:  # each image's features once; every split's distances are taken from them
        fid = InceptionFID(eval_cfg.inception_weights, pipe.device)
        inception = {k: fid.features(images[k]) for k in ("top1", "real", "recon")}
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
            if inception is not None:
                m["fid_top1"] = frechet_distance(inception["top1"][b], inception["real"][a])
                m["fid_real_halves"] = frechet_distance(inception["real"][b], inception["real"][a])
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
        if len(idx) >= 2:
            m["dvae_fd_clip"] = frechet_distance(emb["recon"][idx].numpy(), emb["real"][idx].numpy())
            if inception is not None:
                m["dvae_rfid"] = frechet_distance(inception["recon"][idx], inception["real"][idx])
        out[name] = m
    return out
