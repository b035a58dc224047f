"""Sampling image tokens from the DALL-E transformer with a key/value cache.

The text (and the leading run of kept codes, when editing) is prefilled in one
pass; then one image token per step, each step reading only its own token. An
optional token mask says which codes are sampled and which are kept from a
source image (priming, inpainting, outpainting, variations: one sampler). Classifier-free
guidance runs the conditional and the unconditional (all-padding caption) rows
in one batch: logits = uncond + cond_scale * (cond - uncond).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Literal, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, MaxLen, MinLen

from dalle_core import cpu_fast
from dalle_core.errors import UserError
from dalle_core.lora import fused
from dalle_core.transformer import DALLE, KVCache


class GenerationError(UserError):
    """A bad generation request: an empty prompt, a setting out of range, an image that cannot be decoded.
    The message is one line, naming the bad value and what is allowed."""


MAX_PROMPT_CHARS = 1000  # far beyond any model's text_len tokens, far below what costs the server memory


@dataclass(frozen=True)
class SamplingSettings:
    """How a `DALLEPipeline` call samples (Ramesh et al. 2021, section 2.5: N candidates per prompt, reranked by
    CLIP). Each field's type carries its allowed range: the run config's `generate` section, `dalle serve`'s
    request and the MLflow model's params are built from these fields, so this is the one place they are
    declared. `cond_scale`: classifier-free guidance scale (1 = none); `top_k` codes kept per step (0 or None:
    off); `top_p` nucleus mass (1 or None: off); prompt i draws from `prompt_seed(seed, i)`; `batch_size` images
    share one forward pass. Guidance: `negative_prompt` is the caption guidance steers away from, in place of the
    all-padding one (diffusers' negative_prompt); the scale applies to the image tokens whose share of the grid is
    in [`guidance_start`, `guidance_end`) (LlamaGen's cfg_interval), `constant` there or, with
    `guidance_schedule: linear`, rising from 1 at `guidance_start` to `cond_scale` at `guidance_end`; 1 elsewhere."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the run config and the HTTP request

    num_candidates: Annotated[int, Ge(1)] = 16
    cond_scale: Annotated[float, Ge(0)] = 1.0
    temperature: Annotated[float, Gt(0)] = 1.0
    top_k: Annotated[int, Ge(0)] | None = None
    top_p: Annotated[float, Gt(0), Le(1)] | None = None
    seed: Annotated[int, Ge(0), Le(2**63 - 1)] = 0
    batch_size: Annotated[int, Ge(1)] = 64
    negative_prompt: Annotated[str, MinLen(1), MaxLen(MAX_PROMPT_CHARS)] | None = None
    guidance_schedule: Literal["constant", "linear"] = "constant"
    guidance_start: Annotated[float, Ge(0), Le(1)] = 0.0
    guidance_end: Annotated[float, Ge(0), Le(1)] = 1.0

    def checked(self) -> SamplingSettings:
        """These settings checked against their ranges (for callers that bypass the config's validation), top_k 0
        and top_p 1 made None (off); GenerationError (one line) naming the bad value and what is allowed."""
        hints = get_type_hints(SamplingSettings, include_extras=True)
        for f in fields(self):
            _check_setting(f.name, getattr(self, f.name), hints[f.name])
        if self.guidance_start >= self.guidance_end:
            raise GenerationError(f"guidance_start is {self.guidance_start} and guidance_end {self.guidance_end}; "
                                  "the start must come before the end (shares of the image tokens, 0 to 1)")
        return dataclasses.replace(
            self, cond_scale=float(self.cond_scale), temperature=float(self.temperature), top_k=self.top_k or None,
            top_p=None if self.top_p in (None, 1) else float(self.top_p), negative_prompt=self.negative_prompt or None,
            guidance_start=float(self.guidance_start), guidance_end=float(self.guidance_end))

    def guidance_scales(self, n: int) -> list[float]:
        """The guidance scale at each of `n` image-token positions (raster order), as the schedule says."""
        inside = [i for i in range(n) if self.guidance_start * n <= i < self.guidance_end * n]
        out = [1.0] * n
        for k, i in enumerate(inside):  # linear: from 1 at the first guided position to the scale at the last
            ramp = k / (len(inside) - 1) if len(inside) > 1 else 1.0
            out[i] = self.cond_scale if self.guidance_schedule == "constant" else 1.0 + (self.cond_scale - 1.0) * ramp
        return out

    def replace(self, **given) -> SamplingSettings:
        """These settings with the `given` ones that are not None; GenerationError for a name that is no setting."""
        unknown = sorted(set(given) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise GenerationError(f"{unknown[0]} is not a sampling setting; allowed: {', '.join(SAMPLING_DEFAULTS)}")
        return SamplingSettings(**{**asdict(self), **{k: v for k, v in given.items() if v is not None}})


def _check_setting(name: str, value, hint) -> None:
    """One sampling setting against its annotation: its type (int, float, text or one of a few words, or None
    where allowed) and bounds."""
    kind, bounds, optional = typing_args(hint)
    if value is None:
        if not optional:
            raise GenerationError(f"{name} is None; it must be {'one of ' if get_origin(kind) is Literal else 'a '}"
                                  f"{', '.join(get_args(kind)) if get_origin(kind) is Literal else 'number'}")
        return
    if get_origin(kind) is Literal:
        if value not in get_args(kind):
            raise GenerationError(f"{name} is {described(value)}; allowed: {', '.join(get_args(kind))}")
        return
    if kind is str:
        if not isinstance(value, str):
            raise GenerationError(f"{name} is {described(value)}; it must be text")
        check_text(value, name, next(b.max_length for b in bounds if isinstance(b, MaxLen)))
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise GenerationError(f"{name} is {described(value)}; it must be a {'whole number' if kind is int else 'number'}")
    if kind is int and not isinstance(value, (int, np.integer)):
        raise GenerationError(f"{name} is {value!r}; it must be a whole number")
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):  # ints of any size are finite
        raise GenerationError(f"{name} is {value!r}; it must be a number")
    low = next((b for b in bounds if isinstance(b, (Ge, Gt))), None)
    high = next((b for b in bounds if isinstance(b, Le)), None)
    if (isinstance(low, Ge) and value < low.ge) or (isinstance(low, Gt) and value <= low.gt) or \
            (high is not None and value > high.le):
        parts = [f"at least {low.ge}" if isinstance(low, Ge) else f"more than {low.gt}" if low else None,
                 f"at most {high.le}" if high else None]
        raise GenerationError(f"{name} is {value}; allowed: {' and '.join(p for p in parts if p)}")


def described(value, show=repr, limit: int = 40) -> str:
    """`value` as an error message shows it: `show(value)` when short, else what it is (`a string of 200000
    characters`), so one bad value never makes a megabyte "line"."""
    text = show(value)
    if len(text) <= limit:
        return text
    return f"a string of {len(value)} characters" if isinstance(value, str) else \
        f"a list of {len(value)} items" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"


def check_text(text: str, what: str, max_chars: int | None = None) -> None:
    """`text` has some non-blank text, at most `max_chars` (MAX_PROMPT_CHARS) characters, measured before BPE (encoding
    megabytes costs seconds and gigabytes), and encodes as UTF-8 (no lone surrogates, which JSON's \\ud800
    escapes can carry); GenerationError naming `what` otherwise."""
    max_chars = max_chars or MAX_PROMPT_CHARS
    if not text.strip():
        raise GenerationError(f"{what} is {described(text)}; every prompt needs some text")
    if len(text) > max_chars:
        raise GenerationError(f"{what} is {len(text)} characters; allowed: at most {max_chars} (the model reads only "
                              "its first text_len tokens)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise GenerationError(f"{what} is not valid text: character {err.start + 1} is {text[err.start]!r}, a lone "
                              "UTF-16 surrogate") from None


def typing_args(hint) -> tuple[type, tuple, bool]:
    """(int, float, str or a Literal, the annotated_types bounds, whether None is allowed) of a SamplingSettings
    field's type."""
    optional = False
    if getattr(hint, "__args__", None) and type(None) in hint.__args__:  # Annotated[...] | None
        optional, hint = True, next(a for a in hint.__args__ if a is not type(None))
    base, bounds = (hint.__origin__, hint.__metadata__) if hasattr(hint, "__metadata__") else (hint, ())
    return base, tuple(bounds), optional


# What a call samples with when neither the caller nor the model's own defaults say
SAMPLING_DEFAULTS = asdict(SamplingSettings())


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, then keep the top-k and/or the smallest set with probability >= top_p."""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = logits.masked_fill(logits < top_p_threshold(logits, top_p), float("-inf"))
    return logits


def top_p_threshold(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """(rows, 1): the smallest logit of the nucleus, the fewest top tokens whose probability reaches top_p
    (the token that crosses top_p is kept).

    On CPU, sorting all image codes is slow (docs/benchmarks.md), so the nucleus is looked for among the top
    64 logits first, and only where that is not enough among all; a trained model's sharp distributions need
    the small top-k. On GPUs the sort is cheap and needs no sync.
    """
    V = logits.shape[-1]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    for k in ([min(V, 64), V] if logits.device.type == "cpu" else [V]):
        values, _ = torch.topk(logits, k, dim=-1)  # sorted, descending
        probs = (values - lse).exp()
        cum = probs.cumsum(-1)
        if k == V or bool((cum[:, -1] >= top_p).all()):
            break
    outside = cum - probs >= top_p
    return values.masked_fill(outside, float("inf")).min(dim=-1, keepdim=True).values


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of (rows, V) probabilities, by the inverse CDF: one uniform number per row
    (torch.multinomial draws V exponentials per row, slow on a CPU: docs/benchmarks.md)."""
    cdf = probs.cumsum(-1)
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)  # (0, 1]
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)  # (rows, 1)


def guided(logits: torch.Tensor, batch: int, cond_scale: float) -> torch.Tensor:
    """Rows [0, batch) are conditional, [batch, 2*batch) unconditional."""
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + cond_scale * (cond - uncond)


def for_sampling(model: DALLE, precision: str,
                 rows: int) -> tuple[DALLE, contextlib.AbstractContextManager, torch.dtype]:
    """The model (or a copy) to sample `rows` rows with, the context to run it in, and its KV cache's dtype, for
    `precision` fp32 or bf16. The model passed in is never changed; one carrying a LoRA adapter is sampled fused.

    On a CPU, the CPU's fast copy (dalle_core.cpu_fast.for_sampling). bf16 on a GPU: a bf16 copy of the whole
    model, no autocast (no cast kernels in a launch-bound step), and a bf16 KV cache: half the memory traffic.
    """
    model = fused(model)  # a LoRA adapter merged into a copy: the fast paths read plain layers' weights
    if next(model.parameters()).device.type == "cpu":
        return cpu_fast.for_sampling(model, precision, rows)
    if precision == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16), contextlib.nullcontext(), torch.bfloat16
    return model, contextlib.nullcontext(), torch.float32


def token_mask(mask: torch.Tensor | None, image: torch.Tensor | None, batch: int, n: int,
               device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`sample`'s `mask` and `image` checked and broadcast: ((batch, n) bool mask, (batch, n) long source codes), or
    (None, None) for unmasked sampling. ValueError (one line) for a bad shape or dtype, or a mask that samples
    nothing."""
    if mask is None:
        if image is not None:
            raise ValueError("image (the source codes) was given without a mask; give mask (True = sample) too")
        return None, None
    if mask.dtype != torch.bool or mask.shape not in ((n,), (batch, n)):
        raise ValueError(f"mask is {mask.dtype} {tuple(mask.shape)}; expected torch.bool of shape ({n},) or "
                         f"({batch}, {n}) (True = sample)")
    if image is None or tuple(image.shape) != (batch, n):
        raise ValueError(f"image (the source codes) is {None if image is None else tuple(image.shape)}; expected "
                         f"({batch}, {n}) codes")
    mask = mask.to(device).expand(batch, n)
    if not bool(mask.any()):
        raise ValueError(f"the mask samples none of the {n} codes; at least one must be True (True = sample)")
    return mask, image.to(device=device, dtype=torch.long)


def prefix_mask(image_prefix: torch.Tensor, image_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DALL-E's priming as `sample`'s (image, mask): (B, n) fixed first codes -> (B, image_len) codes, zero after
    the prefix, and the (image_len,) mask that samples every position from n on. ValueError when the prefix leaves
    nothing to sample."""
    B, n = image_prefix.shape
    if n >= image_len:
        raise ValueError(f"an image prefix of {n} codes leaves nothing to sample: the image has {image_len} codes, "
                         f"so a prefix may have 0 to {image_len - 1}")
    image = torch.cat([image_prefix, image_prefix.new_zeros(B, image_len - n)], dim=1)
    return image, torch.arange(image_len, device=image_prefix.device) >= n


@torch.inference_mode()
def sample(model: DALLE, text: torch.Tensor, settings: SamplingSettings = SamplingSettings(), *,
           negative: torch.Tensor | None = None, kept: tuple[torch.Tensor, torch.Tensor] | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None, on_logits=None,
           precision: str = "fp32") -> torch.Tensor:
    """(B, text_len) caption ids -> (B, N) image codes, computed in `precision` (fp32 or bf16, see for_sampling).

    `settings` gives the guidance scale and its schedule, temperature, top-k and top-p (its other fields are the
    caller's: how many candidates, seeds, batches, the negative prompt's text), as transformers' `generate` takes a
    GenerationConfig. Classifier-free guidance (Ho & Salimans 2022; DALL-E-style in dalle-mini and ru-dalle)
    steers from the unconditional caption, all padding, or `negative` (B, text_len) ids of a negative prompt.
    Masked sampling (editing: inpainting, outpainting, variations; as ru-dalle's and taming-transformers'
    completion): `kept` = (image, mask), the (B, N) source codes and a (B, N) or (N,) bool mask in raster order,
    True where a code is sampled, False where the source code is kept. Kept codes are forced as the sampler passes
    them, so every sampled code is conditioned on all codes before it, kept ones included; the leading run of
    positions kept in every row is prefilled in one pass, and nothing is computed after the last sampled one. Priming (the
    first n codes fixed) is `prefix_mask`'s mask. With no mask, every code is sampled.
    `generator` may be a list of G generators: rows then form G equal consecutive groups, each drawn
    from its own generator, so a group's codes do not depend on what else shares the batch. A group draws (one
    number per row) at every position where one of its rows samples.
    `on_logits(i, logits)` sees the guided logits of every position some row samples (tests, progress).
    """
    c = model.c
    B, N = text.shape[0], c.image_len
    scales, temperature = settings.guidance_scales(N), settings.temperature
    top_k, top_p = settings.top_k or None, None if settings.top_p in (None, 1) else settings.top_p
    image, mask = kept if kept is not None else (None, None)
    groups = generator if isinstance(generator, list) else [generator]
    if B % len(groups):
        raise ValueError(f"{B} rows do not split into {len(groups)} equal generator groups")
    per_group = B // len(groups)
    mask, image = token_mask(mask, image, B, N, text.device)
    if mask is None:
        samples, first, last = [True] * N, 0, N - 1
    else:  # per position, whether any row (and which generator groups) sample there: plain bools, no syncs per step
        by_group = mask.reshape(len(groups), per_group, N).any(dim=1).T.tolist()  # (N, G)
        samples = [any(g) for g in by_group]
        first, last = samples.index(True), N - 1 - samples[::-1].index(True)
    rows = text
    if any(s != 1.0 for s in scales):  # one batch: conditional rows, then unconditional (all-pad or negative) rows
        rows = torch.cat([text, torch.full_like(text, c.pad_id) if negative is None else negative.to(text.device)])
    model, context, cache_dtype = for_sampling(model, precision, rows.shape[0])
    with context:
        cache = KVCache(c, rows.shape[0], device=text.device, dtype=cache_dtype)
        out = torch.empty(B, N, dtype=torch.long, device=text.device) if mask is None else image.clone()
        x = model.embed_text(rows)
        if first:  # the leading kept run, prefilled in one pass
            prefix = image[:, :first] if rows.shape[0] == B else image[:, :first].repeat(2, 1)
            x = torch.cat([x, model.embed_image(prefix)], dim=1)
        h = model.hidden(x, cache, 0)
        pos = x.shape[1]
        pos_table = model.image_pos(0, N)  # (N, dim), computed once
        for i in range(first, last + 1):
            if samples[i]:
                logits = model.image_head(guided(h[:, -1], B, scales[i]))  # the head is linear: guide before it
                logits = filter_logits(logits, temperature, top_k, top_p)
                if on_logits is not None:
                    on_logits(i, logits)
                probs = F.softmax(logits, dim=-1)
                token = torch.cat([draw(probs[g * per_group:(g + 1) * per_group], gen)
                                   if mask is None or by_group[i][g] else image[g * per_group:(g + 1) * per_group, i:i + 1]
                                   for g, gen in enumerate(groups)])  # (B, 1); a group with no row sampling draws nothing
                if mask is not None:  # kept rows take the source code
                    token = torch.where(mask[:, i:i + 1], token, image[:, i:i + 1])
                out[:, i] = token[:, 0]
            else:  # every row keeps this code: feed it, nothing to draw
                token = image[:, i:i + 1]
            if i == last:
                break
            step = token if rows.shape[0] == B else token.repeat(2, 1)
            x = model.image_emb(step) + pos_table[i]
            h = model.hidden(x, cache, pos)
            pos += 1
        return out
