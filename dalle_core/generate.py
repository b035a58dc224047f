"""Text to image: sample N candidates per prompt, decode them with the dVAE, rank them with CLIP.

`DALLEPipeline.from_pretrained(folder)` loads an exported model (dalle_core/model_folder.py) and
`pipe(prompts, num_candidates=16, ...)` returns each prompt's candidates ranked by CLIP, as DALL-E's
reranking did (Ramesh et al. 2021, section 2.5). The same call edits an image (priming, inpainting,
outpainting, variations: dalle_core/editing.py's token masks over one masked sampler).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from dalle_core.bpe import TextTokenizer
from dalle_core.clip import CLIPReranker
from dalle_core.dvae import DiscreteVAE
from dalle_core.editing import (
    Edit,
    EditError,
    check_region,
    content_digest,
    image_mask,
    place,
    region_edit_mask,
    top_rows_mask,
)
from dalle_core.images import (
    ImageNormalization,
    size_hw,
    to_rgb_sized,
    to_tensor,
    to_uint8_tensor,
    viewer_size,
)
from dalle_core.lora import fuse
from dalle_core.model_folder import load_folder, pipeline_files, write_folder
from dalle_core.sampling import (
    SAMPLING_DEFAULTS,
    GenerationError,
    SamplingSettings,
    check_text,
    sample,
)
from dalle_core.transformer import DALLE

MAX_CANDIDATES = 64  # the most candidates one request may ask for, in `dalle serve` (--max-candidates) and MLflow
Progress = Callable[[int, int], None]  # (sampling steps done, steps in all)


@dataclass
class GenerationOutput:
    """What a `DALLEPipeline` call returns, per prompt and best first: `images[p][r]` the r-th ranked PIL
    image of prompt p, `scores[p]` their (n,) CLIP cosine similarities (descending), `pixels[p]` the same
    images as (n, H, W, 3) uint8, `image_tokens[p]` their (n, h*w) dVAE codes, `candidates[p]` their (n,)
    sampling indices (candidate c is the c-th drawn; variations draw its mask from (seed, c)); `seeds[p]` the prompt's
    sampling seed (from the call's `seed`, as `dalle generate` draws it) and `truncated[p]` whether the
    prompt was cut to the model's text length. When the call edited an image: `edit` (its source image at the
    model's size and its token mask, dalle_core/editing.py) and `masks[p]` the (n, h*w) bool token masks of
    prompt p's candidates, ranked as `image_tokens` (True = sampled, False = the source's code kept)."""

    prompts: list[str]
    seed: int | list[int]  # the call's seed, or its seeds, one per prompt
    seeds: list[int]
    pixels: list[np.ndarray]
    scores: list[np.ndarray]
    image_tokens: list[np.ndarray]
    truncated: list[bool]
    prime: np.ndarray | None = None  # the prime image at the model's size, when the call primed
    edit: Edit | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    candidates: list[np.ndarray] = field(default_factory=list)

    @property
    def images(self) -> list[list[Image.Image]]:
        return [[Image.fromarray(image) for image in images] for images in self.pixels]


@dataclass
class DALLEPipeline:
    """A trained text-to-image model as diffusers bundles one: the transformer, the image tokenizer (dVAE) with
    its pixel normalisation, the text tokenizer and the CLIP reranker, all on one device; `precision` is the
    sampling precision (fp32 or bf16), `sampling` the model's default settings. Load one with `from_pretrained`,
    call it with prompts. (Not the Prefect pipeline that trains them.)"""

    transformer: DALLE
    dvae: DiscreteVAE
    normalization: ImageNormalization
    tokenizer: TextTokenizer
    reranker: CLIPReranker
    precision: str = "fp32"
    sampling: dict = field(default_factory=dict)  # the model's own sampling defaults (its run's `generate`)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str = "auto", precision: str = "auto") -> DALLEPipeline:
        """The model exported to `folder` (`dalle export`), on `device` (auto | cpu | cuda | cuda:N), sampling in
        `precision` (auto: the faster one on that device; fp32; bf16). Needs no store, config, Prefect or MLflow.
        Raises ModelFolderError (one line) for a folder that is not a complete export."""
        return cls(**load_folder(folder, device, precision))

    def save_pretrained(self, folder: str | os.PathLike) -> list[str]:
        """Write this pipeline as a model folder (dalle_core/model_folder.py's layout, what `from_pretrained`,
        `dalle generate --model`, `dalle serve` and `init_from` read), e.g. after tuning it in a notebook: into a
        new or empty folder, or over an earlier one, whose own files only are replaced. Returns the paths written.
        ModelFolderError (one line) for a folder holding anything else (as diffusers' `save_pretrained`)."""
        parts = {"transformer": self.transformer, "dvae": (self.dvae, self.normalization),
                 "tokenizer": self.tokenizer, "clip": self.reranker}
        return write_folder(folder, pipeline_files(parts, self.image_size, self.sampling))

    def fuse_lora(self) -> DALLEPipeline:
        """Merge the transformer's LoRA adapter into its weights, in place (diffusers' `fuse_lora`): sampling then
        needs no merged copy per call, and `save_pretrained` writes the merged weights alone. Nothing happens to a
        transformer without an adapter. Returns the pipeline."""
        fuse(self.transformer)
        return self

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The images' size in pixels: an int for a square, else (height, width)."""
        return self.dvae.c.image_size

    def __call__(self, prompts: str | list[str], settings: SamplingSettings | None = None, *,
                 edit: EditRequest | None = None, progress: Progress | list[Progress] | None = None,
                 **given) -> GenerationOutput:
        """Draw `num_candidates` images per prompt and rank them by CLIP (best first).

        `settings` (SamplingSettings) default to the model's own (its run's `generate` section); settings given by
        name (`pipe(prompts, num_candidates=4, seed=0)`) replace single fields, None leaving them as they are.
        Prompt i draws from `prompt_seed(seed, i)`, so a prompt's images do not depend on the others; `seed` may
        instead be a list, one per prompt, and prompt i then draws what it would alone with `seed[i]` (how a
        server merges its users' requests into one batch, like diffusers' list of generators). `edit`
        (EditRequest, docs/editing.md): priming keeps the top rows of an image (DALL-E's image completion),
        inpainting, outpainting and variations keep its codes outside the cells they sample; every candidate
        keeps those cells' codes exactly. `progress(done, total)` is called after every sampling step; a list
        gives each prompt its own, counting the steps of the batches that hold it. Raises GenerationError (one
        line) for a bad value."""
        prompts = check_prompts(prompts)
        own_seeds = given.get("seed")
        if isinstance(own_seeds, (list, tuple, np.ndarray)):
            own_seeds = [v.item() if isinstance(v, np.generic) else v for v in own_seeds]
            if len(own_seeds) != len(prompts):
                raise GenerationError(f"seed is a list of {len(own_seeds)}; give one seed per prompt "
                                      f"({len(prompts)}), or one int for all")
            given = {**given, "seed": own_seeds[0] if own_seeds else None}
            for value in own_seeds:  # each checked as a seed is
                SamplingSettings(**{**SAMPLING_DEFAULTS, "seed": value}).checked()
        if isinstance(progress, (list, tuple)) and (len(progress) != len(prompts) or not all(map(callable, progress))):
            raise GenerationError(f"progress is a list of {len(progress)}; give one function (done, total) -> None "
                                  f"per prompt ({len(prompts)})")
        if settings is not None and not isinstance(settings, SamplingSettings):
            example = "pipe(prompts, **settings)" if isinstance(settings, dict) else f"num_candidates={settings!r}"
            raise GenerationError(f"settings is {_a(settings)}; give a SamplingSettings, or each "
                                  f"setting by name (e.g. {example})")
        if edit is not None and not isinstance(edit, EditRequest):
            raise GenerationError(f"edit is {_a(edit)}; give an EditRequest(mode, image, ...)")
        if progress is not None and not callable(progress) and not isinstance(progress, (list, tuple)):
            raise GenerationError(f"progress is {_a(progress)}; give a function (done, total) -> None")
        base = settings if settings is not None else SamplingSettings(**{**SAMPLING_DEFAULTS, **self.sampling})
        s = self.check_settings(base.replace(**given))
        resolved = None if edit is None else edit.resolve(self.image_size, self.transformer.c.image_grid)
        if isinstance(own_seeds, (list, tuple)):
            seeds = [prompt_seed(int(value), 0) for value in own_seeds]
        else:
            seeds = [prompt_seed(s.seed, i) for i in range(len(prompts))]
        results = self.candidates(prompts, seeds, s, resolved, progress)
        prime = resolved.image if resolved is not None and resolved.mode == "prime" else None
        call_seed = [int(v) for v in own_seeds] if isinstance(own_seeds, (list, tuple)) else s.seed
        out = GenerationOutput(prompts, call_seed, seeds, [], [], [], [], prime, resolved)
        for prompt_s, (images, scores, truncated, codes) in zip(seeds, results):
            order = np.argsort(-scores, kind="stable")  # as `ranks`: ties keep candidate order
            out.pixels.append(images[order])
            out.scores.append(scores[order])
            out.image_tokens.append(codes[order])
            out.truncated.append(truncated)
            out.candidates.append(order)
            if resolved is not None:
                out.masks.append(np.array(resolved.masks(prompt_s, s.num_candidates))[order])
        return out

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """A (H, W, 3) uint8 image at the dVAE's size -> its (h*w,) codes in raster order, on the pipeline's device."""
        x = to_tensor(image[None], self.normalization.mean, self.normalization.std).to(self.device)
        return self.dvae.encode(x)[0].flatten()

    @torch.inference_mode()
    def check_settings(self, settings: SamplingSettings) -> SamplingSettings:
        """`settings.checked()`, and a guidance window that holds an image token of this model's grid; GenerationError
        (one line) otherwise."""
        s, n = settings.checked(), self.transformer.c.image_len
        if s.cond_scale != 1.0 and all(scale == 1.0 for scale in s.guidance_scales(n)):
            raise GenerationError(f"guidance_start {s.guidance_start:g} to guidance_end {s.guidance_end:g} holds none of "
                                  f"the {n} image tokens, so nothing would be guided; widen it to at least {1 / n:.4g}")
        return s

    @torch.inference_mode()  # sampled codes are inference tensors: the decoder and CLIP must take them so
    def candidates(self, prompts: list[str], seeds: list[int], settings: SamplingSettings, edit: Edit | None = None,
                   progress: Progress | list[Progress] | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray, bool, np.ndarray]]:
        """Per prompt: (n, H, W, 3) uint8 images, their (n,) CLIP scores, whether it was truncated, and the
        (n, tokens) image codes, n = `settings.num_candidates` (checked settings: `SamplingSettings.checked`).

        Whole prompts share a sampling batch of about `settings.batch_size` images (bigger batches run
        faster on CPU and GPU alike); each prompt draws from its own generator seeded with its
        seed, and is decoded and scored apart, so its images and scores do not depend on which prompts it is
        batched with (CPU kernels round by batch size). `edit` (`EditRequest.resolve`): its
        image's codes are kept wherever a candidate's token mask (`Edit.masks(prompt seed, ...)`, in candidate
        order) is False. `progress(done, total)` is called after every sampling step of every batch; a list of
        one per prompt counts, for each prompt, the steps of the batches that hold it.
        """
        n, batch_size = settings.num_candidates, settings.batch_size
        ids, truncated = self.tokenizer.encode(prompts)
        device = self.device
        text = torch.from_numpy(ids).to(device)
        negative = None  # the negative prompt's ids, the unconditional caption of guidance
        if settings.negative_prompt:
            negative = torch.from_numpy(self.tokenizer.encode([settings.negative_prompt])[0]).to(device)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        grid_hw = self.transformer.c.grid_hw
        chunk = min(n, batch_size)  # candidates of one prompt per batch (n > batch_size: several batches)
        per_batch = prompts_per_batch(n, batch_size)
        images: list[list[np.ndarray]] = [[] for _ in prompts]
        scores: list[list[np.ndarray]] = [[] for _ in prompts]
        tokens: list[list[np.ndarray]] = [[] for _ in prompts]
        source = None if edit is None else self.encode(edit.image)  # (N,) codes the masks keep
        batches = []  # (prompts, candidates per prompt, the first candidate, (rows, N) token masks or None)
        for first in range(0, len(prompts), per_batch):
            group = range(first, min(first + per_batch, len(prompts)))
            for start in range(0, n, chunk):
                b = min(chunk, n - start)
                masks = None if edit is None else torch.from_numpy(
                    np.concatenate([edit.masks(seeds[j], b, start) for j in group]))
                batches.append((group, b, masks))
        image_len = self.transformer.c.image_len
        steps = [image_len if m is None else int(m.any(dim=0).sum()) for _, _, m in batches]  # sampled per batch
        per_prompt = isinstance(progress, (list, tuple))
        total = [sum(k for (g, _, _), k in zip(batches, steps) if j in g) for j in range(len(prompts))] \
            if per_prompt else sum(steps)
        done = [0] * len(prompts) if per_prompt else 0
        group: range = range(0)

        def step(i: int, logits: torch.Tensor) -> None:
            nonlocal done
            if not per_prompt:
                done += 1
                return progress(done, total)
            for j in group:
                done[j] += 1
                progress[j](done[j], total[j])

        for group, b, masks in batches:
            rows = torch.cat([text[j:j + 1].expand(b, -1) for j in group])
            kept = None if source is None else (source[None].expand(rows.shape[0], -1), masks.to(device))
            codes = sample(self.transformer, rows, settings, kept=kept, generator=[gens[j] for j in group],
                           negative=None if negative is None else negative.expand(rows.shape[0], -1),
                           precision=self.precision, on_logits=None if progress is None else step)
            drawn = codes.cpu().numpy()
            for k, j in enumerate(group):
                own = codes[k * b:(k + 1) * b]
                pixels = to_uint8_tensor(self.dvae.decode(own.view(-1, *grid_hw)), self.normalization.mean,
                                         self.normalization.std)
                images[j].append(pixels.cpu().numpy())
                scores[j].append(self.reranker.scores(pixels, [prompts[j]] * b).float().numpy())
                tokens[j].append(drawn[k * b:(k + 1) * b])
        return [(np.concatenate(images[j]), np.concatenate(scores[j]), bool(truncated[j]), np.concatenate(tokens[j]))
                for j in range(len(prompts))]


def prompts_per_batch(n: int, batch_size: int) -> int:
    """How many prompts of n candidates each share one sampling batch of `batch_size` images."""
    return max(1, batch_size // min(n, batch_size))


def ranks(scores: np.ndarray) -> np.ndarray:
    """rank[i] = 0 for the best score; ties keep candidate order."""
    order = np.argsort(-scores, kind="stable")
    out = np.empty(len(scores), dtype=np.int32)
    out[order] = np.arange(len(scores))
    return out


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the index-th prompt of a run: independent of how prompts are batched."""
    return (seed * 1_000_003 + index) % (2**63)


def _a(value) -> str:
    """`an int`, `a dict`: what a wrong value is, for errors."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def check_prompts(prompts) -> list[str]:
    """`prompts` (one string or a list of them) as a non-empty list of prompts that each hold some text, at most
    MAX_PROMPT_CHARS characters, and encode as UTF-8 (no lone surrogates, which JSON's \\ud800 escapes can
    carry); GenerationError otherwise. Every way in (the config, the CLI, HTTP, the MLflow model, the Python API)
    calls it before any work."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif not isinstance(prompts, (list, tuple)):
        raise GenerationError(f"prompts is {prompts!r}; give a string or a list of strings")
    if not prompts:
        raise GenerationError("no prompts given; give at least one")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerationError(f"prompt {i + 1} of {len(prompts)} is {prompt!r}; every prompt needs some text")
        check_text(prompt, f"prompt {i + 1} of {len(prompts)}")
    return list(prompts)


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; GenerationError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GenerationError(f"{name} is {value!r}; it must be a whole number")
    if value < low or (high is not None and value > high):
        allowed = f"{low} to {high}" if high is not None else f"at least {low}"
        raise GenerationError(f"{name} is {value}; allowed: {allowed}")
    return int(value)


MAX_PRIME_PIXELS = 4096 * 4096  # decoding is width * height * 4 bytes; a tiny PNG can claim a huge canvas


@contextlib.contextmanager
def open_image(image, what: str = "prime image"):
    """The PIL image of an input image file (a path or the file's bytes), opened from its header only (no pixels
    decoded yet) and checked to hold at most MAX_PRIME_PIXELS pixels; `what` names it in errors. GenerationError
    (one line) for a missing file, a directory, bytes that are no image, or too many pixels."""
    is_bytes = isinstance(image, (bytes, bytearray, memoryview))
    if not is_bytes and not isinstance(image, (str, os.PathLike)):
        raise GenerationError(f"{what} is a {type(image).__name__}; give a path, image file bytes, a PIL image or "
                              "an (H, W, 3) uint8 array")
    what = f"{what} ({len(image)} bytes)" if is_bytes else f"{what} {str(image)!r}"
    if not is_bytes:
        if os.path.isdir(image):
            raise GenerationError(f"{what} is a directory; give an image file")
        if not os.path.isfile(image):
            raise GenerationError(f"{what} does not exist")
    try:
        with Image.open(io.BytesIO(image) if is_bytes else image) as im:
            w, h = im.size
            if w * h > MAX_PRIME_PIXELS:
                raise GenerationError(f"{what} is {w}x{h} pixels; allowed: at most {MAX_PRIME_PIXELS} pixels "
                                      f"(e.g. 4096x4096); shrink it first")
            yield im
    except Image.DecompressionBombError:  # Pillow's own cap, past twice its warning size: before our header check
        raise GenerationError(f"{what} has over {2 * Image.MAX_IMAGE_PIXELS} pixels; allowed: at most "
                              f"{MAX_PRIME_PIXELS} pixels (e.g. 4096x4096); shrink it first") from None
    except Image.UnidentifiedImageError:
        raise GenerationError(f"{what} is not an image file PNG, JPEG, WebP or another format Pillow reads") from None
    except (OSError, ValueError) as err:  # a truncated or damaged file
        if isinstance(err, (GenerationError, EditError)):  # the caller's own one-line error about a readable image
            raise
        raise GenerationError(f"{what} cannot be decoded as an image: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


@contextlib.contextmanager
def _opened(image, what: str):
    """`open_image` for a path or bytes, and the same PIL image for a PIL image or an (H, W, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or not image.shape[0] * image.shape[1]:
            raise GenerationError(f"{what} array is {image.dtype} {image.shape}; expected (H, W, 3) uint8, H and W "
                                  "at least 1")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        yield image
        return
    with open_image(image, what) as im:
        yield im


def load_image(image, size, what: str = "prime image") -> np.ndarray:
    """An input image (a file path, image file bytes, a PIL image or an (H, W, 3) uint8 array) as (H, W, 3) uint8
    at `size` (an int: a square), as a viewer shows it: resized to cover it, centre crop. GenerationError (one line) if
    unreadable, a directory, or over MAX_PRIME_PIXELS pixels (checked from the header, before decoding)."""
    with _opened(image, what) as im:
        return np.array(to_rgb_sized(im, size))


def load_prime(image, size) -> np.ndarray:
    """The prime image as `load_image` reads it."""
    return load_image(image, size, "prime image")


def _describe(image) -> tuple[str, str]:
    """(where an input image came from, the sha256 of its content, 16 hex digits) for generations.parquet."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return str(image), content_digest(f.read())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"{len(image)} bytes", content_digest(image)
    pixels = np.asarray(image)
    return f"a {pixels.shape[1]}x{pixels.shape[0]} image", content_digest(np.ascontiguousarray(pixels))


# Each edit mode's source image as the flat arguments name it (`EditRequest.from_arguments`: the CLI's --prime,
# --edit, --outpaint, --variations); the run config, HTTP and the MLflow model name the mode instead.
EDIT_SOURCES = {"prime": "prime_image", "inpaint": "edit_image", "outpaint": "outpaint_image", "variations": "variations"}
EDIT_NAMES = {k: k for k in (*EDIT_SOURCES.values(), "prime_rows", "region", "mask", "keep", "edit_mode")}
IMAGE_NAMES = {"prime": "prime image", "inpaint": "edit image", "outpaint": "outpaint image",
               "variations": "variations image"}  # a source image in errors from the Python API
# which options each mode takes
EDIT_OPTIONS = {"prime": ("prime_rows",), "inpaint": ("region", "mask"), "outpaint": ("region",),
                "variations": ("keep",)}


@dataclass(frozen=True)
class EditRequest:
    """An edit a `DALLEPipeline` call asks for (docs/editing.md), before any image is read: the `mode`, its source
    `image` (a path, image file bytes, a PIL image or an (H, W, 3) uint8 array, read as a viewer shows it) and
    the options its mode takes:

    - prime (DALL-E's image completion): `prime_rows` token rows kept from the top (default half the grid);
    - inpaint: `region` (x0, y0, x1, y1 pixels of the image resized to the model's size, snapped outward to whole
      token cells; or "x0,y0,x1,y1") or `mask` (a mask image of the image's size, white = regenerate, or a
      (grid, grid) bool token mask) is regenerated;
    - outpaint: the image is placed in `region` of an empty canvas, everything else is sampled;
    - variations: a share 1 - `keep` (default 0.5) of the cells is resampled, per candidate.

    The run config, the CLI, HTTP, the MLflow model and the Python API all build this type: `check` is the one
    check of a mode's options, `resolve` the one reader of its images."""

    mode: Literal["prime", "inpaint", "outpaint", "variations"]
    image: Any
    region: Any = None
    mask: Any = None
    keep: float | None = None
    prime_rows: int | None = None

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any], names: dict[str, str] | None = None) -> EditRequest | None:
        """The edit that flat arguments ask for (prime_image, edit_image, outpaint_image or variations, each the
        source of its mode, with prime_rows, region, mask and keep), or None when none of the images is given.
        `names` maps an argument to the name the user typed (a CLI flag) for the errors. GenerationError (one
        line) when two images are given, or an option without the image it applies to. Reads nothing."""
        name = {**EDIT_NAMES, **(names or {})}
        unknown = sorted(set(arguments) - set(EDIT_NAMES) | ({"edit_mode"} & set(arguments)))
        if unknown:
            raise GenerationError(f"{unknown[0]} is not an editing argument; allowed: "
                                  f"{', '.join(k for k in EDIT_NAMES if k != 'edit_mode')}")
        given = {k: v for k, v in arguments.items() if v is not None}
        sources = [mode for mode, arg in EDIT_SOURCES.items() if arg in given]
        if len(sources) > 1:
            raise GenerationError(f"{name[EDIT_SOURCES[sources[0]]]} and {name[EDIT_SOURCES[sources[1]]]} were both "
                                  f"given; give one of {', '.join(name[a] for a in EDIT_SOURCES.values())}")
        for option in ("prime_rows", "region", "mask", "keep"):
            needs = [m for m, options in EDIT_OPTIONS.items() if option in options]
            if option in given and not any(m in sources for m in needs):
                wanted = " or ".join(name[EDIT_SOURCES[m]] for m in needs)
                wanted = ("prime image" if names is None else f"{wanted} image") if option == "prime_rows" else wanted
                raise GenerationError(f"{name[option]} is {_shown(given[option])} but no {wanted} was given")
        if not sources:
            return None
        mode = sources[0]
        request = cls(mode, given[EDIT_SOURCES[mode]], **{k: given[k] for k in EDIT_OPTIONS[mode] if k in given})
        request.check(names)
        return request

    def check(self, names: dict[str, str] | None = None) -> EditRequest:
        """The options agree with the mode (each applies to it; inpainting has one of region and mask, outpainting
        a region); GenerationError (one line, in `names`' spelling) otherwise. Reads nothing."""
        name = {**EDIT_NAMES, **(names or {})}
        if self.mode not in EDIT_SOURCES:
            raise GenerationError(f"{name['edit_mode']} is {self.mode!r}; allowed: {', '.join(EDIT_SOURCES)}")
        source = name[EDIT_SOURCES[self.mode]]
        if self.image is None:
            raise GenerationError(f"{name['edit_mode']} {self.mode} needs an image; no {source} was given")
        for option in ("prime_rows", "region", "mask", "keep"):
            if getattr(self, option) is not None and option not in EDIT_OPTIONS[self.mode]:
                takes = " or ".join(name[o] for o in EDIT_OPTIONS[self.mode])
                raise GenerationError(f"{name[option]} does not apply to {name['edit_mode']} {self.mode} (it takes "
                                      f"{takes})")
        if self.mode == "inpaint" and self.region is not None and self.mask is not None:
            raise GenerationError(f"{name['region']} and {name['mask']} were both given; give one of them: "
                                  f"{name['region']} (a box) or {name['mask']} (an image, white = regenerate)")
        if self.mode == "inpaint" and self.region is None and self.mask is None:
            raise GenerationError(f"{source} needs {name['region']} x0,y0,x1,y1 or {name['mask']} (an image, white = "
                                  "regenerate): one of them")
        if self.mode == "outpaint" and self.region is None:
            raise GenerationError(f"{source} needs {name['region']} x0,y0,x1,y1: the box of the canvas the image "
                                  "goes in")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float, np.number))
                                      or not 0 < self.keep < 1):
            raise GenerationError(f"{name['keep']} is {self.keep!r}; allowed: more than 0 and less than 1 (the share "
                                  "of cells kept)")
        return self

    def resolve(self, size, grid, names: dict[str, str] | None = None) -> Edit:
        """The edit at the model's `size` pixels and `grid` tokens (each an int for a square, else (height,
        width)): its image read as `load_image` reads
        it, its token mask. GenerationError (one line) for an unreadable image, a region outside the image, a
        mask of another size than the image, or a mask that keeps or samples nothing."""
        self.check(names)
        name = {**EDIT_NAMES, **(names or {})}
        what = name[EDIT_SOURCES[self.mode]] if names and EDIT_SOURCES[self.mode] in names else IMAGE_NAMES[self.mode]
        with _opened(self.image, what) as im:
            source, digest = _describe(self.image)
            try:
                if self.mode == "prime":
                    height = size_hw(grid)[0]
                    rows = _integer(name["prime_rows"], height // 2 if self.prime_rows is None else self.prime_rows, 1,
                                    height - 1)
                    return Edit("prime", np.array(to_rgb_sized(im, size)), grid, top_rows_mask(grid, rows),
                                source=source, digest=digest)
                if self.mode == "variations":
                    return Edit("variations", np.array(to_rgb_sized(im, size)), grid,
                                keep=0.5 if self.keep is None else float(self.keep), source=source, digest=digest)
                if self.mode == "outpaint":
                    cells = region_edit_mask("outpaint", self.region, size, grid, name["region"])
                    return Edit("outpaint", place(im, check_region(self.region, size), size, grid), grid, cells,
                                source=source, digest=digest)
                if self.region is not None:
                    cells = region_edit_mask("inpaint", self.region, size, grid, name["region"])
                else:
                    cells = _mask_cells(self.mask, viewer_size(im), size, grid, name,
                                        "mask image" if names is None else name["mask"])
                return Edit("inpaint", np.array(to_rgb_sized(im, size)), grid, cells, source=source, digest=digest)
            except EditError as err:
                raise GenerationError(str(err)) from None


def load_edit(size, grid, names: dict[str, str] | None = None, **arguments) -> Edit | None:
    """The edit that flat `arguments` ask for (`EditRequest.from_arguments`), resolved at the model's `size` and
    `grid`; None when they give no source image."""
    request = EditRequest.from_arguments(arguments, names)
    return None if request is None else request.resolve(size, grid, names)


def _mask_cells(mask, image_size: tuple[int, int], size, grid, name: dict[str, str],
                what: str) -> np.ndarray:
    """The token mask of inpainting's `mask` (a mask image of the edit image's size, or a bool token grid)."""
    if isinstance(mask, np.ndarray) and mask.dtype == bool:  # a token mask itself
        return image_mask(mask, size, grid, name["mask"])
    if isinstance(mask, np.ndarray):
        try:  # whatever Pillow reads as an image (8-bit, 16-bit greyscale, ...) is one
            opened = contextlib.nullcontext(Image.fromarray(mask)) if mask.size else None
        except (TypeError, ValueError):
            opened = None
        if opened is None:
            raise GenerationError(f"{name['mask']} array is {mask.dtype} {mask.shape}; give a bool (grid, grid) "
                                  "token mask, or an image array Pillow reads (white = regenerate)")
    else:
        opened = _opened(mask, what)
    with opened as m:
        shown = viewer_size(m)
        if shown != image_size:  # both as a viewer shows them: a mask drawn on the photo as the user sees it
            raise GenerationError(f"{name['mask']} is {shown[0]}x{shown[1]} pixels but {name['edit_image']} is "
                                  f"{image_size[0]}x{image_size[1]} as a viewer shows it; the mask must be the "
                                  "image's size")
        return image_mask(m, size, grid, name["mask"])


def _shown(value) -> str:
    return f"{value!r}" if isinstance(value, str) else str(value) if np.ndim(value) == 0 or isinstance(value, (tuple, list)) \
        else f"a {type(value).__name__}"
