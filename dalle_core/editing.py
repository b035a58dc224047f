"""Token masks for editing an image: which cells of the dVAE's token grid the transformer samples (True) and which
keep a source image's codes (False), flat in raster order as `dalle_core.sampling.sample` takes them.

One masked sampler does every edit, as ru-dalle and taming-transformers complete images: inpainting samples a
region (a pixel box snapped outward to whole cells, or the white of a mask image, diffusers' convention);
outpainting places an image in a box of an empty canvas and samples everything else (the box's mask inverted);
variations resample a seeded random share of the cells; DALL-E's priming keeps the top rows (Ramesh et al. 2021).
Pixel coordinates are those of the image as the model sees it: shorter side resized to the dVAE's input size,
centre-cropped to a square (`dalle_core.images.to_rgb_square`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dalle_core.errors import UserError
from dalle_core.images import to_rgb_square, to_viewer_rgb

Region = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels: x0 <= x < x1, y0 <= y < y1


class EditError(UserError):
    """A bad edit request: a region outside the image, a mask that keeps or samples nothing, ...; one line."""


@dataclass
class Edit:
    """An edit resolved at the model's size. `image` (size, size, 3) uint8 is the source the dVAE encodes (for
    outpainting, the canvas with the image in its box); `mask` (grid, grid) bool, True = sample, is shared by
    every candidate, except for variations (None): each candidate draws its own with `keep` (`masks`).
    `source` names where the image came from (a path, or its byte count) and `digest` is its content's sha256
    (16 hex digits), for generations.parquet."""

    mode: str
    image: np.ndarray
    grid: int
    mask: np.ndarray | None = None
    keep: float | None = None
    source: str = ""
    digest: str = ""

    def masks(self, seed: int, count: int, first: int = 0) -> np.ndarray:
        """(count, grid * grid) bool: the token masks of candidates first .. first + count - 1 of a prompt sampled
        with `seed` (variations: each candidate's mask is drawn from (seed, its index), so it does not depend on
        how candidates are batched)."""
        if self.mask is not None:
            return np.broadcast_to(self.mask.reshape(1, -1), (count, self.grid * self.grid))
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


def check_region(region, size: int, name: str = "region") -> Region:
    """`region` (four whole pixels) checked to lie in a size x size image with x0 < x1 and y0 < y1; EditError
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
    if min(x0, y0) < 0 or max(x1, y1) > size:
        raise EditError(f"{shown} is outside the {size}x{size} image (pixels of the image resized to the model's "
                        f"{size} px): allowed 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}")
    return x0, y0, x1, y1


def region_cells(region: Region, size: int, grid: int) -> Region:
    """The token cells (cx0, cy0, cx1, cy1) a pixel region touches: snapped outward to whole cells of size // grid
    pixels, so a box on cell boundaries keeps its cells and one inside a cell takes the whole cell."""
    assert size % grid == 0, (size, grid)
    cell = size // grid
    x0, y0, x1, y1 = region
    return x0 // cell, y0 // cell, -(-x1 // cell), -(-y1 // cell)


def region_mask(region: Region, size: int, grid: int) -> np.ndarray:
    """(grid, grid) bool, True on the cells the region touches (`region_cells`)."""
    cx0, cy0, cx1, cy1 = region_cells(region, size, grid)
    mask = np.zeros((grid, grid), dtype=bool)
    mask[cy0:cy1, cx0:cx1] = True
    return mask


def region_edit_mask(mode: str, region, size: int, grid: int | None, name: str = "region") -> np.ndarray | None:
    """The (grid, grid) token mask (True = sample) of a region edit: inpaint samples the cells the region touches,
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


def image_mask(mask: Image.Image | np.ndarray, size: int, grid: int, name: str = "mask") -> np.ndarray:
    """A mask image (white = regenerate, black = keep, as diffusers' inpainting masks; the same size as the image
    it edits) -> (grid, grid) bool, True = sample. It is resized and cropped as the image is (`to_rgb_square`),
    then a cell is sampled when any of its pixels is light (>= 128 of 255; 16-bit masks scaled, `grey_mask`): the
    mask snapped outward. A (grid, grid)
    bool array is taken as the token mask itself. EditError if it samples or keeps nothing."""
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        if mask.shape != (grid, grid):
            raise EditError(f"{name} is a bool array of shape {mask.shape}; a token mask is ({grid}, {grid})")
        return check_mask(mask.copy(), name)
    if isinstance(mask, np.ndarray):
        mask = Image.fromarray(mask)
    grey = grey_mask(ImageOps.exif_transpose(mask))
    values = np.asarray(grey)
    if values.min() >= 128 or values.max() < 128:
        colour = "white (all regenerated, nothing kept)" if values.min() >= 128 else "black (nothing to regenerate)"
        alpha = "; its alpha channel is ignored" if "A" in mask.getbands() else ""
        raise EditError(f"{name} is all {colour}; paint the cells to regenerate white and the rest black{alpha}")
    pixels = np.asarray(to_rgb_square(grey.convert("RGB"), size))[..., 0] >= 128
    cell = size // grid
    cells = pixels.reshape(grid, cell, grid, cell).any(axis=(1, 3))
    return check_mask(cells, name)


def grey_mask(mask: Image.Image) -> Image.Image:
    """A mask image as 8-bit greyscale ("L"), alpha dropped (as diffusers does). 16-bit and 32-bit integer masks
    (modes I;16*, I: what Pillow reads a 16-bit PNG or TIFF as) are scaled from 0..65535 to 0..255, so a mask
    means the same at either depth; Pillow's own convert would clip them (1000 of 65535 would read as white)."""
    if mask.mode.startswith("I"):
        values = np.asarray(mask).astype(np.float64) / 257.0  # 65535 / 257 = 255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return mask.convert("L")


def random_mask(grid: int, keep: float, seed: int, candidate: int = 0) -> np.ndarray:
    """(grid, grid) bool for variations: round(keep * cells) cells kept (at least 1, at most all but 1), the rest
    True (sampled), chosen at random by numpy's generator seeded with (seed, candidate)."""
    if not 0 < keep < 1:
        raise EditError(f"keep is {keep}; allowed: more than 0 and less than 1 (the share of cells kept)")
    n = grid * grid
    kept = min(max(round(keep * n), 1), n - 1)
    order = np.random.default_rng([seed, candidate]).permutation(n)
    mask = np.ones(n, dtype=bool)
    mask[order[:kept]] = False
    return mask.reshape(grid, grid)


def top_rows_mask(grid: int, rows: int) -> np.ndarray:
    """(grid, grid) bool keeping the top `rows` rows (DALL-E's priming), sampling the rest."""
    mask = np.ones((grid, grid), dtype=bool)
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


def place(image: Image.Image, region: Region, size: int, grid: int) -> np.ndarray:
    """Outpainting's canvas: (size, size, 3) uint8, black, with `image` covering the region snapped outward to whole
    cells: as a viewer shows it, resized to cover the box and centre-cropped (`to_rgb_square` for a rectangle)."""
    cell = size // grid
    cx0, cy0, cx1, cy1 = region_cells(region, size, grid)
    w, h = (cx1 - cx0) * cell, (cy1 - cy0) * cell
    rgb = to_viewer_rgb(image)
    scale = max(w / rgb.width, h / rgb.height)
    nw, nh = max(w, round(rgb.width * scale)), max(h, round(rgb.height * scale))
    left, top = (nw - w) // 2, (nh - h) // 2
    box = rgb.resize((nw, nh), Image.BICUBIC).crop((left, top, left + w, top + h))
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[cy0 * cell:cy1 * cell, cx0 * cell:cx1 * cell] = np.asarray(box)
    return canvas


def outline(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 with the sampled cells of a (grid, grid) mask dimmed and their border drawn in yellow:
    what the grids show before the candidates."""
    grid = mask.shape[0]
    cell = image.shape[0] // grid
    pixels = np.kron(mask, np.ones((cell, cell), dtype=bool))  # (H, W) True on sampled pixels
    out = image.copy()
    out[pixels] = (out[pixels] * 0.45).astype(np.uint8)
    p = np.pad(pixels, 1)  # outside the image counts as kept, so a region at the image's edge is closed
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    out[pixels & ~inner] = (255, 220, 0)  # sampled pixels with a kept neighbour: the border
    return out


def pack(mask: np.ndarray) -> str:
    """A token mask as a string in raster order, '1' = sampled, '0' = kept (generations.parquet's `mask`)."""
    return "".join("1" if v else "0" for v in np.asarray(mask).reshape(-1))


def unpack(text: str, grid: int) -> np.ndarray:
    """`pack`'s string back to (grid, grid) bool."""
    return (np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")).reshape(grid, grid)


def content_digest(data: bytes | np.ndarray) -> str:
    """The first 16 hex digits of the sha256 of an image file's bytes (or an array's pixels)."""
    return hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else bytes(data)).hexdigest()[:16]
