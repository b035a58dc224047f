import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_core.dvae import DiscreteVAE, DVAEConfig, VectorQuantizer, dvae_schedule, dvae_step
from dalle_core.images import to_tensor
from dalle_core.train import FitHooks, fit, make_optimizer
from data_sources import shapes
from pipeline.config import config_from_dict


def small(quantizer: str, downsamples: int = 2, **kw) -> DVAEConfig:
    return DVAEConfig(image_size=32, codebook_size=64, codebook_dim=32, hidden=32, num_downsamples=downsamples,
                      quantizer=quantizer, **kw)


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
@pytest.mark.parametrize("downsamples,grid", [(2, 8), (3, 4)])
def test_encode_decode_shapes(quantizer, downsamples, grid):
    model = DiscreteVAE(small(quantizer, downsamples)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        tokens = model.encode(x)
        assert tokens.shape == (5, grid, grid) and tokens.dtype == torch.long
        assert int(tokens.min()) >= 0 and int(tokens.max()) < 64
        assert model.decode(tokens).shape == (5, 3, 32, 32)


def test_decode_of_encode_matches_forward_in_eval():
    model = DiscreteVAE(small("vq")).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        recon, idx, _ = model(x)
        assert torch.equal(idx, model.encode(x))
        assert torch.allclose(recon, model.decode(idx), atol=1e-5)


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
@pytest.mark.parametrize("attention", [False, True])
def test_taming_net_is_built_from_channel_mult_with_upstream_names(quantizer, attention):
    """channel_mult switches to taming's encoder/decoder: one level per entry, widths hidden * mult, GroupNorm, an
    8x grid from 3 downsamples, attention only where asked; the parameter names are upstream's, so the same
    modules load VQGAN checkpoints (dalle_core.pretrained)."""
    c = small(quantizer, 3, channel_mult=[1, 2, 2, 4], attention=attention)  # a list, as read back from JSON
    model = DiscreteVAE(c).eval()
    names = dict(model.named_parameters())
    assert names["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
    assert names["encoder.down.3.block.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert names["decoder.up.0.block.1.conv2.weight"].shape == (32, 32, 3, 3)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert ("encoder.mid.attn_1.q.weight" in names) == attention
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        tokens = model.encode(x)
        assert tokens.shape == (2, 4, 4)
        assert model.decode(tokens).shape == (2, 3, 32, 32)
    again = DiscreteVAE(DVAEConfig(**{**c.__dict__}))
    again.load_state_dict(model.state_dict())  # an artifact's config.json rebuilds the same modules


def test_gumbel_dead_code_restart_splits_the_busiest_codes():
    torch.manual_seed(0)
    model = DiscreteVAE(small("gumbel", dead_code_threshold=0.5)).train()
    q, logits = model.quantizer, model.encoder.net[-1]
    q.ema_count.fill_(2.0)
    q.ema_count[[3, 9]] = 0.1  # two dead codes
    q.ema_count[[20, 40]] = torch.tensor([50.0, 30.0])  # the two busiest
    assert model.restart_dead_codes() == 2
    w = logits.weight.detach().flatten(1)
    for dead, donor in ((3, 20), (9, 40)):  # a copy of the donor, nudged apart from it
        assert 0 < (w[dead] - w[donor]).norm() < 0.1 * w[donor].norm()
        assert F.cosine_similarity(q.embed.weight[dead], q.embed.weight[donor], dim=0) > 0.99
        assert logits.bias[dead] == logits.bias[donor]
    assert q.ema_count[3] == q.ema_count[20] == 25.0  # the donor's usage is shared out
    assert model.restart_dead_codes() == 0


def test_gumbel_training_keeps_codes_alive():
    """Usage is counted in training and the schedule restarts dead gumbel codes, as it does vq's."""
    torch.manual_seed(0)
    model = DiscreteVAE(small("gumbel")).train()
    run = config_from_dict({"dvae": {"quantizer": "gumbel", "restart_every": 1}}).dvae
    logits = model.encoder.net[-1]
    with torch.no_grad():
        logits.bias[:8] += 50.0  # 8 codes take every cell: the other 56 are dead
    model(torch.randn(2, 3, 32, 32))
    _, after = dvae_schedule(model, run.loss_config())
    for step in range(10):
        model(torch.randn(2, 3, 32, 32))
        after(step)
    with torch.no_grad():
        used = model(torch.randn(8, 3, 32, 32))[1].unique().numel()
    assert used > 8, used  # without restarts only the 8 boosted codes can win a cell


# logit-Laplace spends its first steps on the scales: 0.71 of the baseline after these 150 steps
@pytest.mark.parametrize("quantizer,recon_loss,ratio,channel_mult", [
    ("gumbel", "mse", 0.5, ()), ("vq", "mse", 0.5, ()), ("vq", "logit_laplace", 0.8, ()), ("vq", "mse", 0.5, (1, 1, 2))])
def test_overfits_a_handful_of_shapes_with_hard_codes(quantizer, recon_loss, ratio, channel_mult):
    """Trained on 8 images, the eval-mode round trip through hard codes (argmax / nearest code, what
    pre-tokenization stores) reconstructs them far better than the trivial baseline, their mean image."""
    torch.manual_seed(0)
    images = torch.from_numpy(np.stack([r[3] for r in shapes.generate(8, 32, seed=5)]))
    run = config_from_dict({"dvae": {"quantizer": quantizer, "codebook_size": 64, "codebook_dim": 32, "hidden": 32,
                                     "temp_anneal": 1.0, "kl_weight": 0.0, "recon_loss": recon_loss,
                                     "train": {"max_steps": 150, "lr": 3e-3, "warmup_steps": 10, "log_every": 10}}}).dvae
    taming = {"channel_mult": channel_mult, "num_res_blocks": 0} if channel_mult else {}  # its middle block only
    model = DiscreteVAE(small(quantizer, logit_laplace=recon_loss == "logit_laplace", **taming))
    before, after = dvae_schedule(model, run.loss_config())
    fit(model, iter(lambda: {"image": images}, None), run.train, make_optimizer(model, run.train), dvae_step(model.c, run.loss_config()),
        FitHooks(before_step=before, after_step=after))
    x = to_tensor(images)
    with torch.inference_mode():
        model.eval()
        hard = F.mse_loss(model.decode(model.encode(x)), x).item()
    baseline = F.mse_loss(x.mean(0, keepdim=True).expand_as(x), x).item()
    assert hard < ratio * baseline, (hard, baseline)  # constant codes would give about the baseline


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(small("vq", dead_code_threshold=0.5)).train()
    vq.embed[32:] += 100.0  # half the codebook is far from every input: never chosen
    vq.ema_sum.copy_(vq.embed)
    z = torch.randn(4, 32, 8, 8)
    for _ in range(100):  # EMA usage of the far codes decays from 1 to 0.99**100
        _, idx, _ = vq(z)
    assert idx.max() < 32  # the far codes stayed dead
    revived = vq.restart_dead_codes()
    assert revived >= 32
    _, idx, _ = vq(torch.randn(4, 32, 8, 8))
    assert (idx >= 32).any()  # restarted codes now win some inputs


def test_gumbel_schedules_follow_the_run_horizon_and_kl_is_normalised_per_pixel_value():
    """Temperature reaches temp_end at temp_anneal x horizon (the step the budget says the run ends at, not
    max_steps); the KL weight ramps over kl_warmup x horizon to beta x cells / pixel values (the paper's sums)."""
    r = config_from_dict({"dvae": {"quantizer": "gumbel", "temp_start": 1.0, "temp_end": 1 / 16, "temp_anneal": 0.5,
                                   "kl_weight": 6.6, "kl_warmup": 0.1, "train": {"max_steps": 10_000}}}).dvae
    model = DiscreteVAE(small("gumbel"))  # 32 px, 8x8 grid
    before, _ = dvae_schedule(model, r.loss_config())
    q = model.quantizer
    before(25, 100)  # a run cut to 100 steps by its clock: half-way through the anneal
    assert q.temperature == pytest.approx(0.25)  # geometric mean of 1 and 1/16
    before(50, 100)
    assert q.temperature == pytest.approx(1 / 16)
    assert q.kl_weight == pytest.approx(6.6 * 64 / (3 * 32 * 32))
    before(5, 100)
    assert q.kl_weight == pytest.approx(0.5 * 6.6 * 64 / (3 * 32 * 32))


def test_pixel_kmeans_recovers_the_shapes_palette_exactly():
    """Shapes images hold 9 colours (black + 8 fills): per-pixel k-means with 16 colours finds all of them, so
    the round trip through tokens gives the images back; with 4x4 blocks it is lossy but beats the mean image."""
    from dalle_core.dvae import fit_kmeans

    images = torch.from_numpy(np.stack([r[3] for r in shapes.generate(64, 32, seed=3)]))
    x = to_tensor(images)
    for downsamples in (0, 2):
        model = DiscreteVAE(DVAEConfig(image_size=32, codebook_size=16, num_downsamples=downsamples,
                                       quantizer="pixel-kmeans"))
        pixels = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 3)
        rounds = []
        fit_kmeans(model, pixels, iters=10, log=lambda i, m, rounds=rounds: rounds.append(m))
        assert downsamples == 0 or rounds[-1] < 0.97 * rounds[0], rounds  # Lloyd rounds improve on the seeding
        with torch.inference_mode():
            tokens = model.encode(x)
            recon = model.decode(tokens)
        assert tokens.shape == (64, 32 >> downsamples, 32 >> downsamples)
        mse = F.mse_loss(recon, x).item()
        if downsamples == 0:
            assert mse < 1e-6, mse
        else:
            assert mse < 0.5 * F.mse_loss(x.mean(0, keepdim=True).expand_as(x), x).item()


def test_logit_laplace_nll_is_the_density_of_dalles_pixel_model():
    """The loss equals -log of a Laplace density in logit space plus the change of variables, for pixels mapped
    into [0.1, 0.9]; and the image a decoder output stands for is the unmapped sigmoid of its location."""
    from dalle_core.dvae import LOGIT_LAPLACE_EPS, logit_laplace_nll

    g = torch.Generator().manual_seed(0)
    unit = torch.rand(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 6, 4, 4, generator=g)
    x = LOGIT_LAPLACE_EPS + (1 - 2 * LOGIT_LAPLACE_EPS) * unit
    laplace = torch.distributions.Laplace(out[:, :3], out[:, 3:].exp())
    want = -(laplace.log_prob(torch.logit(x)) - torch.log(x * (1 - x))).mean()
    assert torch.allclose(logit_laplace_nll(out, unit), want, atol=1e-5)

    model = DiscreteVAE(small("gumbel", logit_laplace=True))
    out[:, :3] = torch.logit(x)  # locations at the mapped pixels: the image is the pixels themselves
    assert torch.allclose(model.to_image(out) * 0.5 + 0.5, unit, atol=1e-5)
    assert model.decode(torch.zeros(1, 8, 8, dtype=torch.long)).shape == (1, 3, 32, 32)


def test_vqgan_losses_send_each_gradient_to_its_own_side():
    """The generator term trains the dVAE through a frozen discriminator; the hinge loss trains the
    discriminator on detached reconstructions; the adaptive weight is proportional to the reconstruction
    loss's gradient norm at the decoder's last layer."""
    from dalle_core.dvae import vqgan_losses

    torch.manual_seed(0)
    model = DiscreteVAE(small("vq", disc_layers=2, disc_channels=16))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    recon = model(x)[0]
    rec_loss = F.mse_loss(recon, x)
    out = vqgan_losses(model, x, recon, rec_loss, disc_weight=0.8)
    disc, dvae = list(model.discriminator.parameters()), list(model.decoder.parameters())
    g_disc = torch.autograd.grad(out["generator_loss"], disc, retain_graph=True, allow_unused=True)
    assert all(g is None or not g.any() for g in g_disc)
    g_dec = torch.autograd.grad(out["generator_loss"], dvae, retain_graph=True, allow_unused=True)
    assert any(g is not None and g.any() for g in g_dec)
    d_dec = torch.autograd.grad(out["discriminator_loss"], dvae, retain_graph=True, allow_unused=True)
    assert all(g is None for g in d_dec)
    d_disc = torch.autograd.grad(out["discriminator_loss"], disc, retain_graph=True)
    assert all(g.any() for g in d_disc[:1])
    tenfold = vqgan_losses(model, x, recon, 10 * rec_loss, disc_weight=0.8)["adaptive_weight"]
    assert tenfold.item() == pytest.approx(10 * out["adaptive_weight"].item(), rel=1e-3)


def test_sharpness_ratio_sees_blur_not_contrast():
    from dalle_core.dvae import laplacian_variance

    edges = torch.zeros(1, 3, 32, 32)
    edges[..., 16:, :] = 1.0  # one hard edge
    blurred = F.avg_pool2d(F.pad(edges, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert edges.var() / blurred.var() < 1.1  # the pixels' spread hardly changes ...
    assert laplacian_variance(blurred) < 0.2 * laplacian_variance(edges)  # ... their Laplacian's does


def test_disc_ramp_scales_the_generator_term_in():
    """With disc_ramp R the generator term's weight is 1/R of full at disc_start and full from R steps on."""
    r = config_from_dict({"dvae": {"quantizer": "vq", "codebook_size": 64, "codebook_dim": 32, "hidden": 32,
                                   "adversarial": True, "disc_start": 10, "disc_ramp": 4, "disc_layers": 2}}).dvae
    torch.manual_seed(0)
    model = DiscreteVAE(small("vq", disc_layers=2)).eval()  # eval: no codebook updates between the calls
    batch = {"image": torch.from_numpy(np.stack([s[3] for s in shapes.generate(4, 32, seed=1)]))}
    metrics = {step: dvae_step(model.c, r.loss_config())(model, batch, step)[2]() for step in (9, 10, 13, 20)}
    assert "adaptive_weight" not in metrics[9]  # before disc_start: no discriminator terms
    weight = {step: m["adaptive_weight"] for step, m in metrics.items() if step >= 10}
    assert weight[10] == pytest.approx(weight[20] / 4, rel=1e-4) and weight[13] == pytest.approx(weight[20], rel=1e-4)


def test_vq_nearest_code_is_exact_under_bf16_autocast():
    """Training and encoding run under bf16 autocast; the code search must still compare distances in fp32
    (in bf16, near codes tie or swap: 1.2% of these vectors got another code)."""
    torch.manual_seed(0)
    q = VectorQuantizer(DVAEConfig(codebook_size=1024, codebook_dim=32))
    z = torch.randn(2048, 32)
    exact = torch.cdist(z.double(), q.embed.double()).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.nearest(z), exact)


def test_code_usage_is_perplexity_and_fraction_of_codes_used():
    from dalle_core.dvae import code_usage

    assert code_usage(torch.tensor([5, 5, 5, 5])) == pytest.approx((4.0, 1.0))
    assert code_usage(torch.tensor([8, 0, 0, 0])) == pytest.approx((1.0, 0.25))
