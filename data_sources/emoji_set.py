"""Emoji as a captioned image set: what every emoji source shares (concepts, skin tones, captions, split, folder).

A source (OpenMoji's SVGs in `data_sources.openmoji`, Noto's PNGs in `data_sources.noto_emoji`) lists its images by
Unicode code points and draws each one; this module names them with the `emoji` package's English CLDR short
names, splits them by concept (the emoji with its skin tones removed: val holds concepts the model never saw,
"unseen", plus for some trained concepts one other variant, "seen-variant", e.g. another skin tone), and writes an
ordinary imagefolder: `metadata.jsonl` (file_name, caption, split, subset, concept), PNGs on white,
ATTRIBUTION.md and `build.json`. The same upstream bytes and options give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from dalle_core.errors import UserError

SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone", 0x1F3FD: "medium skin tone",
              0x1F3FE: "medium-dark skin tone", 0x1F3FF: "dark skin tone"}
VS16 = 0xFE0F  # emoji presentation selector: spelled differently between sources and the emoji package
BUILD_VERSION = 1  # bump when what the build writes changes


class EmojiSetError(UserError):
    """A package is missing, the upstream files are not what the build reads, or an option is out of range."""


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
            raise EmojiSetError(f"size {self.size} is out of range; use 8 to 1024 pixels")
        if not 0 <= self.val_fraction < 1:
            raise EmojiSetError(f"val_fraction {self.val_fraction} is out of range; use 0 <= val_fraction < 1")
        if not 0 <= self.variant_fraction <= 1:
            raise EmojiSetError(f"variant_fraction {self.variant_fraction} is out of range; use 0 to 1")
        if self.limit is not None and self.limit < 2:
            raise EmojiSetError(f"limit {self.limit} is too small; use at least 2 concepts")


@dataclass(frozen=True)
class Emoji:
    file: str  # the image's id: code points in upper-case hex, e.g. 1F469-1F3FD-200D-1F373
    caption: str
    concept: str  # the code points without skin tones or VS16: every variant of one concept shares it


class EmojiSource(Protocol):
    """One upstream emoji image set, as the shared build reads it."""

    name: str  # for messages, e.g. "OpenMoji"
    attribution: str  # one line, printed after a build
    license: str  # the images' licence, e.g. "CC BY-SA 4.0"

    def provenance(self) -> dict:
        """What identifies the upstream bytes (package versions, ...): a build with other provenance is redone."""

    def sequences(self) -> tuple[list[tuple[str, list[int]]], Counter]:
        """(file id, code points) for every image the source has, sorted by id; and what it left out, by reason."""

    def image(self, file: str, size: int) -> np.ndarray:
        """The image `file` as (size, size, 3) uint8 composited on white."""

    def write_attribution(self, folder: str) -> None:
        """ATTRIBUTION.md (and any licence file) into `folder`."""


def emoji_data() -> dict:
    """The `emoji` package's table: emoji string -> {"en": ":CLDR_short_name:", ...}; one line when missing."""
    try:
        import emoji
    except ImportError:
        raise EmojiSetError("emoji captions need the emoji package (emoji is missing): "
                            "pip install -e '.[openmoji]'") from None
    return emoji.EMOJI_DATA


def tidy(name: str) -> str:
    """':Japanese_“here”_button:' -> 'japanese here button'."""
    name = name.strip(":").replace("_", " ").lower()
    name = "".join(" " if ch in "\"“”‘’" else ch for ch in name)
    return " ".join(name.split())


def _name(table: dict, cps: list[int]) -> str | None:
    """The CLDR short name of a code point sequence, however its VS16s are spelled; None for private use."""
    bare = [c for c in cps if c != VS16]
    tries = [cps, bare, bare[:1] + [VS16] + bare[1:]]
    for seq in tries:
        entry = table.get("".join(map(chr, seq)))
        if entry:
            return tidy(entry["en"])
    if len(bare) == 1:  # a non-emoji Unicode symbol a source also draws (e.g. circled digits)
        name = unicodedata.name(chr(bare[0]), "")
        return tidy(name) or None
    return None


def catalogue(sequences: Iterable[tuple[str, list[int]]], skin_tones: bool = True) -> tuple[list[Emoji], Counter]:
    """Caption every (file id, code points) pair with its CLDR short name ("woman cook: medium skin tone").

    Flags (regional indicators, tag sequences), skin-tone variants when `skin_tones` is False, and sequences with
    no Unicode name (private use, a lone skin-tone modifier) are left out and counted by reason. Returns the
    captioned emoji in input order and the counts. Captions follow the emoji package's English CLDR names.
    """
    table = emoji_data()
    skipped: Counter = Counter()
    out = []
    for file, cps in sequences:
        if any(0x1F1E6 <= c <= 0x1F1FF or 0xE0020 <= c <= 0xE007F for c in cps):
            skipped["flag_or_regional_indicator"] += 1
            continue
        tones = [SKIN_TONES[c] for c in cps if c in SKIN_TONES]
        if tones and not skin_tones:
            skipped["skin_tone_variant"] += 1
            continue
        base = [c for c in cps if c not in SKIN_TONES]
        name = _name(table, base)
        if not name:
            skipped["no_unicode_name"] += 1
            continue
        caption = f"{name}: {', '.join(dict.fromkeys(tones))}" if tones else name
        out.append(Emoji(file, caption, "-".join(f"{c:X}" for c in base if c != VS16)))
    return out, skipped


def _unit(text: str, seed: int) -> float:
    return int(hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def choose_concepts(items: list[Emoji], opts: BuildOptions) -> list[Emoji]:
    """The emoji of at most `opts.limit` concepts, chosen by a hash of the concept (all of them when None)."""
    if opts.limit is None:
        return items
    concepts = sorted({e.concept for e in items}, key=lambda c: _unit("limit:" + c, opts.seed))[:opts.limit]
    keep = set(concepts)
    return [e for e in items if e.concept in keep]


def assign_splits(items: list[Emoji], opts: BuildOptions) -> dict[str, tuple[str, str]]:
    """file -> (split, subset). Unseen concepts go to val whole; a seen-variant is one variant of a train concept.

    A concept is unseen with probability `val_fraction` (by a hash of the concept and `seed`, so a concept's
    variants never straddle the split); a train concept with more than one variant gives one of them, chosen by
    hash, to val as "seen-variant" with probability `variant_fraction`. The rest is ("train", "train").
    """
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


def build(out: str, opts: BuildOptions, source: EmojiSource,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the imagefolder of `source` at `out` (atomically) unless an identical build is already there.

    Returns the summary written to `build.json` (build_version, options, the source's provenance, images per
    subset, concepts, skipped by reason, attribution, license) plus `cached`. Raises EmojiSetError when an option
    is out of range or `out` holds something else. `progress(done, total)` is called after each image.
    """
    opts.check()
    want = {"build_version": BUILD_VERSION, "options": asdict(opts), **source.provenance()}
    summary_path = os.path.join(out, "build.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            have = json.load(f)
        if {k: have.get(k) for k in want} == want:
            return {**have, "cached": True}
        raise EmojiSetError(f"{out!r} holds a different {source.name} build ({have.get('options')}); "
                            "remove it or choose another folder")
    if os.path.exists(out) and os.listdir(out):
        raise EmojiSetError(f"{out!r} exists and holds no {source.name} build; choose an empty or new folder")

    sequences, skipped = source.sequences()
    items, named_skips = catalogue(sequences, opts.skin_tones)
    skipped = Counter(skipped)
    skipped.update(named_skips)
    items = choose_concepts(items, opts)
    splits = assign_splits(items, opts)
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "images"))
    counts: Counter = Counter()
    with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for i, e in enumerate(items):
            image = source.image(e.file, opts.size)
            assert image.shape == (opts.size, opts.size, 3) and image.dtype == np.uint8, (e.file, image.shape)
            name = f"images/{e.file}.png"
            Image.fromarray(image).save(os.path.join(tmp, name), optimize=False, compress_level=6)
            split, subset = splits[e.file]
            counts[subset] += 1
            meta.write(json.dumps({"file_name": name, "caption": e.caption, "split": split, "subset": subset,
                                   "concept": e.concept}, ensure_ascii=False) + "\n")
            if progress:
                progress(i + 1, len(items))
    source.write_attribution(tmp)
    summary = {**want, "images": dict(counts), "concepts": len({e.concept for e in items}),
               "skipped": dict(skipped), "attribution": source.attribution, "license": source.license}
    with open(os.path.join(tmp, "build.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if os.path.exists(out):
        os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    return {**summary, "cached": False}
