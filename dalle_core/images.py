"""Image plumbing: PNG bytes <-> arrays <-> tensors, resize/crop, captioned grids."""

from __future__ import annotations

import functools
import io
import math
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageCms, ImageDraw, ImageFont, ImageOps


def to_viewer_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit sRGB "RGB", as an image viewer shows it.

    EXIF/XMP orientation is applied; 16-bit, 32-bit integer and float pixels are scaled to 0-255, not
    clipped; transparency (alpha, palette or colour-key) is composited onto white; an embedded ICC
    profile is converted to sRGB; CMYK, YCbCr, LAB, HSV, 1-bit and palette modes are converted. Only the
    current (first) frame of a multi-frame file is used. Raises what Pillow raises for an undecodable file.
    """
    icc = image.info.get("icc_profile")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: the stored orientation is the best we know
        pass
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if image.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in image.info:
        # Viewers, browsers and our own sample grids show transparent areas on white.
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
        image = image.convert("RGB")
    elif image.mode not in ("RGB", "L", "CMYK"):  # the modes an ICC profile can describe
        image = image.convert("L" if image.mode == "1" else "RGB")
    if icc:
        try:
            return ImageCms.applyTransform(image, _to_srgb(icc, image.mode))
        except (ImageCms.PyCMSError, OSError, ValueError):  # an unreadable profile: read the numbers as sRGB
            pass
    return image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float greyscale -> 8-bit "L", scaled over the range the data is in.

    Unsigned 16-bit (PNG/TIFF) spans 0-65535. Mode "I" and "F" carry no bit depth: values within 0-65535
    (integers) or 0-1 (floats) are read on that scale, anything else is stretched from its min to its max.
    """
    pixels = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.min() >= 0 and pixels.max() <= 65535):
        lo, hi = 0.0, 65535.0
    elif image.mode == "F" and pixels.min() >= 0 and pixels.max() <= 1:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        hi = hi if hi > lo else lo + 1
    scaled = np.nan_to_num((pixels - lo) / (hi - lo) * 255, nan=0.0)
    out = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")
    out.info = {k: v for k, v in image.info.items() if k != "transparency"}  # a 16-bit colour key no longer applies
    return out


@functools.lru_cache(maxsize=16)
def _to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform:
    """The transform from an embedded profile to sRGB (phones embed the same few profiles: kept)."""
    return ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"),
                                   mode, "RGB")


def viewer_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `image` as a viewer shows it: EXIF orientations 5 to 8 turn it a quarter, so the stored
    width and height swap (what `to_viewer_rgb` gives, without decoding any pixel)."""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: the stored orientation is the best we know
        orientation = 1
    w, h = image.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def size_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An `image_size` (or a token grid) as (height, width): an int is a square."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def compact_size(h: int, w: int) -> int | tuple[int, int]:
    """(height, width) as configs and config.json files write it: an int for a square (as before rectangles
    existed, so square runs keep their keys and files), else the pair."""
    return h if h == w else (h, w)


def size_text(size: int | tuple[int, int] | list[int]) -> str:
    """`32x64 (height x width)` for messages and labels; `32` for a square."""
    h, w = size_hw(size)
    return str(h) if h == w else f"{h}x{w} (height x width)"


def to_rgb_sized(image: Image.Image, size: int | tuple[int, int], fit: str = "crop") -> Image.Image:
    """As a viewer shows it (`to_viewer_rgb`), brought to `size` (an int: a square; (height, width)): `crop`
    resizes it to cover the frame and centre-crops, `pad` resizes it to fit inside and centres it on black."""
    image = to_viewer_rgb(image)
    th, tw = size_hw(size)
    w, h = image.size
    if (w, h) == (tw, th):
        return image
    if fit == "pad":
        scale = min(tw / w, th / h)
        nw, nh = min(tw, max(1, round(w * scale))), min(th, max(1, round(h * scale)))
        canvas = Image.new("RGB", (tw, th))
        canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
        return canvas
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return image.crop((left, top, left + tw, top + th))


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast; shards are compressed again by Parquet
    return buf.getvalue()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_png(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8.

    PNGs (all that the image shards hold) go through libpng via torchvision, about twice the
    rate of PIL on 32x32 images, same pixels (tested); anything else through PIL.
    """
    if data[:8] == _PNG_SIGNATURE:
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_png as tv_decode_png

        try:
            out = tv_decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
        except RuntimeError:
            out = None  # corrupt: PIL below raises its usual error
        if out is not None and out.dtype == torch.uint8:  # 16-bit PNGs: PIL's conversion below
            return out.permute(1, 2, 0).numpy()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def to_tensor(images: np.ndarray | torch.Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """(B, H, W, 3) uint8, numpy or a tensor on any device -> normalised (B, 3, H, W) float32 there."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = x.permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass
class ImageNormalization:
    """The per-channel pixel mean and std (torchvision's `Normalize`) that map [0, 1] images to a model's input."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, H, W) -> [0, 1] float32."""
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x.float() * s + m).clamp(0, 1)


def to_uint8_tensor(x: torch.Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> (B, H, W, 3) uint8 on the same device."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(x: torch.Tensor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> np.ndarray:
    """Normalised (B, 3, H, W) -> (B, H, W, 3) uint8 numpy."""
    return to_uint8_tensor(x, mean, std).cpu().numpy()


PSNR_OF_IDENTICAL_IMAGES = 99.0  # dB; finite, so MLflow and JSON take it


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] whose mean squared error over all pixel values is
    `mse` (peak 1: 10 log10(1 / mse)); PSNR_OF_IDENTICAL_IMAGES when mse is 0."""
    return PSNR_OF_IDENTICAL_IMAGES if mse == 0 else 10 * math.log10(1.0 / mse)


def grid(rows: list[list[np.ndarray]], captions: list[str] | None = None, scale: int = 2,
         caption_width: int = 28, header: list[str] | None = None) -> np.ndarray:
    """Tile rows of (H, W, 3) images (upscaled by `scale`, at most to 128 px), with an optional caption under
    each row and an optional label over each column (`header`)."""
    h, w = rows[0][0].shape[:2]
    scale = max(1, min(scale, 128 // max(h, w)))
    cols = max([len(r) for r in rows] + [len(header or [])])
    cell_w, cell_h = w * scale + 2, h * scale + 2
    font = ImageFont.load_default()
    line_h = 11
    head_lines = [textwrap.wrap(label, max(4, cell_w // 6)) for label in (header or [])]
    head_h = max((len(t) for t in head_lines), default=0) * line_h + (4 if header else 0)
    text_lines = [textwrap.wrap(c, max(caption_width, cols * cell_w // 6)) if c else [] for c in (captions or [])]
    text_h = [len(t) * line_h + (2 if t else 0) for t in text_lines] + [0] * (len(rows) - len(text_lines))
    canvas = Image.new("RGB", (cols * cell_w, head_h + sum(cell_h + th for th in text_h)), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(head_lines):
        for i, line in enumerate(lines):
            draw.text((c * cell_w + 2, 2 + i * line_h), line, fill=(255, 220, 120), font=font)
    y = head_h
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (c * cell_w + 1, y + 1))
        y += cell_h
        for line in text_lines[r] if r < len(text_lines) else []:
            draw.text((2, y), line, fill=(230, 230, 230), font=font)
            y += line_h
        y += 2 if r < len(text_lines) and text_lines[r] else 0
    return np.asarray(canvas)
