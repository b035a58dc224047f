"""The Noto Emoji build from a small fabricated emoji-datasource-google tarball in the package's real layout."""

import io
import json
import os
import stat
import tarfile

import pytest
from PIL import Image

from data_sources.emoji_set import BuildOptions, EmojiSetError, assign_splits, catalogue
from data_sources.noto_emoji import NotoEmoji, build, npm_pack
from data_sources.reader import DataSection, read_source
from tests.data_sources.emoji_sets import metadata_rows, split_by_concept

RED = (220, 30, 30, 255)
HALF_BLUE = (0, 0, 255, 128)  # half-transparent: over white it must come out light blue, not dark blue


def _png(colour) -> bytes:
    """64 px RGBA: transparent (and black underneath), a coloured square, one half-transparent blue pixel."""
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste(colour, (16, 16, 48, 48))
    im.putpixel((2, 30), HALF_BLUE)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _entry(unified: str, tones: dict[str, str] | None = None, has_img: bool = True) -> dict:
    """One emoji.json record as the package spells it (only the fields the build reads, plus a few around)."""
    e = {"name": "X", "unified": unified, "image": unified.lower() + ".png", "sheet_x": 0, "sheet_y": 0,
         "short_name": "x", "has_img_google": has_img, "has_img_apple": True}
    if tones:
        e["skin_variations"] = {key: {"unified": u, "image": u.lower() + ".png", "has_img_google": True}
                                for key, u in tones.items()}
    return e


ENTRIES = [
    _entry("1F600"),  # grinning face
    _entry("2764-FE0F"),  # red heart: VS16 in the file, not in the concept
    _entry("1F385", {"1F3FB": "1F385-1F3FB", "1F3FD": "1F385-1F3FD", "1F3FF": "1F385-1F3FF"}),  # santa claus
    _entry("1F44D", {"1F3FC": "1F44D-1F3FC", "1F3FE": "1F44D-1F3FE"}),  # thumbs up
    _entry("1F9D1-200D-1F91D-200D-1F9D1", {"1F3FB-1F3FC": "1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC"}),
    _entry("1F1E9-1F1EA"),  # flag: Germany, left out
    _entry("1F3FB"),  # a lone skin-tone modifier has no name, left out
    _entry("1F34E", has_img=False),  # no Google image, left out
    _entry("1F34C"),  # listed but its PNG is not in the tarball, left out
    *[_entry(u) for u in ("1F431", "1F436", "1F680", "1F308", "1F34B", "1F352", "1F40C", "1F41D")],
]


def _tarball(path, entries=ENTRIES, name="emoji-datasource-google", drop=("1f34c.png",)):
    """Write a gzipped tarball like `npm pack` makes: package/{package.json,emoji.json,LICENSE,README.md,img/...}."""
    members = {
        "package/LICENSE": b"The MIT License (MIT)\n\nCopyright (c) 2013 Cal Henderson\n",
        "package/README.md": b"* Android/Google/Noto images, are available under the [Apache License 2.0](x).\n",
        "package/emoji.json": json.dumps(entries).encode(),
        "package/package.json": json.dumps({"name": name, "version": "16.0.0", "license": "MIT"}).encode(),
    }
    colours = [RED, (30, 160, 40, 255), (240, 200, 20, 255), (90, 60, 200, 255)]
    images = [v["image"] for e in entries for v in [e, *(e.get("skin_variations") or {}).values()]]
    for i, image in enumerate(sorted(images)):
        if image not in drop:
            members[f"package/img/google/64/{image}"] = _png(colours[i % len(colours)])
    with tarfile.open(path, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)




OPTS = BuildOptions(val_fraction=0.3, variant_fraction=1.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("noto")
    tarball = _tarball(root / "emoji-datasource-google-16.0.0.tgz")
    out = root / "noto-64"
    return tarball, out, build(str(out), tarball, OPTS)


def test_captions_are_cldr_names_with_skin_tones_and_leave_outs_counted(built):
    _, out, summary = built
    rows = {r["file_name"]: r for r in metadata_rows(out)}
    assert set(next(iter(rows.values()))) == {"file_name", "caption", "split", "subset", "concept"}
    assert rows["images/1F600.png"]["caption"] == "grinning face"
    assert rows["images/2764-FE0F.png"]["caption"] == "red heart" and rows["images/2764-FE0F.png"]["concept"] == "2764"
    assert rows["images/1F385-1F3FF.png"]["caption"] == "santa claus: dark skin tone"
    assert rows["images/1F385-1F3FF.png"]["concept"] == rows["images/1F385.png"]["concept"] == "1F385"
    two = rows["images/1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC.png"]
    assert two["caption"] == "people holding hands: light skin tone, medium-light skin tone"
    assert two["concept"] == "1F9D1-200D-1F91D-200D-1F9D1"
    assert summary["skipped"] == {"no_image": 2, "flag_or_regional_indicator": 1, "no_unicode_name": 1}
    assert len(rows) == 19 and summary["concepts"] == 13 and sum(summary["images"].values()) == 19


def test_split_is_by_concept_with_skin_tone_seen_variants(built):
    tarball, out, summary = built
    rows = metadata_rows(out)
    train_concepts, unseen, variants = split_by_concept(rows)
    assert any("skin tone" in r["caption"] for r in variants)  # another skin tone of a trained emoji
    multi = {r["concept"] for r in rows if r["concept"] in train_concepts and "skin tone" in r["caption"]}
    assert sorted(r["concept"] for r in variants) == sorted(multi)  # variant_fraction=1: one from each, no more
    assert summary["images"] == {"train": sum(r["subset"] == "train" for r in rows), "unseen": len(unseen),
                                 "seen-variant": len(variants)}
    # the same split as the shared logic gives OpenMoji for these emoji
    source = NotoEmoji(tarball)
    items, _ = catalogue(source.sequences()[0])
    expected = assign_splits(items, OPTS)
    assert {r["file_name"]: (r["split"], r["subset"]) for r in rows} == {
        f"images/{file}.png": split for file, split in expected.items()}
    # and the pipeline's imagefolder reader takes it as it is, subsets included
    read = list(read_source(DataSection(source="imagefolder", path=str(out), image_size=64)))
    assert all(r.skip is None for r in read) and len(read) == len(rows)
    assert sorted(r.subset for r in read if r.split == "val") == sorted(r["subset"] for r in rows if r["split"] == "val")


def test_images_are_composited_on_white_and_attributed(built):
    _, out, _ = built
    with Image.open(out / "images" / "1F385.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent becomes white, not the black underneath
        blue = im.getpixel((2, 30))
        assert blue[2] == 255 and 120 <= blue[0] <= 135  # alpha 128 blended with white
    colours = set()
    for name in os.listdir(out / "images"):
        with Image.open(out / "images" / name) as im:
            colours.add(im.getpixel((32, 32)))
    assert RED[:3] in colours and len(colours) == 4
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "Noto Emoji" in attribution and "Apache License 2.0" in attribution
    assert "emoji-datasource-google 16.0.0" in attribution and "MIT" in attribution
    assert "Cal Henderson" in (out / "LICENSE-emoji-datasource.txt").read_text()
    assert "Apache License" in (out / "LICENSE-Apache-2.0.txt").read_text()  # section 4(a): the text travels


def test_same_tarball_and_options_give_the_same_bytes(built, tmp_path):
    tarball, out, summary = built
    again = tmp_path / "again"
    build(str(again), tarball, OPTS)
    for name in ["metadata.jsonl", "ATTRIBUTION.md", "build.json", *(f"images/{f}" for f in os.listdir(out / "images"))]:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert build(str(again), tarball, OPTS)["cached"] is True
    assert summary["packages"]["emoji-datasource-google"] == "16.0.0" and len(summary["tarball_sha256"]) == 64
    with pytest.raises(EmojiSetError, match="different Noto Emoji build"):
        build(str(again), tarball, BuildOptions(size=32))
    other = _tarball(tmp_path / "other.tgz", drop=("1f34c.png", "1f600.png"))
    with pytest.raises(EmojiSetError, match="different Noto Emoji build"):  # other bytes: not silently reused
        build(str(again), other, OPTS)


def test_smaller_size_and_no_skin_tones(built, tmp_path):
    tarball, _, _ = built
    summary = build(str(tmp_path / "small"), tarball, BuildOptions(size=32, skin_tones=False))
    rows = metadata_rows(tmp_path / "small")
    with Image.open(tmp_path / "small" / rows[0]["file_name"]) as im:
        assert im.size == (32, 32) and im.getpixel((0, 0)) == (255, 255, 255)
    assert not any("skin tone" in r["caption"] for r in rows) and len(rows) == 13
    # six variants, and the lone modifier (skipped for its tone before its missing name)
    assert summary["skipped"]["skin_tone_variant"] == 7 and "seen-variant" not in summary["images"]


@pytest.mark.parametrize("size", [4, 65, 128])
def test_size_outside_the_packages_images_is_one_line(built, tmp_path, size):
    tarball, _, _ = built
    with pytest.raises(EmojiSetError, match=f"size {size} is out of range for Noto's 64 px images; use 8 to 64"):
        build(str(tmp_path / "x"), tarball, BuildOptions(size=size))


def test_bad_tarballs_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tarball")
    cases = {
        str(tmp_path / "missing.tgz"): "does not exist; make one with `npm pack emoji-datasource-google@16.0.0`",
        str(tmp_path / "notes.txt"): "is not a readable npm tarball",
        _tarball(tmp_path / "twitter.tgz", name="emoji-datasource-twitter"):
            "holds the npm package 'emoji-datasource-twitter', not emoji-datasource-google",
    }
    for tarball, message in cases.items():
        with pytest.raises(EmojiSetError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            build(str(tmp_path / "out"), tarball, OPTS)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_bad_tarball_prints_one_line(tmp_path, capsys):
    from cli.main import main

    (tmp_path / "bad.tgz").write_bytes(b"\x1f\x8b\x08 truncated gzip")
    assert main(["data", "noto", "--from", str(tmp_path / "bad.tgz"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.tgz" in err[0] and "npm tarball" in err[0]


def test_without_a_tarball_npm_packs_one_and_says_when_npm_is_missing(built, tmp_path, monkeypatch):
    tarball, out, _ = built
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(EmojiSetError, match="npm is not on PATH; install Node.js's npm, or pass --from"):
        build(str(tmp_path / "out"), None, OPTS)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{path}")
    npm = bin_dir / "npm"  # a stand-in that packs the fabricated tarball into the current folder, as npm pack does
    npm.write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'pack emoji-datasource-google@16.0.0' ] || exit 3\n"
                   f"cp '{tarball}' ./emoji-datasource-google-16.0.0.tgz\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    build(str(tmp_path / "packed"), None, OPTS)
    assert (tmp_path / "packed" / "metadata.jsonl").read_bytes() == (out / "metadata.jsonl").read_bytes()
    npm.write_text("#!/bin/sh\necho 'npm error 404 Not Found - emoji-datasource-google' >&2\nexit 1\n")
    with pytest.raises(EmojiSetError, match="npm pack emoji-datasource-google@16.0.0 failed: npm error 404"):
        npm_pack(str(tmp_path))


def test_noto_config_is_the_openmoji_recipe_with_only_the_data_path_changed():
    import yaml

    from pipeline.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    with open(os.path.join(root, "openmoji.yaml")) as f:
        openmoji = yaml.safe_load(f)
    with open(os.path.join(root, "noto.yaml")) as f:
        noto = yaml.safe_load(f)
    assert noto["data"].pop("path") == "data/noto-64"
    openmoji["data"].pop("path")
    assert noto == openmoji, "configs/noto.yaml must stay configs/openmoji.yaml with data.path changed only"
    assert load_config(os.path.join(root, "noto.yaml")).data.path == "data/noto-64"
