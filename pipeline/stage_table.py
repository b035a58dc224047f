"""The stage table: the only place the pipeline's graph is written.

One record per stage: its name (the same in the CLI's `--only/--from/--force`, the store folder, the task, the
MLflow run and the docs), the stages whose artifacts it reads (the pipeline passes them as arguments, so they
are the edges Prefect draws), the part of the config its key hashes, and the `dalle` command that runs the
pipeline up to it. Keys, stage selection, upstream checks and the manifest's `inputs` all read it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dalle_core import pretrained
from dalle_core.dvae import DVAEConfig
from dalle_core.errors import ConfigError
from dalle_core.evaluation import METRICS_VERSION
from dalle_core.sampling import SAMPLING_DEFAULTS
from data_sources.reader import source_fingerprint
from pipeline.config import Config
from pipeline.model_source import source_digest
from storage.store import content_key, file_digest

StageName = Literal["ingest", "dvae", "bpe", "pretokenize", "transformer", "clip", "generate", "evaluate"]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: `inputs` are the stages whose artifacts it reads; its key hashes `section(cfg)` and
    the keys of `keyed(cfg)` (its inputs, where the config does not say fewer)."""

    name: str
    inputs: tuple[str, ...]
    section: Callable[[Config], dict]
    command: str
    keyed: Callable[[Config], tuple[str, ...]] | None = None
    trained: bool = False  # draws training batches through the one training stage (DDP flags, batch checks)

    def key_inputs(self, cfg: Config) -> tuple[str, ...]:
        return self.keyed(cfg) if self.keyed else self.inputs

    def key(self, cfg: Config, input_keys: dict[str, str]) -> str:
        """The content-addressed key from the config and the keys of the inputs it reads."""
        return content_key(self.section(cfg), {s: input_keys[s] for s in self.key_inputs(cfg)})


def _content(path: str | None) -> str | None:
    """A local file named in the config enters a key as its content's digest, not its path."""
    return file_digest(path) if path and os.path.exists(path) else path


def _ingest(cfg: Config) -> dict:
    data = cfg.data.model_dump(mode="json")
    if not data["shapes"]["colours"]:  # all colours: leave the option out of the key
        del data["shapes"]["colours"]
    if data["fit"] == "crop" or data["source"] == "shapes":  # the default (what runs did before `fit`); shapes
        del data["fit"]                                          # are drawn in their frame: nothing to fit
    fingerprint = source_fingerprint(cfg.data)  # changed data is a new artifact; shapes need none
    return {**data, **({"source_fingerprint": fingerprint} if fingerprint else {})}


def trained_section(cfg: Config, stage: str, **dump) -> dict:
    """A training stage's section as its key sees it: `init_from` as its source's content digest (moving the
    source keeps the key, changing a weight does not), the fine-tuning keys left out while unset."""
    section = getattr(cfg, stage).model_dump(mode="json", **dump)
    if section["init_from"] is None:
        del section["init_from"]
    else:
        section["init_from"] = source_digest(section["init_from"], stage, cfg.store.open(), cfg)
    if not section["train"]["freeze"]:
        del section["train"]["freeze"]
    if section["train"]["lora"] is None:
        del section["train"]["lora"]
    return section


def _taken(cfg: Config, component: str, **extra) -> dict:
    """The dvae or bpe stage under `tokenizers_from`: that export's files' content, not their path."""
    return {"tokenizers_from": source_digest(cfg.tokenizers_from, component, None, cfg), **extra}


# The dvae section's model fields that a loaded tokenizer's files decide (the normalisation and the
# discriminator stay the run's)
UNUSED_WITH_UPSTREAM = sorted({f.name for f in dataclasses.fields(DVAEConfig)}
                              - {"image_size", "logit_laplace", "norm_mean", "norm_std", "disc_layers", "disc_channels"})


def _dvae(cfg: Config) -> dict:
    if cfg.tokenizers_from:
        return _taken(cfg, "dvae")
    section = trained_section(cfg, "dvae", exclude={"encode_precision"})  # how tokens are made, not the model
    if cfg.dvae.pretrained:  # a loaded tokenizer is its files' content and the input normalisation, not paths
        kind, files = pretrained.source_files(cfg.dvae.pretrained, cfg.dvae.pretrained_config)
        return {"pretrained": {"kind": kind, **{role: file_digest(p) for role, p in files.items()}},
                "norm_mean": section["norm_mean"], "norm_std": section["norm_std"]}
    section["pretrained_config"] = None  # a taming yaml's content is in init_from's digest, not its path
    if cfg.dvae.init_from and pretrained.upstream_format(cfg.dvae.init_from):  # its architecture is in its files
        for name in UNUSED_WITH_UPSTREAM:
            del section[name]
    return section


def _bpe(cfg: Config) -> dict:
    if cfg.tokenizers_from:
        return _taken(cfg, "tokenizer", text_len=cfg.text.text_len)
    text = cfg.text.model_dump(mode="json")
    if text["tokenizer_path"]:
        text["tokenizer_path"] = _content(text["tokenizer_path"])
    return text


def _pretokenize(cfg: Config) -> dict:
    return {} if cfg.dvae.encode_precision == "fp32" else {"encode_precision": cfg.dvae.encode_precision}


GUIDANCE_KEYS = ("negative_prompt", "guidance_schedule", "guidance_start", "guidance_end")
EDIT_KEYS = ("edit_mode", "edit_image", "edit_region", "edit_mask", "edit_keep")  # generate.*: editing an image
SAMPLING_ONLY = ("prompts", "num_val_prompts", "best_k", "batch_size", "prime_image", "prime_rows", *EDIT_KEYS)


def _generate(cfg: Config) -> dict:
    gen = cfg.generate.model_dump(mode="json")
    for name in ("prime_image", "edit_image", "edit_mask"):  # images given by path enter as their content
        gen[name] = _content(gen[name])
    if gen["prime_image"] is None:
        del gen["prime_image"], gen["prime_rows"]
    if gen["edit_mode"] is None:
        for name in EDIT_KEYS:
            del gen[name]
    _default_guidance_left_out(gen)
    if not gen["prompts"]:  # which val captions: storage.parquet.val_rows's choice, named so a change of it re-samples
        gen["val_prompts"] = "each val subset in turn"
    return gen


def _default_guidance_left_out(sampling: dict) -> None:
    """The guidance keys at their defaults leave a key as it was before they existed: stores keep their samples."""
    for name in GUIDANCE_KEYS:
        if sampling[name] == SAMPLING_DEFAULTS[name]:
            del sampling[name]


def _evaluate(cfg: Config) -> dict:
    sampling = cfg.generate.model_dump(mode="json", exclude=set(SAMPLING_ONLY))
    _default_guidance_left_out(sampling)
    return {**cfg.evaluate.model_dump(mode="json"), "sampling": sampling, "metrics_version": METRICS_VERSION}


def _no_inputs_when(*fields: str) -> Callable[[Config], tuple[str, ...]]:
    """The dvae and bpe keys leave the images out where the config names the tokenizer to use."""
    def keyed(cfg: Config) -> tuple[str, ...]:
        return () if any(_get(cfg, f) for f in fields) else ("ingest",)
    return keyed


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", (), _ingest, "ingest"),
    Stage("dvae", ("ingest",), _dvae, "train-dvae", _no_inputs_when("tokenizers_from"), trained=True),
    Stage("bpe", ("ingest",), _bpe, "train-bpe", _no_inputs_when("tokenizers_from", "text.tokenizer_path")),
    Stage("pretokenize", ("ingest", "dvae", "bpe"), _pretokenize, "pretokenize"),
    Stage("transformer", ("pretokenize", "dvae"), lambda cfg: trained_section(cfg, "transformer"),
          "train-transformer", lambda cfg: ("pretokenize",), trained=True),
    Stage("clip", ("ingest", "bpe"), lambda cfg: trained_section(cfg, "clip"), "train-clip", trained=True),
    Stage("generate", ("ingest", "dvae", "bpe", "transformer", "clip"), _generate, "generate"),
    Stage("evaluate", ("ingest", "dvae", "bpe", "transformer", "clip", "generate"), _evaluate, "evaluate"),
)}
NAMES: tuple[str, ...] = tuple(STAGES)
COMMANDS = {s.command: s.name for s in STAGES.values()}
TRAINED = tuple(s.name for s in STAGES.values() if s.trained)
RETIRED = ("images", "tokens", "generations", "evaluation")  # the folders of ingest, pretokenize, generate, evaluate
# in stores made before each stage had one name


def stage_keys(cfg: Config) -> dict[str, str]:
    """Every stage's key under `cfg`, in pipeline order."""
    keys: dict[str, str] = {}
    for stage in STAGES.values():
        keys[stage.name] = stage.key(cfg, keys)
    return keys


def upstream(stage: str) -> list[str]:
    """`stage` and every stage whose artifact it (transitively) reads, in pipeline order."""
    todo = [stage]
    for s in todo:
        todo += [n for n in STAGES[s].inputs if n not in todo]
    return [s for s in NAMES if s in todo]


def downstream(stage: str) -> list[str]:
    """`stage` and every stage that (transitively) reads its output, in pipeline order."""
    out = {stage}
    for s in NAMES:
        if any(n in out for n in STAGES[s].inputs):
            out.add(s)
    return [s for s in NAMES if s in out]


def check_names(names: list[str], flag: str) -> None:
    for s in names:
        if s not in STAGES:
            raise ConfigError(f"{flag}: unknown stage {s!r}; stages are {', '.join(NAMES)}")


def select_stages(only: list[str] | None = None, from_stage: str | None = None,
                  until: str | None = None) -> list[str]:
    """The stages a run executes, in pipeline order: `only` these, `from_stage` and everything that reads its
    output, or everything `until` reads and `until` itself (a stage command); all of them by default."""
    check_names(only or [], "--only")
    check_names([from_stage] if from_stage else [], "--from")
    check_names([until] if until else [], "until")
    given = [name for name, value in (("only (--only)", only), ("from_stage (--from)", from_stage),
                                      ("until (a stage command)", until)) if value]
    if len(given) > 1:
        raise ConfigError(f"give one of only (--only), from_stage (--from) and until, not {' and '.join(given)}")
    if only:
        return [s for s in NAMES if s in only]
    if from_stage:
        return downstream(from_stage)
    if until:
        return upstream(until)
    return list(NAMES)
