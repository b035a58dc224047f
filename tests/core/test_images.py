import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from dalle_core.images import decode_png, png_bytes, to_viewer_rgb


@pytest.mark.parametrize("mode", ["RGB", "P", "L", "RGBA", "LA", "I;16"])
def test_decode_png_gives_pils_pixels(mode):
    """The libpng path returns exactly what PIL's convert("RGB") gives, for every PNG flavour."""
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="PNG")
    data = buf.getvalue()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = decode_png(data)
    assert got.dtype == np.uint8 and got.shape == (7, 9, 3)
    assert np.array_equal(got, want)
    assert np.array_equal(decode_png(png_bytes(rgb)), rgb)


def test_corrupt_png_raises_pils_error():
    with pytest.raises(OSError):
        decode_png(b"\x89PNG\r\n\x1a\n" + b"not a png")


# ---------------------------------------------------------------- images as files hold them -> what a viewer shows

def _file(image: Image.Image, fmt: str, **save) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return Image.open(io.BytesIO(buf.getvalue()))


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)


def _rgb_profile(red, green, blue, gamma: float = 2.2) -> bytes:
    """A minimal ICC v2 matrix/TRC display profile with the given D50 colorants."""
    trc = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"wtpt", _xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", _xyz(*red)), (b"gXYZ", _xyz(*green)),
            (b"bXYZ", _xyz(*blue)), (b"rTRC", trc), (b"gTRC", trc), (b"bTRC", trc)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


SRGB_R, SRGB_G, SRGB_B = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)


def _palette_with_transparent_index() -> Image.Image:
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    return p


VIEWER_CASES = {
    # 16-bit grey at half scale is mid-grey, not clipped to white
    "png_16bit_grey": (lambda: _file(Image.fromarray(np.full((4, 4), 32768, np.uint16)), "PNG"), (128, 128, 128)),
    "tiff_16bit_grey": (lambda: _file(Image.fromarray(np.full((4, 4), 16384, np.uint16)), "TIFF"), (64, 64, 64)),
    "tiff_32bit_int": (lambda: _file(Image.fromarray(np.full((4, 4), 65535, np.int32)), "TIFF"), (255, 255, 255)),
    "tiff_float": (lambda: _file(Image.fromarray(np.full((4, 4), 0.25, np.float32)), "TIFF"), (64, 64, 64)),
    "rgba_transparent": (lambda: _file(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),
    "rgba_half": (lambda: _file(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG"), (255, 127, 127)),
    "la_transparent": (lambda: _file(Image.new("LA", (4, 4), (0, 0)), "PNG"), (255, 255, 255)),
    "palette_transparent_png": (lambda: _file(_palette_with_transparent_index(), "PNG"), (255, 255, 255)),
    "palette_transparent_gif": (lambda: _file(_palette_with_transparent_index(), "GIF"), (255, 255, 255)),
    "rgb_colour_key": (lambda: _file(Image.new("RGB", (4, 4), (10, 20, 30)), "PNG", transparency=(10, 20, 30)),
                       (255, 255, 255)),
    "cmyk_jpeg": (lambda: _file(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG"), (0, 255, 255)),
    "cmyk_tiff": (lambda: _file(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "TIFF"), (255, 0, 255)),
    "one_bit": (lambda: _file(Image.new("1", (8, 8), 1), "BMP"), (255, 255, 255)),
    "ycbcr": (lambda: Image.new("RGB", (4, 4), (200, 100, 50)).convert("YCbCr"), (200, 100, 50)),
    # a profile whose red colorant is sRGB's green: the stored (255, 0, 0) is seen as green
    "icc_swapped_primaries": (lambda: _file(Image.new("RGB", (4, 4), (255, 0, 0)), "PNG",
                                            icc_profile=_rgb_profile(SRGB_G, SRGB_R, SRGB_B)), (0, 255, 0)),
}


@pytest.mark.parametrize("case", VIEWER_CASES)
def test_to_viewer_rgb_shows_what_a_viewer_shows(case):
    make, want = VIEWER_CASES[case]
    got = to_viewer_rgb(make())
    assert got.mode == "RGB"
    assert np.abs(np.asarray(got)[0, 0].astype(int) - want).max() <= 2, np.asarray(got)[0, 0]


def test_exif_orientation_is_applied():
    """Stored landscape with red on the left; Orientation=6 shows it portrait with red on top."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32], stored[:, 32:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    got = np.asarray(to_viewer_rgb(_file(Image.fromarray(stored), "JPEG", exif=exif, quality=95))).astype(int)
    assert got.shape == (64, 32, 3)
    assert np.abs(got[5, 16] - (255, 0, 0)).max() <= 3 and np.abs(got[60, 16] - (0, 0, 255)).max() <= 3


def test_srgb_profile_keeps_pixels():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    got = np.asarray(to_viewer_rgb(_file(Image.fromarray(rgb), "PNG", icc_profile=srgb))).astype(int)
    assert np.abs(got - rgb).max() <= 1


def test_one_psnr_in_db_of_unit_range_images():
    from dalle_core.images import PSNR_OF_IDENTICAL_IMAGES, psnr

    assert psnr(0.01) == pytest.approx(20.0) and psnr(1.0) == 0.0
    assert psnr(0.0) == PSNR_OF_IDENTICAL_IMAGES  # finite, for MLflow and JSON
