
import pytest
from PIL import Image

from data_sources.openmoji import BuildOptions, OpenMojiError, build, catalogue, tidy
from tests.data_sources.emoji_sets import metadata_rows, split_by_concept


def test_captions_are_cldr_names_without_flags():
    items, skipped = catalogue(skin_tones=True)
    by_file = {e.file: e for e in items}
    assert by_file["1F600"].caption == "grinning face"
    assert by_file["1F469-1F3FD-200D-1F373"].caption == "woman cook: medium skin tone"
    assert by_file["1F469-1F3FD-200D-1F373"].concept == by_file["1F469-200D-1F373"].concept
    assert by_file["1F201"].caption == "japanese here button"  # curly quotes tidied away
    assert "1F1E9-1F1EA" not in by_file and skipped["flag_or_regional_indicator"] > 200  # flag: Germany
    assert skipped["no_unicode_name"] > 0  # OpenMoji's private-use icons
    plain, skipped_plain = catalogue(skin_tones=False)
    assert not any("skin tone" in e.caption for e in plain)
    assert sum("skin tone" in e.caption for e in items) == len(items) - len(plain) > 1000
    assert tidy(":A_button_(blood_type):") == "a button (blood type)"


def test_subset_build_splits_by_concept_and_is_deterministic(openmoji_subset, tmp_path):
    folder, opts, summary = openmoji_subset
    rows = metadata_rows(folder)
    assert 40 <= len(rows) <= 200 and summary["concepts"] == 40
    train_concepts, unseen, variants = split_by_concept(rows)
    with Image.open(folder / rows[0]["file_name"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert "CC BY-SA 4.0" in (folder / "ATTRIBUTION.md").read_text()

    again = tmp_path / "again"
    build(str(again), opts)
    assert metadata_rows(again) == rows
    name = rows[-1]["file_name"]
    assert (again / name).read_bytes() == (folder / name).read_bytes()
    assert build(str(again), opts)["cached"] is True  # the same build is not redone
    with pytest.raises(OpenMojiError, match="different OpenMoji build"):
        build(str(again), BuildOptions(size=32, limit=40))
    with pytest.raises(OpenMojiError, match="size 4 is out of range"):
        build(str(tmp_path / "bad"), BuildOptions(size=4))
