"""The generate stage: prompts -> N CLIP-ranked candidates each -> `generate/<key>/` (generations.parquet, a grid
per prompt, a contact sheet).

`sample_candidates` is the one way candidates are made, here and for the evaluate stage's other prompts: the
prompts are split into parts, one mapped task per part on the config's task runner, each part written
atomically, so a re-run only samples the missing parts.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pyarrow as pa
from prefect import task, unmapped
from prefect.cache_policies import NONE

from dalle_core.editing import Edit, outline, pack
from dalle_core.errors import ConfigError
from dalle_core.generate import prompt_seed, ranks
from dalle_core.images import decode_png, grid, png_bytes
from dalle_core.sampling import GenerationError
from pipeline.artifacts import (
    ArtifactRef,
    Work,
    no_retry_on_user_error,
    run_name,
    run_stage,
)
from pipeline.config import CONFIG_NAMES, Config, prime_rows_error
from pipeline.logs import log, progress
from pipeline.models import load_pipeline
from pipeline.runners import task_runner
from storage.parquet import (
    GENERATIONS_SCHEMA,
    read_shard,
    shard_name,
    val_rows,
    write_shard,
)
from storage.store import ArtifactStore

PROMPTS_PER_PART = 4
MODELS = ("dvae", "bpe", "transformer", "clip")


@task(name="generate", task_run_name=run_name("generate"), cache_policy=NONE)
def generate(cfg: Config, ingest: ArtifactRef, dvae: ArtifactRef, bpe: ArtifactRef, transformer: ArtifactRef,
             clip: ArtifactRef) -> ArtifactRef:
    """`generate.num_candidates` CLIP-ranked candidates for each prompt (`generate.prompts`, else the first
    `generate.num_val_prompts` distinct val captions of `ingest`), edited or primed as `generate.*` says."""
    inputs = {"ingest": ingest, "dvae": dvae, "bpe": bpe, "transformer": transformer, "clip": clip}
    return run_stage(cfg, "generate", inputs, _generate, cfg.generate.model_dump(mode="json"))


def _generate(w: Work) -> dict:
    cfg, store, gen = w.cfg, w.store, w.cfg.generate
    keys = {s: w.inputs[s].key for s in MODELS}
    prompts = resolve_prompts(cfg, store, w.inputs["ingest"].key)
    edit = source_edit(cfg, keys)  # a missing or unreadable source image, or a mask that does not fit: one line
    start = time.perf_counter()
    table, made = sample_candidates(cfg, keys, w.path("parts"), prompts,
                                    [prompt_seed(gen.seed, i) for i in range(len(prompts))], gen.num_candidates,
                                    edit=True)
    wall_seconds = time.perf_counter() - start
    write_shard(store, w.path("generations.parquet"), table)
    lead, labels = edit_lead(edit)
    prompts, grids, sheet = best_grids(table, gen.best_k, lead, labels)
    scores = table.column("clip_score").to_numpy()
    top1 = table.filter(pa.compute.equal(table.column("rank"), 0)).column("clip_score").to_numpy()
    metrics = {"prompts": len(prompts), "images": table.num_rows, "clip_score_mean": float(scores.mean()),
               "clip_score_top1_mean": float(top1.mean())}
    if made:
        metrics["images_per_s"] = made * gen.num_candidates / max(wall_seconds, 1e-9)
        metrics["prompts_per_s"] = made / max(wall_seconds, 1e-9)
    w.run.log_metrics(metrics)
    for i, p in enumerate(prompts):
        store.write_bytes(w.path("grids", f"prompt-{i:04d}.png"), png_bytes(grids[p]))
        w.run.log_image(grids[p], f"grids/prompt-{i:04d}.png")
    store.write_bytes(w.path("contact_sheet.png"), png_bytes(sheet))
    w.run.log_image(sheet, "contact_sheet.png")
    store.fs.rm(w.path("parts"), recursive=True)
    truncated = [p for p in prompts if _truncated(cfg, keys, p)]
    log.info("generate/%s: %d prompts, top-1 CLIP score %.3f (mean %.3f)", w.key, len(prompts),
             metrics["clip_score_top1_mean"], metrics["clip_score_mean"])
    return {"config": gen.model_dump(mode="json"), "rows": {"generations": table.num_rows}, "prompts": prompts,
            "truncated_prompts": truncated, "metrics": metrics}


def _truncated(cfg: Config, keys: dict, prompt: str) -> bool:
    return bool(load_pipeline(cfg, keys).tokenizer.encode([prompt])[1][0])


def sample_candidates(cfg: Config, keys: dict[str, str], parts_dir: str, prompts: list[str], seeds: list[int],
                      n: int, edit: bool = False) -> tuple[pa.Table, int]:
    """GENERATIONS_SCHEMA rows of `n` candidates for each prompt (prompt i drawn from `seeds[i]`), sampled with
    `generate.*`'s settings by the models of `keys` (by stage), `PROMPTS_PER_PART` prompts per mapped task on the
    config's task runner; parts are written under `parts_dir`, and those already there are read, not sampled.
    `edit`: apply `generate.prime_image` / `generate.edit_*`. Returns (the rows in prompt order, prompts sampled
    now)."""
    store = cfg.store.open()
    parts = [(i, prompts[i:i + PROMPTS_PER_PART], seeds[i:i + PROMPTS_PER_PART])
             for i in range(0, len(prompts), PROMPTS_PER_PART)]
    paths = [f"{parts_dir}/{shard_name(i // PROMPTS_PER_PART)}" for i, _, _ in parts]
    todo = [j for j, path in enumerate(paths) if not store.exists(path)]
    log.info("sampling %d prompts x %d candidates: %d part(s) to do", len(prompts), n, len(todo))
    meter = progress("sample", sum(len(parts[j][1]) for j in todo), "prompts")
    with task_runner(cfg) as runner:
        futures = runner.map(generate_part, {"cfg": unmapped(cfg), "keys": unmapped(keys), "n": unmapped(n),
                                             "edit": unmapped(edit), "path": [paths[j] for j in todo],
                                             "prompts": [parts[j][1] for j in todo],
                                             "seeds": [parts[j][2] for j in todo]})
        for j, future in zip(todo, futures):
            future.result()
            meter.update(len(parts[j][1]))
    meter.close()
    table = pa.concat_tables([read_shard(store, p) for p in paths]) if paths else GENERATIONS_SCHEMA.empty_table()
    return table, sum(len(parts[j][1]) for j in todo)


@task(name="generate-part", cache_policy=NONE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=no_retry_on_user_error)
def generate_part(cfg: Config, keys: dict[str, str], path: str, prompts: list[str], seeds: list[int], n: int,
                  edit: bool) -> dict:
    """Sample, rank and write one part of `sample_candidates` to `path` (atomically)."""
    gen = cfg.generate
    t0 = time.perf_counter()
    pipe = load_pipeline(cfg, keys)
    the_edit = source_edit(cfg, keys) if edit else None
    prime = f"{gen.prime_image} (top {gen.prime_rows} rows)" if edit and gen.prime_image else None
    results = pipe.candidates(prompts, seeds, gen.sampling().replace(num_candidates=n), the_edit)
    rows = []
    for prompt, seed, (images, scores, was_truncated, codes) in zip(prompts, seeds, results):
        if was_truncated:
            log.warning("prompt %r is longer than text_len=%d tokens and was truncated", prompt, cfg.text.text_len)
        masks = None if the_edit is None else the_edit.masks(seed, n)
        rows += candidate_rows(prompt, seed, images, scores, codes, prime, the_edit, masks)
    write_shard(cfg.store.open(), path, pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA))
    seconds = time.perf_counter() - t0
    log.info("sampled %d prompts: %d images in %.1fs (%.1f prompts/s, %.0f images/s)", len(prompts), len(rows),
             seconds, len(prompts) / seconds, len(rows) / seconds)
    return {"prompts": len(prompts), "images": len(rows), "seconds": seconds}


def resolve_prompts(cfg: Config, store: ArtifactStore, ingest_key: str) -> list[str]:
    """The configured prompts (the config refuses empty ones), or distinct val captions (`val_rows`)."""
    if cfg.generate.prompts:
        return list(cfg.generate.prompts)
    return val_rows(store, ingest_key, cfg.generate.num_val_prompts, distinct=True)["caption"]


def candidate_rows(prompt: str, seed: int, images: np.ndarray, scores: np.ndarray, codes: np.ndarray,
                   prime: str | None = None, edit: Edit | None = None, masks: np.ndarray | None = None) -> list[dict]:
    """GENERATIONS_SCHEMA rows of one prompt's candidates, in the order given; `masks` (n, h*w) their token masks
    when `edit` is set."""
    edited = {} if edit is None else {"edit": edit.mode, "source": f"{edit.source} (sha256 {edit.digest})"}
    return [{"prompt": prompt, "candidate": cand, "rank": int(rank), "clip_score": float(score), "seed": seed,
             "image": png_bytes(image), "image_tokens": tokens.astype(np.uint16), "prime": prime, **edited,
             **({} if edit is None else {"mask": pack(masks[cand])})}
            for cand, (image, score, rank, tokens) in enumerate(zip(images, scores, ranks(scores), codes))]


def source_edit(cfg: Config, keys: dict[str, str] | None = None) -> Edit | None:
    """`generate.prime_image` or `generate.edit_*` as the `Edit` the sampler keeps codes of, at the model's image
    size and token grid (loading the models of `keys`, default the config's); None without one. ConfigError (one
    line) for a missing or unreadable image, or a region or mask that does not fit the grid."""
    g = cfg.generate
    if g.prime_image is None and g.edit_image is None:
        return None
    pipe = load_pipeline(cfg, keys)
    rows = pipe.transformer.c.grid_hw[0]
    if g.prime_image is not None and g.prime_rows >= rows:  # a pretrained dVAE's grid is known from its files only
        raise ConfigError(prime_rows_error(g.prime_rows, rows, "the dVAE's token grid"))
    try:
        return g.edit_request().resolve(pipe.image_size, pipe.transformer.c.image_grid, CONFIG_NAMES)
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


def export_generations(cfg: Config, key: str, out_dir: str) -> list[str]:
    """Copy generations.parquet, the per-prompt grids and the contact sheet to a plain folder."""
    store = cfg.store.open()
    store.require("generate", key)
    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
    written = []
    for rel in ["generations.parquet", "contact_sheet.png",
                *[f"grids/{n}" for n in store.listdir(store.path("generate", key, "grids"))]]:
        dest = os.path.join(out_dir, rel)
        with open(dest + ".tmp", "wb") as f:
            f.write(store.read_bytes(store.path("generate", key, rel)))
        shutil.move(dest + ".tmp", dest)
        written.append(dest)
    return written

