"""Judging synthetic scans with measures that need no download, and the copy check for privacy.

Feature spaces, each named where it is used:

- **pooled latent means**: the VAE encoder's posterior mean of a volume (C, d, h, w), average-pooled
  to a ``pool``^3 grid per channel and flattened (C * pool^3 numbers). ``frechet_distance`` (the FID
  formula, on these features instead of an Inception network) and ``mmd`` (squared maximum mean
  discrepancy, RBF kernel, median-distance bandwidth, unbiased) compare two sets there.
- **real units** (HU for CT): ``intensity_distance`` is the Wasserstein-1 distance between the pooled
  voxel-intensity histograms of two sets; ``foreground_fraction`` is the share of voxels above a
  threshold, compared by the difference of the set means.
- **texture** (real units): ``noise_level`` is a robust noise estimate of one volume, the median
  absolute deviation of its 3-D Laplacian, scaled so that white Gaussian noise of standard deviation
  s reads s. Flat and linearly varying regions read 0 and edges are too sparse to move a median, so
  it sees noise and block artefacts in homogeneous tissue and air, which the histogram and latent
  measures miss. ``noise_distance`` compares two sets by |log2| of the ratio of their median levels
  (1: one set is twice as noisy, or twice as smooth, as the other).
- **latent grids** for the copy check: the whole posterior-mean grid on the prior's common shape,
  distance = root-mean-square difference per latent element. ``nearest_distances`` gives each
  volume's distance to its nearest training volume; ``copy_threshold`` turns the held-out-to-training
  nearest distances (what a new patient looks like) into a threshold; a sample below it is flagged
  as a near-copy of a training patient.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

COPY_RATIO = 0.5  # a sample nearer a training volume than this share of the nearest held-out distance is a copy
HISTOGRAM_BINS = 128  # bins of the intensity histograms (over the pooled range of both sets)
LAPLACIAN_NOISE_GAIN = 42**0.5  # the 7-point 3-D Laplacian of white noise of std s has std sqrt(6^2 + 6) s
MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation of a Gaussian
NOISE_FLOOR = 1e-3  # real units: levels below this count as this, so two noise-free sets compare as equal


def pooled_features(latent_means: torch.Tensor, pool: int = 2) -> np.ndarray:
    """(N, C * pool^3) float64 features of posterior means (N, C, d, h, w): adaptive average pooling."""
    pooled = F.adaptive_avg_pool3d(latent_means.float(), pool)
    return pooled.reshape(pooled.shape[0], -1).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between feature sets (N_a, F) and (N_b, F)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False)) if len(a) > 1 else np.zeros((a.shape[1], a.shape[1]))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False)) if len(b) > 1 else np.zeros((b.shape[1], b.shape[1]))
    with warnings.catch_warnings():  # few volumes give singular covariances: sqrtm warns, the result is usable
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():  # as pytorch-fid: regularise the product
            offset = np.eye(cov_a.shape[0]) * 1e-6
            root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def mmd(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD with an RBF kernel whose bandwidth is the median pairwise distance of a ∪ b."""
    from sklearn.metrics import pairwise_distances

    joined = np.concatenate([a, b])
    distances = pairwise_distances(joined)
    positive = distances[distances > 0]
    bandwidth = float(np.median(positive)) if positive.size else 1.0
    kernel = np.exp(-(distances**2) / (2 * bandwidth**2))
    n = len(a)
    k_aa, k_bb, k_ab = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]

    def within(k: np.ndarray) -> float:
        m = len(k)
        return float((k.sum() - np.trace(k)) / (m * (m - 1))) if m > 1 else 0.0

    return within(k_aa) + within(k_bb) - 2 * float(k_ab.mean())


def intensity_distance(a: Sequence[np.ndarray], b: Sequence[np.ndarray], bins: int = HISTOGRAM_BINS) -> float:
    """Wasserstein-1 distance (real units) between the pooled voxel histograms of two sets of volumes."""
    from scipy.stats import wasserstein_distance

    low = min(float(np.min(v)) for v in [*a, *b])
    high = max(float(np.max(v)) for v in [*a, *b])
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    count_a = sum(np.histogram(v, edges)[0] for v in a).astype(np.float64)
    count_b = sum(np.histogram(v, edges)[0] for v in b).astype(np.float64)
    return float(wasserstein_distance(centres, centres, count_a, count_b))


def foreground_fraction(volume: np.ndarray, threshold: float) -> float:
    """Share of voxels above ``threshold`` (real units)."""
    return float((np.asarray(volume) > threshold).mean())


def noise_level(volume: np.ndarray) -> float:
    """Robust noise level of one volume (D, H, W), or (1, D, H, W), in its own units (see the module doc)."""
    from scipy import ndimage

    array = np.asarray(volume, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"noise_level needs a 3-D volume, got shape {array.shape}")
    laplacian = ndimage.laplace(array, mode="nearest")
    deviation = np.abs(laplacian - np.median(laplacian))
    return float(MAD_TO_STD * np.median(deviation) / LAPLACIAN_NOISE_GAIN)


def noise_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """|log2(median level of a / median level of b)| of two sets' ``noise_level`` values."""
    level_a = max(float(np.median(a)), NOISE_FLOOR)
    level_b = max(float(np.median(b)), NOISE_FLOOR)
    return abs(float(np.log2(level_a / level_b)))


def nearest_distances(queries: torch.Tensor, training: torch.Tensor, exclude_self: bool = False) -> np.ndarray:
    """(N,) RMS distance per latent element from each grid (N, C, d, h, w) to its nearest training grid.

    ``exclude_self``: queries ARE the training grids (leave-one-out), so each skips itself.
    """
    q = queries.reshape(queries.shape[0], -1).double()
    t = training.reshape(training.shape[0], -1).double()
    distances = torch.cdist(q, t) / q.shape[1] ** 0.5
    if exclude_self:
        if len(t) < 2:
            raise ValueError("the copy check needs held-out volumes, or at least 2 training volumes")
        distances.fill_diagonal_(float("inf"))
    return distances.min(1).values.numpy()


def copy_threshold(reference_distances: np.ndarray, ratio: float = COPY_RATIO) -> float:
    """The distance below which a sample is flagged: ``ratio`` times the smallest held-out nearest distance."""
    if len(reference_distances) == 0:
        raise ValueError("the copy check needs at least one held-out-to-training distance")
    return float(ratio * np.min(reference_distances))


def copy_check(sample_distances: np.ndarray, threshold: float) -> dict:
    """Flags and the flagged fraction of samples, given their nearest-training distances."""
    flagged = [bool(d < threshold) for d in sample_distances]
    return {"feature_space": "posterior-mean latent grid, RMS distance per element", "threshold": threshold,
            "nearest_training_distance": [float(d) for d in sample_distances], "flagged": flagged,
            "flagged_fraction": float(np.mean(flagged)) if flagged else 0.0}
