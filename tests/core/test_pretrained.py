"""Pretrained tokenizers: upstream architectures with random weights, saved in the upstream formats, loaded through
`dalle_core.pretrained`, must encode and decode exactly as the upstream implementations do."""

import os

import pytest
import torch
import yaml
from torch import nn

from dalle_core import pretrained

NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
REASON = "needs the upstream packages of the `reference` extra (pip install -e '.[reference]')"


def openai_dvae(folder, vocab=512, seed=0):
    """DALL-E's own Encoder/Decoder (the `DALL-E` package), random weights with some spread, pickled as released."""
    dall_e = pytest.importorskip("dall_e", reason=REASON)
    torch.manual_seed(seed)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=vocab)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=vocab)
    with torch.no_grad():  # untrained, the encoder's logits barely depend on the image and the decoder is flat
        for p, scale in [*((p, 3.0) for p in enc.parameters()), *((p, 1.0) for p in dec.parameters())]:
            p.add_(torch.randn_like(p) * p.std().nan_to_num(0.1).clamp(min=0.05) * scale)
    os.makedirs(folder, exist_ok=True)
    torch.save(enc, os.path.join(folder, "encoder.pkl"))
    torch.save(dec, os.path.join(folder, "decoder.pkl"))
    return enc.eval(), dec.eval()


def test_openai_dvae_encodes_and_decodes_as_upstream(tmp_path):
    from dall_e import map_pixels, unmap_pixels

    enc, dec = openai_dvae(tmp_path / "dalle")
    model = pretrained.load(tmp_path / "dalle", None, 32, *NORM)
    assert (model.c.codebook_size, model.c.grid) == (512, 4)
    x = nn.functional.interpolate(torch.rand(3, 3, 4, 4), size=32, mode="bilinear")  # cells differ
    with torch.no_grad():
        want = enc(map_pixels(x)).argmax(1)
        got = model.encode((x - 0.5) / 0.5)
        one_hot = nn.functional.one_hot(want, 512).permute(0, 3, 1, 2).float()
        want_img = unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
        got_img = model.decode(want) * 0.5 + 0.5
    assert len(want.unique()) >= 4  # the comparison means something: codes differ between cells
    assert torch.equal(got, want)
    assert want_img.std() > 0.05 and torch.allclose(got_img, want_img, atol=1e-5)


def taming_vqgan(folder, target: str, seed=0):
    """taming-transformers' Encoder/Decoder/quantizer, arranged as its VQModel / GumbelVQ, saved as a Lightning
    checkpoint (state_dict with loss weights besides) plus its OmegaConf yaml in taming's run layout."""
    model_mod = pytest.importorskip("taming.modules.diffusionmodules.model", reason=REASON)
    quant_mod = pytest.importorskip("taming.modules.vqvae.quantize", reason=REASON)
    torch.manual_seed(seed)
    dd = dict(double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
    m = nn.Module()
    m.encoder, m.decoder = model_mod.Encoder(**dd), model_mod.Decoder(**dd)
    embed_dim = 16 if target == "VQModel" else 32  # GumbelVQ's proj takes quant_conv's output as z_channels wide
    m.quant_conv, m.post_quant_conv = nn.Conv2d(32, embed_dim, 1), nn.Conv2d(embed_dim, 32, 1)
    if target == "VQModel":
        m.quantize = quant_mod.VectorQuantizer2(64, embed_dim, beta=0.25)
        m.quantize.embedding.weight.data.normal_()
    else:
        m.quantize = quant_mod.GumbelQuantize(32, embed_dim, 64)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "configs").mkdir()
    state = {**m.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(4)}
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, folder / "checkpoints" / "last.ckpt")
    conf = {"model": {"target": f"taming.models.vqgan.{target}",
                      "params": {"embed_dim": embed_dim, "n_embed": 64, "ddconfig": dd, "lossconfig": {"target": "x"}}}}
    (folder / "configs" / "model.yaml").write_text(yaml.safe_dump(conf))
    return m.eval()


@pytest.mark.parametrize("target", ["VQModel", "GumbelVQ"])
def test_taming_vqgan_encodes_and_decodes_as_upstream(tmp_path, target):
    m = taming_vqgan(tmp_path / "run", target)
    model = pretrained.load(tmp_path / "run", None, 32, *NORM)
    assert model.spec.kind == {"VQModel": "taming-vq", "GumbelVQ": "taming-gumbel"}[target]
    assert (model.c.codebook_size, model.c.grid) == (64, 16)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        h = m.quant_conv(m.encoder(2 * x - 1))
        if target == "VQModel":
            want = m.quantize(h)[2][2].view(2, 16, 16)
            z = m.quantize.embedding(want).permute(0, 3, 1, 2)
        else:  # upstream samples gumbel noise even in eval; the code of a cell is its logits' argmax
            want = m.quantize.proj(h).argmax(1)
            z = m.quantize.get_codebook_entry(want.flatten(), (2, 16, 16, 32))
        want_img = (m.decoder(m.post_quant_conv(z)).clamp(-1, 1) + 1) / 2
        got = model.encode((x - 0.5) / 0.5)
        got_img = model.decode(want) * 0.5 + 0.5
    assert len(want.unique()) > 5
    assert torch.equal(got, want)
    assert torch.allclose(got_img, want_img, atol=1e-5)


@pytest.mark.parametrize("target", ["VQModel", "GumbelVQ"])
def test_a_taming_fine_tune_steps_as_upstream_trains(tmp_path, target):
    """The training forward of a loaded VQGAN (`dvae.init_from`) is taming's: the same reconstruction and
    quantizer loss as VQModel's forward (VectorQuantizer2's legacy loss; GumbelQuantize's relaxation and KL at the
    same noise), with the same gradients: the codebook learns by gradient, as upstream's does."""
    m = taming_vqgan(tmp_path / "run", target).train()
    model = pretrained.load(tmp_path / "run", None, 16, *NORM).train()
    x = torch.rand(2, 3, 16, 16)
    if target == "GumbelVQ":
        m.quantize.temperature = model.quantizer.temperature = 0.5
        m.quantize.kl_weight = model.quantizer.kl_weight = 0.01
    torch.manual_seed(3)
    h = m.quant_conv(m.encoder(2 * x - 1))
    z_q, want_loss, (_, _, want_idx) = m.quantize(h)
    want_out = m.decoder(m.post_quant_conv(z_q))
    torch.manual_seed(3)
    out, idx, q_loss = model((x - 0.5) / 0.5)
    assert torch.allclose(out, want_out, atol=1e-5) and torch.allclose(q_loss, want_loss, atol=1e-6)
    if target == "VQModel":  # GumbelQuantize reports the noisy sample's argmax; ours is the code encode() gives
        assert torch.equal(idx.flatten(), want_idx.flatten())
    (want_out.pow(2).mean() + want_loss).backward()  # the gradients too: which term moves the codebook, which z
    (out.pow(2).mean() + q_loss).backward()
    table = "embedding" if target == "VQModel" else "embed"
    for theirs, ours in ((getattr(m.quantize, table), getattr(model.quantize, table)), (m.quant_conv, model.quant_conv)):
        assert ours.weight.grad.abs().sum() > 0 and torch.allclose(ours.weight.grad, theirs.weight.grad, atol=1e-6)


def test_an_openai_fine_tune_relaxes_its_codes_and_learns(tmp_path):
    """OpenAI's dVAE fine-tunes with DALL-E's relaxation: at a low temperature the decoder sees (almost) the
    one-hots of its hard codes, so the training forward's image is the decoded one; a few steps of its
    logit-Laplace loss on one batch lower that loss."""
    from dalle_core.dvae import DVAELossConfig, dvae_schedule, dvae_step

    openai_dvae(tmp_path / "dalle")
    model = pretrained.load(tmp_path / "dalle", None, 32, *NORM).train()
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=32) * 2 - 1
    model.quantizer.temperature = 1e-4
    with torch.no_grad():
        out, idx, _ = model(x)
        assert torch.equal(idx, model.encode(x))
        assert torch.allclose(model.to_image(out), model.decode(idx), atol=1e-3)
    loss_cfg = DVAELossConfig(recon_loss="logit_laplace", temp_start=1 / 16)
    step, (before, _) = dvae_step(model.c, loss_cfg), dvae_schedule(model, loss_cfg)
    batch = {"image": ((x * 0.5 + 0.5) * 255).round().permute(0, 2, 3, 1).to(torch.uint8)}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for i in range(15):
        before(i, 15)
        torch.manual_seed(i)
        loss = step(model, batch, i)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_reading_a_checkpoint_runs_no_code_from_it(tmp_path):
    """Checkpoints are pickles: a hostile one must not run its payload (plain torch.load(weights_only=False)
    would)."""
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    torch.save({"state_dict": {"encoder.w": torch.zeros(1)}, "callbacks": Payload()}, tmp_path / "x.ckpt")
    blob = pretrained.read_pickle(tmp_path / "x.ckpt")
    assert not (tmp_path / "pwned").exists()
    assert torch.equal(blob["state_dict"]["encoder.w"], torch.zeros(1))


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(pretrained.PretrainedError, match="does not exist"):
        pretrained.source_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pretrained.PretrainedError, match="holds 0 .ckpt files"):
        pretrained.source_files(tmp_path / "empty")
    (tmp_path / "a.ckpt").write_bytes(b"")
    with pytest.raises(pretrained.PretrainedError, match="candidate .yaml"):
        pretrained.source_files(tmp_path / "a.ckpt")
    (tmp_path / "a.yaml").write_text("model: {target: taming.models.cond_transformer.Net2NetTransformer, "
                                     "params: {n_embed: 4, embed_dim: 4, ddconfig: {}}}")
    with pytest.raises(pretrained.PretrainedError, match="Net2NetTransformer is not supported"):
        pretrained.load(tmp_path / "a.ckpt", None, 32, *NORM)


def test_lpips_from_local_weights_equals_the_lpips_package(tmp_path):
    """Our LPIPS on a local (random) VGG16 and the lpips package's linear layers = lpips.LPIPS on the same."""
    lpips = pytest.importorskip("lpips", reason=REASON)
    import torchvision

    from dalle_core.perceptual import load_lpips

    torch.manual_seed(0)
    vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, tmp_path / "vgg16.pth")
    ours = load_lpips(tmp_path / "vgg16.pth")
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    ref.net.load_state_dict({f"slice{i + 1}.{k}": v for k, v in vgg.state_dict().items()
                             for i, (lo, hi) in enumerate(slices) if lo <= int(k.split(".")[0]) < hi})
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = ref(a, b).flatten()
        assert torch.allclose(ours(a, b), want, rtol=1e-4) and want.min() > 0
        assert ours(a, a).abs().max() < 1e-6
    from dalle_core.perceptual import PerceptualError

    with pytest.raises(PerceptualError, match="does not exist"):
        load_lpips(tmp_path / "missing.pth")
