"""Images that are not square (issue 42, item 3): `data.image_size: [height, width]` through ingest, the dVAE, the
token shards, the transformer's positions, sampling, editing, CLIP, export and the served API; square runs keep their
keys; ingest crops or pads to the frame and says which.

One tiny pipeline at 16x32 (a 4x8 token grid), made once for the module."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from dalle_core.errors import ConfigError
from dalle_core.generate import DALLEPipeline, EditRequest
from dalle_core.images import decode_png, to_rgb_sized
from data_sources.shapes import check, generate, position_of
from pipeline.config import load_config
from pipeline.stage_table import stage_keys
from storage.parquet import read_shard, shard_paths
from tests.conftest import TINY, run_stage

WIDE = "data.image_size=[16, 32]"


@pytest.fixture(scope="module")
def wide(tmp_path_factory, prefect_backend):
    """(overrides of a tiny 16x32 run finished through generate, its exported folder)."""
    tmp = tmp_path_factory.mktemp("wide")
    ov = [f"store.root={tmp / 'store'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", WIDE]
    run_stage("generate", ov)
    assert main(["export", "-c", str(TINY), *sum((["--set", o] for o in ov), []), "--out", str(tmp / "model")]) == 0
    return ov, tmp / "model"


def test_every_stage_keeps_the_rectangle(wide):
    ov, _ = wide
    cfg = load_config(TINY, ov)
    store, keys = cfg.store.open(), stage_keys(cfg)
    images = read_shard(store, shard_paths(store, "ingest", keys["ingest"], "train")[0])
    assert decode_png(images.column("image")[0].as_py()).shape == (16, 32, 3)
    tokens = store.require("pretokenize", keys["pretokenize"])
    assert tokens["grid"] == [4, 8]
    shard = read_shard(store, shard_paths(store, "pretokenize", keys["pretokenize"], "train")[0])
    assert len(shard.column("image_tokens")[0].as_py()) == 32
    config = json.loads(Path(store.path("transformer", keys["transformer"], "config.json")).read_text())
    assert config["image_grid"] == [4, 8]
    generations = read_shard(store, store.path("generate", keys["generate"], "generations.parquet"), ["image"])
    assert decode_png(generations.column("image")[0].as_py()).shape == (16, 32, 3)


def test_the_export_draws_and_edits_wide_images(wide, tmp_path):
    _, folder = wide
    index = json.loads((folder / "model_index.json").read_text())
    assert index["image_size"] == [16, 32]
    pipe = DALLEPipeline.from_pretrained(folder, device="cpu")
    assert pipe.transformer.c.grid_hw == (4, 8) and pipe.transformer.row_emb.num_embeddings == 4 \
        and pipe.transformer.col_emb.num_embeddings == 8
    out = pipe(["a red circle"], num_candidates=2, seed=1)
    assert out.pixels[0].shape == (2, 16, 32, 3) and out.image_tokens[0].shape == (2, 32)
    source = out.pixels[0][0]
    # inpaint the right half (x 16..32 of the wide image): the left half's cells keep their codes exactly
    edited = pipe(["a blue square"], num_candidates=2, seed=2,
                  edit=EditRequest("inpaint", source, (16, 0, 32, 16)))
    mask = edited.masks[0][0].reshape(4, 8)
    assert mask[:, 4:].all() and not mask[:, :4].any()
    kept = pipe.encode(source).cpu().numpy().reshape(4, 8)[:, :4]
    assert all(np.array_equal(codes.reshape(4, 8)[:, :4], kept) for codes in edited.image_tokens[0])
    with pytest.raises(Exception, match=r"region 0,0,33,16 is outside the image, 32 px wide and 16 px high \(the "
                                        r"image resized to the model's size\): allowed 0 <= x0 < x1 <= 32 and "
                                        r"0 <= y0 < y1 <= 16"):
        pipe(["a red circle"], num_candidates=1, edit=EditRequest("inpaint", source, (0, 0, 33, 16)))
    prime = pipe(["a red circle"], num_candidates=1, edit=EditRequest("prime", source))
    assert prime.masks[0][0].reshape(4, 8)[:2].sum() == 0  # half the rows kept: 2 of 4
    assert main(["generate", "--model", str(folder), "a red circle", "--out", str(tmp_path / "out"),
                 "--edit", str(_png(source, tmp_path)), "--region", "16,0,32,16"]) == 0
    # --prime without --prime-rows keeps half the grid's 4 rows
    assert main(["generate", "--model", str(folder), "a red circle", "--out", str(tmp_path / "primed"),
                 "--prime", str(_png(source, tmp_path))]) == 0
    import pyarrow.parquet as pq

    masks = pq.read_table(tmp_path / "primed" / "generations.parquet", columns=["mask"]).column("mask").to_pylist()
    assert masks and all(m == "0" * 16 + "1" * 16 for m in masks)


def _png(pixels: np.ndarray, tmp_path: Path) -> Path:
    path = tmp_path / "wide.png"
    Image.fromarray(pixels).save(path)
    return path


def test_the_server_reports_and_checks_the_rectangle(wide):
    from fastapi.testclient import TestClient

    from serve import create_app

    _, folder = wide
    client = TestClient(create_app(DALLEPipeline.from_pretrained(folder, device="cpu"), name="wide"))
    model = client.get("/api/model").json()
    assert model["image_size"] == [16, 32] and model["token_grid"] == [4, 8]
    reply = client.post("/api/generate", json={"prompt": "a red circle", "num_candidates": 1, "seed": 0})
    assert reply.status_code == 200, reply.text


def test_square_runs_keep_their_keys_and_a_pair_of_equal_sides_is_the_square():
    square = stage_keys(load_config(TINY, []))
    assert stage_keys(load_config(TINY, ["data.image_size=[32, 32]"])) == square
    assert stage_keys(load_config(TINY, ["data.fit=crop"])) == square
    wide = stage_keys(load_config(TINY, ["data.image_size=[32, 64]"]))
    assert wide["ingest"] != square["ingest"]
    assert stage_keys(load_config(TINY, ["data.fit=pad"]))["ingest"] == square["ingest"]  # shapes are drawn to fit
    folder = ["data.source=imagefolder", "data.path=/nowhere"]
    assert stage_keys(load_config(TINY, [*folder, "data.fit=pad"]))["ingest"] != \
        stage_keys(load_config(TINY, folder))["ingest"]


@pytest.mark.parametrize("sets, message", [
    (["data.image_size=[16, 30]"], "data.image_size 16x30 (height x width): each side must be a multiple of 2**dvae.num_downsamples = 4"),
    (["data.image_size=[16, 4]"], "data.image_size: allowed: a whole number of pixels (e.g. 32) or [height, width] "
                                  "(e.g. [32, 64]), each side at least 8 (got [16, 4])"),
    (["data.image_size=32x64"], "data.image_size: allowed: a whole number of pixels (e.g. 32) or [height, width] "
                                "(e.g. [32, 64]), each side at least 8 (got '32x64')"),
    (["data.image_size=[16, 24]", "dvae.num_downsamples=1", "clip.patch_size=16"],
     "data.image_size 16x24 (height x width): each side must be a multiple of clip.patch_size = 16"),
    (["data.image_size=[16, 32, 8]"], "data.image_size: allowed: a whole number of pixels"),
    (["data.image_size=[32]"], "data.image_size: allowed: a whole number of pixels"),
    (["data.image_size=true"], "data.image_size: allowed: a whole number of pixels"),
    (["data.fit=stretch"], "data.fit: Input should be 'crop' or 'pad'"),
])
def test_bad_image_sizes_are_one_line_at_config_load(sets, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(TINY, sets)


def test_crop_fills_the_frame_and_pad_keeps_the_whole_image():
    square = np.zeros((32, 32, 3), dtype=np.uint8)
    square[:, :16] = (255, 0, 0)  # left half red, right half black
    square[:4] = (0, 255, 0)  # a green band along the top
    cropped = np.asarray(to_rgb_sized(Image.fromarray(square), (16, 32), "crop"))
    assert cropped.shape == (16, 32, 3)
    assert (cropped[:, :14, 0] > 200).all() and not (cropped[..., 1] > 200).any()  # the band is cropped away
    padded = np.asarray(to_rgb_sized(Image.fromarray(square), (16, 32), "pad"))
    assert padded.shape == (16, 32, 3)
    assert not padded[:, :8].any() and not padded[:, 24:].any()  # black bars left and right
    assert (padded[0, 10:14, 1] > 200).all()  # the band is kept, shrunk to the top row


def test_ingest_says_how_it_reshaped_the_images(tiny, tmp_path):
    folder = tmp_path / "square"
    folder.mkdir()
    rows = []
    for i, (_, _, caption, image) in enumerate(generate(24, 32, seed=5, val_fraction=0.25)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "caption": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config, make = tiny
    for fit, word in (("crop", "centre-cropped"), ("pad", "padded")):
        ov = make("data.source=imagefolder", f"data.path={folder}", WIDE, f"data.fit={fit}")
        ref = run_stage("ingest", ov, config)
        manifest = load_config(config, ov).store.open().require("ingest", ref.key)
        assert manifest["fit"] == fit
        assert manifest["notes"] == {f"{word} to the 16x32 (height x width) frame (data.fit {fit})": 24}


def test_wide_shapes_spread_over_the_width_and_the_checker_grades_them():
    rows = list(generate(300, (32, 64), seed=2))
    assert all(image.shape == (32, 64, 3) for _, _, _, image in rows)
    assert all(all(check(image, caption).values()) for _, _, caption, image in rows)
    right = [image for _, _, caption, image in rows if caption.endswith("in the top right")]
    assert right and all(image[:, 43:].any() and not image[:, :21].any() for image in right)
    assert position_of((30.0, 5.0), (32, 64)) == "top center" and position_of((30.0, 5.0), 32) == "top right"


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("DALLE_REQUIRE_BROWSER"),
                    reason="needs Debian's Chromium (apt-get install -y chromium); .ci/run installs it")
def test_the_page_draws_and_edits_the_wide_frame(wide, tmp_path):
    """The served page in a headless browser: the model line names the frame, the edit canvas has its shape, a
    rectangle dragged on it is the region in the wide image's pixels, and the candidates come back wide."""
    from playwright.sync_api import expect, sync_playwright

    from tests.flows.servers import app_server

    _, folder = wide
    source = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(source)
    with app_server(DALLEPipeline.from_pretrained(folder, device="cpu"), name="wide") as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url)
        expect(page.locator("#model-info")).to_contain_text("32x16 px (width x height) images from a 8x4 token grid")
        page.fill("#prompt", "a red circle")
        page.fill("#num_candidates", "2")
        page.locator("summary", has_text="Edit an image").click()
        page.set_input_files("#edit", str(source))
        canvas = page.locator("#edit-canvas")
        expect(canvas).to_be_visible()
        canvas.scroll_into_view_if_needed()
        box = canvas.bounding_box()  # about 256 x 128 on screen for 32 x 16 model pixels: 8 screen px a model pixel
        assert round(box["width"]) == 256 and abs(box["height"] - 128) <= 2  # the frame's shape (and its border)
        page.mouse.move(box["x"] + 20 * 8 + 3, box["y"] + 2 * 8 + 3)
        page.mouse.down()
        page.mouse.move(box["x"] + 27 * 8 + 3, box["y"] + 9 * 8 + 3, steps=4)
        page.mouse.up()
        expect(page.locator("#region-shown")).to_contain_text("region 20,2,28,10 (pixels of the 32x16 px image); "
                                                               "6 of 32 token cells redrawn")
        page.click("#go")
        expect(page.locator("#settings-shown")).to_contain_text("inpaint of region 20,2,28,10")
        figures = page.locator("#grid figure.candidate")
        expect(figures).to_have_count(2, timeout=30_000)
        expect(figures.nth(0).locator("img")).to_have_js_property("naturalWidth", 32)
        expect(figures.nth(0).locator("img")).to_have_js_property("naturalHeight", 16)
        if os.environ.get("DALLE_SCREENSHOT"):
            page.screenshot(path=os.environ["DALLE_SCREENSHOT"], full_page=True)
        browser.close()
