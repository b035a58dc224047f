"""Noto Emoji (Google's shaded, gradient style) as a captioned image set, from the npm package emoji-datasource-google.

The package (iamcal/emoji-data, MIT) holds `emoji.json` (every emoji and its skin-tone variations by code point)
and Noto Emoji's 64 px PNGs (googlefonts/noto-emoji, Apache License 2.0) under `img/google/64/`. Its tarball,
as `npm pack emoji-datasource-google@16.0.0` writes it, is read in place with `tarfile`. Captions, the concept
split and the folder are `data_sources.emoji_set`'s, so the result is laid out like the OpenMoji set and the
same run config reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections import Counter

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_sources.emoji_set import BuildOptions, EmojiSetError, emoji_data
from data_sources.emoji_set import build as build_emoji_set

PACKAGE = "emoji-datasource-google"
PACKAGE_SPEC = f"{PACKAGE}@16.0.0"  # the version the default build packs; --from accepts any version's tarball
NATIVE_SIZE = 64  # the package's largest single-emoji PNGs
IMAGE_DIR = f"package/img/google/{NATIVE_SIZE}/"
NOTO_URL = "https://github.com/googlefonts/noto-emoji"
APACHE_URL = "https://www.apache.org/licenses/LICENSE-2.0"


def npm_pack(dest: str, spec: str = PACKAGE_SPEC) -> str:
    """Run `npm pack SPEC` in the folder `dest`; the path of the tarball it wrote. One-line EmojiSetError when
    npm is missing or fails (npm serves a package it fetched before from its own cache)."""
    npm = shutil.which("npm")
    if npm is None:
        raise EmojiSetError(f"npm is not on PATH; install Node.js's npm, or pass --from a tarball made elsewhere by "
                            f"`npm pack {spec}`")
    proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=dest, capture_output=True, text=True)
    written = [f for f in os.listdir(dest) if f.endswith(".tgz")]
    if proc.returncode != 0 or len(written) != 1:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise EmojiSetError(f"npm pack {spec} failed: {why}")
    return os.path.join(dest, written[0])


class NotoEmoji:
    """The Noto Emoji PNGs of an emoji-datasource-google tarball, on white (an `emoji_set.EmojiSource`).

    Raises EmojiSetError (one line) when the tarball is missing, unreadable, or another package's.
    """

    name = "Noto Emoji"
    license = "Apache License 2.0"
    attribution = f"Noto Emoji by Google ({NOTO_URL}), Apache License 2.0"

    def __init__(self, tarball: str) -> None:
        if not os.path.isfile(tarball):
            raise EmojiSetError(f"tarball {tarball!r} does not exist; make one with `npm pack {PACKAGE_SPEC}`")
        emoji_data()  # captions need the emoji package: say so before reading 70 MB
        self.tarball = tarball
        self._files: dict[str, bytes] | None = None
        self._digest: str | None = None
        self._image_of: dict[str, str] = {}  # file id -> tarball member, filled by sequences()

    def _read(self) -> dict[str, bytes]:
        """The members the build uses, by name, from one streaming pass over the tarball."""
        if self._files is None:
            wanted = {"package/package.json", "package/emoji.json", "package/LICENSE", "package/README.md"}
            files = {}
            try:
                with tarfile.open(self.tarball, "r|*") as tar:
                    for member in tar:
                        if member.isfile() and (member.name in wanted or member.name.startswith(IMAGE_DIR)):
                            files[member.name] = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                raise EmojiSetError(f"{self.tarball!r} is not a readable npm tarball ({err}); make one with "
                                    f"`npm pack {PACKAGE_SPEC}`") from None
            self._files = files
            meta = self._json("package/package.json")
            if not isinstance(meta, dict) or meta.get("name") != PACKAGE:
                got = meta.get("name") if isinstance(meta, dict) else meta
                raise EmojiSetError(f"{self.tarball!r} holds the npm package {got!r}, not {PACKAGE}; make one with "
                                    f"`npm pack {PACKAGE_SPEC}`")
            self.version = str(meta.get("version"))
        return self._files

    def _json(self, name: str):
        raw = self._files.get(name)
        if raw is None:
            raise EmojiSetError(f"{self.tarball!r} has no {name}; it is not an {PACKAGE} tarball "
                                f"(`npm pack {PACKAGE_SPEC}` makes one)")
        try:
            return json.loads(raw)
        except ValueError as err:
            raise EmojiSetError(f"{name} in {self.tarball!r} is not valid JSON ({err})") from None

    def provenance(self) -> dict:
        from importlib.metadata import version

        self._read()
        return {"packages": {PACKAGE: self.version, "emoji": version("emoji"), "pillow": version("pillow")},
                "tarball_sha256": self._sha256()}

    def _sha256(self) -> str:
        if self._digest is None:
            sha = hashlib.sha256()
            with open(self.tarball, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            self._digest = sha.hexdigest()
        return self._digest

    def sequences(self) -> tuple[list[tuple[str, list[int]]], Counter]:
        """Every emoji and skin-tone variation of emoji.json with a Google image, by its `unified` code points."""
        files = self._read()
        entries = self._json("package/emoji.json")
        if not isinstance(entries, list):
            raise EmojiSetError(f"package/emoji.json in {self.tarball!r} is not a list of emoji")
        skipped: Counter = Counter()
        self._image_of = {}
        for entry in entries:
            for e in [entry, *(entry.get("skin_variations") or {}).values()]:
                member = IMAGE_DIR + str(e.get("image"))
                if not e.get("has_img_google") or member not in files:
                    skipped["no_image"] += 1
                    continue
                self._image_of[str(e["unified"]).upper()] = member
        out = []
        for file in sorted(self._image_of):
            try:
                out.append((file, [int(h, 16) for h in file.split("-")]))
            except ValueError:
                raise EmojiSetError(f"emoji.json in {self.tarball!r} has a malformed code point sequence "
                                    f"{file!r}; expected hex code points joined by '-'") from None
        return out, skipped

    def image(self, file: str, size: int) -> np.ndarray:
        """The PNG composited on white, resized with Lanczos when `size` is not the native 64 px."""
        member = self._image_of[file]
        try:
            with Image.open(io.BytesIO(self._files[member])) as im:
                rgba = im.convert("RGBA")
        except (UnidentifiedImageError, OSError) as err:
            raise EmojiSetError(f"{member} in {self.tarball!r} is not a readable PNG ({err})") from None
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(rgb)

    def write_attribution(self, folder: str) -> None:
        files = self._read()
        if "package/LICENSE" in files:
            with open(os.path.join(folder, "LICENSE-emoji-datasource.txt"), "wb") as f:
                f.write(files["package/LICENSE"])
        # Apache 2.0 section 4(a): a copy of the licence goes with the images (the package links it only)
        shutil.copyfile(os.path.join(os.path.dirname(__file__), "licenses", "Apache-2.0.txt"),
                        os.path.join(folder, "LICENSE-Apache-2.0.txt"))
        readme = files.get("package/README.md", b"").decode("utf-8", "replace").splitlines()
        says = [line.strip(" *") for line in readme if "Noto" in line and "Apache" in line]
        quote = f'; the package\'s README says: "{says[0]}"' if says else ""
        sha = self._sha256()
        with open(os.path.join(folder, "ATTRIBUTION.md"), "w", encoding="utf-8") as f:
            f.write(f"{self.attribution}.\n\n"
                    f"Licence of the images: Apache License 2.0 ({APACHE_URL}, copied as LICENSE-Apache-2.0.txt)"
                    f"{quote}\n"
                    f"Source: the npm package {PACKAGE} {self.version} (https://github.com/iamcal/emoji-data, "
                    f"MIT licence, copied as LICENSE-emoji-datasource.txt), its {IMAGE_DIR.removeprefix('package/')} "
                    f"PNGs; tarball sha256 {sha}.\n"
                    "Captions are Unicode CLDR short names (emoji package).\n"
                    "Changes: composited on white and, at sizes other than 64 px, resized (Lanczos); flags, lone "
                    "skin-tone modifiers and images without a Unicode name left out.\n")


def build(out: str, tarball: str | None = None, opts: BuildOptions = BuildOptions(), progress=None) -> dict:
    """Write the Noto Emoji imagefolder at `out` from an emoji-datasource-google tarball (None: `npm pack` one
    into a temporary folder first) unless an identical build is already there; its summary (see
    `emoji_set.build`). Sizes 8 to 64 px (the package's images are 64 px; larger would only upsample)."""
    if not 8 <= opts.size <= NATIVE_SIZE:
        raise EmojiSetError(f"size {opts.size} is out of range for Noto's {NATIVE_SIZE} px images; "
                            f"use 8 to {NATIVE_SIZE} pixels")
    opts.check()
    if tarball is None:
        with tempfile.TemporaryDirectory(prefix="dalle-noto-") as tmp:
            return build_emoji_set(out, opts, NotoEmoji(npm_pack(tmp)), progress)
    return build_emoji_set(out, opts, NotoEmoji(tarball), progress)
