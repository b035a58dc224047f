"""The discrete VAE of DALL-E (stage 1): images <-> grids of codebook tokens.

An encoder maps a (3, H, W) image to a (H/f, W/f) grid, f = 2**num_downsamples,
and a decoder maps code embeddings back to pixels. Three quantizers:

- `gumbel` (DALL-E): the encoder emits K logits per cell; training relaxes the
  one-hot with gumbel-softmax (temperature annealed towards 1/16) and adds a KL
  term to the uniform prior; encoding takes the argmax.
- `vq` (VQ-VAE): the encoder emits a D-vector per cell, snapped to its nearest
  codebook entry with straight-through gradients; the codebook follows the
  encoder by EMA, a commitment loss keeps the encoder close, and codes nobody
  uses are restarted from encoder outputs.
- `pixel-kmeans` (iGPT / minGPT): no network. Each f x f block of pixels is
  averaged (f = 1: every pixel) and tokenized as its nearest of K colours, the
  centroids of a k-means over training pixels (`fit_kmeans`); decoding paints
  each block in its colour. The simplest stage-1 tokenizer, a baseline.

The encoder downsamples first and works at low resolution, so encoding (the
bulk pre-tokenization path) stays cheap; the decoder carries the capacity.
With `logit_laplace` the decoder emits DALL-E's logit-Laplace statistics
instead of pixels (`logit_laplace_nll`, `DiscreteVAE.to_image`).

The training objective follows the model: `dvae_step` (reconstruction +
quantizer loss, VQGAN's adversarial terms in `vqgan_losses`), `dvae_schedule`
(gumbel temperature and KL ramps, dead-code restarts) and `evaluate_dvae`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from annotated_types import Ge, Gt, Le, Lt

from dalle_core.device import to_device
from dalle_core.images import ImageNormalization, compact_size, psnr, size_hw, to_tensor
from dalle_core.perceptual import load_lpips
from dalle_core.taming import TamingDecoder, TamingEncoder
from dalle_core.train import StepFn, distributed, unwrap


@dataclass
class DVAEConfig:
    """The tokenizer's architecture and quantizer. Each field's type carries its allowed range: the run config's
    `dvae` section is built from these fields (`pipeline.config`), so this is the one place they are declared.
    `image_size`, `logit_laplace` and `disc_layers` are set by the stage (from the data and the loss)."""

    image_size: int | tuple[int, int] = 32  # an int for a square, else (height, width)
    codebook_size: Annotated[int, Ge(2), Le(65536)] = 512  # K, the transformer's image vocabulary (uint16 shards)
    codebook_dim: Annotated[int, Ge(1)] = 256  # D, size of one code embedding
    hidden: Annotated[int, Ge(8)] = 64  # conv channels (the small net), or the base width (channel_mult)
    num_downsamples: Annotated[int, Ge(0), Le(5)] = 2  # grid = image_size / 2**num_downsamples (0: pixel-kmeans)
    num_res_blocks: Annotated[int, Ge(0)] = 1  # per resolution level
    # Empty: the small net (one width, no normalisation). Set: taming-transformers' encoder/decoder, level i (full
    # resolution first, num_downsamples + 1 levels) hidden * channel_mult[i] wide, with GroupNorm and swish.
    channel_mult: tuple[Annotated[int, Ge(1)], ...] = ()
    attention: bool = False  # self-attention at the lowest resolution (channel_mult only)
    quantizer: Literal["gumbel", "vq", "pixel-kmeans"] = "vq"
    commitment: Annotated[float, Ge(0)] = 0.25  # VQ-VAE's beta
    ema_decay: Annotated[float, Gt(0), Lt(1)] = 0.99  # the vq codebook follows the encoder by this EMA
    dead_code_threshold: Annotated[float, Ge(0)] = 1.0  # EMA usage below which a code is restarted
    straight_through: bool = False  # gumbel: hard one-hots forward, soft gradients backward
    # DALL-E's logit-Laplace likelihood: the decoder emits a location and a log-scale per pixel value (6 channels)
    # for pixels mapped into [eps, 1 - eps]; its image is the unmapped sigmoid of the location. The image is
    # normalised with norm_mean / norm_std like every other decoder output.
    logit_laplace: bool = False
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel pixel mean and std the model sees
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # VQGAN (taming-transformers): a PatchGAN discriminator trained beside the dVAE; 0 layers = none. It exists
    # only while training: the stage's artifact is the tokenizer without it.
    disc_layers: int = 0
    disc_channels: Annotated[int, Ge(8)] = 64

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)  # a list when read back from an artifact's JSON
        if not isinstance(self.image_size, int):
            self.image_size = compact_size(*size_hw(self.image_size))

    @property
    def image_hw(self) -> tuple[int, int]:
        """The input images' (height, width) in pixels."""
        return size_hw(self.image_size)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """The token grid's (rows, cols): the image's sides over 2**num_downsamples."""
        return tuple(side // 2 ** self.num_downsamples for side in self.image_hw)

    @property
    def grid(self) -> int | tuple[int, int]:
        """The token grid as a DALLEConfig's `image_grid` takes it: an int for a square."""
        return compact_size(*self.grid_hw)


@dataclass
class DVAELossConfig:
    """The dVAE's training objective and its schedules, read by `dvae_step` and `dvae_schedule`. The run config's
    `dvae` section carries these fields flat (`dvae.kl_weight`), so this is the one place they are declared."""

    __pydantic_config__ = {"extra": "forbid"}  # read by the run config

    # logit_laplace: DALL-E's likelihood (pixels mapped into [0.1, 0.9], a location and scale per value); against
    # it the paper's kl_weight for gumbel was 6.6
    recon_loss: Literal["mse", "l1", "logit_laplace"] = "mse"
    # gumbel (DALL-E's recipe). The schedules follow the run's real horizon (its last step, the wall-clock
    # budget included), not a fixed step count: the temperature goes from temp_start to temp_end
    # (exponentially) over the first `temp_anneal` of it, the KL weight from 0 to kl_weight over the first
    # `kl_warmup`. kl_weight is the paper's beta: the KL to the uniform prior summed over grid cells, against
    # a reconstruction loss summed over pixel values. DALL-E used 6.6 against its logit-Laplace likelihood; against
    # the MSE here that over-regularises (docs/tokenizers.md). Validation, encoding and pre-tokenization always
    # take the hard argmax.
    temp_start: Annotated[float, Gt(0)] = 1.0
    temp_end: Annotated[float, Gt(0)] = 1 / 16
    temp_anneal: Annotated[float, Gt(0), Le(1)] = 0.5
    kl_weight: Annotated[float, Ge(0)] = 0.5
    kl_warmup: Annotated[float, Gt(0), Le(1)] = 0.1
    # VQGAN (taming-transformers): a PatchGAN discriminator (disc_layers stride-2 convs, disc_channels wide) with
    # the hinge loss, from step disc_start on. The generator term's weight is disc_weight x the ratio of the
    # reconstruction's and the adversarial term's gradient norms at the decoder's last layer (clamped to
    # [0, 1e4]). The discriminator trains with the same optimizer settings and is not part of the artifact.
    adversarial: bool = False
    disc_start: Annotated[int, Ge(0)] = 1000
    disc_weight: Annotated[float, Ge(0)] = 0.8
    # Steps over which the generator term's weight ramps from 0 to full after disc_start (the discriminator
    # learns at full rate meanwhile). 0 = taming's switch-on, which knocks a converged dVAE down (docs/tokenizers.md).
    disc_ramp: Annotated[int, Ge(0)] = 0
    # A perceptual term (LPIPS on VGG16 features) needs weights on local disk, since nothing is downloaded:
    # perceptual_vgg = torchvision's vgg16 state dict (.pth), perceptual_lpips = LPIPS' linear layers (vgg.pth
    # of the lpips package; taken from an installed lpips package when unset). Off when perceptual_vgg is unset.
    perceptual_weight: Annotated[float, Ge(0)] = 1.0
    perceptual_vgg: str | None = None
    perceptual_lpips: str | None = None
    restart_every: Annotated[int, Ge(1)] = 50  # steps between dead-code restarts (vq and gumbel)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    """The small net's encoder: stride-2 convolutions first, then residual blocks at the grid's resolution."""

    def __init__(self, c: DVAEConfig, out_ch: int):
        super().__init__()
        layers: list[nn.Module] = []
        ch_in = 3
        for _ in range(c.num_downsamples):  # 4x4 stride-2 convs halve the resolution
            layers += [nn.Conv2d(ch_in, c.hidden, 4, stride=2, padding=1), nn.ReLU()]
            ch_in = c.hidden
        layers += [ResBlock(c.hidden) for _ in range(c.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(c.hidden, out_ch, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, 3, H, W) -> (B, out_ch, h, w)
        return self.net(x)


class Decoder(nn.Module):
    """The small net's decoder: residual blocks at the grid's resolution, then transposed convolutions."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c.codebook_dim, c.hidden, 1)]
        layers += [ResBlock(c.hidden) for _ in range(c.num_res_blocks)]
        for i in range(c.num_downsamples):
            layers += [nn.ReLU(), nn.ConvTranspose2d(c.hidden, c.hidden, 4, stride=2, padding=1)]
            if i < c.num_downsamples - 1:
                layers += [ResBlock(c.hidden) for _ in range(c.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(c.hidden, 6 if c.logit_laplace else 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):  # (B, D, h, w) -> (B, 3, H, W), or (B, 6, H, W) logit-Laplace statistics
        return self.net(z)


def taming_ddconfig(c: DVAEConfig, z_channels: int, out_ch: int) -> dict:
    """taming's `ddconfig` for this tokenizer: width hidden * channel_mult[i] at level i, attention (and the
    middle block's) only at the lowest resolution when `attention`."""
    return dict(ch=c.hidden, ch_mult=list(c.channel_mult), num_res_blocks=c.num_res_blocks,
                resolution=c.image_hw[0], attn_resolutions=[c.grid_hw[0]] if c.attention else [],
                mid_attention=c.attention, in_channels=3, z_channels=z_channels, out_ch=out_ch)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with EMA updates and dead-code restarts."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        self.c = c
        embed = torch.randn(c.codebook_size, c.codebook_dim) / math.sqrt(c.codebook_dim)
        self.register_buffer("embed", embed)  # (K, D), moved by EMA, not by the optimizer
        self.register_buffer("ema_count", torch.ones(c.codebook_size))
        self.register_buffer("ema_sum", embed.clone())

    def nearest(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """(N, D) -> (N,) index of the closest code.

        argmin |z - e|^2 = argmin (|e|^2 - 2 z.e): one fused addmm per chunk of rows,
        sized so the (chunk, K) distance block stays in cache.
        """
        e = self.embed
        e_sq = e.pow(2).sum(1)
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        with torch.autocast(z.device.type, enabled=False):  # fp32 distances: bf16's 8 bits would pick near codes
            for i in range(0, z.shape[0], chunk):
                out[i:i + chunk] = torch.addmm(e_sq, z[i:i + chunk].float(), e.t(), alpha=-2).argmin(1)
        return out

    def forward(self, z_e: torch.Tensor):
        B, D, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, D).float()  # (B*h*w, D)
        idx = self.nearest(flat)
        z_q = self.embed[idx].view(B, h, w, D).permute(0, 3, 1, 2)
        commit = F.mse_loss(z_e.float(), z_q.detach())
        if self.training:
            self._ema_update(flat.detach(), idx)
        z_q = z_e + (z_q - z_e).detach()  # straight-through
        return z_q, idx.view(B, h, w), self.c.commitment * commit

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        K, d = self.c.codebook_size, self.c.ema_decay
        counts = torch.bincount(idx, minlength=K).float()
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # DDP: every rank moves its codebook by the global batch
            torch.distributed.all_reduce(sums)
        self.ema_count.mul_(d).add_(counts, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + K * 1e-5) * n  # Laplace smoothing
        self.embed.copy_(self.ema_sum / count[:, None])
        self._last_batch = flat

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Move codes whose EMA usage fell below the threshold onto random recent encoder outputs."""
        batch = getattr(self, "_last_batch", None)
        if batch is None:
            return 0
        dead = (self.ema_count < self.c.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        pick = torch.randint(0, batch.shape[0], (dead.numel(),), device=batch.device)
        self.embed[dead] = batch[pick]
        self.ema_sum[dead] = batch[pick]
        self.ema_count[dead] = 1.0
        return int(dead.numel())


class GumbelQuantizer(nn.Module):
    """DALL-E's relaxation: soft one-hots over K codes during training, argmax at encode time.

    The returned loss is `kl_weight` x KL(q || uniform) in nats per grid cell (the training loop sets the
    weight, normalised against the reconstruction loss); `last_kl` keeps the unweighted value for logs."""

    def __init__(self, c: DVAEConfig, own_table: bool = True):
        super().__init__()
        self.c = c
        if own_table:  # else the caller passes the (K, D) table to `forward`: a loaded tokenizer keeps its own
            self.embed = nn.Embedding(c.codebook_size, c.codebook_dim)
        self.temperature = 1.0  # annealed by the training loop
        self.kl_weight = 0.0  # ramped by the training loop
        self.last_kl = torch.zeros(())
        # argmax usage by EMA, as the vq codebook keeps it; training state only (not in the artifact)
        self.register_buffer("ema_count", torch.ones(c.codebook_size), persistent=False)

    def forward(self, logits: torch.Tensor, table: torch.Tensor | None = None):
        """(B, K, h, w) logits -> (code embeddings (B, D, h, w), argmax codes (B, h, w), weighted KL); the
        embeddings mix the rows of `table` (K, D), by default this quantizer's own."""
        table = self.embed.weight if table is None else table
        idx = logits.argmax(1)  # (B, h, w)
        if self.training:
            soft = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=self.c.straight_through, dim=1)
        else:
            soft = F.one_hot(idx, self.c.codebook_size).permute(0, 3, 1, 2).float()
        z = torch.einsum("bkhw,kd->bdhw", soft, table)
        if self.training:
            self._count(idx)
        logq = F.log_softmax(logits.float(), dim=1)
        kl = (logq.exp() * (logq + math.log(self.c.codebook_size))).sum(1).mean()  # KL(q || uniform) per cell
        self.last_kl = kl.detach()
        return z, idx, self.kl_weight * kl

    @torch.no_grad()
    def _count(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx.flatten(), minlength=self.c.codebook_size).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every rank restarts the same codes
        self.ema_count.mul_(self.c.ema_decay).add_(counts, alpha=1 - self.c.ema_decay)

    @torch.no_grad()
    def restart_dead_codes(self, logits_layer: nn.Conv2d) -> int:
        """Split the busiest codes into the dead ones (EMA usage below the threshold), as k-means splits a
        cluster: a dead code gets a busy code's logit row (`logits_layer`, the encoder's last 1x1 conv) and
        embedding, each pair nudged apart along a random direction, so the busy code's cells divide between the
        two. The direction comes from a fixed-seed generator, so DDP ranks stay identical. Returns the number
        of codes restarted."""
        dead = (self.ema_count < self.c.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        splittable = int((self.ema_count >= 2 * self.c.dead_code_threshold).sum())  # both halves stay alive
        donors = self.ema_count.topk(min(dead.numel(), splittable)).indices
        dead = dead[:donors.numel()]
        if dead.numel() == 0:
            return 0
        self.restarts = getattr(self, "restarts", 0) + 1
        g = torch.Generator().manual_seed(self.restarts)
        for table in (logits_layer.weight, self.embed.weight):
            rows = table[donors].flatten(1)
            nudge = torch.randn(rows.shape, generator=g).to(rows) * 0.01 * rows.norm(dim=1, keepdim=True).clamp_min(1e-3)
            nudge /= rows.shape[1] ** 0.5
            table[dead] = (rows - nudge).view_as(table[dead])
            table[donors] = (rows + nudge).view_as(table[donors])
        logits_layer.bias[dead] = logits_layer.bias[donors]
        self.ema_count[donors] /= 2
        self.ema_count[dead] = self.ema_count[donors]
        return int(dead.numel())


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN, as in taming-transformers: `disc_layers` stride-2 4x4 convs (BatchNorm, LeakyReLU)
    then two stride-1 ones, one real/fake logit per overlapping patch; N(0, 0.02) initialisation."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        ch = c.disc_channels
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, c.disc_layers + 1):
            c_in, ch = ch, c.disc_channels * min(2 ** i, 8)
            layers += [nn.Conv2d(c_in, ch, 4, stride=2 if i < c.disc_layers else 1, padding=1, bias=False),
                       nn.BatchNorm2d(ch), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch, 1, 4, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):  # normalised (B, 3, H, W) -> (B, 1, h', w') patch logits
        return self.net(x)


class DiscreteVAE(nn.Module):
    def __init__(self, c: DVAEConfig):
        super().__init__()
        assert c.quantizer in ("gumbel", "vq", "pixel-kmeans"), c.quantizer
        self.c = c
        if c.quantizer == "pixel-kmeans":  # block averages snapped to K colours; painted back block by block
            f = 2 ** c.num_downsamples
            self.encoder = nn.AvgPool2d(f) if f > 1 else nn.Identity()
            self.quantizer = VectorQuantizer(replace(c, codebook_dim=3))
            self.decoder = nn.Upsample(scale_factor=f, mode="nearest") if f > 1 else nn.Identity()
            return
        enc_out, dec_out = c.codebook_size if c.quantizer == "gumbel" else c.codebook_dim, 6 if c.logit_laplace else 3
        if c.channel_mult:
            self.encoder = TamingEncoder(taming_ddconfig(c, enc_out, dec_out))
        else:
            self.encoder = Encoder(c, enc_out)
        self.quantizer = GumbelQuantizer(c) if c.quantizer == "gumbel" else VectorQuantizer(c)
        self.decoder = TamingDecoder(taming_ddconfig(c, c.codebook_dim, dec_out)) if c.channel_mult else Decoder(c)
        self.discriminator = PatchDiscriminator(c) if c.disc_layers else None

    def drop_discriminator(self) -> None:
        """After training: the tokenizer alone (the discriminator is not part of the artifact)."""
        self.discriminator = None
        self.c = replace(self.c, disc_layers=0)

    @property
    def device(self) -> torch.device:
        return next(iter([*self.parameters(), *self.buffers()])).device  # pixel-kmeans has buffers only

    def forward(self, images: torch.Tensor):
        """Normalised (B, 3, H, W) -> (decoder output, token grid, quantizer loss). The decoder output is the
        normalised reconstruction, or with `logit_laplace` its (B, 6, H, W) statistics (see `to_image`)."""
        z, idx, q_loss = self.quantizer(self.encoder(images))
        return self.decoder(z), idx, q_loss

    def to_image(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> normalised (B, 3, H, W) image (for logit-Laplace: the unmapped sigmoid of mu)."""
        return logit_laplace_image(out, self.c) if self.c.logit_laplace else out

    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where VQGAN balances its loss terms (taming's `get_last_layer`)."""
        return (self.decoder.conv_out if self.c.channel_mult else self.decoder.net[-1]).weight

    def restart_dead_codes(self) -> int:
        """Restart the codes nobody uses (vq: onto recent encoder outputs; gumbel: splits of the busiest codes).
        Returns how many were restarted."""
        if self.c.quantizer == "vq":
            return self.quantizer.restart_dead_codes()
        if self.c.quantizer == "gumbel":
            return self.quantizer.restart_dead_codes(self.encoder.conv_out if self.c.channel_mult else self.encoder.net[-1])
        return 0

    def code_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.quantizer.embed.weight if self.c.quantizer == "gumbel" else self.quantizer.embed
        return F.embedding(tokens, weight).permute(0, 3, 1, 2)  # (B, h, w) -> (B, D, h, w)

    def encode(self, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Normalised (B, 3, H, W) -> LongTensor (B, h, w) of codebook indices.

        precision="bf16" runs the encoder under bf16 autocast; the code search stays fp32.
        """
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            z = self.encoder(images.contiguous(memory_format=torch.channels_last))  # oneDNN's fast layout on CPU
        if self.c.quantizer == "gumbel":
            return z.argmax(1)
        B, D, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, D).float()).view(B, h, w)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, h, w) -> normalised (B, 3, H, W) images."""
        return self.to_image(self.decoder(self.code_embeddings(tokens)))


LOGIT_LAPLACE_EPS = 0.1  # DALL-E: pixels mapped into [eps, 1 - eps], so logit(x) stays finite


def logit_laplace_image(out: torch.Tensor, c: DVAEConfig) -> torch.Tensor:
    """(B, 6, H, W) logit-Laplace statistics -> the normalised (B, 3, H, W) image (`c.norm_mean`, `c.norm_std`):
    the sigmoid of the location, unmapped from [eps, 1 - eps] (DALL-E's `unmap_pixels`) and clamped to [0, 1]."""
    unit = ((torch.sigmoid(out[:, :3].float()) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)
    mean = torch.tensor(c.norm_mean, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(c.norm_std, device=out.device).view(1, 3, 1, 1)
    return (unit - mean) / std


def logit_laplace_nll(out: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per pixel value of images `unit` in [0, 1] under DALL-E's logit-Laplace
    distribution with the decoder's statistics `out` (B, 6, H, W): location mu and log-scale ln b per value.

    For y = logit(x_m), x_m = eps + (1 - 2 eps) x:  -ln p(x_m) = ln(2b) + ln(x_m (1 - x_m)) + |y - mu| / b.
    """
    x = LOGIT_LAPLACE_EPS + (1 - 2 * LOGIT_LAPLACE_EPS) * unit.float()
    mu, log_b = out[:, :3].float(), out[:, 3:].float().clamp(-7, 7)
    y = torch.log(x) - torch.log1p(-x)
    nll = math.log(2) + log_b + torch.log(x * (1 - x)) + (y - mu).abs() * torch.exp(-log_b)
    return nll.mean()


@torch.no_grad()
def fit_kmeans(model: DiscreteVAE, pixels: torch.Tensor, iters: int = 20, seed: int = 0,
               log=None) -> float:
    """Set a `pixel-kmeans` model's K colours by k-means (Lloyd, in torch) over (N, 3) normalised training
    pixels (block averages when f > 1): k-means++ seeding on a sample, then `iters` rounds; a colour that
    loses all its pixels restarts on a random one. `log(i, mse)` sees each round. Returns the final mse."""
    q = model.quantizer
    k = model.c.codebook_size
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = pixels.float()
    sample = x[torch.randperm(len(x), generator=g)[:max(20 * k, 4096)].to(x.device)]
    centres = sample[torch.randint(len(sample), (1,), generator=g).to(x.device)]
    d2 = (sample - centres[0]).pow(2).sum(1)
    for _ in range(1, k):  # k-means++: each new colour drawn in proportion to the squared distance
        pick = torch.multinomial((d2 + 1e-12).cpu(), 1, generator=g).to(x.device)
        centres = torch.cat([centres, sample[pick]])
        d2 = torch.minimum(d2, (sample - sample[pick]).pow(2).sum(1))
    q.embed.copy_(centres)
    mse = float("nan")
    for i in range(iters):
        idx = q.nearest(x)
        sums = torch.zeros_like(q.embed).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).float()
        empty = counts == 0
        q.embed.copy_(torch.where(empty[:, None], q.embed, sums / counts.clamp(min=1)[:, None]))
        if empty.any():
            q.embed[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g).to(x.device)]
        mse = float((x - q.embed[q.nearest(x)]).pow(2).sum(1).mean())
        if log:
            log(i + 1, mse)
    q.ema_sum.copy_(q.embed)
    return mse


# ------------------------------------------------------------------ training objective


def code_usage(counts: torch.Tensor) -> tuple[float, float]:
    """(perplexity, fraction of codes used) of (K,) code counts: exp of the usage entropy in nats (K when every
    code is used equally, 1 when one code takes all) and how many codes appear at all."""
    p = counts.float() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp()), float((counts > 0).float().mean())


def dvae_step(c: DVAEConfig, section: DVAELossConfig) -> StepFn:
    """The dVAE's loss on a batch {"image": (B, H, W, 3) uint8} for a model of config `c`: reconstruction +
    quantizer loss, and for VQGAN (`section.adversarial`) the LPIPS term when it has weights, the adaptive-weight
    generator term and the discriminator's hinge loss."""
    norm = ImageNormalization(c.norm_mean, c.norm_std)
    lpips = None
    if section.adversarial and section.perceptual_vgg and section.perceptual_weight > 0:
        lpips = load_lpips(section.perceptual_vgg, section.perceptual_lpips)

    def step_fn(model: nn.Module, batch: dict, step: int):
        x = to_tensor(batch["image"], norm.mean, norm.std)
        out, idx, q_loss = model(x)
        if section.recon_loss == "logit_laplace":
            rec_loss = logit_laplace_nll(out, norm.to_unit(x))
            recon = unwrap(model).to_image(out if lpips is not None or section.adversarial else out.detach())
        else:
            recon = out.float()
            rec_loss = F.mse_loss(recon, x) if section.recon_loss == "mse" else F.l1_loss(recon, x)
        adv: dict[str, torch.Tensor] = {}
        if lpips is not None:
            lpips.to(x.device)  # in place; nothing moves after the first step
            adv["perceptual"] = lpips(2 * norm.to_unit(x) - 1, 2 * norm.to_unit(recon) - 1).mean()
            rec_loss = rec_loss + section.perceptual_weight * adv["perceptual"]
        loss = rec_loss + q_loss
        if section.adversarial and step >= section.disc_start:
            ramp = min(1.0, (step - section.disc_start + 1) / section.disc_ramp) if section.disc_ramp else 1.0
            adv.update(vqgan_losses(unwrap(model), x, recon, rec_loss, section.disc_weight * ramp))
            loss = loss + adv["adaptive_weight"] * adv["generator_loss"] + adv["discriminator_loss"]
        elif section.adversarial and distributed():  # every parameter gets a gradient each step, as DDP expects
            loss = loss + 0 * sum(p.sum() for p in unwrap(model).discriminator.parameters())

        def metrics() -> dict[str, float]:
            ppl, used = code_usage(torch.bincount(idx.flatten(), minlength=c.codebook_size))
            with torch.no_grad():
                recon_psnr = psnr(F.mse_loss(norm.to_unit(recon.detach()), norm.to_unit(x)).item())
            return {"recon_mse": F.mse_loss(recon.detach().float(), x).item(), "psnr": recon_psnr, "perplexity": ppl,
                    "code_usage_fraction": used, "quantizer_loss": q_loss.item(),
                    "temperature": getattr(unwrap(model).quantizer, "temperature", float("nan")),
                    "kl_per_cell": float(getattr(unwrap(model).quantizer, "last_kl", float("nan"))),
                    **{k: float(v.detach()) for k, v in adv.items()}}

        return loss, x.shape[0], metrics

    return step_fn


def vqgan_losses(model: nn.Module, x: torch.Tensor, recon: torch.Tensor, rec_loss: torch.Tensor,
                 disc_weight: float) -> dict[str, torch.Tensor]:
    """Taming-transformers' adversarial terms for normalised images `x` and reconstructions `recon`.

    generator_loss = -D(recon), to be weighted by adaptive_weight = disc_weight x |grad rec_loss| /
    |grad generator_loss| at the decoder's last layer (so neither term drowns the other); its gradient reaches
    the dVAE only (D's parameters are detached for it). discriminator_loss = hinge on D(x) and D(recon.detach()),
    its gradient reaches D only."""
    d = model.discriminator
    frozen = {name: p.detach() for name, p in d.named_parameters()}
    generator_loss = -torch.func.functional_call(d, frozen, (recon,)).float().mean()
    last = model.last_layer()
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(generator_loss, last, retain_graph=True)[0]
    weight = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * disc_weight
    real, fake = d(x).float(), d(recon.detach()).float()
    disc_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    return {"generator_loss": generator_loss, "adaptive_weight": weight, "discriminator_loss": disc_loss,
            "logits_real": real.detach().mean(), "logits_fake": fake.detach().mean()}


def dvae_schedule(model: nn.Module, section: DVAELossConfig
                  ) -> tuple[Callable[[int, int], None], Callable[[int], None]]:
    """(before_step, after_step): the gumbel temperature and KL ramps over the run's horizon (the step the
    budget says it will end at); dead-code restarts every `restart_every` steps."""
    quantizer, c = unwrap(model).quantizer, unwrap(model).c
    cells_per_value = math.prod(c.grid_hw) / (3 * math.prod(c.image_hw))  # KL summed over cells, recon over pixel values

    def before(step: int, horizon: int) -> None:
        if c.quantizer == "gumbel":
            frac = min(1.0, step / max(1.0, section.temp_anneal * horizon))
            quantizer.temperature = section.temp_start * (section.temp_end / section.temp_start) ** frac
            kl_ramp = min(1.0, step / max(1.0, section.kl_warmup * horizon))
            quantizer.kl_weight = section.kl_weight * cells_per_value * kl_ramp

    def after(step: int) -> None:
        if (step + 1) % section.restart_every == 0:
            unwrap(model).restart_dead_codes()

    return before, after


@torch.inference_mode()
def evaluate_dvae(model: nn.Module, batches: Iterable[dict], norm: ImageNormalization,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Validation PSNR of the hard-code reconstruction (over all pixels of all batches), codebook usage, and
    sharpness: the variance of the reconstructions' Laplacian over the originals' (1 = as sharp; blur < 1)."""
    model.eval()
    se, n, lap_recon, lap_real = 0.0, 0, 0.0, 0.0
    counts = torch.zeros(model.c.codebook_size, device=device)
    for batch in batches:
        x = to_tensor(to_device(batch["image"], torch.device(device)), norm.mean, norm.std)
        tokens = model.encode(x)
        recon = model.decode(tokens)
        se += F.mse_loss(norm.to_unit(recon), norm.to_unit(x), reduction="sum").item()
        n += x.numel()
        lap_recon += laplacian_variance(norm.to_unit(recon)).sum().item()
        lap_real += laplacian_variance(norm.to_unit(x)).sum().item()
        counts += torch.bincount(tokens.flatten(), minlength=model.c.codebook_size).float()
    mse = se / max(n, 1)
    perplexity, used = code_usage(counts)
    return {"val_psnr": psnr(mse), "val_mse": mse, "val_code_usage_fraction": used, "val_perplexity": perplexity,
            "val_sharpness_ratio": lap_recon / max(lap_real, 1e-12)}


def laplacian_variance(unit: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B,) variance of the 3x3 Laplacian of their luma: a standard focus
    measure, high for sharp edges and fine texture, low for blur."""
    luma = (unit.float() * torch.tensor([0.299, 0.587, 0.114], device=unit.device).view(1, 3, 1, 1)).sum(1, True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=unit.device).view(1, 1, 3, 3)
    return F.conv2d(luma, kernel).flatten(1).var(1)
