"""Run configuration: one YAML file, one pydantic section per stage.

Every section forbids unknown keys, so a typo fails before any work starts
with a one-line message (`dvae.codebok_size: unknown key; did you mean
codebook_size?`). `load_config(path, overrides)` is the single entry point.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from dalle_core.clip import CLIPConfig
from dalle_core.dvae import DVAEConfig, DVAELossConfig
from dalle_core.editing import region_edit_mask
from dalle_core.errors import ConfigError
from dalle_core.generate import EditRequest, check_prompts
from dalle_core.images import size_text
from dalle_core.pretrained import upstream_format
from dalle_core.sampling import SAMPLING_DEFAULTS, GenerationError, SamplingSettings, described
from dalle_core.train import TrainConfig, parse_freeze
from dalle_core.transformer import DALLEConfig
from data_sources.reader import DataSection
from storage.store import ArtifactStore


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _with_model_fields(section: type[Section], model_config: type | tuple[type, ...], derived: set[str],
                       doc: str) -> type[Section]:
    """`section` plus every field of the core's dataclass(es) but the `derived` ones (set by the stage from the
    data and upstream artifacts), with the dataclass's type, range and default: one place per field."""
    fields = {}
    for config in model_config if isinstance(model_config, tuple) else (model_config,):
        hints = typing.get_type_hints(config, include_extras=True)
        fields |= {f.name: (hints[f.name], f.default) for f in dataclasses.fields(config) if f.name not in derived}
    name = section.__name__.removeprefix("_").replace("Training", "")
    name = name if name.endswith("Section") else f"{name}Section"
    return create_model(name, __base__=section, __module__=__name__, __doc__=doc, **fields)


class _DVAETraining(Section):
    """The `dvae` section's own fields: a pretrained tokenizer, k-means, and how it trains. `DVAESection` adds the
    model's fields from `dalle_core.dvae.DVAEConfig` and the loss's from `dalle_core.dvae.DVAELossConfig`."""

    # A tokenizer others trained, instead of training one (dalle_core.pretrained): a local folder with OpenAI's
    # encoder.pkl + decoder.pkl, or a taming-transformers VQGAN .ckpt (its .yaml next to it, in ../configs/, or
    # at pretrained_config). The codebook and shape come from the files; the quantizer, widths and train
    # settings here are then unused. The files' sha256 are part of the stage key and the manifest.
    pretrained: str | None = None
    pretrained_config: str | None = None
    # Fine-tune: start from this dVAE's weights (docs/finetuning.md): an exported model folder, a store artifact
    # folder, dvae/<key> in this run's store, or a loaded tokenizer's files as `pretrained` takes them (which then
    # trains in its own architecture and upstream objective); its content digest, not its path, is in the stage key
    init_from: str | None = None
    disc_layers: int = Field(3, ge=1, le=6)  # the VQGAN discriminator's stride-2 convs (dvae.adversarial)
    # pixel-kmeans: K = codebook_size colours (minGPT: 512) from k-means over the pixels (block averages) of
    # `kmeans_images` training images, `kmeans_iters` rounds; no gradient training, no network
    kmeans_images: int = Field(2048, ge=1)
    kmeans_iters: int = Field(20, ge=1)
    # Pre-tokenization: bf16 runs the encoder convolutions under autocast (faster on CPUs with AVX512-BF16:
    # docs/benchmarks.md; the code search stays fp32). Near-tie cells may get a neighbouring
    # code; reconstruction PSNR stays the same (tested). Part of the tokens key, not the dVAE's.
    encode_precision: Literal["fp32", "bf16"] = "fp32"
    shuffle_buffer: int = Field(4096, ge=1)  # decoded images mixed per shuffle window (memory: rows x H x W x 3)
    train: TrainConfig = TrainConfig(batch_size=64, lr=2e-3, max_steps=2000)

    @model_validator(mode="after")
    def _kmeans_is_one_process(self):
        if self.quantizer != "pixel-kmeans" and self.num_downsamples < 1:
            raise ValueError(f"dvae.num_downsamples: 0 (one token per pixel) is for quantizer pixel-kmeans only; "
                             f"{self.quantizer} needs 1 to 5")
        if self.channel_mult and len(self.channel_mult) != self.num_downsamples + 1:
            raise ValueError(f"dvae.channel_mult {list(self.channel_mult)} has {len(self.channel_mult)} levels; "
                             f"num_downsamples={self.num_downsamples} needs {self.num_downsamples + 1} "
                             f"(full resolution first), or [] for the small net")
        widest = self.hidden * max(self.channel_mult, default=1)
        if widest > 4096:  # a typo's width would exhaust memory minutes into training
            raise ValueError(f"dvae.hidden {self.hidden} x channel_mult {list(self.channel_mult)} makes a level "
                             f"{widest} channels wide; keep hidden * max(channel_mult) at most 4096")
        if self.quantizer == "pixel-kmeans" and (self.channel_mult or self.attention):
            raise ValueError("dvae.channel_mult and dvae.attention shape a network; quantizer pixel-kmeans has "
                             "none (use vq or gumbel, or leave them unset)")
        if self.attention and not self.channel_mult:
            raise ValueError("dvae.attention needs dvae.channel_mult (the small net has no attention); "
                             "set channel_mult, e.g. [1, 1, 2, 4]")
        if self.adversarial and self.quantizer == "pixel-kmeans":
            raise ValueError("dvae.adversarial: a discriminator needs a trained decoder; quantizer pixel-kmeans has "
                             "none (use vq or gumbel)")
        if self.pretrained and (self.train.nproc > 1 or self.train.nnodes > 1):
            raise ValueError(f"dvae.pretrained loads a tokenizer in one process, nothing trains under DDP "
                             f"(got dvae.train.nproc={self.train.nproc}, nnodes={self.train.nnodes}); set both to 1")
        if self.train.freeze:
            raise ValueError(f"dvae.train.freeze {self.train.freeze}: freezing is for transformer and clip; "
                             "the dVAE trains whole (leave it empty)")
        if self.train.lora:
            raise ValueError("dvae.train.lora: LoRA adapters are for the transformer; the dVAE trains whole "
                             "(leave it unset)")
        if self.init_from and (self.pretrained or self.quantizer == "pixel-kmeans"):
            raise ValueError("dvae.init_from fine-tunes a trained dVAE; dvae.pretrained and quantizer pixel-kmeans "
                             "train none: use one of them")
        if self.quantizer == "pixel-kmeans" and (self.train.nproc > 1 or self.train.nnodes > 1):
            raise ValueError(f"dvae.quantizer=pixel-kmeans trains by k-means in one process, not under DDP "
                             f"(got dvae.train.nproc={self.train.nproc}, nnodes={self.train.nnodes}); set both to 1")
        return self

    @property
    def loads_files(self) -> bool:
        """Whether the tokenizer's codebook and grid come from files (`pretrained`, or `init_from` in OpenAI's or
        taming's format), not from this section's model fields."""
        return bool(self.pretrained) or bool(self.init_from and upstream_format(self.init_from))

    def loss_config(self):
        """The training objective (`dalle_core.dvae.DVAELossConfig`): every field the two share by name."""
        return _build(DVAELossConfig, self)

    def dvae_config(self, image_size: int):
        """The model config (`dalle_core.dvae.DVAEConfig`) at `image_size`: every field the two share by name,
        the logit-Laplace output from recon_loss, and a discriminator only when adversarial."""
        return _build(DVAEConfig, self, image_size=image_size, logit_laplace=self.recon_loss == "logit_laplace",
                      disc_layers=self.disc_layers if self.adversarial else 0)


DVAESection = _with_model_fields(
    _DVAETraining, (DVAEConfig, DVAELossConfig), derived={"image_size", "logit_laplace", "disc_layers"},
    doc="""The `dvae` run-config section: the tokenizer's model fields (`dalle_core.dvae.DVAEConfig`, built by
    `dvae_config`), its loss and schedules, and how it trains.""")


class TextSection(Section):
    vocab_size: int = Field(1000, ge=260)  # byte-level: 256 bytes + specials + merges
    text_len: int = Field(32, ge=2)
    lowercase: bool = True
    tokenizer_path: str | None = None  # use an existing tokenizer.json instead of training


class _TransformerTraining(Section):
    """The `transformer` section's own fields: caption dropout, sampling during training, and how it trains.
    `TransformerSection` adds the model's fields from `dalle_core.transformer.DALLEConfig`."""

    caption_dropout: float = Field(0.1, ge=0, le=1)  # enables classifier-free guidance
    # Fine-tune: start from this transformer's weights (docs/finetuning.md): an exported model folder, a store
    # artifact folder, or transformer/<key> in this run's store; its content digest is part of the stage key
    init_from: str | None = None
    shuffle_buffer: int = Field(8192, ge=1)
    sample_every: int = Field(1000, ge=1)
    train: TrainConfig = TrainConfig(batch_size=16, lr=1e-3, weight_decay=0.1, max_steps=2000)

    @model_validator(mode="after")
    def _heads_divide_dim(self):
        if self.dim % self.heads:
            raise ValueError(f"transformer.dim {self.dim} is not divisible by heads {self.heads}")
        if self.train.lora and not self.init_from:
            raise ValueError("transformer.train.lora trains adapters on a trained transformer; set "
                             "transformer.init_from to it (an exported model folder, models:/NAME@ALIAS or a store artifact)")
        if self.train.lora and self.train.freeze:
            raise ValueError(f"transformer.train.lora freezes every base weight already; leave "
                             f"transformer.train.freeze {self.train.freeze} unset")
        parts, blocks = parse_freeze(self.train.freeze, self.depth, "transformer.train.freeze")
        if parts == {"embeddings", "head"} and len(blocks) == self.depth:
            raise ValueError(f"transformer.train.freeze {self.train.freeze} freezes every parameter; leave a part "
                             "to train")
        return self

    def dalle_config(self, text_vocab: int, text_len: int, pad_id: int, image_vocab: int, image_grid: int):
        """The model config (`dalle_core.transformer.DALLEConfig`) for the vocabularies and sequence shape the
        token shards were made with."""
        return _build(DALLEConfig, self, text_vocab=text_vocab, text_len=text_len, pad_id=pad_id,
                      image_vocab=image_vocab, image_grid=image_grid)


TransformerSection = _with_model_fields(
    _TransformerTraining, DALLEConfig, derived={"text_vocab", "text_len", "pad_id", "image_vocab", "image_grid"},
    doc="""The `transformer` run-config section: the model's fields (`dalle_core.transformer.DALLEConfig`, built by
    `dalle_config`), caption dropout and how it trains.""")


class _CLIPTraining(Section):
    """The `clip` section's own fields: a pretrained CLIP, and how it trains. `CLIPSection` adds the small
    CLIP's model fields from `dalle_core.clip.CLIPConfig`."""

    pretrained: str | None = None  # "<open_clip model>:<tag>" or a local checkpoint file
    # Fine-tune: start from this project's CLIP (docs/finetuning.md): an exported model folder, a store artifact
    # folder, or clip/<key> in this run's store; its content digest is part of the stage key
    init_from: str | None = None
    shuffle_buffer: int = Field(4096, ge=1)  # decoded images mixed per shuffle window
    train: TrainConfig = TrainConfig(batch_size=128, lr=1e-3, weight_decay=0.1, max_steps=1000)

    @model_validator(mode="after")
    def _fine_tuning(self):
        if self.init_from and self.pretrained:
            raise ValueError("clip.init_from fine-tunes this project's CLIP; clip.pretrained uses one as it is: "
                             "set one of them")
        parse_freeze(self.train.freeze, max(self.vision_layers, self.text_layers), "clip.train.freeze")
        if self.train.lora:
            raise ValueError("clip.train.lora: LoRA adapters are for the transformer; fine-tune the CLIP whole or "
                             "with clip.train.freeze (leave lora unset)")
        return self

    def clip_config(self, image_size: int, text_vocab: int, text_len: int, pad_id: int):
        """The model config (`dalle_core.clip.CLIPConfig`) for `image_size` images and the BPE's ids."""
        return _build(CLIPConfig, self, image_size=image_size, text_vocab=text_vocab, text_len=text_len,
                      pad_id=pad_id)


CLIPSection = _with_model_fields(
    _CLIPTraining, CLIPConfig, derived={"image_size", "text_vocab", "text_len", "pad_id"},
    doc="""The `clip` run-config section: the small CLIP's model fields (`dalle_core.clip.CLIPConfig`, built by
    `clip_config`), or a pretrained one, and how it trains.""")


def _build(model_config: type, section: Section, **given: Any):
    """A model's dataclass config from the section's copy of its fields, plus `given` (the derived fields: shapes
    from data and upstream artifacts, and what the stage sets from its loss)."""
    names = {f.name for f in dataclasses.fields(model_config)} - set(given)
    return model_config(**{n: getattr(section, n) for n in names}, **given)


# The `generate.*` keys that stand for `EditRequest`'s fields (and `EditRequest.from_arguments`' names), in errors
CONFIG_NAMES = {"prime_image": "generate.prime_image", "prime_rows": "generate.prime_rows",
                "edit_image": "generate.edit_image", "outpaint_image": "generate.edit_image",
                "variations": "generate.edit_image", "region": "generate.edit_region", "mask": "generate.edit_mask",
                "keep": "generate.edit_keep", "edit_mode": "generate.edit_mode"}


class _Generate(Section):
    """The `generate` section's own fields: the prompts, how many best images a grid shows, the precision, and
    an edit. `GenerateSection` adds the sampling fields of `dalle_core.sampling.SamplingSettings`."""

    prompts: list[str] = []  # empty: use val captions
    num_val_prompts: int = Field(8, ge=1)
    best_k: int = Field(4, ge=1)
    # auto: the faster one measured per device (bench dalle_sample): bf16 on CPU, fp32 on CUDA
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    # image completion (DALL-E's priming): the image, resized to the dVAE's input and encoded, fixes the top
    # `prime_rows` rows of tokens of every candidate; the rest is sampled
    prime_image: str | None = None
    prime_rows: int = Field(0, ge=0)
    # editing (docs/editing.md): edit_image, resized to the dVAE's input and encoded, keeps its codes in every
    # candidate except in the cells the mode samples: inpaint (edit_region x0,y0,x1,y1, pixels of the resized image
    # snapped outward to whole cells, or the white of edit_mask, a PNG of the image's size), outpaint (all but
    # edit_region, where the image is resized into an empty canvas), variations (a share 1 - edit_keep, default
    # 0.5, of the cells, seeded per candidate)
    edit_mode: Literal["inpaint", "outpaint", "variations"] | None = None
    edit_image: str | None = None
    edit_region: list[int] | None = None
    edit_mask: str | None = None
    edit_keep: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _edit_keys_agree(self):
        mode, used = self.edit_mode, {k for k in ("edit_region", "edit_mask", "edit_keep") if getattr(self, k) is not None}
        if (mode is None) != (self.edit_image is None):
            raise ValueError(f"generate.edit_mode is {mode} but no generate.edit_image is set" if mode else
                             "generate.edit_image is set but generate.edit_mode is not: inpaint, outpaint or variations")
        if mode is None:
            if used:
                raise ValueError(f"generate.{min(used)} is set but no generate.edit_mode / edit_image")
            return self
        if self.prime_image is not None:
            raise ValueError("generate.prime_image and generate.edit_image are both set; give one source image")
        if self.edit_region is not None and len(self.edit_region) != 4:
            raise ValueError(f"generate.edit_region is {self.edit_region}; expected [x0, y0, x1, y1] in pixels")
        try:
            self.edit_request().check(CONFIG_NAMES)
        except GenerationError as err:
            raise ValueError(str(err)) from None
        return self

    @model_validator(mode="after")
    def _sampling_settings_agree(self):
        try:  # the core's own check, for what the fields' ranges cannot say (the guidance window's order)
            SamplingSettings(**self.sampling_defaults()).checked()
        except GenerationError as err:
            raise ValueError(f"generate.{err}") from None
        return self

    @field_validator("prompts")
    @classmethod
    def _prompts_have_text(cls, prompts: list[str]) -> list[str]:
        if prompts:
            try:
                check_prompts(prompts)
            except GenerationError as err:
                raise ValueError(str(err)) from None
        return prompts

    def sampling_defaults(self) -> dict:
        """The sampling settings a model folder carries as its defaults (`DALLEPipeline.sampling`)."""
        return {k: getattr(self, k) for k in SAMPLING_DEFAULTS}

    def sampling(self) -> SamplingSettings:
        """The sampling settings of this section, checked (`SamplingSettings.checked`)."""
        return SamplingSettings(**self.sampling_defaults()).checked()

    def edit_request(self) -> EditRequest | None:
        """The edit these keys ask for: priming (prime_image), an edit (edit_mode, edit_image and its options), or
        None."""
        if self.prime_image is not None:
            return EditRequest("prime", self.prime_image, prime_rows=self.prime_rows or None)
        if self.edit_mode is None:
            return None
        region = None if self.edit_region is None else tuple(self.edit_region)
        return EditRequest(self.edit_mode, self.edit_image, region, self.edit_mask, self.edit_keep)


GenerateSection = _with_model_fields(
    _Generate, SamplingSettings, derived=set(),
    doc="""The `generate` run-config section: the sampling settings (`dalle_core.sampling.SamplingSettings`), the
    prompts, and an edit (`edit_request`).""")


class EvaluateSection(Section):
    num_prompts: int = Field(64, ge=1)  # val captions for the evaluation, an equal share from each val subset
    num_candidates: int = Field(16, ge=1)  # reranking gain is reported at N = 1, 2, 4, 8, ... and this
    # Seen-caption prompts: this many training rows are drawn as prompts too (the "seen" split, next to the val
    # rows); their images are the memorisation check's "own training image".
    train_prompts: int = Field(64, ge=0)
    train_images: int = Field(20000, ge=1)  # training images embedded for the nearest-neighbour check (the first N)
    r_precision_distractors: int = Field(99, ge=1)  # other captions each true caption is ranked against
    # The standard FID as well (`fid_top1`, and the dVAE's reconstruction FID `dvae_rfid`): a local InceptionV3
    # weights file, since nothing is downloaded: torch-fidelity's weights-inception-2015-12-05-6726825d.pth (the
    # `fid` extra), or the TorchScript export `make inception-weights` puts in place. None: CLIP-space only.
    inception_weights: str | None = None
    seed: int = 1234

    @field_validator("inception_weights")
    @classmethod
    def _weights_exist(cls, value: str | None) -> str | None:
        import importlib.util

        from dalle_core.evaluation import inception_format

        if value is None:
            return value
        kind = inception_format(value)  # ValueError: its own line
        missing = [m for m in ("torchmetrics", "torch_fidelity") if importlib.util.find_spec(m) is None]
        if missing and kind == "torch-fidelity":
            raise ValueError(f"a torch-fidelity weights file needs the fid extra ({', '.join(missing)} missing): "
                             "pip install -e '.[fid]'")
        return value


class StoreSection(Section):
    root: str = "./artifacts"  # any fsspec URL: memory://, s3://bucket/prefix, gs://...
    storage_options: dict[str, Any] = {}

    def open(self) -> ArtifactStore:
        """The artifact store this section names."""
        return ArtifactStore(self.root, self.storage_options)


class TrackingSection(Section):
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite in the store
    experiment: str = "dalle"
    source: str | None = None  # the config file of the run (filled in by load_config): MLflow's mlflow.source.name


class RunnerSection(Section):
    """Where work runs. Nothing here changes results, so no stage key depends on it."""

    kind: Literal["local", "dask"] = "local"
    address: str | None = None  # dask scheduler; None starts a LocalCluster
    workers: int = Field(2, ge=1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto takes CUDA when present
    loader_workers: int = Field(0, ge=0)  # image decode processes per training process (0: in the trainer)
    # Multi-node DDP (<stage>.train.nnodes machines, train.nproc processes each), torchrun's c10d rendezvous:
    # start the same command on every machine with the same rdzv_endpoint (host:port of one of them).
    rdzv_endpoint: str | None = None
    rdzv_id: str = "dalle"
    # Prefect global concurrency limit a training stage holds train.nproc slots of while it trains on CUDA, so two
    # scheduled runs never share a card (`prefect gcl create gpu --limit <cards>`); null: none
    gpu_slot: str | None = Field("gpu", min_length=1)

    @field_validator("device")
    @classmethod
    def _device_spec(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return value


def prime_rows_error(k: int, rows: int, grid: str) -> str:
    """The one-line error for a generate.prime_rows K that leaves no row of a `rows`-row token grid to sample."""
    return f"generate.prime_rows={k} must leave rows to sample: {grid} has {rows} rows, so use 1 to {rows - 1}"


class Config(Section):
    data: DataSection = DataSection()
    dvae: DVAESection = DVAESection()
    text: TextSection = TextSection()
    transformer: TransformerSection = TransformerSection()
    clip: CLIPSection = CLIPSection()
    generate: GenerateSection = GenerateSection()
    evaluate: EvaluateSection = EvaluateSection()
    store: StoreSection = StoreSection()
    tracking: TrackingSection = TrackingSection()
    runner: RunnerSection = RunnerSection()
    # The image and text tokenizers of an exported model folder (docs/finetuning.md): the dvae and bpe stages copy
    # them instead of training, keyed by their content digest, and the tokens stage encodes this run's data with them
    tokenizers_from: str | None = None

    @field_validator("store", mode="before")
    @classmethod
    def _store_as_url(cls, value: Any) -> Any:
        return {"root": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _image_size_fits_the_models(self) -> Config:
        h, w = self.data.image_hw
        for factor, key, unless in ((2 ** self.dvae.num_downsamples, "2**dvae.num_downsamples", self.dvae.loads_files),
                                    (self.clip.patch_size, "clip.patch_size", self.clip.pretrained)):
            if not unless and (h % factor or w % factor):
                raise ValueError(f"data.image_size {size_text(self.data.image_size)}: each side must be a multiple "
                                 f"of {key} = {factor} (the token grid and CLIP's patches tile the image)")
        return self

    @model_validator(mode="after")
    def _priming_leaves_rows_to_sample(self) -> Config:
        g, rows = self.generate, self.data.image_hw[0] // 2 ** self.dvae.num_downsamples
        if g.prime_image is None:
            if g.prime_rows:
                raise ValueError(f"generate.prime_rows is {g.prime_rows} but no generate.prime_image is set")
            return self
        if self.dvae.loads_files:  # its grid is in its files: tasks.generate checks K once they are loaded
            if g.prime_rows < 1:
                raise ValueError(f"generate.prime_rows={g.prime_rows} must be at least 1 when a prime image is set")
            return self
        if not 1 <= g.prime_rows < rows:
            raise ValueError(prime_rows_error(g.prime_rows, rows, "the token grid"))
        return self

    @model_validator(mode="after")
    def _edit_region_fits_the_image(self) -> Config:
        g, size = self.generate, self.data.image_size
        if g.edit_region is not None:  # a loaded tokenizer's grid is in its files: tasks.generate checks the cells
            known = not self.dvae.loads_files and not getattr(self, "tokenizers_from", None)
            region_edit_mask(g.edit_mode, g.edit_region, size, self.dvae.dvae_config(size).grid if known else None,
                             "generate.edit_region")
        return self

    @model_validator(mode="after")
    def _one_tokenizer_source(self) -> Config:
        if self.tokenizers_from:
            for key, value in (("dvae.pretrained", self.dvae.pretrained), ("dvae.init_from", self.dvae.init_from),
                               ("text.tokenizer_path", self.text.tokenizer_path)):
                if value:
                    raise ValueError(f"tokenizers_from takes the dVAE and the BPE from {self.tokenizers_from!r}; "
                                     f"{key} ({value!r}) names another source: set one of them")
        return self

    @model_validator(mode="after")
    def _discriminator_fits_the_image(self) -> Config:
        d, size = self.dvae, min(self.data.image_hw)
        if d.adversarial and size // 2 ** d.disc_layers < 3:  # two stride-1 4x4 convs follow the halvings
            most = max(1, int(math.log2(size / 3))) if size >= 6 else 0
            raise ValueError(f"dvae.disc_layers={d.disc_layers} halves data.image_size={size} to less than 3 px "
                             f"before the patch logits; use at most {most}")
        return self

    @model_validator(mode="after")
    def _rendezvous_for_nodes(self) -> Config:
        for stage in ("dvae", "transformer", "clip"):
            nnodes = getattr(self, stage).train.nnodes
            if nnodes > 1 and not self.runner.rdzv_endpoint:
                raise ValueError(f"{stage}.train.nnodes is {nnodes}: set runner.rdzv_endpoint to host:port of the "
                                 "machine where the machines meet")
        return self


def _keys_at(loc: tuple) -> list[str]:
    """The keys allowed where `loc` points: the fields of the section (a pydantic model, or a core dataclass such
    as `TrainConfig`) that owns it (for did-you-mean)."""
    model: type = Config
    for part in loc:
        if issubclass(model, BaseModel):
            field = model.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
        else:  # a core dataclass (TrainConfig) holding another (LoraConfig)
            annotation = typing.get_type_hints(model).get(str(part)) if dataclasses.is_dataclass(model) else None
        if annotation is not None and not isinstance(annotation, type):  # `X | None`: the section's type
            annotation = next((a for a in typing.get_args(annotation) if isinstance(a, type) and a is not type(None)),
                              None)
        if annotation is None or not (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)):
            break
        model = annotation
    if dataclasses.is_dataclass(model):
        return [f.name for f in dataclasses.fields(model)]
    return list(model.model_fields) if issubclass(model, BaseModel) else []


def _format_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    name = ".".join(str(p) for p in loc)
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):  # a model's and a dataclass's word for it
        keys = _keys_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; allowed: {', '.join(keys)}"
        return f"{name}: unknown key{hint}"
    msg, got = e["msg"].removeprefix("Value error, "), e.get("input")
    if not name or isinstance(got, dict):  # a whole-section check names its own keys
        return msg
    if isinstance(got, float) and not math.isfinite(got):  # pydantic would name a bound the value never met
        msg = "Input should be a finite number"
    return f"{name}: {msg} (got {described(got)})"


def _join_surrogates(value: Any, where: str) -> Any:
    """Strings with YAML's `\\uD83D\\uDE00` escapes (JSON's spelling of one astral character) come back from
    PyYAML as two lone surrogates; join each pair into its character, in lists and mappings too."""
    if isinstance(value, str):
        if not re.search("[\ud800-\udfff]", value):
            return value
        try:
            return value.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: {value!r} holds half of a UTF-16 surrogate pair; give the whole character "
                              "(or both \\uXXXX halves)") from None
    if isinstance(value, list):
        return [_join_surrogates(v, where) for v in value]
    if isinstance(value, dict):
        return {_join_surrogates(k, where): _join_surrogates(v, where) for k, v in value.items()}
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`dvae.codebook_size=1024` -> (["dvae", "codebook_size"], 1024). The value is YAML (so JSON too); any
    text, in any Unicode plane, round-trips exactly. Raises ConfigError on a malformed item."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {str(err).splitlines()[0]}") from None
    return key.strip().split("."), _join_surrogates(value, f"--set {key.strip()}")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part == "store":
                child = {"root": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict | None, overrides: list[str] = ()) -> Config:
    raw = apply_overrides(json.loads(json.dumps(raw or {})), list(overrides))
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def merged_config(base: dict, given: dict) -> Config:
    """The run config of the mapping `given` laid over the mapping `base`, key by key at any depth (a list or
    value replaces), as a deployment run's partial `cfg` over the deployment's own. Raises ConfigError if the
    result is not a valid config."""

    def merge(into: dict, given: dict) -> dict:
        for name, value in given.items():
            below = {"root": into[name]} if name == "store" and isinstance(into.get(name), str) else into.get(name)
            into[name] = merge(dict(below), value) if isinstance(value, dict) and isinstance(below, dict) else value
        return into

    return config_from_dict(merge(json.loads(json.dumps(base)), given))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML run config (or the defaults when `path` is None) and apply `--set` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
        raw = _join_surrogates(raw, f"config file {str(p)!r}")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must be a mapping of sections, got {type(raw).__name__}")
    cfg = config_from_dict(raw, overrides)
    if path is not None and cfg.tracking.source is None:
        cfg.tracking.source = str(path)
    return cfg


def flatten(section: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1e-3}}` -> `{"train.lr": 1e-3}` (MLflow params)."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
