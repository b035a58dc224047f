import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_sources.reader import DataError, DataSection, read_source, source_fingerprint


def _png(colour=(200, 100, 50), size=(12, 10), fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt, **save)
    return buf.getvalue()


def _folder_cfg(folder, **kw) -> DataSection:
    return DataSection(source="imagefolder", path=str(folder), image_size=8, val_fraction=0.5, **kw)


def _captioned_folder(folder, n=3):
    folder.mkdir()
    for i in range(n):
        (folder / f"{i}.png").write_bytes(_png())
    (folder / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{i}.png,photo {i}\n" for i in range(n)))
    return folder


# ---------------------------------------------------------------- fingerprint of a source's content

def test_fingerprint_follows_the_folder_content(tmp_path):
    folder = _captioned_folder(tmp_path / "f")
    cfg = _folder_cfg(folder)
    first = source_fingerprint(cfg)
    assert first == source_fingerprint(cfg)
    (folder / ".DS_Store").write_bytes(b"finder")  # not data
    assert source_fingerprint(cfg) == first

    seen = {first}
    meta = folder / "metadata.csv"
    st = meta.stat()
    meta.write_text(meta.read_text().replace("photo 1", "photo X"))  # same size
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns))  # and same mtime: the content still counts
    seen.add(source_fingerprint(cfg))
    os.utime(folder / "0.png", ns=(1, 10**18))  # touched image
    seen.add(source_fingerprint(cfg))
    (folder / "sub").mkdir()
    (folder / "sub" / "new.webp").write_bytes(_png(fmt="WEBP"))  # added image
    seen.add(source_fingerprint(cfg))
    assert len(seen) == 4


def test_fingerprint_of_txt_captions_and_file_sources(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "a.txt").write_text("a cat")
    cfg = _folder_cfg(folder)
    before = source_fingerprint(cfg)
    (folder / "a.txt").write_text("a black cat")
    assert source_fingerprint(cfg) != before

    pq.write_table(pa.table({"image": [_png()], "caption": ["x"]}), tmp_path / "d.parquet")
    pcfg = DataSection(source="parquet", path=str(tmp_path / "*.parquet"))
    before = source_fingerprint(pcfg)
    os.utime(tmp_path / "d.parquet", ns=(1, 10**18))
    assert source_fingerprint(pcfg) != before
    assert source_fingerprint(DataSection()) is None  # shapes: the config says all


def test_parquet_image_paths_are_relative_to_the_parquet_file(tmp_path, monkeypatch):
    """A Parquet source naming its images by path finds them beside itself, whatever the working directory;
    a missing one is skipped naming the path that was looked for. Row ids run on across files."""
    for part, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0))):
        (tmp_path / "data" / part / "img").mkdir(parents=True)
        (tmp_path / "data" / part / "img" / "x.png").write_bytes(_png(colour))
        pq.write_table(pa.table({"image": ["img/x.png", "img/gone.png"], "caption": [f"{part} x", f"{part} gone"]}),
                       tmp_path / "data" / part / "rows.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rows = list(read_source(DataSection(source="parquet", path=str(tmp_path / "data"), image_size=8)))
    assert [r.caption for r in rows if r.skip is None] == ["a x", "b x"]
    assert [tuple(r.image[0, 0]) for r in rows if r.skip is None] == [(200, 0, 0), (0, 200, 0)]
    assert [r.tried for r in rows if r.skip == "missing_file"] == [
        str(tmp_path / "data" / p / "img" / "gone.png") for p in ("a", "b")]
    assert [r.id for r in rows] == [f"parquet-{i:08d}" for i in range(4)]


# ---------------------------------------------------------------- metadata files as spreadsheets write them

def test_metadata_csv_with_excel_bom_reads_every_row(tmp_path):
    folder = _captioned_folder(tmp_path / "bom")
    text = (folder / "metadata.csv").read_text()
    (folder / "metadata.csv").write_bytes(text.encode("utf-8-sig"))
    recs = list(read_source(_folder_cfg(folder)))
    assert [(r.id, r.caption, r.skip) for r in recs] == [(f"{i}.png", f"photo {i}", None) for i in range(3)]


def test_metadata_semicolon_tsv_and_parquet(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "x.png").write_bytes(_png())
    (folder / "metadata.csv").write_text("file_name;caption\nx.png;a semicolon row\n")
    assert [r.caption for r in read_source(_folder_cfg(folder))] == ["a semicolon row"]
    (folder / "metadata.csv").unlink()
    (folder / "metadata.tsv").write_text("file_name\tcaption\nx.png\ta tab, with a comma\n")
    assert [r.caption for r in read_source(_folder_cfg(folder))] == ["a tab, with a comma"]
    (folder / "metadata.tsv").unlink()
    pq.write_table(pa.table({"file_name": ["x.png"], "text": ["from parquet"]}), folder / "metadata.parquet")
    assert [r.caption for r in read_source(_folder_cfg(folder))] == ["from parquet"]


def test_metadata_without_the_needed_columns_names_what_it_has(tmp_path):
    folder = tmp_path / "cols"
    folder.mkdir()
    (folder / "metadata.csv").write_text("image,description\nx.png,hello\n")
    with pytest.raises(DataError, match=r"has columns \['image', 'description'\].*data.caption_column"):
        list(read_source(_folder_cfg(folder)))
    (folder / "metadata.csv").write_bytes("file_name,caption\nx.png,caf\xe9\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"not UTF-8 \(byte 0xe9"):
        list(read_source(_folder_cfg(folder)))


# ---------------------------------------------------------------- which files an imagefolder reads, and why not

def test_imagefolder_reads_every_format_pillow_reads(tmp_path):
    folder = tmp_path / "formats"
    folder.mkdir()
    files = {"a.bmp": "BMP", "b.tif": "TIFF", "c.webp": "WEBP", "d.tga": "TGA", "e.ppm": "PPM", "f.jpe": "JPEG",
             "g.PNG": "PNG", "h.qoi": "QOI"}
    for name, fmt in files.items():
        (folder / name).write_bytes(_png(fmt=fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        (folder / name).with_suffix(".txt").write_text(f"a {fmt} file")
    recs = list(read_source(_folder_cfg(folder)))
    assert sorted(r.id for r in recs) == sorted(files)
    for r in recs:
        assert r.skip is None and np.abs(r.image[4, 4].astype(int) - (200, 100, 50)).max() <= 3, r.id


def test_multi_frame_keeps_first_and_big_images_are_counted(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    (folder / "anim.gif").write_bytes(buf.getvalue())
    (folder / "big.png").write_bytes(_png(size=(64, 64)))
    (folder / "metadata.jsonl").write_text('{"file_name": "anim.gif", "caption": "two frames"}\n'
                                           '{"file_name": "big.png", "caption": "too many pixels"}\n')
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice this: a decompression bomb
    anim, big = read_source(_folder_cfg(folder))
    assert anim.skip is None and anim.note == "multi_frame_first_used" and tuple(anim.image[0, 0]) == (255, 0, 0)
    assert big.skip == "too_large" and big.image is None


def test_big_jpeg_decodes_at_reduced_scale_with_right_pixels(tmp_path):
    folder = tmp_path / "jpeg"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(_png(size=(800, 600), fmt="JPEG", quality=95))
    (folder / "big.txt").write_text("big")
    (rec,) = read_source(_folder_cfg(folder))
    assert rec.image.shape == (8, 8, 3) and np.abs(rec.image.astype(int) - (200, 100, 50)).max() <= 3


def test_fingerprint_sees_changes_inside_a_symlinked_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_bytes(_png())
    (outside / "a.txt").write_text("a photo")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    cfg = _folder_cfg(folder)
    assert [r.id for r in read_source(cfg)] == ["linked/a.png"]
    before = source_fingerprint(cfg)
    (outside / "b.png").write_bytes(_png())
    (outside / "b.txt").write_text("b photo")
    assert [r.id for r in read_source(cfg)] == ["linked/a.png", "linked/b.png"]
    assert source_fingerprint(cfg) != before


def test_captioned_files_pillow_cannot_read_are_counted(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "ok.png").write_bytes(_png())
    (folder / "ok.txt").write_text("a photo")
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "phone.txt").write_text("a phone photo")
    (folder / "notes.md").write_text("not data: no caption beside it")
    assert sorted((r.id, r.skip) for r in read_source(_folder_cfg(folder))) == [
        ("ok.png", None), ("phone.heic", "unsupported_format")]
    meta = _captioned_folder(tmp_path / "meta", n=1)
    (meta / "clip.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (meta / "metadata.csv").write_text("file_name,caption\n0.png,photo 0\nclip.heic,a phone photo\n")
    assert [(r.id, r.skip) for r in read_source(_folder_cfg(meta))] == [
        ("0.png", None), ("clip.heic", "unsupported_format")]


@pytest.mark.parametrize("head", ["\n\n", "sep=;\n", "\r\nsep=;\r\n"])
def test_metadata_csv_with_blank_lines_or_excels_separator_line(tmp_path, head):
    folder = _captioned_folder(tmp_path / "csv")
    (folder / "metadata.csv").write_text(head + "file_name;caption\n" + "".join(f"{i}.png;photo {i}, left\n"
                                                                             for i in range(3)))
    recs = list(read_source(_folder_cfg(folder)))
    assert [(r.id, r.caption, r.skip) for r in recs] == [(f"{i}.png", f"photo {i}, left", None) for i in range(3)]
