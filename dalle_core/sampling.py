"""Sampling image tokens from the DALL-E transformer with a key/value cache.

The text (and an optional image prefix) is prefilled in one pass; then one
image token per step, each step reading only its own token. Classifier-free
guidance runs the conditional and the unconditional (all-padding caption) rows
in one batch: logits = uncond + cond_scale * (cond - uncond).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle_core.transformer import DALLE, KVCache


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Temperature, then keep the top-k and/or the smallest set with probability >= top_p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def guided(logits: torch.Tensor, batch: int, cond_scale: float) -> torch.Tensor:
    """Rows [0, batch) are conditional, [batch, 2*batch) unconditional."""
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + cond_scale * (cond - uncond)


@torch.inference_mode()
def sample(model: DALLE, text: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, cond_scale: float = 1.0, image_prefix: torch.Tensor | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None, on_logits=None) -> torch.Tensor:
    """(B, text_len) caption ids -> (B, N) image codes.

    `image_prefix` (B, n) fixes the first n codes (primed completion).
    `generator` may be a list of G generators: rows then form G equal consecutive groups, each drawn
    from its own generator, so a group's codes do not depend on what else shares the batch.
    `on_logits(i, logits)` sees the guided logits of every sampled position (tests).
    """
    c = model.c
    B, N = text.shape[0], c.image_len
    groups = generator if isinstance(generator, list) else [generator]
    if B % len(groups):
        raise ValueError(f"{B} rows do not split into {len(groups)} equal generator groups")
    per_group = B // len(groups)
    rows = text
    if cond_scale != 1.0:  # one batch: conditional rows, then unconditional (all-pad) rows
        rows = torch.cat([text, torch.full_like(text, c.pad_id)])
    dtype = next(model.parameters()).dtype
    cache = KVCache(c, rows.shape[0], device=text.device, dtype=dtype)
    out = torch.empty(B, N, dtype=torch.long, device=text.device)
    n_prefix = 0 if image_prefix is None else image_prefix.shape[1]
    x = model.embed_text(rows)
    if n_prefix:
        out[:, :n_prefix] = image_prefix
        prefix = image_prefix if rows.shape[0] == B else image_prefix.repeat(2, 1)
        x = torch.cat([x, model.embed_image(prefix)], dim=1)
    h = model.hidden(x, cache, 0)
    pos = x.shape[1]
    pos_table = model.image_pos(0, N)  # (N, dim), computed once
    for i in range(n_prefix, N):
        logits = guided(model.image_head(h[:, -1]), B, cond_scale)
        logits = filter_logits(logits, temperature, top_k, top_p)
        if on_logits is not None:
            on_logits(i, logits)
        probs = F.softmax(logits, dim=-1)
        token = torch.cat([torch.multinomial(probs[g * per_group:(g + 1) * per_group], 1, generator=gen)
                           for g, gen in enumerate(groups)])  # (B, 1)
        out[:, i] = token[:, 0]
        if i == N - 1:
            break
        step = token if rows.shape[0] == B else token.repeat(2, 1)
        x = model.image_emb(step) + pos_table[i]
        h = model.hidden(x, cache, pos)
        pos += 1
    return out
