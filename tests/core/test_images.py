import io

import numpy as np
import pytest
from PIL import Image

from dalle_core.images import decode_png, png_bytes


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
