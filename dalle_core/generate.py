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
from dalle_core.errors import UserError
from dalle_core.images import ImageNormalization, to_rgb_square, to_tensor, to_uint8_tensor
from dalle_core.model_folder import load_folder
from dalle_core.sampling import sample
from dalle_core.transformer import DALLE

# What a call samples with when neither the caller nor the model's own defaults say (as GenerateSection)
SAMPLING_DEFAULTS = {"num_candidates": 16, "cond_scale": 1.0, "temperature": 1.0, "top_k": None, "top_p": None,
                     "seed": 0, "batch_size": 64}
Progress = Callable[[int, int], None]  # (sampling steps done, steps in all)


class GenerationError(UserError):
    """A bad generation request: an empty prompt, a setting out of range, an image that cannot be decoded.
    The message is one line, naming the bad value and what is allowed."""


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
    seed: int
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

    @property
    def image_size(self) -> int:
        return self.dvae.c.image_size

    def __call__(self, prompts: str | list[str], num_candidates: int | None = None, *, cond_scale: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, prime_image=None, prime_rows: int | None = None, edit_image=None,
                 region=None, mask=None, outpaint_image=None, variations=None, keep: float | None = None,
                 batch_size: int | None = None, progress: Progress | None = None) -> GenerationOutput:
        """Draw `num_candidates` images per prompt and rank them by CLIP (best first).

        Settings left None take the model's own defaults (its run's `generate` section). `cond_scale`:
        classifier-free guidance, >= 0 (1 = none); `temperature` > 0; `top_k` >= 0 codes (0 = off); `top_p`
        in (0, 1] (1 = off); `seed` >= 0: prompt i draws from `prompt_seed(seed, i)`, so a prompt's images do
        not depend on the others. `prime_image` (a path, PNG/JPEG bytes, a PIL image or an (H, W, 3) uint8
        array; resized to the dVAE's input, shorter side then centre crop) fixes the top `prime_rows` token
        rows of every candidate (DALL-E's image completion; default half the rows).

        Editing (docs/editing.md; images given as `prime_image` is; at most one source image): `edit_image` with
        `region` (x0, y0, x1, y1 pixels of the image resized to the model's `image_size`, snapped outward to
        whole token cells; or "x0,y0,x1,y1") or `mask` (a mask image of the edit image's size, white =
        regenerate, or a (grid, grid) bool token mask) regenerates that part (inpainting); `outpaint_image`
        with `region` places the image in that box of an empty canvas and samples everything else; `variations`
        resamples a share 1 - `keep` (default 0.5) of the cells, chosen per candidate from (its prompt's seed,
        its index). Every candidate keeps the other cells' codes exactly. `progress(done, total)` is called
        after every sampling step. Raises GenerationError (one line) for a bad value."""
        prompts = check_prompts(prompts)
        s = {**SAMPLING_DEFAULTS, **self.sampling}
        n = _integer("num_candidates", s["num_candidates"] if num_candidates is None else num_candidates, 1)
        settings = check_sampling(s["cond_scale"] if cond_scale is None else cond_scale,
                                  s["temperature"] if temperature is None else temperature,
                                  s["top_k"] if top_k is None else top_k, s["top_p"] if top_p is None else top_p)
        seed = _integer("seed", s["seed"] if seed is None else seed, 0, 2**63 - 1)
        batch = _integer("batch_size", s["batch_size"] if batch_size is None else batch_size, 1)
        edit = load_edit(self.image_size, self.transformer.c.image_grid, prime_image=prime_image,
                         prime_rows=prime_rows, edit_image=edit_image, region=region, mask=mask,
                         outpaint_image=outpaint_image, variations=variations, keep=keep)
        seeds = [prompt_seed(seed, i) for i in range(len(prompts))]
        results = self.candidates(prompts, n, seeds, batch, *settings, edit, progress=progress)
        prime = edit.image if edit is not None and edit.mode == "prime" else None
        out = GenerationOutput(prompts, seed, seeds, [], [], [], [], prime, edit)
        for prompt_s, (images, scores, truncated, codes) in zip(seeds, results):
            order = np.argsort(-scores, kind="stable")  # as `ranks`: ties keep candidate order
            out.pixels.append(images[order])
            out.scores.append(scores[order])
            out.image_tokens.append(codes[order])
            out.truncated.append(truncated)
            out.candidates.append(order)
            if edit is not None:
                out.masks.append(np.array(edit.masks(prompt_s, n))[order])
        return out

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """A (H, W, 3) uint8 image at the dVAE's size -> its (h*w,) codes in raster order, on the pipeline's device."""
        x = to_tensor(image[None], self.normalization.mean, self.normalization.std).to(self.device)
        return self.dvae.encode(x)[0].flatten()

    @torch.inference_mode()
    def candidates(self, prompts: list[str], n: int, seeds: list[int], batch_size: int = 64,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   cond_scale: float = 1.0, edit: Edit | None = None, progress: Progress | None = None,
                   ) -> list[tuple[np.ndarray, np.ndarray, bool, np.ndarray]]:
        """Per prompt: (n, H, W, 3) uint8 images, their (n,) CLIP scores, whether it was truncated, and the
        (n, tokens) image codes.

        Whole prompts share a sampling batch of about `batch_size` images (bigger batches run
        faster on CPU and GPU alike); each prompt draws from its own generator seeded with its
        seed, so its images do not depend on which prompts it is batched with. `edit` (`load_edit`): its
        image's codes are kept wherever a candidate's token mask (`Edit.masks(prompt seed, ...)`, in candidate
        order) is False. `progress(done, total)` is called after every sampling step of every batch.
        """
        ids, truncated = self.tokenizer.encode(prompts)
        device = self.device
        text = torch.from_numpy(ids).to(device)
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        side = self.transformer.c.image_grid
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
        total = sum(image_len if m is None else int(m.any(dim=0).sum()) for _, _, m in batches)  # steps sampled
        done = 0

        def step(i: int, logits: torch.Tensor) -> None:
            nonlocal done
            done += 1
            progress(done, total)

        for group, b, masks in batches:
            rows = torch.cat([text[j:j + 1].expand(b, -1) for j in group])
            kept = None if source is None else source[None].expand(rows.shape[0], -1)
            codes = sample(self.transformer, rows, temperature=temperature, top_k=top_k, top_p=top_p,
                           cond_scale=cond_scale, image=kept, mask=None if masks is None else masks.to(device),
                           generator=[gens[j] for j in group], precision=self.precision,
                           on_logits=None if progress is None else step)
            pixels = to_uint8_tensor(self.dvae.decode(codes.view(-1, side, side)), self.normalization.mean, self.normalization.std)
            s = self.reranker.scores(pixels, [prompts[j] for j in group for _ in range(b)]).float().numpy()
            decoded, drawn = pixels.cpu().numpy(), codes.cpu().numpy()
            for k, j in enumerate(group):
                images[j].append(decoded[k * b:(k + 1) * b])
                scores[j].append(s[k * b:(k + 1) * b])
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


def check_prompts(prompts) -> list[str]:
    """`prompts` (one string or a list of them) as a non-empty list of prompts that each hold some text and
    encode as UTF-8 (no lone surrogates, which JSON's \\ud800 escapes can carry); GenerationError otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif not isinstance(prompts, (list, tuple)):
        raise GenerationError(f"prompts is {prompts!r}; give a string or a list of strings")
    if not prompts:
        raise GenerationError("no prompts given; give at least one")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerationError(f"prompt {i + 1} of {len(prompts)} is {prompt!r}; every prompt needs some text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise GenerationError(f"prompt {i + 1} of {len(prompts)} is not valid text: character {err.start + 1} "
                                  f"is {prompt[err.start]!r}, a lone UTF-16 surrogate") from None
    return list(prompts)


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; GenerationError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GenerationError(f"{name} is {value!r}; it must be a whole number")
    if value < low or (high is not None and value > high):
        allowed = f"{low} to {high}" if high is not None else f"at least {low}"
        raise GenerationError(f"{name} is {value}; allowed: {allowed}")
    return int(value)


def check_sampling(cond_scale: float, temperature: float, top_k: int | None,
                   top_p: float | None) -> tuple[float, int | None, float | None, float]:
    """(temperature, top_k, top_p, cond_scale) as `DALLEPipeline.candidates` takes them, top_k 0 and top_p 1
    meaning off (None); GenerationError (one line) for a value out of range."""
    for name, value in (("cond_scale", cond_scale), ("temperature", temperature), ("top_p", top_p)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not np.isfinite(value)):
            raise GenerationError(f"{name} is {value!r}; it must be a number")
    if cond_scale < 0:
        raise GenerationError(f"cond_scale is {cond_scale}; allowed: 0 or more (1 = no guidance)")
    if temperature <= 0:
        raise GenerationError(f"temperature is {temperature}; allowed: more than 0")
    if top_k is not None:
        top_k = _integer("top_k", top_k, 0) or None
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p is {top_p}; allowed: more than 0 and at most 1 (1 = off)")
    return float(temperature), top_k, None if top_p is None or top_p == 1 else float(top_p), float(cond_scale)


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
    except Image.UnidentifiedImageError:
        raise GenerationError(f"{what} is not an image file PNG, JPEG, WebP or another format Pillow reads") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # a truncated or damaged file
        if isinstance(err, (GenerationError, EditError)):  # the caller's own one-line error about a readable image
            raise
        raise GenerationError(f"{what} cannot be decoded as an image: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


@contextlib.contextmanager
def _opened(image, what: str):
    """`open_image` for a path or bytes, and the same PIL image for a PIL image or an (H, W, 3) uint8 array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise GenerationError(f"{what} array is {image.dtype} {image.shape}; expected (H, W, 3) uint8")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        yield image
        return
    with open_image(image, what) as im:
        yield im


def load_image(image, size: int, what: str = "prime image") -> np.ndarray:
    """An input image (a file path, image file bytes, a PIL image or an (H, W, 3) uint8 array) as (size, size, 3)
    uint8, as a viewer shows it: shorter side resized to `size`, centre crop. GenerationError (one line) if
    unreadable, a directory, or over MAX_PRIME_PIXELS pixels (checked from the header, before decoding)."""
    with _opened(image, what) as im:
        return np.array(to_rgb_square(im, size))


def load_prime(image, size: int) -> np.ndarray:
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


EDIT_NAMES = {k: k for k in ("prime_image", "prime_rows", "edit_image", "region", "mask", "outpaint_image",
                             "variations", "keep")}


def load_edit(size: int, grid: int, *, prime_image=None, prime_rows: int | None = None, edit_image=None,
              region=None, mask=None, outpaint_image=None, variations=None, keep: float | None = None,
              names: dict[str, str] | None = None) -> Edit | None:
    """The edit a `DALLEPipeline` call asks for, at the model's `size` pixels and `grid` x `grid` tokens, or None
    when it gives no source image (see `DALLEPipeline.__call__` for the arguments). Images are read as
    `load_image` reads them. `names` maps an argument to the name the user typed (a CLI flag, a config key) for
    the errors. GenerationError (one line) for conflicting arguments, an unreadable image, a region outside the
    image, a mask of another size than the image, or a mask that keeps or samples nothing."""
    name = {**EDIT_NAMES, **(names or {})}
    mode = edit_source(prime_image=prime_image, prime_rows=prime_rows, edit_image=edit_image, region=region,
                       mask=mask, outpaint_image=outpaint_image, variations=variations, keep=keep, names=names)
    if mode is None:
        return None
    image = {"prime_image": prime_image, "edit_image": edit_image, "outpaint_image": outpaint_image,
             "variations": variations}[mode]
    what = name[mode] if names and mode in names else {
        "prime_image": "prime image", "edit_image": "edit image", "outpaint_image": "outpaint image",
        "variations": "variations image"}[mode]
    with _opened(image, what) as im:
        source, digest = _describe(image)
        try:
            if mode == "prime_image":
                rows = _integer(name["prime_rows"], grid // 2 if prime_rows is None else prime_rows, 1, grid - 1)
                return Edit("prime", np.array(to_rgb_square(im, size)), grid, top_rows_mask(grid, rows),
                            source=source, digest=digest)
            if mode == "variations":
                keep = 0.5 if keep is None else keep
                if isinstance(keep, bool) or not isinstance(keep, (int, float, np.number)) or not 0 < keep < 1:
                    raise GenerationError(f"{name['keep']} is {keep!r}; allowed: more than 0 and less than 1 "
                                          "(the share of cells kept)")
                return Edit("variations", np.array(to_rgb_square(im, size)), grid, keep=float(keep), source=source,
                            digest=digest)
            if mode == "outpaint_image":
                if region is None:
                    raise GenerationError(f"{name['outpaint_image']} needs {name['region']} x0,y0,x1,y1: the box of "
                                          "the canvas the image goes in")
                cells = region_edit_mask("outpaint", region, size, grid, name["region"])
                return Edit("outpaint", place(im, check_region(region, size), size, grid), grid, cells,
                            source=source, digest=digest)
            if region is None and mask is None:
                raise GenerationError(f"{name['edit_image']} needs {name['region']} x0,y0,x1,y1 or {name['mask']} "
                                      "(an image, white = regenerate): one of them")
            if region is not None:
                cells = region_edit_mask("inpaint", region, size, grid, name["region"])
            else:
                cells = _mask_cells(mask, im.size, size, grid, name, "mask image" if names is None else name["mask"])
            return Edit("inpaint", np.array(to_rgb_square(im, size)), grid, cells, source=source, digest=digest)
        except EditError as err:
            raise GenerationError(str(err)) from None


def edit_source(*, prime_image=None, prime_rows=None, edit_image=None, region=None, mask=None, outpaint_image=None,
                variations=None, keep=None, names: dict[str, str] | None = None) -> str | None:
    """Which of `load_edit`'s source images is given (prime_image, edit_image, outpaint_image or variations), or
    None; GenerationError (one line) when two are, or when region, mask, keep or prime_rows come without the image
    they apply to. Reads nothing."""
    name = {**EDIT_NAMES, **(names or {})}
    sources = [k for k, v in (("prime_image", prime_image), ("edit_image", edit_image),
                              ("outpaint_image", outpaint_image), ("variations", variations)) if v is not None]
    if len(sources) > 1:
        raise GenerationError(f"{name[sources[0]]} and {name[sources[1]]} were both given; give one of "
                              f"{', '.join(name[k] for k in ('prime_image', 'edit_image', 'outpaint_image', 'variations'))}")
    for arg, value, needs in (("prime_rows", prime_rows, ("prime_image",)), ("region", region, ("edit_image", "outpaint_image")),
                              ("mask", mask, ("edit_image",)), ("keep", keep, ("variations",))):
        if value is not None and not any(k in sources for k in needs):
            wanted = " or ".join(name[k] for k in needs)
            wanted = ("prime image" if names is None else f"{wanted} image") if arg == "prime_rows" else wanted
            raise GenerationError(f"{name[arg]} is {_shown(value)} but no {wanted} was given")
    if edit_image is not None and region is not None and mask is not None:
        raise GenerationError(f"{name['region']} and {name['mask']} were both given; give one of them: "
                              f"{name['region']} (a box) or {name['mask']} (an image, white = regenerate)")
    return sources[0] if sources else None


def _mask_cells(mask, image_size: tuple[int, int], size: int, grid: int, name: dict[str, str],
                what: str) -> np.ndarray:
    """The token mask of inpainting's `mask` (a mask image of the edit image's size, or a bool token grid)."""
    if isinstance(mask, np.ndarray) and mask.dtype == bool:  # a token mask itself
        return image_mask(mask, size, grid, name["mask"])
    opened = contextlib.nullcontext(Image.fromarray(mask)) if isinstance(mask, np.ndarray) else \
        _opened(mask, what)
    with opened as m:
        if m.size != image_size:
            raise GenerationError(f"{name['mask']} is {m.size[0]}x{m.size[1]} pixels but {name['edit_image']} is "
                                  f"{image_size[0]}x{image_size[1]}; the mask must be the image's size")
        return image_mask(m, size, grid, name["mask"])


def _shown(value) -> str:
    return f"{value!r}" if isinstance(value, str) else str(value) if np.ndim(value) == 0 or isinstance(value, (tuple, list)) \
        else f"a {type(value).__name__}"
