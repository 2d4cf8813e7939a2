"""Image-set metrics computed from features: FID, KID, Inception Score, precision/recall,
density/coverage, CMMD and CLIPScore.

Every function takes features (``[N, D]`` tensors or arrays; one row per image) and computes in
float64. The formulas follow the reference implementations, so that the numbers can be compared
with published ones:

- FID (Heusel et al. 2017): Fréchet distance of Gaussians fitted to the two feature sets
  (``np.cov`` with N-1, as torch-fidelity and the original TTUR code), ``tr(sqrt(S1 S2))`` from
  symmetric eigendecompositions (see :func:`frechet_distance`).
- KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel
  ``(x.y / d + 1)^3``, averaged over random subsets; subsets are drawn like torch-fidelity does
  (``numpy.random.RandomState(seed).choice`` without replacement, first set then second), so the
  same seed gives the same subsets and the same mean and std.
- Inception Score (Salimans et al. 2016): ``exp(E KL(p(y|x) || p(y)))`` per split of the logits, in
  order (no shuffling), mean and population std over the splits.
- Precision/recall (Kynkäänniemi et al. 2019): k-NN manifolds (k = 3 by default); density/coverage
  (Naeem et al. 2020; k = 5 by default, their recommendation). Strict ``<`` against the k-NN radius,
  as the ``prdc`` package.
- CMMD (Jayasumana et al. 2024): MMD² with a Gaussian RBF kernel (sigma = 10) on L2-normalised
  CLIP image embeddings, times 1000. This module uses the unbiased estimator (Gretton et al. 2012):
  with equally many samples on both sides the paired U-statistic (their MMD²_u, which is exactly 0
  for a set against itself), otherwise the two-sample unbiased form. The official CMMD code uses the
  biased estimator; the two differ by O(1/N).
- CLIPScore: ``100 * max(cos(image, text), 0)`` per image (the scale of torchmetrics' CLIPScore).

Sample counts below which a metric is known to be unreliable are in :data:`RELIABLE_COUNTS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RELIABLE_COUNTS",
    "MetricValue",
    "reliability_warning",
    "gaussian_statistics",
    "frechet_distance",
    "fid_from_features",
    "polynomial_kernel",
    "mmd2_unbiased",
    "kid",
    "inception_score",
    "knn_radii",
    "precision_recall",
    "density_coverage",
    "expected_coverage",
    "cmmd",
    "clip_score",
]

ArrayLike = Union[Tensor, np.ndarray]

# Below these counts (images of the smaller set) a metric is known to be unreliable:
# - fid: the 2048-d covariance has rank < 2048 below 2,048 images, and FID is strongly biased upward
#   at small N (Chong & Forsyth 2020);
# - kid: the default subset size (1,000) of the KID paper and torch-fidelity;
# - inception_score: 10 splits of 500 images (the original protocol uses 50,000 images);
# - precision_recall / density_coverage: k-NN manifolds need many samples (Kynkäänniemi et al. used
#   50,000; below 5,000 precision and recall move by several points between draws);
# - cmmd: the CMMD paper reports stable values from about 1,000 images;
# - clip_score: a per-image score; the mean is an ordinary average.
RELIABLE_COUNTS: dict[str, int] = {
    "fid": 2048,
    "kid": 1000,
    "inception_score": 5000,
    "precision_recall": 5000,
    "density_coverage": 5000,
    "cmmd": 1000,
    "clip_score": 1,
}

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


@dataclass
class MetricValue:
    """One metric with its spread and the sample counts it came from.

    Attributes:
        name: e.g. ``"fid"``, ``"kid"``, ``"precision"``.
        value: the number (for KID and IS: the mean over subsets / splits).
        std: spread over subsets / splits / images where the metric has one, else None.
        n_generated, n_reference: images on each side (``n_reference`` 0 for metrics of one set).
        details: metric-specific settings (subset size, k, splits, ...).
        warning: a sentence when the counts are below :data:`RELIABLE_COUNTS`, else "".
    """

    name: str
    value: float
    std: Optional[float] = None
    n_generated: int = 0
    n_reference: int = 0
    details: dict = field(default_factory=dict)
    warning: str = ""


def reliability_warning(metric: str, n_generated: int, n_reference: Optional[int] = None) -> str:
    """A warning sentence when the smaller set is below the metric's reliable count, else ""."""
    need = RELIABLE_COUNTS[metric]
    counts = [n_generated] + ([n_reference] if n_reference is not None else [])
    smallest = min(counts)
    if smallest >= need:
        return ""
    return (f"{metric} from {smallest} images is unreliable (needs at least {need:,} per set); "
            "compare it only with values computed from the same counts.")


def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, D] features, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]} (features of different extractors?)")


# ---- FID ------------------------------------------------------------------------------------


def gaussian_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean ``[D]``, covariance ``[D, D]`` with N-1) in float64. Needs at least 2 rows."""
    x = _as_float64(features, "features")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2))``.

    ``tr(sqrt(S1 S2))`` is the sum of the square roots of the eigenvalues of ``S1 S2``. They are
    taken from the symmetric matrix ``R S2 R`` with ``R = sqrt(S1)`` (same eigenvalues; two symmetric
    eigendecompositions are several times faster than the general one of ``S1 S2`` that
    torch-fidelity and TTUR use, and cannot produce complex round-off). Round-off below zero
    is clipped. The two agree to round-off (checked against torch-fidelity in the tests).
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: means {mu1.shape} / {mu2.shape}, "
                         f"covariances {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    values, vectors = np.linalg.eigh((s1 + s1.T) / 2.0)
    root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    product = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(generated: ArrayLike, reference: ArrayLike) -> float:
    """FID between two feature sets (each needs at least 2 rows)."""
    mu1, s1 = gaussian_statistics(generated)
    mu2, s2 = gaussian_statistics(reference)
    return frechet_distance(mu1, s1, mu2, s2)


# ---- KID ------------------------------------------------------------------------------------


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None,
                      coef0: float = 1.0) -> np.ndarray:
    """``(gamma x.y + coef0)^degree`` with gamma = 1/D by default (the KID kernel)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD² from kernel matrices: diagonals of K_xx and K_yy left out, all of K_xy kept
    (Gretton et al. 2012, eq. 3; the KID estimator)."""
    m, n = k_xx.shape[0], k_yy.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float(sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * k_xy.sum() / (m * n))


def kid(generated: ArrayLike, reference: ArrayLike, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: Optional[float] = None, coef0: float = 1.0, seed: int = 2020) -> MetricValue:
    """KID: unbiased polynomial-kernel MMD² averaged over ``subsets`` random subsets.

    ``subset_size`` is lowered to the size of the smaller set when that is smaller (the value then
    has a larger spread; ``details["subset_size"]`` says what was used). The defaults are those of
    torch-fidelity (100 subsets of 1,000, seed 2020).
    """
    x = _as_float64(generated, "generated features")
    y = _as_float64(reference, "reference features")
    _check_pair(x, y)
    size = min(int(subset_size), x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {x.shape[0]} and {y.shape[0]}")
    if subsets < 1:
        raise ValueError(f"KID needs at least 1 subset, got {subsets}")
    rng = np.random.RandomState(seed)
    values = np.zeros(subsets)
    for i in range(subsets):
        xs = x[rng.choice(x.shape[0], size, replace=False)]
        ys = y[rng.choice(y.shape[0], size, replace=False)]
        values[i] = mmd2_unbiased(polynomial_kernel(xs, xs, degree, gamma, coef0),
                                  polynomial_kernel(ys, ys, degree, gamma, coef0),
                                  polynomial_kernel(xs, ys, degree, gamma, coef0))
    return MetricValue("kid", float(values.mean()), float(values.std()), x.shape[0], y.shape[0],
                       {"subsets": subsets, "subset_size": size, "degree": degree, "seed": seed},
                       reliability_warning("kid", x.shape[0], y.shape[0]))


# ---- Inception Score ------------------------------------------------------------------------


def inception_score(logits: ArrayLike, splits: int = 10) -> MetricValue:
    """Inception Score from classifier logits ``[N, C]`` (for the FID Inception: the 1008 logits
    without the fc bias, as the original TensorFlow code). Splits are taken in order."""
    z = torch.as_tensor(_as_float64(logits, "logits"))
    n = z.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {max(splits, 1)} images, got {n}")
    p = z.softmax(dim=1)
    log_p = z.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        marginal = p_chunk.mean(dim=0, keepdim=True)
        kl = (p_chunk * (log_p_chunk - marginal.log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    values = np.asarray(scores)
    return MetricValue("inception_score", float(values.mean()), float(values.std()), n, 0, {"splits": splits},
                       reliability_warning("inception_score", n))


# ---- k-NN manifolds -------------------------------------------------------------------------


def _pairwise_distances(a: Tensor, b: Tensor, chunk: int = 1024) -> Tensor:
    """Euclidean distances ``[len(a), len(b)]`` in float64, computed row-chunk by row-chunk."""
    # The matrix-product form (|a|² + |b|² - 2 a.b) runs on BLAS; in float64 its round-off is far
    # below any k-NN radius of real features.
    rows = [torch.cdist(a[i:i + chunk], b, compute_mode="use_mm_for_euclid_dist")
            for i in range(0, a.shape[0], chunk)]
    return torch.cat(rows) if rows else torch.zeros(0, b.shape[0], dtype=a.dtype)


def knn_radii(features: ArrayLike, k: int) -> Tensor:
    """Distance of each row to its k-th nearest other row (float64 ``[N]``)."""
    x = torch.as_tensor(_as_float64(features, "features"))
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} samples, got {x.shape[0]}")
    radii = []
    for i in range(0, x.shape[0], 1024):
        d = _pairwise_distances(x[i:i + 1024], x)
        # The (k+1)-th smallest includes the row itself at distance 0.
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _within_balls(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """``[len(points), len(centres)]`` bool: point j strictly inside the ball of centre i."""
    rows = [_pairwise_distances(points[i:i + chunk], centres) < radii.unsqueeze(0)
            for i in range(0, points.shape[0], chunk)]
    return torch.cat(rows)


def precision_recall(generated: ArrayLike, reference: ArrayLike, k: int = 3) -> tuple[MetricValue, MetricValue]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Precision: share of generated samples inside the reference manifold (the union of balls around
    each reference sample with its k-NN radius). Recall: share of reference samples inside the
    generated manifold.
    """
    x = torch.as_tensor(_as_float64(reference, "reference features"))
    y = torch.as_tensor(_as_float64(generated, "generated features"))
    _check_pair(x.numpy(), y.numpy())
    real_radii, fake_radii = knn_radii(x, k), knn_radii(y, k)
    precision = float(_within_balls(y, x, real_radii).any(dim=1).double().mean())
    recall = float(_within_balls(x, y, fake_radii).any(dim=1).double().mean())
    warning = reliability_warning("precision_recall", y.shape[0], x.shape[0])
    details = {"k": k}
    return (MetricValue("precision", precision, None, y.shape[0], x.shape[0], dict(details), warning),
            MetricValue("recall", recall, None, y.shape[0], x.shape[0], dict(details), warning))


def density_coverage(generated: ArrayLike, reference: ArrayLike, k: int = 5) -> tuple[MetricValue, MetricValue]:
    """Density and coverage (Naeem et al. 2020), with k-NN balls around the reference samples only.

    Density: average number of reference balls a generated sample falls in, divided by k (about 1
    when both sets come from one distribution; above 1 when samples crowd into dense regions).
    Coverage: share of reference samples whose ball holds at least one generated sample.
    """
    x = torch.as_tensor(_as_float64(reference, "reference features"))
    y = torch.as_tensor(_as_float64(generated, "generated features"))
    _check_pair(x.numpy(), y.numpy())
    radii = knn_radii(x, k)
    inside = _within_balls(y, x, radii)            # [M generated, N reference]
    density = float(inside.double().sum() / (k * y.shape[0]))
    coverage = float(inside.any(dim=0).double().mean())
    warning = reliability_warning("density_coverage", y.shape[0], x.shape[0])
    return (MetricValue("density", density, None, y.shape[0], x.shape[0], {"k": k}, warning),
            MetricValue("coverage", coverage, None, y.shape[0], x.shape[0], {"k": k}, warning))


def expected_coverage(n_reference: int, n_generated: int, k: int) -> float:
    """Expected coverage when both sets are samples of one distribution (Naeem et al. 2020):
    ``1 - prod_{i=1..k} (N - i) / (N + M - i)``."""
    product = 1.0
    for i in range(1, k + 1):
        product *= (n_reference - i) / (n_reference + n_generated - i)
    return 1.0 - product


# ---- CMMD -----------------------------------------------------------------------------------


def _rbf_kernel(x: Tensor, y: Tensor, sigma: float) -> Tensor:
    squared = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.T
    return torch.exp(-squared.clamp(min=0.0) / (2.0 * sigma * sigma))


def cmmd(generated: ArrayLike, reference: ArrayLike, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE,
         normalize: bool = True) -> MetricValue:
    """CMMD: ``scale`` x unbiased MMD² with the Gaussian RBF kernel on (L2-normalised) CLIP embeddings.

    Equal set sizes use the paired U-statistic (exactly 0 for a set against itself), unequal sizes
    the two-sample unbiased estimator; both are unbiased (see the module docstring).
    """
    x = torch.as_tensor(_as_float64(generated, "generated embeddings"))
    y = torch.as_tensor(_as_float64(reference, "reference embeddings"))
    _check_pair(x.numpy(), y.numpy())
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"CMMD needs at least 2 images per set, got {m} and {n}")
    if normalize:
        x = torch.nn.functional.normalize(x, dim=1)
        y = torch.nn.functional.normalize(y, dim=1)
    k_xx, k_yy, k_xy = _rbf_kernel(x, x, sigma), _rbf_kernel(y, y, sigma), _rbf_kernel(x, y, sigma)
    sum_xx = float(k_xx.sum() - k_xx.diagonal().sum())
    sum_yy = float(k_yy.sum() - k_yy.diagonal().sum())
    if m == n:
        cross = float(k_xy.sum() - k_xy.diagonal().sum()) / (m * (m - 1))
        estimator = "paired U-statistic"
    else:
        cross = float(k_xy.sum()) / (m * n)
        estimator = "two-sample unbiased"
    value = sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2.0 * cross
    return MetricValue("cmmd", scale * value, None, m, n, {"sigma": sigma, "scale": scale, "estimator": estimator},
                       reliability_warning("cmmd", m, n))


# ---- CLIPScore ------------------------------------------------------------------------------


def clip_score(image_embeddings: ArrayLike, text_embeddings: ArrayLike) -> tuple[MetricValue, Tensor]:
    """CLIPScore of each image against its own prompt: ``100 * max(cos, 0)``.

    Returns the mean (with the std over images) and the per-image scores ``[N]`` (float64).
    """
    img = torch.as_tensor(_as_float64(image_embeddings, "image embeddings"))
    txt = torch.as_tensor(_as_float64(text_embeddings, "text embeddings"))
    if img.shape != txt.shape:
        raise ValueError(f"one text embedding per image needed: {tuple(img.shape)} vs {tuple(txt.shape)}")
    if img.shape[0] < 1:
        raise ValueError("CLIPScore needs at least 1 image")
    cosine = (torch.nn.functional.normalize(img, dim=1) * torch.nn.functional.normalize(txt, dim=1)).sum(1)
    per_image = 100.0 * cosine.clamp(min=0.0)
    std = float(per_image.std(unbiased=False)) if per_image.numel() > 1 else 0.0
    return (MetricValue("clip_score", float(per_image.mean()), std, img.shape[0], 0, {},
                        reliability_warning("clip_score", img.shape[0])), per_image)

