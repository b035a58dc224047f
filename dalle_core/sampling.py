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

import torch
import torch.nn.functional as F

from dalle_core import cpu_fast
from dalle_core.transformer import DALLE, KVCache


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
    `precision` fp32 or bf16. The model passed in is never changed.

    On a CPU, the CPU's fast copy (dalle_core.cpu_fast.for_sampling). bf16 on a GPU: a bf16 copy of the whole
    model, no autocast (no cast kernels in a launch-bound step), and a bf16 KV cache: half the memory traffic.
    """
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


@torch.inference_mode()
def sample(model: DALLE, text: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, cond_scale: float = 1.0, image: torch.Tensor | None = None,
           mask: torch.Tensor | None = None, image_prefix: torch.Tensor | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None, on_logits=None,
           precision: str = "fp32") -> torch.Tensor:
    """(B, text_len) caption ids -> (B, N) image codes, computed in `precision` (fp32 or bf16, see for_sampling).

    Masked sampling (editing: inpainting, outpainting, variations; as ru-dalle's and taming-transformers'
    completion): `image` (B, N) source codes and `mask` (B, N) or (N,) bool in raster order, True where a code is
    sampled, False where the source code is kept. Kept codes are forced as the sampler passes them, so every
    sampled code is conditioned on all codes before it, kept ones included; the leading run of positions kept in
    every row is prefilled in one pass, and nothing is computed after the last sampled position.
    `image_prefix` (B, n) fixes the first n codes (DALL-E's priming): the mask that keeps the first n positions.
    With no mask, every code is sampled.
    `generator` may be a list of G generators: rows then form G equal consecutive groups, each drawn
    from its own generator, so a group's codes do not depend on what else shares the batch. A group draws (one
    number per row) at every position where one of its rows samples.
    `on_logits(i, logits)` sees the guided logits of every position some row samples (tests, progress).
    """
    c = model.c
    B, N = text.shape[0], c.image_len
    groups = generator if isinstance(generator, list) else [generator]
    if B % len(groups):
        raise ValueError(f"{B} rows do not split into {len(groups)} equal generator groups")
    per_group = B // len(groups)
    if image_prefix is not None:  # priming is the top-n mask
        n_prefix = image_prefix.shape[1]
        if image is not None or mask is not None:
            raise ValueError("give image_prefix (priming) or image and mask, not both")
        if n_prefix >= N:
            raise ValueError(f"an image prefix of {n_prefix} codes leaves nothing to sample: "
                             f"the image has {N} codes, so a prefix may have 0 to {N - 1}")
        image = torch.cat([image_prefix, image_prefix.new_zeros(B, N - n_prefix)], dim=1)
        mask = torch.arange(N, device=text.device) >= n_prefix
    mask, image = token_mask(mask, image, B, N, text.device)
    if mask is None:
        samples, first, last = [True] * N, 0, N - 1
    else:  # per position, whether any row (and which generator groups) sample there: plain bools, no syncs per step
        by_group = mask.reshape(len(groups), per_group, N).any(dim=1).T.tolist()  # (N, G)
        samples = [any(g) for g in by_group]
        first, last = samples.index(True), N - 1 - samples[::-1].index(True)
    rows = text
    if cond_scale != 1.0:  # one batch: conditional rows, then unconditional (all-pad) rows
        rows = torch.cat([text, torch.full_like(text, c.pad_id)])
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
                logits = model.image_head(guided(h[:, -1], B, cond_scale))  # the head is linear: guide before it
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
