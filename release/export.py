"""`dalle export`: a run's trained models, read from its store, as a self-contained model folder
(dalle_core/model_folder.py) with a model card. The same run exported twice gives the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from dalle_core.bpe import TextTokenizer
from dalle_core.errors import ConfigError
from dalle_core.images import grid, png_bytes
from dalle_core.lora import ADAPTER_FILES
from dalle_core.model_folder import (
    COMPONENTS,
    CONTENT_FILES,
    clip_files,
    has_adapter,
    index,
    json_bytes,
    open_clip_files,
    write_folder,
)
from pipeline.config import Config, flatten
from pipeline.model_source import artifact_reader
from pipeline.models import load_pipeline, load_reranker
from pipeline.stage_table import stage_keys
from release.model_card import data_licence, headline_metrics, model_card
from storage.parquet import val_rows
from storage.store import ArtifactStore
from storage.tracking import StageRun, _client, code_version, producer_run, tracking_uri

MODEL_STAGES = ("transformer", "dvae", "bpe", "clip")


@dataclass
class Export:
    """What `export_model` wrote: the folder, its files, and where its sample picture came from."""

    folder: str
    files: list[str]
    samples_from: str
    keys: dict[str, str]


def model_files(cfg: Config, store: ArtifactStore, keys: dict[str, str]) -> dict[str, bytes]:
    """The component folders' files: the store's weights and configs as they are (transformer, dvae), the BPE
    tokenizer, and the reranking CLIP (this project's checkpoint split into weights, config and tokenizer)."""
    files: dict[str, bytes] = {}
    for stage in ("transformer", "dvae"):
        read = artifact_reader(store, stage, keys[stage], cfg, verify=True)  # LoRA: its base and its adapter
        adapter = ADAPTER_FILES if stage == "transformer" and has_adapter(read) else ()
        for name in (*CONTENT_FILES[stage], *adapter):
            files[f"{stage}/{name}"] = read(name)
    tokenizer = artifact_reader(store, "bpe", keys["bpe"], verify=True)("tokenizer.json")
    pad_id = TextTokenizer.from_str(tokenizer.decode(), cfg.text.text_len).pad_id
    files["tokenizer/tokenizer.json"] = tokenizer
    files["tokenizer/config.json"] = json_bytes({"text_len": cfg.text.text_len, "pad_id": pad_id})
    spec = cfg.clip.pretrained
    if spec and not os.path.isfile(spec):  # an open_clip model: its weights as loaded

        clip = open_clip_files(load_reranker(cfg, store, keys["clip"]).model, spec.partition(":")[0])
    else:
        if spec:
            with open(spec, "rb") as f:
                checkpoint = f.read()
        else:
            checkpoint = artifact_reader(store, "clip", keys["clip"], verify=True)("model.safetensors")
        clip = clip_files(checkpoint)
    files.update({f"clip/{name}": data for name, data in clip.items()})
    return files


def samples_picture(cfg: Config, store: ArtifactStore, keys: dict[str, str]) -> tuple[bytes, str]:
    """(PNG, where from) of the run's top-1 samples: the evaluation's top-1-vs-random sheet, else the generation
    stage's contact sheet, else top-1 of `generate.num_candidates` for four val captions, drawn now."""
    for stage, key, name in (("evaluate", keys["evaluate"], "top1_vs_random.png"),
                             ("generate", keys["generate"], "contact_sheet.png")):
        if store.is_complete(stage, key):
            return store.read_bytes(store.path(stage, key, name)), f"{stage}/{key}/{name}"

    done = store.is_complete("ingest", keys["ingest"])
    prompts = val_rows(store, keys["ingest"], 4, distinct=True)["caption"] if done else []
    prompts = prompts or ["a red circle"]
    out = load_pipeline(cfg)(prompts, **cfg.generate.sampling_defaults())
    sheet = grid([[images[0]] for images in out.pixels], prompts, scale=3,
                 header=[f"top-1 of {cfg.generate.num_candidates} by CLIP"])
    return png_bytes(sheet), f"drawn at export (seed {cfg.generate.seed})"


def training_commit(cfg: Config, store: ArtifactStore, transformer_key: str) -> dict:
    """{git_commit, git_dirty, git_commit_of}: the commit the transformer's MLflow run recorded, else (a run not in
    this tracking store) the commit of the code exporting it."""

    uri = tracking_uri(cfg.tracking.uri, store)
    found = producer_run(uri, cfg.tracking.experiment, "transformer", transformer_key)
    tags, of = code_version(), "export"
    if run_id := found and found[0]:
        run_tags = _client(uri).get_run(run_id).data.tags
        if "mlflow.source.git.commit" in run_tags:
            tags, of = run_tags, "training"
    return {"git_commit": tags.get("mlflow.source.git.commit"), "git_dirty": tags.get("git_dirty") == "true",
            "git_commit_of": of}


def export_model(cfg: Config, out_dir: str) -> Export:
    """Write the model folder of `cfg`'s run to `out_dir` (a new folder, or an earlier export to replace):
    dalle_core/model_folder.py's layout, the model card README.md, samples.png, and the data's licence files under
    data/. StoreError (one line) when a model stage of the run is not finished."""
    if not out_dir:
        raise ConfigError("--out is empty; give the folder to write the model to")
    store, keys = cfg.store.open(), stage_keys(cfg)
    manifests = {s: store.require(s, keys[s]) for s in MODEL_STAGES if s != "clip" or not cfg.clip.pretrained}
    files = model_files(cfg, store, keys)
    files["samples.png"], samples_from = samples_picture(cfg, store, keys)
    licence = data_licence(cfg)
    files.update({f"data/{name}": data for name, data in licence.files.items()})
    evaluation = None
    if store.is_complete("evaluate", keys["evaluate"]):
        evaluation = store.read_json(store.path("evaluate", keys["evaluate"], "evaluation.json"))
    config = os.path.basename(cfg.tracking.source) if cfg.tracking.source else None  # no machine paths
    source = {"config": config, **training_commit(cfg, store, keys["transformer"]),
              "stage_keys": {s: keys[s] for s in (*MODEL_STAGES, "ingest", "pretokenize")}}
    image_size = json.loads(files["dvae/config.json"])["model"]["image_size"]
    metrics = headline_metrics(manifests, evaluation)
    # each component file's sha256 (first 16 hex digits), so a damaged copy is found before it is loaded
    checksums = {name: hashlib.sha256(data).hexdigest()[:16] for name, data in sorted(files.items())
                 if name.split("/")[0] in COMPONENTS}
    done = store.is_complete("ingest", keys["ingest"])
    example = (val_rows(store, keys["ingest"], 1)["caption"] if done else []) or ["a red circle"]
    files["README.md"] = model_card(cfg, manifests, metrics, evaluation, licence, source, samples_from,
                                    example[0]).encode()
    # `files`: what this export owns, so a later export replaces exactly these and nothing of the user's
    files["model_index.json"] = json_bytes(index(image_size, cfg.generate.sampling_defaults(), source=source,
                                                 data_licence=licence.spdx, metrics=metrics, sha256=checksums,
                                                 files=sorted(files)))
    written = write_folder(out_dir, files)
    return Export(out_dir, written, samples_from, keys)



def register_export(cfg: Config, export: Export, name: str, alias: str | None = None):
    """Register the exported folder as the next version of MLflow model `name` (`models:/<name>/<N>`, a
    release.registry.RegisteredModel) in the run's tracking store: a pyfunc model (release/mlflow_model.py) linked to
    the runs that trained its parts; `alias` (e.g. champion) is set on the new version. TrackingError (one line) when
    MLflow refuses."""
    from pathlib import Path

    import pandas as pd

    # MLflow's pyfunc and registry modules load MLflow and pandas: only `--register` pays for them
    from release.mlflow_model import ARTIFACT, DALLEPyfunc, requirements, signature
    from release.registry import check_model_name, register_pyfunc

    store, keys = cfg.store.open(), export.keys
    uri = tracking_uri(cfg.tracking.uri, store)
    idx = json.loads((Path(export.folder) / "model_index.json").read_text(encoding="utf-8"))
    runs = {stage: (producer_run(uri, cfg.tracking.experiment, stage, keys[stage]) or (None,))[0]
            for stage in ("dvae", "bpe", "transformer", "clip", "evaluate")}
    made_by = ", ".join(f"{s} run `{r}`" for s, r in runs.items() if r) or "runs not in this tracking store"
    description = (f"`{idx['source']['config'] or '(built-in defaults)'}`'s model (transformer `{keys['transformer']}`), "
                   f"made by {made_by}. Serve it: `mlflow models serve -m models:/{name}/<version> --env-manager "
                   "local`. Its model card is the README.md of the exported folder in the model's artifacts.")
    example = (pd.DataFrame({"prompt": ["a red circle"]}), {"num_candidates": 2})
    pyfunc = {"python_model": DALLEPyfunc(), "artifacts": {ARTIFACT: export.folder},
              "signature": signature(idx["sampling"]), "pip_requirements": requirements(), "input_example": example,
              "model_config": {"fuse_lora": False}}  # declared, so load_model(uri, model_config={...}) may set it
    check_model_name(name)
    with StageRun(uri, cfg.tracking.experiment, store, f"export-{keys['transformer']}", stage="export",
                  key=keys["transformer"]) as run:
        run.log_params(flatten({"generate": idx["sampling"], "stage_keys": idx["source"]["stage_keys"]}))
        run.log_metrics(idx.get("metrics", {}))
        return register_pyfunc(run, name, pyfunc, runs, description, alias)
