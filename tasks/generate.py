"""Generation stage: prompts -> N CLIP-ranked candidates each -> `generations/<key>/`.

Prompts are split into parts, one mapped task per part; each part is written
atomically, so a re-run only generates the missing parts.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE

from dalle_core.config import Config, ConfigError, config_from_dict, prime_rows_error
from dalle_core.device import resolve_device, sampling_precision
from dalle_core.editing import Edit, outline, pack
from dalle_core.generate import DALLEPipeline, GenerationError, load_edit, prompt_seed, ranks
from dalle_core.images import decode_png, grid, png_bytes
from storage.parquet import (
    GENERATIONS_SCHEMA,
    iter_batches,
    read_shard,
    shard_name,
    shard_paths,
    write_shard,
)
from storage.store import ArtifactStore
from tasks.clip import load_reranker
from tasks.common import (
    ArtifactRef,
    StagePlan,
    attach_run,
    claimed,
    logger,
    no_retry_on_user_error,
    open_store,
    ref,
    reuse,
    stage_keys,
    stage_run,
)
from tasks.dvae import load_dvae
from tasks.text import load_tokenizer
from tasks.transformer import load_transformer

PROMPTS_PER_PART = 4


@functools.lru_cache(maxsize=2)
def _load_pipeline(cfg_json: str) -> DALLEPipeline:
    cfg = config_from_dict(json.loads(cfg_json))
    store, keys = open_store(cfg), stage_keys(cfg)
    device = resolve_device(cfg.runner.device)
    dvae_model, normalization = load_dvae(store, keys["dvae"], device)
    return DALLEPipeline(load_transformer(store, keys["transformer"], device), dvae_model, normalization,
                         load_tokenizer(store, keys["bpe"], cfg.text.text_len), load_reranker(cfg, store, device),
                         sampling_precision(cfg.generate.precision, device))


def load_pipeline(cfg: Config) -> DALLEPipeline:
    """The models of this config (transformer, dVAE, tokenizer, CLIP) on its device, loaded once per process."""
    return _load_pipeline(json.dumps(cfg.model_dump(mode="json"), sort_keys=True))


def val_captions(store: ArtifactStore, images_key: str, limit: int, distinct: bool = True) -> list[str]:
    out: list[str] = []
    for batch in iter_batches(store, shard_paths(store, "images", images_key, "val"), ["caption"]):
        for c in batch.column("caption").to_pylist():
            if not distinct or c not in out:
                out.append(c)
            if len(out) >= limit:
                return out
    return out


def resolve_prompts(cfg: Config, store: ArtifactStore) -> list[str]:
    """The configured prompts (the config refuses empty ones), or the first distinct val captions."""
    prompts = list(cfg.generate.prompts)
    return prompts or val_captions(store, stage_keys(cfg)["images"], cfg.generate.num_val_prompts)


@task(name="plan-generation", cache_policy=NONE)
def plan_generation(cfg: Config, parent_run_id: str | None = None) -> StagePlan:
    """(first prompt index, prompts) of every part still to generate, and the stage's MLflow run, opened as
    the work starts; the finished artifact instead when there is nothing to do."""
    store, keys = open_store(cfg), stage_keys(cfg)
    if done := reuse(store, "generations", keys["generations"], cfg, parent_run_id):
        return StagePlan([], cached=done)
    with claimed(store, "generations", keys["generations"]):
        for stage in ("transformer", "dvae", "bpe"):
            store.require(stage, keys[stage])
        prompts = resolve_prompts(cfg, store)
        source_edit(cfg)  # a missing or unreadable source image, or a mask that does not fit, fails here in one line
        store.prepare("generations", keys["generations"])
        parts = [(i, prompts[i:i + PROMPTS_PER_PART]) for i in range(0, len(prompts), PROMPTS_PER_PART)]
        todo = [(i, p) for i, p in parts
                if not store.exists(store.path("generations", keys["generations"], "parts",
                                               shard_name(i // PROMPTS_PER_PART)))]
        logger().info("generate: %d prompts x %d candidates, %d part(s) to do", len(prompts),
                      cfg.generate.num_candidates, len(todo))
        run = stage_run(cfg, store, "generations", keys["generations"], cfg.generate.model_dump(mode="json"),
                        parent_run_id)
    return StagePlan(todo, run.run_id, stage="generations", key=keys["generations"])


def candidate_rows(prompt: str, seed: int, images: np.ndarray, scores: np.ndarray, codes: np.ndarray,
                   prime: str | None = None, edit: Edit | None = None, masks: np.ndarray | None = None) -> list[dict]:
    """GENERATIONS_SCHEMA rows of one prompt's candidates, in the order given; `masks` (n, h*w) their token masks
    when `edit` is set."""
    edited = {} if edit is None else {"edit": edit.mode, "source": f"{edit.source} (sha256 {edit.digest})"}
    return [{"prompt": prompt, "candidate": cand, "rank": int(rank), "clip_score": float(score), "seed": seed,
             "image": png_bytes(image), "image_tokens": tokens.astype(np.uint16), "prime": prime, **edited,
             **({} if edit is None else {"mask": pack(masks[cand])})}
            for cand, (image, score, rank, tokens) in enumerate(zip(images, scores, ranks(scores), codes))]


# the config keys that stand for `load_edit`'s arguments, in its errors
CONFIG_NAMES = {"prime_image": "generate.prime_image", "prime_rows": "generate.prime_rows",
                "edit_image": "generate.edit_image", "outpaint_image": "generate.edit_image",
                "variations": "generate.edit_image", "region": "generate.edit_region", "mask": "generate.edit_mask",
                "keep": "generate.edit_keep"}


def source_edit(cfg: Config) -> Edit | None:
    """`generate.prime_image` or `generate.edit_*` as the `Edit` the sampler keeps codes of, at the model's image
    size and token grid (loading the models); None without one. ConfigError (one line) for a missing or
    unreadable image, or a region or mask that does not fit the grid."""
    g = cfg.generate
    if g.prime_image is None and g.edit_image is None:
        return None
    pipe = load_pipeline(cfg)
    rows = pipe.transformer.c.image_grid
    if g.prime_image is not None and g.prime_rows >= rows:  # a pretrained dVAE's grid is known from its files only
        raise ConfigError(prime_rows_error(g.prime_rows, rows, "the dVAE's token grid"))
    source = {"inpaint": "edit_image", "outpaint": "outpaint_image", "variations": "variations"}.get(g.edit_mode)
    try:
        return load_edit(pipe.image_size, rows, prime_image=g.prime_image, prime_rows=g.prime_rows or None,
                         **({} if source is None else {source: g.edit_image}), region=g.edit_region,
                         mask=g.edit_mask, keep=g.edit_keep, names=CONFIG_NAMES)
    except GenerationError as err:
        raise ConfigError(str(err)) from None


def edit_lead(edit: Edit | None) -> tuple[list[np.ndarray], list[str]]:
    """The images a grid shows before the candidates, and their labels: the source and its sampled cells (dimmed,
    outlined); for variations, whose masks differ per candidate, the source only."""
    if edit is None:
        return [], []
    if edit.mask is None:
        return [edit.image], [f"source (keeps {edit.keep:.0%} of cells)"]
    return [edit.image, outline(edit.image, edit.mask)], [edit.mode if edit.mode == "prime" else "source",
                                                          "sampled cells"]


@task(name="generate-part", cache_policy=NONE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=no_retry_on_user_error)
def generate_part(cfg: Config, first: int, prompts: list[str]) -> dict:
    store, key, gen_cfg = open_store(cfg), stage_keys(cfg)["generations"], cfg.generate
    out = store.path("generations", key, "parts", shard_name(first // PROMPTS_PER_PART))
    t0 = time.perf_counter()
    pipe = load_pipeline(cfg)
    rows, truncated = [], []
    seeds = [prompt_seed(gen_cfg.seed, first + j) for j in range(len(prompts))]
    edit = source_edit(cfg)
    prime = f"{gen_cfg.prime_image} (top {gen_cfg.prime_rows} rows)" if gen_cfg.prime_image else None
    results = pipe.candidates(prompts, gen_cfg.num_candidates, seeds, gen_cfg.batch_size, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p,
                             gen_cfg.cond_scale, edit)
    for prompt, seed, (images, scores, was_truncated, codes) in zip(prompts, seeds, results):
        if was_truncated:
            truncated.append(prompt)
            logger().warning("prompt %r is longer than text_len=%d tokens and was truncated", prompt,
                             cfg.text.text_len)
        masks = None if edit is None else edit.masks(seed, gen_cfg.num_candidates)
        rows += candidate_rows(prompt, seed, images, scores, codes, prime, edit, masks)
    write_shard(store, out, pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA))
    seconds = time.perf_counter() - t0
    logger().info("generated prompts %d-%d: %d images in %.1fs (%.1f prompts/s, %.0f images/s)", first,
                  first + len(prompts) - 1, len(rows), seconds, len(prompts) / seconds, len(rows) / seconds)
    return {"prompts": len(prompts), "images": len(rows), "truncated": truncated, "seconds": seconds}


def best_grids(table: pa.Table, best_k: int, lead: list[np.ndarray] = (), lead_labels: list[str] = (),
               ) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """Per prompt, a grid of its best_k images with the prompt under it; and a contact sheet of all prompts.
    `lead`: images shown first in every row (editing: the source and its sampled cells, `edit_lead`)."""
    prompts, best = [], {}
    for row in table.select(["prompt", "rank", "image"]).to_pylist():
        if row["prompt"] not in best:
            prompts.append(row["prompt"])
            best[row["prompt"]] = {}
        if row["rank"] < best_k:
            best[row["prompt"]][row["rank"]] = decode_png(row["image"])
    rows = [[*lead, *(best[p][r] for r in sorted(best[p]))] for p in prompts]
    header = [*lead_labels, *(f"#{i + 1} by CLIP" for i in range(max(len(r) for r in rows) - len(lead)))] \
        if lead else None
    grids = {p: grid([r], [p], scale=4, header=header) for p, r in zip(prompts, rows)}
    return prompts, grids, grid(rows, prompts, scale=3, header=header)


@task(name="finish-generation", cache_policy=NONE)
def finish_generation(cfg: Config, plan: StagePlan, results: list[dict], wall_seconds: float) -> ArtifactRef:
    """Join the parts into generations.parquet, draw the grids and the contact sheet, close the MLflow run."""
    store, keys = open_store(cfg), stage_keys(cfg)
    key = keys["generations"]
    inputs = {s: keys[s] for s in ("transformer", "dvae", "clip", "bpe")}
    with claimed(store, "generations", key), attach_run(cfg, store, plan.run_id) as run:
        parts = shard_paths(store, "generations", key, "parts")
        table = pa.concat_tables([read_shard(store, p) for p in parts])
        write_shard(store, store.path("generations", key, "generations.parquet"), table)
        lead, labels = edit_lead(source_edit(cfg))
        prompts, grids, sheet = best_grids(table, cfg.generate.best_k, lead, labels)
        scores = table.column("clip_score").to_numpy()
        top1 = table.filter(pa.compute.equal(table.column("rank"), 0)).column("clip_score").to_numpy()
        metrics = {"prompts": len(prompts), "images": table.num_rows, "clip_score_mean": float(scores.mean()),
                   "clip_score_top1_mean": float(top1.mean())}
        made = sum(r["images"] for r in results)
        if made:
            metrics["images_per_s"] = made / max(wall_seconds, 1e-9)
            metrics["prompts_per_s"] = sum(r["prompts"] for r in results) / max(wall_seconds, 1e-9)
        run.log_metrics(metrics)
        for i, p in enumerate(prompts):
            data = png_bytes(grids[p])
            store.write_bytes(store.path("generations", key, "grids", f"prompt-{i:04d}.png"), data)
            run.log_image(grids[p], f"grids/prompt-{i:04d}.png")
        store.write_bytes(store.path("generations", key, "contact_sheet.png"), png_bytes(sheet))
        run.log_image(sheet, "contact_sheet.png")
        store.fs.rm(store.path("generations", key, "parts"), recursive=True)
        truncated = sorted({t for r in results for t in r["truncated"]})
        manifest = store.finish("generations", key, config=cfg.generate.model_dump(mode="json"), inputs=inputs,
                                rows={"generations": table.num_rows}, prompts=prompts, truncated_prompts=truncated,
                                metrics=metrics)
        run.log_dict(manifest, "manifest.json")
    logger().info("generations/%s: %d prompts, top-1 CLIP score %.3f (mean %.3f)", key, len(prompts),
                  metrics["clip_score_top1_mean"], metrics["clip_score_mean"])
    return ref(store, "generations", key, cached=False)


def export_generations(cfg: Config, key: str, out_dir: str) -> list[str]:
    """Copy generations.parquet, the per-prompt grids and the contact sheet to a plain folder."""
    store = open_store(cfg)
    store.require("generations", key)
    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
    written = []
    for rel in ["generations.parquet", "contact_sheet.png",
                *[f"grids/{n}" for n in store.listdir(store.path("generations", key, "grids"))]]:
        dest = os.path.join(out_dir, rel)
        with open(dest + ".tmp", "wb") as f:
            f.write(store.read_bytes(store.path("generations", key, rel)))
        shutil.move(dest + ".tmp", dest)
        written.append(dest)
    return written

