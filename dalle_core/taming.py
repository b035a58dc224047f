"""taming-transformers' encoder and decoder (Esser et al. 2021, `taming/modules/diffusionmodules/model.py`).

Per resolution level, residual blocks (GroupNorm, swish, 3x3 convs) at width `ch * ch_mult[i]`, optional
single-head self-attention at `attn_resolutions`, a stride-2 convolution (encoder) or nearest upsampling
(decoder) between levels, and a middle block at the lowest resolution. Parameter names follow upstream, so a
VQGAN checkpoint loads into them (`dalle_core.pretrained`), and the trainable tokenizer uses the same modules
when `dvae.channel_mult` is set (`dalle_core.dvae`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)  # upstream's 32 groups; fewer for narrow nets


class _TamingResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _TamingAttn(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as upstream


class _Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _mid(ch: int, attention: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.block_2 = _TamingResBlock(ch, ch), _TamingResBlock(ch, ch)
    mid.attn_1 = _TamingAttn(ch) if attention else nn.Identity()
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class TamingEncoder(nn.Module):
    """ResNet levels (GroupNorm, swish) with attention at `attn_resolutions`, halving between levels.

    `dd` is taming's `ddconfig` (ch, ch_mult, num_res_blocks, resolution, attn_resolutions, in_channels,
    z_channels, double_z) plus `mid_attention` (default True, as upstream). (B, in_channels, H, W) ->
    (B, z_channels, H / 2**(len(ch_mult) - 1), ...)."""

    def __init__(self, dd: dict):
        super().__init__()
        ch, mult, n_res, res = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"], dd["resolution"]
        self.conv_in = nn.Conv2d(dd["in_channels"], ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, m in enumerate(mult):
            blocks, attn = [], []
            for _ in range(n_res):
                blocks.append(_TamingResBlock(c_in, ch * m))
                c_in = ch * m
                if res in dd["attn_resolutions"]:
                    attn.append(_TamingAttn(c_in))
            last = i == len(mult) - 1
            self.down.append(_level(blocks, attn, None if last else _Down(c_in), "downsample"))
            res = res if last else res // 2
        self.mid = _mid(c_in, dd.get("mid_attention", True))
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, dd["z_channels"] * (2 if dd.get("double_z") else 1), 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class TamingDecoder(nn.Module):
    """The encoder mirrored: `num_res_blocks + 1` blocks per level, nearest upsampling + a 3x3 conv between
    levels. (B, z_channels, h, w) -> (B, out_ch, h * 2**(len(ch_mult) - 1), ...)."""

    def __init__(self, dd: dict):
        super().__init__()
        ch, mult, n_res = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"]
        res = dd["resolution"] // 2 ** (len(mult) - 1)
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(dd["z_channels"], c_in, 3, padding=1)
        self.mid = _mid(c_in, dd.get("mid_attention", True))
        levels = []
        for i in reversed(range(len(mult))):
            blocks, attn = [], []
            for _ in range(n_res + 1):
                blocks.append(_TamingResBlock(c_in, ch * mult[i]))
                c_in = ch * mult[i]
                if res in dd["attn_resolutions"]:
                    attn.append(_TamingAttn(c_in))
            levels.insert(0, _level(blocks, attn, _Up(c_in) if i else None, "upsample"))
            res = res * 2 if i else res
        self.up = nn.ModuleList(levels)  # indexed by resolution level, run from the coarsest
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, dd["out_ch"], 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
