"""Token masks for editing (dalle_core/editing.py) and the edit requests that build them (dalle_core.generate.load_edit):
region snapping, mask images, seeded variations, outpainting's canvas, and the one-line errors."""

import numpy as np
import pytest
from PIL import Image

from dalle_core.editing import Edit, outline, pack, random_mask, region_mask, unpack
from dalle_core.generate import load_edit
from dalle_core.images import to_rgb_sized
from dalle_core.sampling import GenerationError

SIZE, GRID = 32, 8  # the tiny config: 32 px images, an 8 x 8 token grid, 4 px cells


def _cells(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(y), int(x)) for y, x in zip(*np.nonzero(mask))}


def _png(path, size=(40, 30), colour=(200, 30, 30), mode="RGB"):
    Image.new(mode, size, colour).save(path)
    return str(path)


def test_a_region_on_cell_boundaries_keeps_its_cells_and_one_inside_a_cell_takes_the_whole_cell():
    assert _cells(region_mask((4, 8, 12, 12), SIZE, GRID)) == {(2, 1), (2, 2)}  # x 4-12 = cells 1, 2; y 8-12 = 2
    assert _cells(region_mask((5, 9, 6, 10), SIZE, GRID)) == {(2, 1)}  # one pixel inside cell (row 2, col 1)
    assert _cells(region_mask((3, 3, 5, 5), SIZE, GRID)) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # straddles 4 cells
    assert region_mask((0, 0, 32, 32), SIZE, GRID).all()


def test_an_inpainting_region_samples_its_cells_and_keeps_the_others(tmp_path):
    gradient = np.stack([*np.meshgrid(np.arange(40) * 6, np.arange(30) * 8), np.full((30, 40), 9)], -1)
    Image.fromarray(gradient.astype(np.uint8)).save(tmp_path / "a.png")
    edit = load_edit(SIZE, GRID, edit_image=str(tmp_path / "a.png"), region="6,0,13,4")
    with Image.open(tmp_path / "a.png") as im:  # the source as every input image: shorter side resized, centre crop
        assert edit.mode == "inpaint" and np.array_equal(edit.image, np.asarray(to_rgb_sized(im, SIZE)))
    assert _cells(edit.mask) == {(0, 1), (0, 2), (0, 3)}
    assert np.array_equal(edit.masks(seed=3, count=2), np.stack([edit.mask.reshape(-1)] * 2))


def test_a_mask_image_is_resized_and_cropped_as_the_image_then_snapped_outward(tmp_path):
    """A 96x64 mask (the image's size) is resized to 48x32 and centre-cropped by 8 px, as the image is, so its
    white box x 36-60, y 20-28 lands on pixels x 10-22, y 10-14 of the 32 px image: cells 2-5 and rows 2-3."""
    mask = np.zeros((64, 96), np.uint8)
    mask[20:28, 36:60] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    edit = load_edit(SIZE, GRID, edit_image=_png(tmp_path / "a.png", (96, 64)), mask=str(tmp_path / "mask.png"))
    assert _cells(edit.mask) == {(y, x) for y in (2, 3) for x in (2, 3, 4, 5)}
    token_mask = np.zeros((GRID, GRID), bool)  # a bool token grid is the mask itself
    token_mask[7, 7] = True
    assert _cells(load_edit(SIZE, GRID, edit_image=_png(tmp_path / "a.png"), mask=token_mask).mask) == {(7, 7)}


def test_outpainting_places_the_image_in_the_box_and_samples_everything_else(tmp_path):
    edit = load_edit(SIZE, GRID, outpaint_image=_png(tmp_path / "a.png", (30, 30), (10, 200, 90)), region=(9, 8, 23, 24))
    box = np.zeros((SIZE, SIZE), bool)
    box[8:24, 8:24] = True  # x 9-23 snapped outward to cells 2-5
    assert (edit.image[box] == (10, 200, 90)).all() and (edit.image[~box] == 0).all()
    assert _cells(~edit.mask) == {(y, x) for y in range(2, 6) for x in range(2, 6)}


def test_variations_keep_a_seeded_share_per_candidate_independent_of_batching(tmp_path):
    edit = load_edit(SIZE, GRID, variations=_png(tmp_path / "a.png"), keep=0.25)
    assert edit.mask is None and edit.keep == 0.25
    masks = edit.masks(seed=11, count=4)
    assert masks.shape == (4, GRID * GRID) and ((~masks).sum(axis=1) == 16).all()  # a quarter of 64 cells kept
    assert len({m.tobytes() for m in masks}) == 4  # each candidate its own
    assert np.array_equal(masks, np.concatenate([edit.masks(11, 2, 0), edit.masks(11, 2, 2)]))
    assert not np.array_equal(masks, edit.masks(seed=12, count=4))
    assert (~random_mask(GRID, 0.001, 0)).sum() == 1 and random_mask(GRID, 0.999, 0).sum() == 1  # never all or none


def test_priming_is_the_top_rows_mask(tmp_path):
    edit = load_edit(SIZE, GRID, prime_image=_png(tmp_path / "a.png"), prime_rows=3)
    assert edit.mode == "prime" and not edit.mask[:3].any() and edit.mask[3:].all()
    assert load_edit(SIZE, GRID, prime_image=_png(tmp_path / "a.png")).mask[:4].sum() == 0  # default: half


def test_the_outline_dims_and_borders_the_sampled_cells_only():
    image = np.full((SIZE, SIZE, 3), 200, np.uint8)
    mask = np.zeros((GRID, GRID), bool)
    mask[2:4, 3:5] = True
    out = outline(image, mask)
    inside = np.kron(mask, np.ones((4, 4), bool))
    assert (out[~inside] == 200).all()  # kept cells exactly as the source
    assert (out[10, 14] < 200).all() and tuple(out[8, 12]) == (255, 220, 0)  # dimmed inside, yellow border


def test_a_packed_mask_reads_back():
    mask = random_mask(GRID, 0.5, 1)
    assert len(pack(mask)) == 64 and pack(mask).count("1") == 32 and np.array_equal(unpack(pack(mask), GRID), mask)


def _bad(tmp_path) -> list[tuple[dict, str]]:
    img = _png(tmp_path / "img.png", (40, 30))
    Image.new("L", (20, 20), 255).save(tmp_path / "small.png")
    Image.new("L", (40, 30), 0).save(tmp_path / "black.png")
    Image.new("L", (40, 30), 255).save(tmp_path / "white.png")
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    return [
        ({"edit_image": img, "region": (0, 0, 40, 8)}, "region 0,0,40,8 is outside the 32x32 image"),
        ({"edit_image": img, "region": "8,0,4,8"}, "region 8,0,4,8 is empty: x0=8 must be less than x1=4"),
        ({"edit_image": img, "region": "0,0,8"}, "region is '0,0,8'; expected x0,y0,x1,y1"),
        ({"edit_image": img, "region": (0, 0, 32, 32)}, "region covers all 64 token cells, so nothing of the image is kept"),
        ({"outpaint_image": img, "region": (1, 1, 31, 31)}, "covers all 64 token cells, so nothing is left to outpaint"),
        ({"edit_image": img, "mask": str(tmp_path / "small.png")}, "mask is 20x20 pixels but edit_image is 40x30"),
        ({"edit_image": img, "mask": str(tmp_path / "black.png")}, "mask is all black (nothing to regenerate)"),
        ({"edit_image": img, "mask": str(tmp_path / "white.png")}, "mask is all white (all regenerated, nothing kept)"),
        ({"edit_image": str(tmp_path / "junk.png"), "region": (0, 0, 4, 4)}, "edit image '" + str(tmp_path / "junk.png")
         + "' is not an image file"),
        ({"edit_image": str(tmp_path / "none.png"), "region": (0, 0, 4, 4)}, "does not exist"),
        ({"edit_image": img}, "edit_image needs region x0,y0,x1,y1 or mask"),
        ({"edit_image": img, "region": (0, 0, 4, 4), "mask": str(tmp_path / "black.png")},
         "region and mask were both given; give one of them"),
        ({"outpaint_image": img}, "outpaint_image needs region"),
        ({"variations": img, "keep": 1.0}, "keep is 1.0; allowed: more than 0 and less than 1"),
        ({"variations": img, "keep": 0}, "keep is 0; allowed"),
        ({"edit_image": img, "prime_image": img}, "prime_image and edit_image were both given"),
        ({"region": (0, 0, 4, 4)}, "region is (0, 0, 4, 4) but no edit_image or outpaint_image was given"),
        ({"variations": img, "region": (0, 0, 4, 4)}, "but no edit_image or outpaint_image was given"),
        ({"keep": 0.5}, "keep is 0.5 but no variations was given"),
        ({"outpaint_image": img, "region": (0, 0, 4, 4), "mask": str(tmp_path / "black.png")}, "no edit_image was given"),
    ]


def test_bad_edit_requests_are_one_line_errors(tmp_path):
    for kwargs, message in _bad(tmp_path):
        with pytest.raises(GenerationError) as err:
            load_edit(SIZE, GRID, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, str(err.value))


def test_an_edit_names_its_source_and_content(tmp_path):
    path = _png(tmp_path / "a.png")
    edit = load_edit(SIZE, GRID, edit_image=path, region=(0, 0, 4, 4))
    again = load_edit(SIZE, GRID, edit_image=open(path, "rb").read(), region=(0, 0, 4, 4))
    other = load_edit(SIZE, GRID, edit_image=_png(tmp_path / "b.png", colour=(1, 2, 3)), region=(0, 0, 4, 4))
    assert isinstance(edit, Edit) and edit.source == path and edit.digest == again.digest != other.digest
    assert edit.label() == f"inpaint of {path} (sha256 {edit.digest})"


def test_an_all_black_or_all_white_mask_is_its_own_error_not_an_undecodable_image(tmp_path):
    img = _png(tmp_path / "img.png", (40, 30))
    Image.new("L", (40, 30), 0).save(tmp_path / "black.png")
    Image.new("L", (40, 30), 255).save(tmp_path / "white.png")
    Image.new("LA", (40, 30), (0, 255)).save(tmp_path / "alpha.png")  # opaque black: the alpha is not the mask
    for mask, message in (("black.png", "mask is all black (nothing to regenerate); paint the cells"),
                          ("white.png", "mask is all white (all regenerated, nothing kept); paint the cells"),
                          ("alpha.png", "mask is all black (nothing to regenerate); paint the cells to regenerate "
                                        "white and the rest black; its alpha channel is ignored")):
        with pytest.raises(GenerationError) as err:
            load_edit(SIZE, GRID, edit_image=img, mask=str(tmp_path / mask), names={"mask": "mask"})
        assert str(err.value).startswith(message), str(err.value)


def test_a_16_bit_mask_means_what_the_same_8_bit_mask_means(tmp_path):
    """A 16-bit greyscale PNG (Pillow's mode I;16) is scaled from 0..65535: 1000 is nearly black (kept), not
    clipped to white; the white box lands on the same cells as in the 8-bit test above."""
    mask = np.full((64, 96), 1000, np.uint16)
    mask[20:28, 36:60] = 65535
    Image.fromarray(mask).save(tmp_path / "mask16.png")
    with Image.open(tmp_path / "mask16.png") as im:
        assert im.mode == "I;16"
    img = _png(tmp_path / "a.png", (96, 64))
    edit = load_edit(SIZE, GRID, edit_image=img, mask=str(tmp_path / "mask16.png"))
    assert _cells(edit.mask) == {(y, x) for y in (2, 3) for x in (2, 3, 4, 5)}
    mask[:] = 32000  # just under half of 65535: dark, so all kept
    Image.fromarray(mask).save(tmp_path / "dark16.png")
    with pytest.raises(GenerationError, match="mask is all black"):
        load_edit(SIZE, GRID, edit_image=img, mask=str(tmp_path / "dark16.png"))
    right = np.full((64, 96), 1000, np.int32)  # mode I (32-bit integers, 16-bit values): scaled the same
    right[:, 48:] = 65535
    assert Image.fromarray(right).mode == "I"
    assert _cells(load_edit(SIZE, GRID, edit_image=img, mask=right).mask) == {(y, x) for y in range(8) for x in range(4, 8)}


# the transform each EXIF orientation asks a viewer to apply (Pillow's exif_transpose), and its inverse
_SHOWN = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}
_STORED = {**_SHOWN, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_mask_drawn_on_a_photo_as_a_viewer_shows_it_works_for_every_orientation(tmp_path, orientation):
    """A phone photo stored turned or mirrored with an EXIF Orientation tag, and a mask drawn on it as a viewer
    shows it (no tag of its own): the same cells as for the upright photo, and the same source image; a mask of
    the stored size where a viewer shows another is refused naming the sizes the user sees."""
    rng = np.random.default_rng(0)
    shown = Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8))  # 32 wide, 64 high, as seen
    stored = shown if _STORED[orientation] is None else shown.transpose(_STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.png", exif=exif)
    mask = np.zeros((64, 32), np.uint8)
    mask[20:28, 0:8] = 255  # drawn on the picture as seen: left edge, upper middle
    Image.fromarray(mask).save(tmp_path / "mask.png")
    edit = load_edit(SIZE, GRID, edit_image=str(tmp_path / "photo.png"), mask=str(tmp_path / "mask.png"))
    assert _cells(edit.mask) == {(1, 0), (1, 1), (2, 0), (2, 1)}  # rows 20-27 after the centre crop: 4-11
    assert np.array_equal(edit.image, np.asarray(to_rgb_sized(shown, SIZE)))
    if orientation >= 5:  # stored 64 wide: a mask of the stored size is not what the user sees
        Image.fromarray(np.asarray(Image.fromarray(mask).transpose(Image.Transpose.TRANSPOSE))).save(tmp_path / "m.png")
        with pytest.raises(GenerationError, match=r"mask is 64x32 pixels but edit_image is 32x64 as a viewer shows it"):
            load_edit(SIZE, GRID, edit_image=str(tmp_path / "photo.png"), mask=str(tmp_path / "m.png"))
