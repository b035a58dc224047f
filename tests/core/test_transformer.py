import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_core import cpu_fast, sampling
from dalle_core.device import autocast
from dalle_core.sampling import SamplingSettings, filter_logits, prefix_mask, sample
from dalle_core.train import FitHooks, FitState, TrainConfig, fit, make_optimizer
from dalle_core.transformer import DALLE, DALLEConfig, transformer_step
from tests.conftest import DEVICES

C = DALLEConfig(text_vocab=50, text_len=6, pad_id=0, image_vocab=20, image_grid=3, dim=32, depth=2, heads=4)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = DALLE(C).eval()
    with torch.no_grad():  # untrained heads are near-uniform; sharpen so comparisons mean something
        m.image_head.weight.mul_(50)
    return m


def full_logits(model: DALLE, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full recompute (no cache): text logits (B, T-1, text_vocab), image logits (B, n+1, image_vocab) for a text
    and the first n image codes (n may be 0)."""
    T = model.c.text_len
    x = model.embed_text(text)
    if image.shape[1]:
        x = torch.cat([x, model.embed_image(image)], dim=1)
    h = model.hidden(x)
    return model.text_head(h[:, : T - 1]), model.image_head(h[:, T - 1:])


def _text(b=3):
    t = torch.randint(1, C.text_vocab, (b, C.text_len))
    t[:, 4:] = C.pad_id
    return t


@pytest.mark.parametrize("device", DEVICES)
def test_cached_sampling_matches_full_recompute_every_step(model, device):
    model, text = model.to(device), _text().to(device)
    seen = {}
    codes = sample(model, text, generator=torch.Generator(device=device).manual_seed(1),
                   on_logits=lambda i, lg: seen.__setitem__(i, lg.clone()))
    assert sorted(seen) == list(range(C.image_len))
    with torch.inference_mode():
        for i in range(C.image_len):
            _, image_logits = full_logits(model, text, codes[:, :i])
            assert torch.allclose(image_logits[:, -1], seen[i], atol=1e-4), i


@pytest.mark.parametrize("packed", [True, False])  # False: a PyTorch without oneDNN's packed linear
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_sampling_tracks_the_full_recompute(model, device, packed, monkeypatch):
    """bf16 sampling: keys/values in bf16 (on CPUs where the compiled decode attention builds; fp32 where
    not, as PyTorch's bf16 attention is slower there); the logits stay near an fp32 full recompute."""
    if not packed:
        monkeypatch.setattr(cpu_fast, "packed_linear_works", lambda: False)
    model, text = model.to(device), _text().to(device)
    seen, caches, kernel_steps = {}, [], []
    compiled = device == "cpu" and cpu_fast.kernel() is not None
    if compiled:
        real_kernel = cpu_fast.kernel()
        monkeypatch.setattr(cpu_fast, "kernel", lambda: lambda *a: kernel_steps.append(1) or real_kernel(*a))
    real_cache = sampling.KVCache

    def spy(*args, **kwargs):
        caches.append(real_cache(*args, **kwargs))
        return caches[-1]

    sampling.KVCache = spy
    try:
        codes = sample(model, text, SamplingSettings(cond_scale=2.0),
                       generator=torch.Generator(device=device).manual_seed(1), on_logits=lambda i,
                       lg: seen.__setitem__(i, lg.float().clone()), precision="bf16")
    finally:
        sampling.KVCache = real_cache
    assert caches[0].k.dtype == (torch.bfloat16 if device == "cuda" or compiled else torch.float32)
    assert bool(kernel_steps) == compiled
    with torch.inference_mode():
        for i in range(0, C.image_len, 3):
            _, cond = full_logits(model, text, codes[:, :i])
            _, uncond = full_logits(model, torch.full_like(text, C.pad_id), codes[:, :i])
            expect = uncond[:, -1] + 2.0 * (cond[:, -1] - uncond[:, -1])
            scale = expect.abs().max()
            assert (seen[i] - expect).abs().max() < 0.05 * scale, (i, (seen[i] - expect).abs().max(), scale)


def test_cached_guided_sampling_matches_recompute(model):
    text = _text()
    seen = {}
    codes = sample(model, text, SamplingSettings(cond_scale=3.0), generator=torch.Generator().manual_seed(2),
                   on_logits=lambda i, lg: seen.__setitem__(i, lg.clone()))
    with torch.inference_mode():
        for i in (0, 4, C.image_len - 1):
            _, cond = full_logits(model, text, codes[:, :i])
            _, uncond = full_logits(model, torch.full_like(text, C.pad_id), codes[:, :i])
            expect = uncond[:, -1] + 3.0 * (cond[:, -1] - uncond[:, -1])
            assert torch.allclose(expect, seen[i], atol=1e-3), i


@pytest.mark.parametrize("schedule, start, end", [("constant", 0.0, 1.0), ("constant", 0.2, 0.6),
                                                  ("linear", 0.0, 1.0), ("linear", 0.3, 1.0)])
def test_guidance_steers_from_the_negative_prompt_with_the_scheduled_scale(model, schedule, start, end):
    """Each step's logits are uncond + s_i (cond - uncond) over a full recompute, where uncond is the negative
    prompt's caption (not all padding) and s_i the schedule's scale at image position i: cond_scale inside
    [start, end) of the grid (rising linearly from 1 to it with `linear`), 1 outside."""
    text, negative = _text(), _text()
    settings = SamplingSettings(cond_scale=3.0, guidance_schedule=schedule, guidance_start=start, guidance_end=end)
    scales = settings.guidance_scales(C.image_len)
    seen = {}
    codes = sample(model, text, settings, negative=negative, generator=torch.Generator().manual_seed(2),
                   on_logits=lambda i, lg: seen.__setitem__(i, lg.clone()))
    with torch.inference_mode():
        for i in range(C.image_len):
            _, cond = full_logits(model, text, codes[:, :i])
            _, uncond = full_logits(model, negative, codes[:, :i])
            expect = uncond[:, -1] + scales[i] * (cond[:, -1] - uncond[:, -1])
            assert torch.allclose(expect, seen[i], atol=1e-3), i
    inside = [i for i in range(C.image_len) if start * C.image_len <= i < end * C.image_len]
    assert all(s == 1.0 for i, s in enumerate(scales) if i not in inside)
    expected = [3.0] * len(inside) if schedule == "constant" else list(np.linspace(1.0, 3.0, len(inside)))
    assert np.allclose([scales[i] for i in inside], expected)


@pytest.mark.parametrize("given, message", [
    ({"guidance_schedule": "cosine"}, "guidance_schedule is 'cosine'; allowed: constant, linear"),
    ({"guidance_start": 0.5, "guidance_end": 0.5}, "guidance_start is 0.5 and guidance_end 0.5; the start must come"),
    ({"guidance_end": 1.5}, "guidance_end is 1.5; allowed: at least 0 and at most 1"),
    ({"negative_prompt": "  "}, "negative_prompt is '  '; every prompt needs some text"),
    ({"negative_prompt": "x" * 1001}, "negative_prompt is 1001 characters; allowed: at most 1000"),
    ({"negative_prompt": 7}, "negative_prompt is 7; it must be text")])
def test_bad_guidance_settings_are_one_line(given, message):
    from dalle_core.sampling import GenerationError

    with pytest.raises(GenerationError, match=f"^{re.escape(message)}"):
        SamplingSettings(**given).checked()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 on a CPU: the attention runs in fp32 (its own path)
def test_future_tokens_never_change_past_logits(model, precision):
    text = _text(2)
    image = torch.randint(0, C.image_vocab, (2, C.image_len))
    with torch.inference_mode(), autocast(precision, "cpu", C.seq_len):
        t1, i1 = full_logits(model, text, image[:, :-1])
        changed = image.clone()
        changed[:, 5] = (changed[:, 5] + 1) % C.image_vocab
        t2, i2 = full_logits(model, text, changed[:, :-1])
        text2 = text.clone()
        text2[:, 3] = (text2[:, 3] + 1) % C.text_vocab
        t3, _ = full_logits(model, text2, image[:, :-1])
    assert torch.equal(t1, t2) and torch.allclose(i1[:, :6], i2[:, :6])  # image pos j predicts code j
    assert not torch.allclose(i1[:, 6:], i2[:, 6:])
    assert torch.allclose(t1[:, :3], t3[:, :3]) and not torch.allclose(t1[:, 3:], t3[:, 3:])


def test_text_and_image_positions_use_their_own_vocabularies(model):
    text = _text(2)
    image = torch.randint(0, C.image_vocab, (2, C.image_len))
    with torch.inference_mode():
        text_logits, image_logits = full_logits(model, text, image[:, :-1])
    assert text_logits.shape == (2, C.text_len - 1, C.text_vocab)
    assert image_logits.shape == (2, C.image_len, C.image_vocab)
    codes = sample(model, _text(8), SamplingSettings(temperature=5.0))
    assert int(codes.max()) < C.image_vocab and int(codes.min()) >= 0


def test_overfits_a_few_sequences():
    torch.manual_seed(0)
    m = DALLE(C)
    text, image = _text(4), torch.randint(0, C.image_vocab, (4, C.image_len))
    t = TrainConfig(batch_size=4, lr=3e-3, warmup_steps=10, max_steps=300, log_every=50, grad_clip=1.0)
    with torch.no_grad():
        losses = [m(text, image)[2].item()]  # about ln(20) before training
    fit(m, iter(lambda: {"text": text, "image": image}, None), t, make_optimizer(m, t),
        transformer_step(0.0, C.pad_id, t.seed), FitHooks(log=lambda s, mt: losses.append(mt["image_loss"])))
    assert losses[0] > 2.5 and losses[-1] < 0.02, losses


def test_same_seed_same_images(model):
    text = _text()
    a = sample(model, text, SamplingSettings(top_k=5), generator=torch.Generator().manual_seed(7))
    b = sample(model, text, SamplingSettings(top_k=5), generator=torch.Generator().manual_seed(7))
    c = sample(model, text, SamplingSettings(top_k=5), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("cond_scale", [1.0, 2.0])
def test_primed_sampling_matches_a_full_recompute_after_the_prefix(model, cond_scale):
    """Every step after an image prefix sees the logits of a full pass over [text ; prefix ; sampled so far]."""
    text = _text()
    prefix = torch.randint(0, C.image_vocab, (3, 4))
    seen = {}
    image, mask = prefix_mask(prefix, C.image_len)
    codes = sample(model, text, SamplingSettings(cond_scale=cond_scale), kept=(image, mask),
                   generator=torch.Generator().manual_seed(4), on_logits=lambda i, lg: seen.__setitem__(i, lg.clone()))
    assert torch.equal(codes[:, :4], prefix) and sorted(seen) == list(range(4, C.image_len))
    with torch.inference_mode():
        for i in seen:
            _, cond = full_logits(model, text, codes[:, :i])
            _, uncond = full_logits(model, torch.full_like(text, C.pad_id), codes[:, :i])
            expect = uncond[:, -1] + cond_scale * (cond[:, -1] - uncond[:, -1]) if cond_scale != 1 else cond[:, -1]
            assert torch.allclose(expect, seen[i], atol=1e-3), i


def test_a_prefix_of_the_whole_image_is_refused(model):
    with pytest.raises(ValueError, match=r"prefix of 9 codes leaves nothing to sample.*0 to 8$"):
        prefix_mask(torch.zeros(3, C.image_len, dtype=torch.long), C.image_len)


def test_losses_are_next_token_cross_entropies_weighted_text_and_image():
    """forward's losses against a hand computation from `logits` (the inference path), position by position."""
    torch.manual_seed(0)
    c = DALLEConfig(**{**C.__dict__, "text_loss_weight": 0.3})
    m = DALLE(c).eval()
    text, image = _text(2), torch.randint(0, C.image_vocab, (2, C.image_len))
    with torch.inference_mode():
        loss, text_loss, image_loss = m(text, image)
        text_logits, _ = full_logits(m, text, image[:, :0])
        by_hand_text = torch.stack([F.cross_entropy(text_logits[:, i], text[:, i + 1]) for i in range(C.text_len - 1)])
        by_hand_image = torch.stack([F.cross_entropy(full_logits(m, text, image[:, :j])[1][:, -1], image[:, j])
                                     for j in range(C.image_len)])
    assert torch.allclose(text_loss, by_hand_text.mean(), atol=1e-5)
    assert torch.allclose(image_loss, by_hand_image.mean(), atol=1e-5)
    assert torch.allclose(loss, 0.3 * by_hand_text.mean() + 0.7 * by_hand_image.mean(), atol=1e-5)


def test_each_padding_position_has_its_own_embedding(model):
    text = _text(1)  # ids at positions 0-3, padding at 4 and 5
    emb = model.embed_text(text)[0]
    pad_rows = model.text_emb.weight[C.text_vocab + torch.arange(C.text_len)]
    expect = torch.where((text[0] == C.pad_id)[:, None], pad_rows, model.text_emb.weight[text[0]])
    assert torch.allclose(emb, expect + model.text_pos.weight)
    assert not torch.allclose(emb[4] - model.text_pos.weight[4], emb[5] - model.text_pos.weight[5])


def test_per_group_generators_make_rows_independent_of_batch_mates(model):
    text = _text(3).repeat_interleave(2, dim=0)  # 3 prompts x 2 candidates
    alone = [sample(model, text[2 * g:2 * g + 2], SamplingSettings(cond_scale=2.0, top_p=0.9),
                    generator=torch.Generator().manual_seed(10 + g)) for g in range(3)]
    batched = sample(model, text, SamplingSettings(cond_scale=2.0, top_p=0.9),
                     generator=[torch.Generator().manual_seed(10 + g) for g in range(3)])
    assert torch.equal(batched, torch.cat(alone))
    with pytest.raises(ValueError, match="6 rows do not split into 4"):
        sample(model, text, generator=[torch.Generator() for _ in range(4)])


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).sum() == 2  # 0.5 + 0.3 crosses 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).sum() == 3
    # together: top_p applies to what top_k left, renormalised (0.5 / 0.8 = 0.625 >= 0.6 alone), so one
    # token stays where top_p alone keeps two (0.5 < 0.6)
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.6)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, True, False, False]]


def test_top_p_over_a_large_vocabulary_matches_a_full_sort():
    """The CPU path looks among the top 64 first; sharp and flat rows must both give the sorted answer."""
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 8192) * 8, torch.randn(3, 8192) * 0.1])  # sharp rows, flat rows
    got = torch.isfinite(filter_logits(logits, top_p=0.9))
    order = logits.sort(-1, descending=True)
    cum = order.values.softmax(-1).cumsum(-1)
    keep_sorted = (cum - order.values.softmax(-1)) < 0.9
    expect = torch.zeros_like(got).scatter(-1, order.indices, keep_sorted)
    assert torch.equal(got, expect) and got[:3].sum() < 64 * 3 and got[3:].sum() > 64 * 3


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_tracks_fp32(device):
    text, image = _text(8), torch.randint(0, C.image_vocab, (8, C.image_len))
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = DALLE(C).to(device)
        t = TrainConfig(batch_size=8, lr=2e-3, warmup_steps=5, max_steps=60, log_every=10, precision=precision)
        curves[precision] = []
        fit(m, iter(lambda: {"text": text, "image": image}, None), t, make_optimizer(m, t),
            transformer_step(0.1, C.pad_id, t.seed), FitHooks(log=lambda s, mt, p=precision: curves[p].append(mt["loss"])),
            FitState(device=device))
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert abs(a - b) < 0.1 * a + 0.02, curves


def test_cpu_bf16_sampling_packs_every_linear_layer_and_fuses_the_gelu(model):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN: CPU bf16 sampling uses F.linear")
    twin, _, _ = sampling.for_sampling(model, "bf16", rows=6)
    packed = [m for m in twin.modules() if isinstance(m, cpu_fast.PackedLinear)]
    assert len(packed) == 4 * C.depth + 2 and not any(isinstance(m, torch.nn.Linear) for m in twin.modules())
    x = torch.randn(6, 1, C.dim)
    with torch.inference_mode():
        for block, fp32 in zip(twin.blocks, model.blocks):
            expect = fp32.mlp(x)
            assert (block.mlp(x).float() - expect).abs().max() < 0.02 * expect.abs().max()


# ------------------------------------------------------------------ masked sampling (editing)


def _masks(rows: int, seed: int) -> torch.Tensor:
    """(rows, N) random token masks (True = sample), each sampling and keeping some positions, one row keeping
    position 0 and one sampling it, so both the prefill and the step-by-step feeding of kept codes are used."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, C.image_len, generator=g) < 0.5
    mask[:, 1], mask[:, 2] = True, False
    mask[0, 0], mask[-1, 0] = False, True
    return mask


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 on a CPU: the fast copy (cpu_fast.for_sampling)
@pytest.mark.parametrize("cond_scale", [1.0, 2.0])
def test_masked_sampling_keeps_every_unmasked_code(model, precision, cond_scale):
    text = _text(4)
    source = torch.randint(0, C.image_vocab, (4, C.image_len), generator=torch.Generator().manual_seed(3))
    for mask in (_masks(4, 5), _masks(1, 6)[0]):  # one mask per row, and one (N,) mask shared by every row
        codes = sample(model, text, SamplingSettings(cond_scale=cond_scale, top_p=0.9), kept=(source, mask),
                       precision=precision,
                       generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
        full = mask.expand(4, -1)
        assert torch.equal(codes[~full], source[~full])
        assert not torch.equal(codes[full], source[full])  # the sampled codes are the model's, not the source's


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_all_sampled_mask_equals_unmasked_sampling(model, precision):
    text = _text(4)
    source = torch.randint(0, C.image_vocab, (4, C.image_len))
    gens = lambda: [torch.Generator().manual_seed(8), torch.Generator().manual_seed(9)]  # noqa: E731
    plain = sample(model, text, SamplingSettings(cond_scale=2.0, top_p=0.9), generator=gens(), precision=precision)
    masked = sample(model, text, SamplingSettings(cond_scale=2.0, top_p=0.9),
                    kept=(source, torch.ones(C.image_len, dtype=torch.bool)), generator=gens(), precision=precision)
    assert torch.equal(plain, masked)


@pytest.mark.parametrize("cond_scale", [1.0, 2.0])
def test_a_top_rows_mask_fed_step_by_step_equals_prefilled_priming(model, cond_scale):
    """Rows that keep the top rows, batched with rows that sample from position 0 (so nothing is prefilled and the
    kept codes are fed one step at a time, their group drawing nothing there), equal priming's prefilled result."""
    text = _text(2)
    prefix = torch.randint(0, C.image_vocab, (2, 4))
    image, top_rows = prefix_mask(prefix, C.image_len)
    primed = sample(model, text, SamplingSettings(cond_scale=cond_scale), kept=(image, top_rows),
                    generator=torch.Generator().manual_seed(4))
    source = torch.cat([prefix, torch.zeros(2, C.image_len - 4, dtype=torch.long)], dim=1)
    mask = torch.arange(C.image_len) >= 4
    mixed = sample(model, torch.cat([text, _text(2)]), SamplingSettings(cond_scale=cond_scale),
                   kept=(torch.cat([source, source]),
                         torch.stack([mask, mask, torch.ones_like(mask), torch.ones_like(mask)])),
                   generator=[torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)])
    assert torch.equal(mixed[:2], primed) and torch.equal(primed[:, :4], prefix)


def _recomputed_masked_sample(model, text, source, mask, cond_scale, top_p, gens):
    """The masked sampler without a KV cache: a full forward pass over [text ; codes so far] at every position, the
    same draws (a generator group draws where one of its rows samples), kept codes forced."""
    B, N = text.shape[0], C.image_len
    per = B // len(gens)
    out = source.clone()
    with torch.inference_mode():
        for i in range(N):
            if not mask[:, i].any():
                continue
            _, cond = full_logits(model, text, out[:, :i])
            _, uncond = full_logits(model, torch.full_like(text, C.pad_id), out[:, :i])
            logits = sampling.guided(torch.cat([cond[:, -1], uncond[:, -1]]), B, cond_scale)
            probs = F.softmax(filter_logits(logits, top_p=top_p), dim=-1)
            for g, gen in enumerate(gens):
                rows = slice(g * per, (g + 1) * per)
                if mask[rows, i].any():
                    drawn = sampling.draw(probs[rows], gen)[:, 0]
                    out[rows, i] = torch.where(mask[rows, i], drawn, source[rows, i])
    return out


@pytest.mark.parametrize("seed", [5, 7])
def test_cached_masked_sampling_equals_a_full_recompute(model, seed):
    text, mask = _text(4), _masks(4, seed)
    mask[:, :2] = False  # a leading kept run in every row: prefilled
    source = torch.randint(0, C.image_vocab, (4, C.image_len), generator=torch.Generator().manual_seed(seed))
    gens = lambda: [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]  # noqa: E731
    seen = []
    cached = sample(model, text, SamplingSettings(cond_scale=2.0, top_p=0.9), kept=(source, mask), generator=gens(),
                    on_logits=lambda i, lg: seen.append(i))
    assert seen == [i for i in range(C.image_len) if mask[:, i].any()]  # logits only where some row samples
    assert torch.equal(cached, _recomputed_masked_sample(model, text, source, mask, 2.0, 0.9, gens()))


def test_bad_masks_are_one_line_errors(model):
    text, source = _text(2), torch.zeros(2, C.image_len, dtype=torch.long)
    for kwargs, message in [({"mask": torch.ones(C.image_len)}, r"mask is torch.float32 \(9,\); expected torch.bool"),
                            ({"mask": torch.ones(3, C.image_len, dtype=torch.bool)}, r"of shape \(9,\) or \(2, 9\)"),
                            ({"mask": torch.zeros(C.image_len, dtype=torch.bool)}, "samples none of the 9 codes"),
                            ({"mask": None}, "without a mask"),
                            ({"image": None, "mask": torch.ones(C.image_len, dtype=torch.bool)}, r"is None; expected \(2, 9\)")]:
        with pytest.raises(ValueError, match=message):
            given = {"image": source, **kwargs}
            sample(model, text, kept=(given["image"], given["mask"]))
