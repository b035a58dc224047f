"""Evaluation stage: how good are this pipeline's images? -> `evaluation/<key>/evaluation.json`.

Collects each stage's validation numbers, samples candidates for a fixed set of
val captions to measure the CLIP reranking gain (best of N vs a random
candidate), and on the shapes dataset checks caption faithfulness of the top-1
image, a random candidate, and the dVAE reconstruction of the real image.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.config import Config
from dalle_core.evaluation import faithfulness, has_pair, is_shapes_caption, rerank_gain
from dalle_core.generate import prompt_seed, prompts_per_batch
from dalle_core.images import decode_png, grid, png_bytes, to_tensor, to_uint8
from storage.parquet import GENERATIONS_SCHEMA, iter_batches, shard_paths, write_shard
from storage.store import ArtifactStore
from storage.tracking import StageRun
from tasks.common import (
    ArtifactRef,
    Progress,
    open_store,
    ref,
    reuse,
    stage_keys,
    stage_run,
)
from tasks.generate import candidate_rows, generator


def _val_rows(store, images_key: str, limit: int) -> tuple[list[str], np.ndarray]:
    captions, images = [], []
    for batch in iter_batches(store, shard_paths(store, "images", images_key, "val"), ["caption", "image"]):
        captions += batch.column("caption").to_pylist()
        images += [decode_png(b) for b in batch.column("image").to_pylist()]
        if len(captions) >= limit:
            break
    return captions[:limit], np.stack(images[:limit])


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(cfg: Config, parent_run_id: str | None = None) -> ArtifactRef:
    store, keys = open_store(cfg), stage_keys(cfg)
    key, e = keys["evaluation"], cfg.evaluate
    if done := reuse(store, "evaluation", key, cfg, parent_run_id):
        return done
    for stage in ("dvae", "transformer", "clip", "bpe", "images"):
        store.require(stage, keys[stage])
    store.prepare("evaluation", key)
    with stage_run(cfg, store, "evaluation", key, e.model_dump(mode="json"), parent_run_id) as run:
        _evaluate(cfg, store, keys, run)
    return ref(store, "evaluation", key, cached=False)


def _evaluate(cfg: Config, store: ArtifactStore, keys: dict, run: StageRun) -> None:
    """Measure, write `evaluation/<key>/` and log it to the stage's MLflow run."""
    key, e, g = keys["evaluation"], cfg.evaluate, cfg.generate
    gen = generator(cfg)
    report: dict = {"keys": {s: keys[s] for s in ("images", "dvae", "bpe", "tokens", "transformer", "clip")}}
    dvae_m = store.read_json(store.path("dvae", keys["dvae"], "metrics.json"))
    report["dvae"] = {"val_psnr": dvae_m["val_psnr"], "val_code_usage_fraction": dvae_m["val_code_usage_fraction"]}
    tr_m = store.read_json(store.path("transformer", keys["transformer"], "metrics.json"))
    report["transformer"] = {"val_bits_per_image_token": tr_m["val_bits_per_image_token"]}
    if store.exists(store.path("clip", keys["clip"], "metrics.json")):
        clip_m = store.read_json(store.path("clip", keys["clip"], "metrics.json"))
        report["clip"] = {k: clip_m[k] for k in ("val_i2t_recall_at_1", "val_t2i_recall_at_1", "val_chance_recall_at_1")
                          if k in clip_m}

    captions, real = _val_rows(store, keys["images"], e.num_prompts)
    n = e.num_candidates
    scores = np.zeros((len(captions), n), dtype=np.float32)
    top1, random_pick, rows = [], [], []
    progress = Progress("evaluate", len(captions), "prompts")
    t0 = time.perf_counter()
    per_call = prompts_per_batch(n, g.batch_size)  # one sampling batch per call
    for first in range(0, len(captions), per_call):
        group = captions[first:first + per_call]
        seeds = [prompt_seed(e.seed, first + j) for j in range(len(group))]
        results = gen.candidates(group, n, seeds, g.batch_size, g.temperature, g.top_k, g.top_p, g.cond_scale)
        for i, caption, seed, (images, s, _, codes) in zip(range(first, first + len(group)), group, seeds, results):
            scores[i] = s
            top1.append(images[int(np.argmax(s))])
            random_pick.append(images[0])  # candidates are i.i.d. draws, so the first is a random one
            rows += candidate_rows(caption, seed, images, s, codes)
        progress.update(len(group), extra=f"{(first + len(group)) * n / (time.perf_counter() - t0):.0f} images/s")
    report["generation"] = {"prompts": len(captions), "candidates": n, **rerank_gain(scores),
                            "images_per_s": len(captions) * n / max(time.perf_counter() - t0, 1e-9)}

    if all(is_shapes_caption(c) for c in captions):
        with torch.inference_mode():
            x = to_tensor(torch.from_numpy(real).to(gen.device), gen.norm.mean, gen.norm.std)
            recon = to_uint8(gen.dvae.decode(gen.dvae.encode(x)), gen.norm.mean, gen.norm.std)
        report["faithfulness"] = {"top1": faithfulness(top1, captions), "random": faithfulness(random_pick, captions),
                                  "dvae_reconstruction": faithfulness(list(recon), captions),
                                  "real_images": faithfulness(list(real), captions)}
        held = cfg.data.shapes.holdout if cfg.data.source == "shapes" else []
        idx = [i for i, c in enumerate(captions) if held and has_pair(c, held)]
        if idx:
            report["faithfulness"]["holdout_pairs"] = {
                "prompts": len(idx), **faithfulness([top1[i] for i in idx], [captions[i] for i in idx])}

    sheet = grid([[top1[i], random_pick[i]] for i in range(min(32, len(captions)))], captions[:32], scale=3,
                 header=[f"top-1 of {n} by CLIP", "random candidate"])
    run.log_metrics(flat_metrics(report))
    run.log_image(sheet, "top1_vs_random.png")
    run.log_dict(report, "evaluation.json")
    write_shard(store, store.path("evaluation", key, "generations.parquet"),
                pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA))
    store.write_bytes(store.path("evaluation", key, "top1_vs_random.png"), png_bytes(sheet))
    store.write_json(store.path("evaluation", key, "evaluation.json"), report)
    store.finish("evaluation", key, config=e.model_dump(mode="json"),
                 inputs={s: keys[s] for s in ("images", "dvae", "bpe", "transformer", "clip")},
                 rows={"generations": len(rows)})


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
