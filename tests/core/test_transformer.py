import pytest
import torch

from dalle_core.config import TrainConfig
from dalle_core.sampling import filter_logits, guided, sample
from dalle_core.train import make_optimizer, train_transformer
from dalle_core.transformer import DALLE, DALLEConfig

C = DALLEConfig(text_vocab=50, text_len=6, pad_id=0, image_vocab=20, image_grid=3, dim=32, depth=2, heads=4)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = DALLE(C).eval()
    with torch.no_grad():  # untrained heads are near-uniform; sharpen so comparisons mean something
        m.image_head.weight.mul_(50)
    return m


def _text(b=3):
    t = torch.randint(1, C.text_vocab, (b, C.text_len))
    t[:, 4:] = C.pad_id
    return t


def test_cached_sampling_matches_full_recompute_every_step(model):
    text = _text()
    seen = {}
    codes = sample(model, text, generator=torch.Generator().manual_seed(1),
                   on_logits=lambda i, lg: seen.__setitem__(i, lg.clone()))
    assert sorted(seen) == list(range(C.image_len))
    with torch.inference_mode():
        for i in range(C.image_len):
            _, image_logits = model.logits(text, codes[:, :i])
            assert torch.allclose(image_logits[:, -1], seen[i], atol=1e-4), i


def test_cached_guided_sampling_matches_recompute(model):
    text = _text()
    seen = {}
    codes = sample(model, text, cond_scale=3.0, generator=torch.Generator().manual_seed(2),
                   on_logits=lambda i, lg: seen.__setitem__(i, lg.clone()))
    with torch.inference_mode():
        for i in (0, 4, C.image_len - 1):
            _, cond = model.logits(text, codes[:, :i])
            _, uncond = model.logits(torch.full_like(text, C.pad_id), codes[:, :i])
            expect = uncond[:, -1] + 3.0 * (cond[:, -1] - uncond[:, -1])
            assert torch.allclose(expect, seen[i], atol=1e-3), i


def test_future_tokens_never_change_past_logits(model):
    text = _text(2)
    image = torch.randint(0, C.image_vocab, (2, C.image_len))
    with torch.inference_mode():
        t1, i1 = model.logits(text, image[:, :-1])
        changed = image.clone()
        changed[:, 5] = (changed[:, 5] + 1) % C.image_vocab
        t2, i2 = model.logits(text, changed[:, :-1])
        text2 = text.clone()
        text2[:, 3] = (text2[:, 3] + 1) % C.text_vocab
        t3, _ = model.logits(text2, image[:, :-1])
    assert torch.equal(t1, t2) and torch.allclose(i1[:, :6], i2[:, :6])  # image pos j predicts code j
    assert not torch.allclose(i1[:, 6:], i2[:, 6:])
    assert torch.allclose(t1[:, :3], t3[:, :3]) and not torch.allclose(t1[:, 3:], t3[:, 3:])


def test_text_and_image_positions_use_their_own_vocabularies(model):
    text = _text(2)
    image = torch.randint(0, C.image_vocab, (2, C.image_len))
    with torch.inference_mode():
        text_logits, image_logits = model.logits(text, image[:, :-1])
    assert text_logits.shape == (2, C.text_len - 1, C.text_vocab)
    assert image_logits.shape == (2, C.image_len, C.image_vocab)
    codes = sample(model, _text(8), temperature=5.0)
    assert int(codes.max()) < C.image_vocab and int(codes.min()) >= 0


def test_per_position_padding_embeddings(model):
    text = torch.zeros(1, C.text_len, dtype=torch.long)
    emb = model.embed_text(text) - model.text_pos(torch.arange(C.text_len))
    assert not torch.allclose(emb[0, 0], emb[0, 1])  # a pad at each position has its own vector


def test_overfits_a_few_sequences():
    torch.manual_seed(0)
    m = DALLE(C)
    text, image = _text(4), torch.randint(0, C.image_vocab, (4, C.image_len))
    t = TrainConfig(batch_size=4, lr=3e-3, warmup_steps=10, max_steps=300, log_every=50, grad_clip=1.0)
    with torch.no_grad():
        losses = [m(text, image)[2].item()]  # about ln(20) before training
    train_transformer(m, iter(lambda: (text, image), None), t, 0.0, C.pad_id, make_optimizer(m, t), 0,
                      lambda s, mt: losses.append(mt["image_loss"]), lambda s: None)
    assert losses[0] > 2.5 and losses[-1] < 0.02, losses


def test_guidance_at_scale_one_is_plain_sampling(model):
    text = _text()
    both = torch.randn(6, C.image_vocab)
    assert torch.allclose(guided(both, 3, 1.0), both[:3])
    a = sample(model, text, cond_scale=1.0, generator=torch.Generator().manual_seed(3))
    b = sample(model, text, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_same_seed_same_images_and_prefix_is_kept(model):
    text = _text()
    a = sample(model, text, top_k=5, generator=torch.Generator().manual_seed(7))
    b = sample(model, text, top_k=5, generator=torch.Generator().manual_seed(7))
    c = sample(model, text, top_k=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    prefix = torch.randint(0, C.image_vocab, (3, 3))
    primed = sample(model, text, image_prefix=prefix, cond_scale=2.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(primed[:, :3], prefix)


def test_per_group_generators_make_rows_independent_of_batch_mates(model):
    text = _text(3).repeat_interleave(2, dim=0)  # 3 prompts x 2 candidates
    alone = [sample(model, text[2 * g:2 * g + 2], cond_scale=2.0, top_p=0.9,
                    generator=torch.Generator().manual_seed(10 + g)) for g in range(3)]
    batched = sample(model, text, cond_scale=2.0, top_p=0.9,
                     generator=[torch.Generator().manual_seed(10 + g) for g in range(3)])
    assert torch.equal(batched, torch.cat(alone))
    with pytest.raises(ValueError, match="6 rows do not split into 4"):
        sample(model, text, generator=[torch.Generator() for _ in range(4)])


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).sum() == 2  # 0.5 + 0.3 crosses 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.9)).sum() == 3


def test_bf16_training_tracks_fp32():
    text, image = _text(8), torch.randint(0, C.image_vocab, (8, C.image_len))
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = DALLE(C)
        t = TrainConfig(batch_size=8, lr=2e-3, warmup_steps=5, max_steps=60, log_every=10, precision=precision)
        curves[precision] = []
        train_transformer(m, iter(lambda: (text, image), None), t, 0.1, C.pad_id, make_optimizer(m, t), 0,
                          lambda s, mt, p=precision: curves[p].append(mt["loss"]), lambda s: None)
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert abs(a - b) < 0.1 * a + 0.02, curves
