"""LPIPS (Zhang et al. 2018), the perceptual distance VQGAN adds to its reconstruction loss, from local weights.

VGG16's ReLU outputs at five depths, each unit-normalised over channels; the squared difference of two images'
features is weighted per channel by LPIPS' learned linear layers, averaged over positions and summed over the
five depths. Nothing is downloaded: the VGG16 weights (torchvision's state dict) and the linear layers (the
`vgg.pth` that ships with the `lpips` package) come from files the user names.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from dalle_core.errors import UserError

# LPIPS' input scaling of [-1, 1] images (its ScalingLayer), and the VGG16 feature indices after each block's
# last ReLU (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAPS = (3, 8, 15, 22, 29)
WIDTHS = (64, 128, 256, 512, 512)


class PerceptualError(UserError):
    """Missing or mismatched perceptual weights; the message is one line."""


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        vgg = torchvision.models.vgg
        self.features = vgg.make_layers(vgg.cfgs["D"])[:TAPS[-1] + 1]  # VGG16's convolutions, not its classifier
        self.lin = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in WIDTHS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)  # a fixed loss: gradients flow to the images only

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B,) distances."""
        x = torch.cat([a, b]).float()
        h = (x - self.shift) / self.scale
        total = x.new_zeros(a.shape[0])
        start = 0
        for tap, lin in zip(TAPS, self.lin, strict=True):
            h = self.features[start:tap + 1](h)
            start = tap + 1
            f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fa, fb = f.chunk(2)
            total = total + lin((fa - fb).pow(2)).mean((1, 2, 3))
        return total


def load_lpips(vgg_path: str | Path, lin_path: str | Path | None = None) -> LPIPS:
    """LPIPS from torchvision VGG16 weights at `vgg_path` and linear layers at `lin_path` (default: the `vgg.pth`
    inside an installed `lpips` package)."""
    if lin_path is None:
        try:
            import lpips  # only for the file it ships; its own loader would download VGG16
        except ImportError:
            raise PerceptualError("dvae.perceptual_lpips: not set and the lpips package is not installed; give the "
                                  "path of LPIPS' vgg.pth (pip install lpips ships it)") from None
        lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    model = LPIPS()
    vgg = _read(vgg_path, "dvae.perceptual_vgg")
    vgg = {k.removeprefix("features."): v for k, v in vgg.items() if not k.startswith("classifier.")}
    lin = _read(lin_path, "dvae.perceptual_lpips")
    lin = {f"{k[3]}.weight": v for k, v in lin.items() if k.startswith("lin") and k.endswith(".weight")}
    try:
        model.features.load_state_dict({k: v for k, v in vgg.items() if int(k.split(".")[0]) <= TAPS[-1]})
        model.lin.load_state_dict(lin)
    except (RuntimeError, ValueError) as e:
        raise PerceptualError(f"dvae.perceptual_vgg / perceptual_lpips: the weights do not fit VGG16 + LPIPS: "
                              f"{str(e).splitlines()[0]}") from None
    return model.eval()


def _read(path: str | Path, setting: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PerceptualError(f"{setting}: {p} does not exist (nothing is downloaded; give a local file)")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same user error
        raise PerceptualError(f"{setting}: cannot read {p}: {str(e).splitlines()[0]}") from None
