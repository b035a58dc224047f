"""The one training loop: gradient accumulation, exact resume, tied embeddings, the dVAE's losses."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_core.dvae import DiscreteVAE, DVAEConfig, dvae_step
from dalle_core.images import to_tensor
from dalle_core.train import (
    FitHooks,
    FitState,
    TrainConfig,
    TrainingError,
    fit,
    load_training_state,
    make_optimizer,
    training_state_bytes,
)
from dalle_core.transformer import DALLE, DALLEConfig, transformer_step
from data_sources import shapes
from pipeline.config import config_from_dict
from tests.conftest import DEVICES

C = DALLEConfig(text_vocab=40, text_len=5, pad_id=0, image_vocab=16, image_grid=3, dim=32, depth=2, heads=4)


def _batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"text": torch.randint(1, C.text_vocab, (n, C.text_len), generator=g),
            "image": torch.randint(0, C.image_vocab, (n, C.image_len), generator=g)}


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gradient_accumulation_equals_one_big_batch():
    big = _batch(8)
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    out = {}
    for accum, stream in ((1, iter(lambda: big, None)), (2, iter(halves * 3))):
        torch.manual_seed(0)
        model = DALLE(C)
        t = TrainConfig(lr=0.5, warmup_steps=0, max_steps=1, grad_accum=accum, grad_clip=None)
        fit(model, stream, t, torch.optim.SGD(model.parameters(), lr=t.lr), transformer_step(0.0, C.pad_id, 0))
        out[accum] = _weights(model)
    for k in out[1]:
        assert torch.allclose(out[1][k], out[2][k], atol=1e-6), k


def test_killed_and_resumed_run_with_dropout_equals_an_uninterrupted_one():
    """Dropout and caption dropout draw random numbers: the checkpoint's RNG state makes the resume exact."""
    c = DALLEConfig(**{**C.__dict__, "dropout": 0.2})
    batches = [_batch(4, seed) for seed in range(20)]
    t = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=12, log_every=100)
    step_fn = transformer_step(0.3, C.pad_id, 0)

    torch.manual_seed(0)
    whole = DALLE(c)
    fit(whole, iter(batches), t, make_optimizer(whole, t), step_fn)

    torch.manual_seed(0)
    first = DALLE(c)
    opt = make_optimizer(first, t)
    saved = {}
    fit(first, iter(batches), dataclasses.replace(t, checkpoint_every=5), opt, step_fn,
        FitHooks(checkpoint=lambda step, elapsed: saved.update(step=step, weights=_weights(first),
                                                               state=training_state_bytes(opt)) if step == 5 else None))
    torch.rand(100)  # the killed process drew more random numbers after its checkpoint
    resumed = DALLE(c)
    resumed.load_state_dict(saved["weights"])
    opt2 = make_optimizer(resumed, t)
    load_training_state(opt2, saved["state"])
    fit(resumed, iter(batches[5:]), t, opt2, transformer_step(0.3, C.pad_id, 0), state=FitState(start_step=saved["step"]))
    for k, v in _weights(whole).items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_tied_image_embedding_stays_tied_through_training_and_a_save():
    from safetensors.torch import load, save

    torch.manual_seed(0)
    c = DALLEConfig(**{**C.__dict__, "tie_image_embedding": True})
    model = DALLE(c)
    t = TrainConfig(lr=1e-2, warmup_steps=0, max_steps=3)
    fit(model, iter(lambda: _batch(4), None), t, make_optimizer(model, t), transformer_step(0.0, C.pad_id, 0))
    assert model.image_head.weight is model.image_emb.weight
    data = save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
    again = DALLE(c)
    again.load_state_dict(load(data))
    assert again.image_head.weight is again.image_emb.weight
    assert torch.equal(again.image_head.weight, model.image_emb.weight)
    untied = DALLE(DALLEConfig(**C.__dict__))
    assert untied.num_params() - model.num_params() == C.image_vocab * C.dim


def test_recon_loss_setting_picks_the_loss():
    torch.manual_seed(0)
    images = torch.from_numpy(np.stack([r[3] for r in shapes.generate(4, 32, seed=1)]))
    model = DiscreteVAE(DVAEConfig(image_size=32, codebook_size=16, codebook_dim=8, hidden=8,
                                   quantizer="gumbel")).eval()  # eval: a deterministic forward
    x = to_tensor(images)
    with torch.no_grad():
        recon, _, q_loss = model(x)
        for name, fn in (("mse", F.mse_loss), ("l1", F.l1_loss)):
            r = config_from_dict({"dvae": {"quantizer": "gumbel", "recon_loss": name}}).dvae
            loss, n, _ = dvae_step(model.c, r.loss_config())(model, {"image": images}, 0)
            assert n == 4 and torch.allclose(loss, fn(recon, x) + q_loss), name


@pytest.mark.parametrize("device", DEVICES)
def test_a_diverged_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(device):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).to(device)
    x = torch.randn(8, 4)

    def step_fn(m, batch, step):  # the loss blows up at step 5, as a learning-rate typo would make it
        loss = m(batch).pow(2).mean() * (float("inf") if step == 5 else 1.0)
        return loss, len(batch), dict

    checkpoints, logged = [], []
    t = TrainConfig(lr=3e-3, warmup_steps=0, max_steps=20, log_every=4, checkpoint_every=3, val_every=None)
    with pytest.raises(TrainingError, match=r"^training diverged: .* not finite at step 5 \(learning rate 0.00\d+, "
                                            r"train.lr=0.003\)") as err:
        fit(model, iter(lambda: x, None), t, torch.optim.SGD(model.parameters(), lr=t.lr), step_fn,
            FitHooks(log=lambda step, m: logged.append(step), checkpoint=lambda step, s: checkpoints.append(step)),
            FitState(device=device))
    assert "\n" not in str(err.value)
    assert checkpoints == [3] and logged == [4]  # nothing saved or logged after the bad step
