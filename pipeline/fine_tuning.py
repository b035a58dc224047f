"""A training stage that starts from an earlier model (docs/finetuning.md): its weights loaded and parts frozen
(`start_model`), the source recorded in MLflow and the manifest (`source_tags`, `source_note`), and the dvae and
bpe stages under `tokenizers_from`, which take an exported model's tokenizers instead of training
(`take_tokenizer`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dalle_core.errors import ConfigError, load_reason
from dalle_core.lora import LoraConfig, add_lora
from dalle_core.model_folder import build_dvae, read_component, read_index
from dalle_core.train import CLIP_PARTS, DALLE_PARTS, freeze
from pipeline.logs import log
from pipeline.model_source import ModelSource, model_source
from pipeline.runs import run_link
from pipeline.source_fit import check_fine_tuning
from pipeline.stage_table import stage_keys
from storage.tracking import producer_run, tracking_uri


@dataclass
class Start:
    """How a training stage's model starts: from `source`'s weights (None: a fresh init), with the parts in
    `freeze` kept as they are; `trainable` of `total` parameters train."""

    source: ModelSource | None
    freeze: list[str]
    trainable: int
    total: int
    lora: LoraConfig | None = None  # adapters train on the frozen source (dalle_core/lora.py)

    def describe(self) -> str:
        """The log line's words: `1,234 of 5,678 parameters train (frozen: embeddings); from <spec> (digest d)`."""
        frozen = f" (frozen: {', '.join(self.freeze)})" if self.freeze else ""
        if self.lora:
            frozen = f" (LoRA rank {self.lora.rank} on {', '.join(self.lora.targets)}; the base frozen)"
        origin = f"; starting from {self.source.spec} (digest {self.source.digest})" if self.source else ""
        return f"{self.trainable:,} of {self.total:,} parameters train{frozen}{origin}"

    def manifest(self, tags: dict[str, str] | None = None) -> dict:
        """What the stage's manifest records: the trainable count, the frozen parts, the source (with the id of
        the run that made it, from `source_tags`)."""
        source = {**self.source.record(), "run_id": (tags or {}).get("init_from.run_id")} if self.source else None
        return {"trainable_params": self.trainable, **({"init_from": source} if source else {}),
                **({"freeze": self.freeze} if self.freeze else {}), **({"lora": asdict(self.lora)} if self.lora else {})}


def start_model(cfg, stage: str, model, store) -> Start:
    """Load `<stage>.init_from`'s weights into `model` (a dVAE's discriminator, not part of an artifact, starts
    fresh) and freeze `<stage>.train.freeze`; before the optimizer is made. ConfigError (one line) when the
    weights do not load."""

    section = getattr(cfg, stage)
    source = None
    if section.init_from:
        source = model_source(section.init_from, stage, store, f"{stage}.init_from", cfg)
        try:
            missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
            missing = [k for k in missing if not k.startswith("discriminator.")]
            why = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else ""
        except Exception as err:  # safetensors' and torch's own kinds: another shape, a damaged file
            why = load_reason(err)
        if why:
            raise ConfigError(f"{stage}.init_from {source.spec!r} does not load into this run's {stage}: {why}")
    lora = getattr(section.train, "lora", None)
    if lora is not None:  # the loaded weights stay as they are; only the adapters train
        add_lora(model, lora)
        params = list(model.parameters())
        trainable, total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        return Start(source, [], trainable, total, lora)
    parts = {"transformer": (DALLE_PARTS, getattr(section, "depth", 0)),
             "clip": (CLIP_PARTS, max(getattr(section, "vision_layers", 0), getattr(section, "text_layers", 0)))}
    if stage in parts:
        trainable, total = freeze(model, section.train.freeze, *parts[stage])
    else:
        trainable = total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ConfigError(f"{stage}.train.freeze {section.train.freeze} leaves no parameter to train")
    return Start(source, list(section.train.freeze), trainable, total)


def source_tags(cfg, source: ModelSource, store, prefix: str = "init_from") -> dict[str, str]:
    """MLflow tags naming a source: `<prefix>` (the spec), `.digest`, `.kind`, and `.run_id` with a link to the
    run that made it when that run is in this run's tracking store (else `.run_id` says it is not)."""

    tags = {prefix: source.spec, f"{prefix}.digest": source.digest, f"{prefix}.kind": source.kind,
            f"{prefix}.location": source.location}
    uri = tracking_uri(cfg.tracking.uri, store)
    found = producer_run(uri, None, *source.made_by) if source.made_by else None
    if found:
        tags[f"{prefix}.run_id"], tags[f"{prefix}.run_url"] = found[0], run_link(uri, found[1], found[0])
    elif source.kind == "upstream":
        tags[f"{prefix}.run_id"] = "none: an upstream tokenizer's own files"
    else:
        tags[f"{prefix}.run_id"] = "not in this tracking store"
    return tags


def source_note(tags: dict[str, str], prefix: str = "init_from") -> str:
    """The run description (MLflow's `mlflow.note.content`) for a run made from a source, linking its run."""
    link = (f"; made by run [{tags[prefix + '.run_id'][:8]}]({tags[prefix + '.run_url']})"
            if prefix + ".run_url" in tags else " (the run that made it is not in this tracking store)")
    verb = "Fine-tuned from" if prefix == "init_from" else "Tokenizers taken from"
    return f"{verb} `{tags[prefix]}` ({tags[prefix + '.kind']}, content digest {tags[prefix + '.digest']}){link}."


def take_tokenizer(w) -> dict:
    """The dvae or bpe stage's work under `tokenizers_from`: the exported model's dVAE (config.json,
    model.safetensors) or BPE (tokenizer.json) written to `<stage>/<key>` as they are, nothing trained; the key is
    their content digest, and the manifest and MLflow run record where they came from. Returns the manifest's
    fields."""

    cfg, store, stage, key = w.cfg, w.store, w.stage, w.key
    component = "dvae" if stage == "dvae" else "tokenizer"
    check_fine_tuning(cfg, [], store, stage_keys(cfg))
    source = model_source(cfg.tokenizers_from, component, None, "tokenizers_from", cfg)
    tags = source_tags(cfg, source, store, "tokenizers_from")
    w.run.set_tags({**tags, "mlflow.note.content": source_note(tags, "tokenizers_from")})
    if stage == "dvae":
        model = build_dvae(source.model_config())
        try:  # a damaged file fails here, not in the pretokenize stage
            model.load_state_dict(source.state_dict())
        except Exception as err:
            raise ConfigError(f"tokenizers_from {source.spec!r}: its dVAE does not load: {load_reason(err)}") from None
        made = {"grid": list(model.c.grid_hw), "codebook_size": model.c.codebook_size}
        names = ("config.json", "model.safetensors")
        # the val numbers its own run measured (on that run's data), as the export's index keeps them
        measured = read_index(Path(source.location).parent).get("metrics", {})
        store.write_json(w.path("metrics.json"), {
            "val_psnr": measured.get("dvae.val_psnr", float("nan")),
            "val_code_usage_fraction": measured.get("dvae.val_code_usage_fraction", float("nan")),
            "steps": 0, "measured_on": f"the data of the run that made {source.spec}"})
    else:
        tok = read_component("tokenizer", source.read, cfg.text.text_len)  # the one reader: one line for a bad file
        made = {"pad_id": tok.pad_id, "text_len": cfg.text.text_len, "vocab_size": tok.vocab_size}
        names = ("tokenizer.json",)
    for name in names:
        store.write_bytes(w.path(name), source.read(name))
    log.info("%s/%s: taken from %s (digest %s), not trained", stage, key, source.location, source.digest)
    return {"config": {"tokenizers_from": cfg.tokenizers_from}, "steps": 0,
            "tokenizers_from": {**source.record(), "run_id": tags["tokenizers_from.run_id"]}, **made}
