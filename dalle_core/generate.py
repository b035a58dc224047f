"""Text to image: sample N candidates per prompt, decode them with the dVAE, rank them with CLIP.

`DALLEPipeline.from_pretrained(folder)` loads an exported model (dalle_core/export.py) and
`pipe(prompts, num_candidates=16, ...)` returns each prompt's candidates ranked by CLIP, as DALL-E's
reranking did (Ramesh et al. 2021, section 2.5).
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
from dalle_core.images import ImageNormalization, to_rgb_square, to_tensor, to_uint8_tensor
from dalle_core.sampling import sample
from dalle_core.transformer import DALLE

# What a call samples with when neither the caller nor the model's own defaults say (as GenerateSection)
SAMPLING_DEFAULTS = {"num_candidates": 16, "cond_scale": 1.0, "temperature": 1.0, "top_k": None, "top_p": None,
                     "seed": 0, "batch_size": 64}
Progress = Callable[[int, int], None]  # (sampling steps done, steps in all)


class GenerationError(ValueError):
    """A bad generation request: an empty prompt, a setting out of range, an image that cannot be decoded.
    The message is one line, naming the bad value and what is allowed."""


@dataclass
class GenerationOutput:
    """What a `DALLEPipeline` call returns, per prompt and best first: `images[p][r]` the r-th ranked PIL
    image of prompt p, `scores[p]` their (n,) CLIP cosine similarities (descending), `pixels[p]` the same
    images as (n, H, W, 3) uint8, `image_tokens[p]` their (n, h*w) dVAE codes; `seeds[p]` the prompt's
    sampling seed (from the call's `seed`, as `dalle generate` draws it) and `truncated[p]` whether the
    prompt was cut to the model's text length."""

    prompts: list[str]
    seed: int
    seeds: list[int]
    pixels: list[np.ndarray]
    scores: list[np.ndarray]
    image_tokens: list[np.ndarray]
    truncated: list[bool]
    prime: np.ndarray | None = None  # the prime image at the model's size, when the call primed

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
        from dalle_core.export import load_folder

        return load_folder(folder, device, precision)

    @property
    def image_size(self) -> int:
        return self.dvae.c.image_size

    def __call__(self, prompts: str | list[str], num_candidates: int | None = None, *, cond_scale: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, prime_image=None, prime_rows: int | None = None,
                 batch_size: int | None = None, progress: Progress | None = None) -> GenerationOutput:
        """Draw `num_candidates` images per prompt and rank them by CLIP (best first).

        Settings left None take the model's own defaults (its run's `generate` section). `cond_scale`:
        classifier-free guidance, >= 0 (1 = none); `temperature` > 0; `top_k` >= 0 codes (0 = off); `top_p`
        in (0, 1] (1 = off); `seed` >= 0: prompt i draws from `prompt_seed(seed, i)`, so a prompt's images do
        not depend on the others. `prime_image` (a path, PNG/JPEG bytes, a PIL image or an (H, W, 3) uint8
        array; resized to the dVAE's input, shorter side then centre crop) fixes the top `prime_rows` token
        rows of every candidate (DALL-E's image completion; default half the rows). `progress(done, total)`
        is called after every sampling step. Raises GenerationError (one line) for a bad value."""
        prompts = check_prompts(prompts)
        s = {**SAMPLING_DEFAULTS, **self.sampling}
        n = _integer("num_candidates", s["num_candidates"] if num_candidates is None else num_candidates, 1)
        settings = check_sampling(s["cond_scale"] if cond_scale is None else cond_scale,
                                  s["temperature"] if temperature is None else temperature,
                                  s["top_k"] if top_k is None else top_k, s["top_p"] if top_p is None else top_p)
        seed = _integer("seed", s["seed"] if seed is None else seed, 0, 2**63 - 1)
        batch = _integer("batch_size", s["batch_size"] if batch_size is None else batch_size, 1)
        prefix, prime = None, None
        if prime_image is not None:
            rows = self.transformer.c.image_grid
            k = _integer("prime_rows", rows // 2 if prime_rows is None else prime_rows, 1, rows - 1)
            prime = load_prime(prime_image, self.image_size)
            prefix, _ = self.prime(prime, k)
        elif prime_rows:
            raise GenerationError(f"prime_rows is {prime_rows} but no prime image was given")
        seeds = [prompt_seed(seed, i) for i in range(len(prompts))]
        results = self.candidates(prompts, n, seeds, batch, *settings, prefix, progress=progress)
        out = GenerationOutput(prompts, seed, seeds, [], [], [], [], prime)
        for images, scores, truncated, codes in results:
            order = np.argsort(-scores, kind="stable")  # as `ranks`: ties keep candidate order
            out.pixels.append(images[order])
            out.scores.append(scores[order])
            out.image_tokens.append(codes[order])
            out.truncated.append(truncated)
        return out

    @torch.inference_mode()
    def prime(self, image: np.ndarray, rows: int) -> tuple[torch.Tensor, np.ndarray]:
        """A (H, W, 3) uint8 image at the dVAE's size -> (its top `rows` rows of codes, flat; its reconstruction)."""
        x = to_tensor(image[None], self.normalization.mean, self.normalization.std).to(self.device)
        codes = self.dvae.encode(x)
        recon = to_uint8_tensor(self.dvae.decode(codes), self.normalization.mean, self.normalization.std)[0].cpu().numpy()
        return codes[0, :rows].flatten(), recon

    @torch.inference_mode()
    def candidates(self, prompts: list[str], n: int, seeds: list[int], batch_size: int = 64,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   cond_scale: float = 1.0, prefix: torch.Tensor | None = None, progress: Progress | None = None,
                   ) -> list[tuple[np.ndarray, np.ndarray, bool, np.ndarray]]:
        """Per prompt: (n, H, W, 3) uint8 images, their (n,) CLIP scores, whether it was truncated, and the
        (n, tokens) image codes.

        Whole prompts share a sampling batch of about `batch_size` images (bigger batches run
        faster on CPU and GPU alike); each prompt draws from its own generator seeded with its
        seed, so its images do not depend on which prompts it is batched with. `prefix` (codes, flat)
        fixes the first codes of every candidate (image completion, see `prime`). `progress(done, total)`
        is called after every sampling step of every batch.
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
        steps = self.transformer.c.image_len - (0 if prefix is None else len(prefix))
        total, done = steps * -(-len(prompts) // per_batch) * -(-n // chunk), 0

        def step(i: int, logits: torch.Tensor) -> None:
            nonlocal done
            done += 1
            progress(done, total)

        for first in range(0, len(prompts), per_batch):
            group = range(first, min(first + per_batch, len(prompts)))
            for start in range(0, n, chunk):
                b = min(chunk, n - start)
                rows = torch.cat([text[j:j + 1].expand(b, -1) for j in group])
                fixed = None if prefix is None else prefix.to(device)[None].expand(rows.shape[0], -1)
                codes = sample(self.transformer, rows, temperature=temperature, top_k=top_k, top_p=top_p,
                               cond_scale=cond_scale, image_prefix=fixed, generator=[gens[j] for j in group],
                               precision=self.precision, on_logits=None if progress is None else step)
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
def open_prime(image):
    """The PIL image of a prime image file (a path or the file's bytes), opened from its header only (no pixels
    decoded yet) and checked to hold at most MAX_PRIME_PIXELS pixels. GenerationError (one line) for a missing
    file, a directory, bytes that are no image, or too many pixels."""
    is_bytes = isinstance(image, (bytes, bytearray, memoryview))
    what = f"prime image ({len(image)} bytes)" if is_bytes else f"prime image {str(image)!r}"
    if not is_bytes:
        if not isinstance(image, (str, os.PathLike)):
            raise GenerationError(f"prime image is a {type(image).__name__}; give a path, image file bytes, "
                                  "a PIL image or an (H, W, 3) uint8 array")
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
        if isinstance(err, GenerationError):
            raise
        raise GenerationError(f"{what} cannot be decoded as an image: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def load_prime(image, size: int) -> np.ndarray:
    """A prime image (a file path, image file bytes, a PIL image or an (H, W, 3) uint8 array) as (size, size, 3)
    uint8, as a viewer shows it: shorter side resized to `size`, centre crop. GenerationError (one line) if
    unreadable, a directory, or over MAX_PRIME_PIXELS pixels (checked from the header, before decoding)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise GenerationError(f"prime image array is {image.dtype} {image.shape}; expected (H, W, 3) uint8")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        return np.array(to_rgb_square(image, size))
    with open_prime(image) as im:
        return np.array(to_rgb_square(im, size))
