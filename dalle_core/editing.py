"""Token masks for editing an image: which cells of the dVAE's token grid the transformer samples (True) and which
keep a source image's codes (False), flat in raster order as `dalle_core.sampling.sample` takes them.

One masked sampler does every edit, as ru-dalle and taming-transformers complete images: inpainting samples a
region (a pixel box snapped outward to whole cells, or the white of a mask image, diffusers' convention);
outpainting places an image in a box of an empty canvas and samples everything else (the box's mask inverted);
variations resample a seeded random share of the cells; DALL-E's priming keeps the top rows (Ramesh et al. 2021).
Pixel coordinates are those of the image as the model sees it: resized to cover the dVAE's input size (a square,
or height x width) and centre-cropped to it (`dalle_core.images.to_rgb_sized`). A `size` or `grid` below is an int
for a square or (height, width).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dalle_core.errors import UserError
from dalle_core.images import size_hw, to_rgb_sized, to_viewer_rgb

Region = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels: x0 <= x < x1, y0 <= y < y1


class EditError(UserError):
    """A bad edit request: a region outside the image, a mask that keeps or samples nothing, ...; one line."""


@dataclass
class Edit:
    """An edit resolved at the model's size. `image` (H, W, 3) uint8 is the source the dVAE encodes (for
    outpainting, the canvas with the image in its box); `mask` (rows, cols) bool, True = sample, is shared by
    every candidate, except for variations (None): each candidate draws its own with `keep` (`masks`).
    `source` names where the image came from (a path, or its byte count) and `digest` is its content's sha256
    (16 hex digits), for generations.parquet."""

    mode: str
    image: np.ndarray
    grid: int | tuple[int, int]
    mask: np.ndarray | None = None
    keep: float | None = None
    source: str = ""
    digest: str = ""

    def masks(self, seed: int, count: int, first: int = 0) -> np.ndarray:
        """(count, rows * cols) bool: the token masks of candidates first .. first + count - 1 of a prompt sampled
        with `seed` (variations: each candidate's mask is drawn from (seed, its index), so it does not depend on
        how candidates are batched)."""
        if self.mask is not None:
            return np.broadcast_to(self.mask.reshape(1, -1), (count, self.mask.size))
        return np.stack([random_mask(self.grid, self.keep, seed, first + c).reshape(-1) for c in range(count)])

    def label(self) -> str:
        """One line naming the edit and its source, e.g. `inpaint of cat.png (sha256 3f2a...)`."""
        return f"{self.mode} of {self.source} (sha256 {self.digest})"


def parse_region(text: str, name: str = "region") -> Region:
    """'x0,y0,x1,y1' (whole pixels; spaces allowed) -> a region; EditError (one line) otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise EditError(f"{name} is {text!r}; expected x0,y0,x1,y1: four whole numbers of pixels, "
                        "e.g. 8,8,24,24") from None
    return values  # type: ignore[return-value]


def check_region(region, size: int | tuple[int, int], name: str = "region") -> Region:
    """`region` (four whole pixels) checked to lie in the image of `size` with x0 < x1 and y0 < y1; EditError
    (one line) naming the bad value and what is allowed."""
    if isinstance(region, str):
        region = parse_region(region, name)
    if (not isinstance(region, (tuple, list)) or len(region) != 4
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in region)):
        raise EditError(f"{name} is {region!r}; expected (x0, y0, x1, y1): four whole numbers of pixels")
    x0, y0, x1, y1 = (int(v) for v in region)
    shown = f"{name} {x0},{y0},{x1},{y1}"
    if x0 >= x1 or y0 >= y1:
        axis = f"x0={x0} must be less than x1={x1}" if x0 >= x1 else f"y0={y0} must be less than y1={y1}"
        raise EditError(f"{shown} is empty: {axis}")
    h, w = size_hw(size)
    if min(x0, y0) < 0 or x1 > w or y1 > h:
        frame = (f"the {w}x{h} image (pixels of the image resized to the model's {w} px)" if w == h else
                 f"the image, {w} px wide and {h} px high (the image resized to the model's size)")
        raise EditError(f"{shown} is outside {frame}: allowed 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
    return x0, y0, x1, y1


def region_cells(region: Region, size, grid) -> Region:
    """The token cells (cx0, cy0, cx1, cy1) a pixel region touches: snapped outward to whole cells of size // grid
    pixels, so a box on cell boundaries keeps its cells and one inside a cell takes the whole cell."""
    (h, w), (rows, cols) = size_hw(size), size_hw(grid)
    assert h % rows == 0 and w % cols == 0, (size, grid)
    ch, cw = h // rows, w // cols
    x0, y0, x1, y1 = region
    return x0 // cw, y0 // ch, -(-x1 // cw), -(-y1 // ch)


def region_mask(region: Region, size, grid) -> np.ndarray:
    """(rows, cols) bool, True on the cells the region touches (`region_cells`)."""
    cx0, cy0, cx1, cy1 = region_cells(region, size, grid)
    mask = np.zeros(size_hw(grid), dtype=bool)
    mask[cy0:cy1, cx0:cx1] = True
    return mask


def region_edit_mask(mode: str, region, size, grid, name: str = "region") -> np.ndarray | None:
    """The (rows, cols) token mask (True = sample) of a region edit: inpaint samples the cells the region touches,
    outpaint all the others. EditError (one line) for a region outside the image or one that leaves nothing to
    sample or nothing kept. `grid` None (not known yet): only the region is checked, and None returned."""
    region = check_region(region, size, name)
    if grid is None:
        return None
    cells = region_mask(region, size, grid)
    if mode == "outpaint":
        if cells.all():
            raise EditError(f"{name} covers all {cells.size} token cells, so nothing is left to outpaint; "
                            "make it smaller")
        return ~cells
    return check_mask(cells, name)


def image_mask(mask: Image.Image | np.ndarray, size, grid, name: str = "mask") -> np.ndarray:
    """A mask image (white = regenerate, black = keep, as diffusers' inpainting masks; the same size as the image
    it edits) -> (rows, cols) bool, True = sample. It is resized and cropped as the image is (`to_rgb_sized`),
    then a cell is sampled when any of its pixels is light (>= 128 of 255; 16-bit masks scaled, `grey_mask`): the
    mask snapped outward. A (rows, cols)
    bool array is taken as the token mask itself. EditError if it samples or keeps nothing."""
    rows, cols = size_hw(grid)
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        if mask.shape != (rows, cols):
            raise EditError(f"{name} is a bool array of shape {mask.shape}; a token mask is ({rows}, {cols})")
        return check_mask(mask.copy(), name)
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(mask)
    grey = grey_mask(ImageOps.exif_transpose(mask))
    values = np.asarray(grey)
    if values.min() >= 128 or values.max() < 128:
        colour = "white (all regenerated, nothing kept)" if values.min() >= 128 else "black (nothing to regenerate)"
        alpha = "; its alpha channel is ignored" if "A" in mask.getbands() else ""
        raise EditError(f"{name} is all {colour}; paint the cells to regenerate white and the rest black{alpha}")
    pixels = np.asarray(to_rgb_sized(grey.convert("RGB"), size))[..., 0] >= 128
    h, w = size_hw(size)
    cells = pixels.reshape(rows, h // rows, cols, w // cols).any(axis=(1, 3))
    return check_mask(cells, name)


def grey_mask(mask: Image.Image) -> Image.Image:
    """A mask image as 8-bit greyscale ("L"), alpha dropped (as diffusers does). 16-bit and 32-bit integer masks
    (modes I;16*, I: what Pillow reads a 16-bit PNG or TIFF as) are scaled from 0..65535 to 0..255, so a mask
    means the same at either depth; Pillow's own convert would clip them (1000 of 65535 would read as white)."""
    if mask.mode.startswith("I"):
        values = np.asarray(mask).astype(np.float64) / 257.0  # 65535 / 257 = 255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return mask.convert("L")


def random_mask(grid, keep: float, seed: int, candidate: int = 0) -> np.ndarray:
    """(rows, cols) bool for variations: round(keep * cells) cells kept (at least 1, at most all but 1), the rest
    True (sampled), chosen at random by numpy's generator seeded with (seed, candidate)."""
    if not 0 < keep < 1:
        raise EditError(f"keep is {keep}; allowed: more than 0 and less than 1 (the share of cells kept)")
    rows, cols = size_hw(grid)
    n = rows * cols
    kept = min(max(round(keep * n), 1), n - 1)
    order = np.random.default_rng([seed, candidate]).permutation(n)
    mask = np.ones(n, dtype=bool)
    mask[order[:kept]] = False
    return mask.reshape(rows, cols)


def top_rows_mask(grid, rows: int) -> np.ndarray:
    """(grid rows, grid cols) bool keeping the top `rows` rows (DALL-E's priming), sampling the rest."""
    mask = np.ones(size_hw(grid), dtype=bool)
    mask[:rows] = False
    return mask


def check_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """`mask` unchanged if it samples some cells and keeps others; EditError (one line) otherwise."""
    if mask.all():
        raise EditError(f"{name} covers all {mask.size} token cells, so nothing of the image is kept; "
                        "make it smaller (or generate without an image)")
    if not mask.any():
        raise EditError(f"{name} covers no token cell, so nothing is sampled; make it larger")
    return mask


def place(image: Image.Image, region: Region, size, grid) -> np.ndarray:
    """Outpainting's canvas: (H, W, 3) uint8 at the model's size, black, with `image` covering the region snapped outward to whole
    cells: as a viewer shows it, resized to cover the box and centre-cropped (`to_rgb_sized` for a rectangle)."""
    (height, width), (rows, cols) = size_hw(size), size_hw(grid)
    ch, cw = height // rows, width // cols
    cx0, cy0, cx1, cy1 = region_cells(region, size, grid)
    w, h = (cx1 - cx0) * cw, (cy1 - cy0) * ch
    rgb = to_viewer_rgb(image)
    scale = max(w / rgb.width, h / rgb.height)
    nw, nh = max(w, round(rgb.width * scale)), max(h, round(rgb.height * scale))
    left, top = (nw - w) // 2, (nh - h) // 2
    box = rgb.resize((nw, nh), Image.BICUBIC).crop((left, top, left + w, top + h))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[cy0 * ch:cy1 * ch, cx0 * cw:cx1 * cw] = np.asarray(box)
    return canvas


def outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with the sampled cells of a (rows, cols) mask dimmed and their border drawn in yellow:
    what the grids show before the candidates."""
    cell = (image.shape[0] // mask.shape[0], image.shape[1] // mask.shape[1])
    pixels = np.kron(mask, np.ones(cell, dtype=bool))  # (H, W) True on sampled pixels
    out = image.copy()
    out[pixels] = (out[pixels] * 0.45).astype(np.uint8)
    p = np.pad(pixels, 1)  # outside the image counts as kept, so a region at the image's edge is closed
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    out[pixels & ~inner] = (255, 220, 0)  # sampled pixels with a kept neighbour: the border
    return out


def pack(mask: np.ndarray) -> str:
    """A token mask as a string in raster order, '1' = sampled, '0' = kept (generations.parquet's `mask`)."""
    return "".join("1" if v else "0" for v in np.asarray(mask).reshape(-1))


def unpack(text: str, grid) -> np.ndarray:
    """`pack`'s string back to (rows, cols) bool."""
    return (np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")).reshape(size_hw(grid))


def content_digest(data: bytes | np.ndarray) -> str:
    """The first 16 hex digits of the sha256 of an image file's bytes (or an array's pixels)."""
    return hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else bytes(data)).hexdigest()[:16]
