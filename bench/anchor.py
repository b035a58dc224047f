"""The anchor: lucidrains' dalle-pytorch 1.6.6, the issue's comparison, measured in this run when installed, and
the issue's own numbers for it (the reference column) when not."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys

import torch

from bench.common import DALLE_SHAPE, Settings, median_seconds

# dalle-pytorch 1.6.6 at the reference configuration and at DALL-E's bench shape, measured on the reference
# 2-core CPU (issue text): `table row -> value`
REFERENCE = {"transformer_train_fp32.tokens_per_s": 3600, "sample_16.seconds": 4.9, "sample_16_cfg3.seconds": 1.1,
             "dvae_train.images_per_s": 280, "dvae_encode.images_per_s": 7500,
             "dalle_train_fp32.tokens_per_s": 507, "dalle_train_bf16.tokens_per_s": 915,
             "dalle_sample_cfg3.seconds": 34.8}
# the anchor's measurements that stand in for REFERENCE rows when it ran: `table row -> anchor key`
SAME_RUN = {"dalle_train_fp32.tokens_per_s": "train_fp32_tokens_per_s",
            "dalle_train_bf16.tokens_per_s": "train_bf16_tokens_per_s",
            "dalle_sample_cfg3.seconds": "sample_cfg3_seconds"}


@contextlib.contextmanager
def _lightning_moved_modules():
    """Within: pytorch-lightning's pre-1.6 `utilities.distributed` module name resolves to `utilities.rank_zero`,
    where its `rank_zero_only` moved. dalle-pytorch 1.6.6 imports taming-transformers' VQGAN, whose `taming.main`
    imports the old name; the installed pytorch-lightning is 2.x and an older one cannot be pinned next to it.
    The alias is removed on exit, so nothing else in the process sees it."""
    old = "pytorch_lightning.utilities.distributed"
    if importlib.util.find_spec("pytorch_lightning") is None or old in sys.modules:
        yield
        return
    sys.modules[old] = importlib.import_module("pytorch_lightning.utilities.rank_zero")
    try:
        yield
    finally:
        del sys.modules[old]


def import_dalle_pytorch():
    """lucidrains' dalle_pytorch, or None when it is not installed."""
    if importlib.util.find_spec("dalle_pytorch") is None:
        return None
    with _lightning_moved_modules():
        import dalle_pytorch
    return dalle_pytorch


def dalle_anchor(s: Settings) -> dict:
    """The issue's anchor measured in this run, so the comparison does not depend on which machine this is:
    lucidrains' dalle-pytorch 1.6.6 at DALL-E's bench shape (same widths, dim_head 32), training tokens/s in fp32
    and under bf16 autocast, and 4 images with cond_scale 3 and its KV cache (its final dVAE decode left out, as
    ours is). Needs `pip install --no-deps dalle-pytorch==1.6.6 axial_positional_embedding rotary-embedding-torch
    ftfy regex 'setuptools<81'` next to the `reference` extra; {} when it is not installed, or on a GPU (the
    anchor is the issue's CPU measurement: against a GPU run it says nothing)."""
    if s.device.type != "cpu":
        return {}
    dp = import_dalle_pytorch()
    if dp is None:
        print("  dalle_pytorch is not installed: the table compares with the issue's numbers", file=sys.stderr)
        return {}
    c, batch, cpu = DALLE_SHAPE, 4, torch.device("cpu")
    torch.manual_seed(0)
    vae = dp.DiscreteVAE(image_size=8 * c.image_grid, num_layers=3, num_tokens=c.image_vocab, codebook_dim=256,
                         hidden_dim=64)
    model = dp.DALLE(dim=c.dim, vae=vae, num_text_tokens=c.text_vocab, text_seq_len=c.text_len, depth=c.depth,
                     heads=c.heads, dim_head=c.dim // c.heads)
    text = torch.randint(1, c.text_vocab, (batch, c.text_len))
    image = torch.randint(0, c.image_vocab, (batch, c.image_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        def step(precision=precision):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(text, image, return_loss=True)
            loss.backward()
            opt.step()

        sec = median_seconds(step, s.repeats, cpu)
        out[f"train_{precision}_tokens_per_s"] = batch * (c.text_len + c.image_len) / sec
    model.eval()
    model.vae.decode = lambda codes: codes  # time the token sampling only

    def generate():
        with torch.no_grad():
            model.generate_images(text, cond_scale=3.0, use_cache=True)

    # no warm-up and half the repeats: one call is tens of seconds
    out["sample_cfg3_seconds"] = median_seconds(generate, max(1, s.repeats // 2), cpu, warmup=0)
    return out
