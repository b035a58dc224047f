"""The model card (README.md) of an exported model: what it was trained on under which licence, how to use
it, its headline numbers, its config and the commit that trained it, in Hugging Face's model-card layout
(YAML front matter, then Markdown). Nothing in it changes between two exports of the same run."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field

import yaml

from dalle_core.evaluation import format_report
from dalle_core.images import size_text
from pipeline.config import Config

LICENCE_FILES = ("ATTRIBUTION.md", "ATTRIBUTION.txt", "ATTRIBUTION", "LICENSE.txt", "LICENSE.md", "LICENSE",
                 "LICENCE.txt", "LICENCE.md", "LICENCE", "COPYING")
KNOWN_LICENCES = {"cc by-sa 4.0": "cc-by-sa-4.0", "cc-by-sa-4.0": "cc-by-sa-4.0", "cc by 4.0": "cc-by-4.0",
                  "cc0": "cc0-1.0", "mit license": "mit", "apache license": "apache-2.0", "apache 2.0": "apache-2.0"}


@dataclass
class DataLicence:
    """The training data's licence: an SPDX-like id for the card's front matter (Hugging Face's `license`),
    a Markdown paragraph with its attribution, and the licence files to ship under data/."""

    spdx: str
    text: str
    files: dict[str, bytes] = field(default_factory=dict)


def data_licence(cfg: Config) -> DataLicence:
    """The data source's licence and attribution: the built-in shapes are this project's own drawings; for a
    local source, the ATTRIBUTION/LICENSE files beside the data (as `dalle data openmoji` writes them) travel
    with the model; where none is found the card says so."""
    data = cfg.data
    if data.source == "shapes":
        return DataLicence("mit", "The built-in *shapes* data set: captioned pictures drawn procedurally by "
                                  "`data_sources/shapes.py` (no third-party images; this project's MIT licence).")
    folder = data.path if data.path and os.path.isdir(data.path) else os.path.dirname(data.path or "")
    files = {}
    for name in LICENCE_FILES:
        path = os.path.join(folder, name) if folder else name
        if folder and os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    where = f"`data.source: {data.source}`, `{os.path.basename(os.path.normpath(data.path or ''))}`"
    if not files:
        hub = f" See the data set's card: https://huggingface.co/datasets/{data.path}." if data.source == "hf" else ""
        return DataLicence("other", f"{where}. No ATTRIBUTION or LICENSE file was found beside the data, so its "
                                    f"licence is not recorded here: add it before sharing this model.{hub}")
    attribution = next((files[n].decode("utf-8", "replace").strip() for n in files if n.startswith("ATTRIBUTION")), "")
    all_text = " ".join(v.decode("utf-8", "replace") for v in files.values()).lower()
    spdx = next((v for k, v in KNOWN_LICENCES.items() if k in all_text), "other")
    share = (" Its licence requires this attribution to travel with anything made from the data, this model "
             "included; adaptations are shared under the same licence." if spdx.startswith("cc-by") else "")
    quoted = "\n".join(f"> {line}" if line else ">" for line in attribution.splitlines())
    return DataLicence(spdx, f"{where}, under **{spdx}**.{share} The licence files are in `data/` "
                             f"({', '.join(f'`{n}`' for n in files)}).\n\n{quoted}".rstrip(), files)


def headline_metrics(manifests: dict[str, dict], evaluation: dict | None) -> dict[str, float]:
    """{name: value}: each trained stage's final validation numbers, and the evaluation's reranking gain,
    caption faithfulness (shapes) and R-precision where the run was evaluated."""
    out: dict[str, float] = {}
    picks = {"dvae": ("val_psnr", "val_code_usage_fraction"), "transformer": ("val_bits_per_image_token",),
             "clip": ("val_i2t_recall_at_1", "val_chance_recall_at_1")}
    for stage, names in picks.items():
        metrics = (manifests.get(stage) or {}).get("metrics") or {}
        out.update({f"{stage}.{n}": float(metrics[n]) for n in names if n in metrics})
    if evaluation:
        gen = evaluation.get("generation", {})
        out.update({f"generation.{k}": float(v) for k, v in gen.items() if k.startswith("clip_")})
        for column in ("top1", "random"):
            for k, v in (evaluation.get("faithfulness", {}).get(column) or {}).items():
                if k.endswith(".all"):  # single-object, two-object and overall scenes
                    out[f"faithfulness.{column}.{k}"] = float(v)
        for split, m in (evaluation.get("splits") or {}).items():
            out.update({f"splits.{split}.{k}": float(m[k]) for k in ("r_precision_top1", "r_precision_random")
                        if k in m})
    return out


_DESCRIBE = {"dvae.val_psnr": "dVAE reconstruction PSNR (val, dB)", "dvae.val_code_usage_fraction": "codebook in use",
             "transformer.val_bits_per_image_token": "transformer bits per image token (val)",
             "clip.val_i2t_recall_at_1": "CLIP image-to-text recall@1 (val)",
             "clip.val_chance_recall_at_1": "... chance"}


def _describe(name: str) -> str:
    if name in _DESCRIBE:
        return _DESCRIBE[name]
    if m := re.fullmatch(r"generation\.clip_top1_of_(\d+)", name):
        return f"CLIP score, top-1 of {m[1]}"
    if m := re.fullmatch(r"faithfulness\.(top1|random)\.(single|pair|overall)\.all", name):
        scenes = {"single": "one-object", "pair": "two-object", "overall": "all"}[m[2]]
        return f"caption faithfulness, {scenes} scenes, {'top-1' if m[1] == 'top1' else 'a random candidate'}"
    if m := re.fullmatch(r"splits\.(.+)\.r_precision_(top1|random)", name):
        return f"R-precision, {m[1]} captions, {'top-1' if m[2] == 'top1' else 'a random candidate'}"
    return {"generation.clip_random": "CLIP score, a random candidate"}.get(name, name)


def model_card(cfg: Config, manifests: dict[str, dict], metrics: dict[str, float], evaluation: dict | None,
               licence: DataLicence, source: dict, samples_from: str, example: str) -> str:
    """The README.md of an exported model; `example`: a prompt to show in its usage (a val caption)."""
    name = os.path.splitext(os.path.basename(source.get("config") or "dalle"))[0]
    commit = source.get("git_commit") or "unknown (not a git checkout)"
    dirty = " with uncommitted changes" if source.get("git_dirty") else ""
    of = "" if source.get("git_commit_of") == "training" else " (the exporting code's: the training run is not in this tracking store)"
    t, d = manifests["transformer"], manifests["dvae"]
    run_cfg = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("store", "tracking", "runner")}
    rows = "\n".join(f"| {_describe(k)} | `{k}` | {v:.4g} |" for k, v in metrics.items())
    g = cfg.generate
    report = ""
    if evaluation:

        report = f"\n<details><summary>The whole evaluation</summary>\n\n```\n{format_report(evaluation)}\n```\n</details>\n"
    return f"""---
license: {licence.spdx}
library_name: dalle-pipeline
pipeline_tag: text-to-image
tags: [text-to-image, dall-e, dvae, clip-reranking]
---

# {name}: a DALL-E (1)-style text-to-image model

A decoder-only transformer over `[text tokens ; image tokens]` ({t.get('num_params', 0) / 1e6:.1f}M parameters,
{t.get('steps', '?')} steps), an image tokenizer with a {d.get('grid', ['?', '?'])[0]}x{d.get('grid', ['?', '?'])[1]} grid of
{d.get('codebook_size', '?')} codes for {size_text(cfg.data.image_size)} px images, a byte-level BPE text tokenizer and a CLIP
that ranks the candidates, trained with dalle-pipeline from `{source.get('config') or '(built-in defaults)'}`
at git commit `{commit}`{dirty}{of}.

![top-1 samples](samples.png)

*samples.png*: from `{samples_from}`.

## Use it

```
dalle generate --model DIR {shlex.quote(example)} --out out/
dalle serve --model DIR                       # a web page and a JSON API on http://127.0.0.1:8000
```

```python
from dalle_core.generate import DALLEPipeline

pipe = DALLEPipeline.from_pretrained("DIR")   # CPU or GPU (device="auto"); no store, Prefect or MLflow
out = pipe([{json.dumps(example, ensure_ascii=False)}], num_candidates={g.num_candidates}, seed=0)
out.images[0][0], out.scores[0][0]            # the best image by CLIP and its score
```

Sampling defaults (from the run's `generate` section): {g.num_candidates} candidates, guidance
`cond_scale` {g.cond_scale}, `temperature` {g.temperature}, `top_k` {g.top_k}, `top_p` {g.top_p}, seed {g.seed}.

## Training data

{licence.text}

## Evaluation

| metric | name | value |
|---|---|---|
{rows}
{report}
## Training config

<details><summary>The run's config (<code>store</code>, <code>tracking</code> and <code>runner</code> left out: where
it ran, not what it is)</summary>

```yaml
{yaml.safe_dump(run_cfg, sort_keys=False).rstrip()}
```
</details>

Stage keys (the content-addressed artifacts it was made from): {', '.join(f'{s} `{k}`' for s, k in source['stage_keys'].items())}.
"""
