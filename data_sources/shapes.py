"""The built-in "shapes" text-to-image dataset and its caption-faithfulness checker.

The spec is exact on purpose (other tools grade generated images against it):
black canvas, solid fills in an 8-colour palette, four shapes that fill a square
box of side s, positions as cells of a 3x3 grid, and two-object relations. The
same geometry is used to draw images and to check them. A canvas that is not
square (`image_size` (height, width)) sizes its shapes by its shorter side and
spreads its 3x3 grid over its whole width and height.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dalle_core.images import size_hw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (150, 70, 210),
    "orange": (245, 140, 35),
    "cyan": (50, 205, 215),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.28, "large": 0.47}  # box side = round(fraction * the canvas's shorter side)
PAIR_SIZE = 0.3  # box side of both objects in a two-object scene
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = tuple(
    "center" if (r, c) == ("middle", "center") else f"{r} {c}" for r in ROWS for c in COLS
)  # index = 3 * row + col
RELATIONS = ("above", "below", "to the left of", "to the right of")


def box_side(fraction: float, image_size) -> int:
    return int(round(fraction * min(size_hw(image_size))))


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    x0: int  # top-left corner of the square box, pixels
    y0: int
    side: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + self.side / 2, self.y0 + self.side / 2


def shape_mask(shape: str, x0: float, y0: float, side: float, image_size) -> np.ndarray:
    """Boolean (H, W) mask of `shape` filling the box; a pixel is in if its centre is."""
    h, w = size_hw(image_size)
    py, px = np.mgrid[0:h, 0:w] + 0.5
    cx, cy, h = x0 + side / 2, y0 + side / 2, side / 2
    inside = (px >= x0) & (px <= x0 + side) & (py >= y0) & (py <= y0 + side)
    if shape == "square":
        return inside
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= h * h
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        return inside & (np.abs(px - cx) <= (py - y0) / 2)
    if shape == "diamond":  # vertices at the midpoints of the four edges
        return np.abs(px - cx) + np.abs(py - cy) <= h
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")


def render(objects: list[Obj], image_size) -> np.ndarray:
    image = np.zeros((*size_hw(image_size), 3), dtype=np.uint8)
    for o in objects:
        image[shape_mask(o.shape, o.x0, o.y0, o.side, image_size)] = COLOURS[o.colour]
    return image


def cell_of(coord: float, length: int) -> int:
    """The third (0..2) of an axis `length` pixels long that `coord` falls in."""
    return min(2, max(0, int(coord * 3 // length)))


def position_of(obj_centre: tuple[float, float], image_size) -> str:
    h, w = size_hw(image_size)
    col, row = cell_of(obj_centre[0], w), cell_of(obj_centre[1], h)
    return POSITIONS[3 * row + col]


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """`a <relation> b` by box centres: the main-axis offset beats the cross-axis one."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # image y grows downwards
    return {
        "above": dy > abs(dx),
        "below": -dy > abs(dx),
        "to the left of": dx > abs(dy),
        "to the right of": -dx > abs(dy),
    }[relation]


def _place_in_cell(rng: np.random.Generator, cell: int, side: int, length: int) -> int:
    """A box corner whose centre falls in `cell` (0..2) of an axis `length` pixels long, away from cell edges
    when possible."""
    lo, hi = cell * length / 3, (cell + 1) * length / 3
    corners = [x for x in range(length - side + 1) if lo <= x + side / 2 < hi]
    margin = [x for x in corners if lo + 1 <= x + side / 2 <= hi - 1]
    choices = margin or corners
    assert choices, (cell, side, length)
    return int(rng.choice(choices))


def _single(rng: np.random.Generator, image_size, palette: list[str]) -> tuple[str, list[Obj]]:
    colour = str(rng.choice(palette))
    shape = str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    pos = int(rng.integers(9))
    side = box_side(SIZES[size], image_size)
    h, w = size_hw(image_size)
    obj = Obj(colour, shape, _place_in_cell(rng, pos % 3, side, w), _place_in_cell(rng, pos // 3, side, h), side)
    say_size, say_pos = rng.random() >= 1 / 3, rng.random() >= 1 / 3
    caption = "a " + (f"{size} " if say_size else "") + f"{colour} {shape}"
    caption += f" in the {POSITIONS[pos]}" if say_pos else ""
    return caption, [obj]


def _pair(rng: np.random.Generator, image_size, palette: list[str]) -> tuple[str, list[Obj]]:
    c1, c2 = (str(c) for c in rng.choice(palette, size=2, replace=False))
    s1, s2 = (str(s) for s in rng.choice(SHAPES, size=2))
    relation = str(rng.choice(RELATIONS))
    side = box_side(PAIR_SIZE, image_size)
    h, w = size_hw(image_size)
    while True:
        if h == w:  # one draw of four, as square canvases always drew them
            x1, y1, x2, y2 = rng.integers(0, w - side + 1, size=4)
        else:
            x1, x2 = rng.integers(0, w - side + 1, size=2)
            y1, y2 = rng.integers(0, h - side + 1, size=2)
        a, b = Obj(c1, s1, int(x1), int(y1), side), Obj(c2, s2, int(x2), int(y2), side)
        apart = abs(int(x1) - int(x2)) >= side + 1 or abs(int(y1) - int(y2)) >= side + 1
        dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
        clear = abs(abs(dx) - abs(dy)) >= 2  # no near-diagonal ties
        if apart and clear and relation_holds(relation, a.centre, b.centre):
            return f"a {c1} {s1} {relation} a {c2} {s2}", [a, b]


def make_scene(rng: np.random.Generator, image_size, two_object_fraction: float,
               colours: list[str] = ()) -> tuple[str, list[Obj]]:
    """One random scene and its caption, its colours drawn from `colours` (default: all of COLOURS)."""
    palette = [c for c in COLOURS if c in colours] if colours else list(COLOURS)
    if rng.random() < two_object_fraction:
        return _pair(rng, image_size, palette)
    return _single(rng, image_size, palette)


def generate(num_images: int, image_size: int | tuple[int, int] = 32, seed: int = 0, two_object_fraction: float = 0.3,
             holdout: list[str] = (), val_fraction: float = 0.05,
             colours: list[str] = ()) -> Iterator[tuple[str, str, str, np.ndarray]]:
    """Yield (id, split, caption, HxWx3 uint8 image); the same arguments give the same bytes.

    The first round(val_fraction * num_images) images are the val split. Train
    images never contain a held-out colour-shape pair; val images may. `colours`
    (default: all 8) is the palette of every image, train and val: a colour left
    out of it is in no image and no caption (the fine-tuning measurement's base,
    docs/finetuning.md). Two-object scenes need two colours.
    """
    num_val = max(1, int(round(val_fraction * num_images)))
    held = set(holdout)
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        split = "val" if i < num_val else "train"
        while True:
            caption, objects = make_scene(rng, image_size, two_object_fraction, colours)
            if split == "val" or not any(f"{o.colour} {o.shape}" in held for o in objects):
                break
        yield f"shapes-{seed}-{i:07d}", split, caption, render(objects, image_size)


# ---------------------------------------------------------------- the checker

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_SINGLE = re.compile(rf"^a (?:(small|large) )?({_C}) ({_S})(?: in the ({'|'.join(POSITIONS)}))?$")
_PAIR = re.compile(rf"^a ({_C}) ({_S}) ({'|'.join(RELATIONS)}) a ({_C}) ({_S})$")


def parse_caption(caption: str) -> dict | None:
    """The attributes a shapes caption names, or None if it is not a shapes caption."""
    caption = caption.strip().lower()
    if m := _SINGLE.match(caption):
        size, colour, shape, pos = m.groups()
        return {"objects": [(colour, shape)], "size": size, "position": pos, "relation": None}
    if m := _PAIR.match(caption):
        c1, s1, rel, c2, s2 = m.groups()
        return {"objects": [(c1, s1), (c2, s2)], "size": None, "position": None, "relation": rel}
    return None


def palette_labels(image: np.ndarray, max_dist: float = 70.0) -> np.ndarray:
    """Per pixel: 0 for black, 1..8 for the palette colours, -1 for neither."""
    palette = np.array([(0, 0, 0), *COLOURS.values()], dtype=np.float32)
    dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - palette[None, None], axis=-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > max_dist] = -1
    return labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, comp = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            comp.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


@dataclass
class Found:
    area: int
    centre: tuple[float, float]
    side: float
    shape: str


def _describe(mask: np.ndarray) -> Found:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = int(max(x1 - x0, y1 - y0))
    # The shape is the template that overlaps the mask best, drawn as the renderer draws it: a box of
    # side `side` at whole-pixel corners around the found box. Where the found box is not square, the
    # centred corner falls on half a pixel (template edges on pixel centres, one row too many), so
    # both whole-pixel placements are tried.
    bxs = {int(np.floor((x0 + x1 - side) / 2)), int(np.ceil((x0 + x1 - side) / 2))}
    bys = {int(np.floor((y0 + y1 - side) / 2)), int(np.ceil((y0 + y1 - side) / 2))}
    ious = {}
    for shape in SHAPES:
        ious[shape] = max(_iou(shape_mask(shape, bx, by, side, mask.shape), mask) for bx in bxs for by in bys)
    return Found(int(mask.sum()), ((x0 + x1) / 2, (y0 + y1) / 2), float(side), max(ious, key=ious.get))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def check(image: np.ndarray, caption: str) -> dict[str, bool]:
    """For every attribute the caption names, whether the image has it.

    Keys: colour, shape, size, position (single-object captions), relation
    (two-object captions). Colours/shapes of a pair are checked per object.
    """
    attrs = parse_caption(caption)
    if attrs is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    n = image.shape[:2]
    labels = palette_labels(image)
    min_area = max(4, int(0.15 * box_side(SIZES["small"], n) ** 2))
    names = list(COLOURS)
    found: list[Found | None] = []
    for colour, _ in attrs["objects"]:
        comp = _largest_component(labels == names.index(colour) + 1)
        found.append(_describe(comp) if comp.sum() >= min_area else None)
    result: dict[str, bool] = {}
    if len(found) == 1:
        f = found[0]
        areas = [int(_largest_component(labels == k).sum()) for k in range(1, 9)]
        result["colour"] = f is not None and f.area >= max(areas)
        result["shape"] = f is not None and f.shape == attrs["objects"][0][1]
        if attrs["size"]:
            sides = {s: box_side(fr, n) for s, fr in SIZES.items()}
            result["size"] = f is not None and min(sides, key=lambda s: abs(sides[s] - f.side)) == attrs["size"]
        if attrs["position"]:
            result["position"] = f is not None and position_of(f.centre, n) == attrs["position"]
        return result
    a, b = found
    result["colour"] = a is not None and b is not None
    result["shape"] = (a is not None and a.shape == attrs["objects"][0][1]
                       and b is not None and b.shape == attrs["objects"][1][1])
    result["relation"] = a is not None and b is not None and relation_holds(attrs["relation"], a.centre, b.centre)
    return result


def faithfulness(images: list[np.ndarray], captions: list[str]) -> dict[str, float]:
    """Share of images that have each attribute their caption names, split by scene kind.

    Keys: `<kind>.<attribute>` and `<kind>.all` for kind in single, pair, overall.
    """
    hits: dict[str, list[bool]] = defaultdict(list)
    for image, caption in zip(images, captions):
        result = check(image, caption)
        kind = "pair" if "relation" in result else "single"
        for k in (kind, "overall"):
            for attr, ok in result.items():
                hits[f"{k}.{attr}"].append(ok)
            hits[f"{k}.all"].append(all(result.values()))
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def is_shapes_caption(caption: str) -> bool:
    return parse_caption(caption) is not None


def has_pair(caption: str, pairs: list[str]) -> bool:
    parsed = parse_caption(caption)
    return parsed is not None and any(f"{c} {s}" in pairs for c, s in parsed["objects"])
