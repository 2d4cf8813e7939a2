"""Out-of-distribution scores: Mahalanobis distance to a fitted reference, and its percentile.

A reference set of feature rows (image features from an extractor, or pooled latents) is fitted
with its mean and a Ledoit-Wolf shrinkage covariance (well conditioned even with fewer samples
than dimensions). A new sample's score is ``sqrt((x - mean)^T S^-1 (x - mean))``; its percentile is
the share of reference scores below it ("more unusual than 99% of the reference" = percentile 99).

Calibration: a reference sample's distance to a fit that includes it is smaller than a fresh
sample's (the fit has seen it), most of all when the dimension is not small next to the count.
The reference scores that percentiles are read from are therefore cross-fitted: each of
:data:`CROSS_FIT_FOLDS` folds is scored by a fit on the other folds. Fresh in-distribution
samples then land above the 99th percentile about 1% of the time.

Fits are saved as safetensors with metadata (what the features are: extractor id or latent
pooling, dimension, count, shrinkage).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_write
from .stored import read_format_file

__all__ = [
    "MIN_REFERENCE_SAMPLES",
    "CROSS_FIT_FOLDS",
    "OODFileError",
    "OODReference",
    "ledoit_wolf",
    "fit_reference",
    "mahalanobis",
    "percentiles",
    "save_reference",
    "load_reference",
    "latent_features",
]

logger = logging.getLogger(__name__)

MIN_REFERENCE_SAMPLES = 100
CROSS_FIT_FOLDS = 5
OOD_FORMAT = "probe-select-ood-reference"
OOD_FORMAT_VERSION = 1
LATENT_POOL = 4


class OODFileError(ValueError):
    """An OOD reference file is missing, not one, or made for other features."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


def _shrink(s: np.ndarray, fourth: float, n: int) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrinkage of the maximum-likelihood covariance ``s`` of ``n`` centred rows whose
    squared norms' squares sum to ``fourth`` (= sum_n |x_n|^4)."""
    d = s.shape[0]
    mu = np.trace(s) / d
    s_sq = (s ** 2).sum()
    delta_sq = (s_sq - 2.0 * mu * np.trace(s) + d * mu * mu) / d      # |S - mu I|² / d
    beta_sq = min((fourth / n - s_sq) / (d * n), delta_sq)            # estimated variance of S, / d
    shrinkage = 0.0 if delta_sq <= 0 else float(max(beta_sq, 0.0) / delta_sq)
    covariance = (1.0 - shrinkage) * s
    covariance[np.diag_indices(d)] += shrinkage * mu
    return covariance, shrinkage


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean, shrunk covariance, shrinkage) of rows ``x`` ``[N, D]`` (Ledoit & Wolf 2004).

    The covariance ``(1 - a) S + a mu I`` shrinks the maximum-likelihood covariance S towards a
    multiple of the identity (mu = tr(S) / D) with the shrinkage ``a`` in [0, 1] that minimises the
    expected Frobenius error, estimated from the data (the formula of scikit-learn's
    ``ledoit_wolf_shrinkage``).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    mean = x.mean(axis=0)
    xc = x - mean
    covariance, shrinkage = _shrink(xc.T @ xc / n, float(((xc ** 2).sum(axis=1) ** 2).sum()), n)
    return mean, covariance, shrinkage


def _cholesky(covariance: np.ndarray) -> Optional[Tensor]:
    """Lower Cholesky factor (float64 torch), or None when the matrix is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(torch.from_numpy(covariance))
    return factor if int(info) == 0 else None


def _precision(covariance: np.ndarray) -> np.ndarray:
    factor = _cholesky(covariance)
    if factor is not None:
        return torch.cholesky_inverse(factor).numpy()
    # Only a degenerate reference (e.g. all rows equal) gets here: invert through the
    # eigendecomposition with a floor against round-off.
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = max(float(eigenvalues.max()) * 1e-12, 1e-300)
    return (eigenvectors / np.maximum(eigenvalues, floor)) @ eigenvectors.T


def _distances(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    centred = x - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, precision, centred), 0.0))


def _cross_fitted_distances(x: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Distance of each row to a Ledoit-Wolf fit on the other folds.

    The folds' covariances come from the full second-moment matrix minus each fold's own, so the
    cost is one pass over the data plus one Cholesky factorisation per fold.
    """
    n = x.shape[0]
    xg = x - x.mean(axis=0)                    # centred once: keeps the moment differences accurate
    gram = xg.T @ xg
    order = np.random.RandomState(seed).permutation(n)
    distances = np.empty(n)
    for fold in np.array_split(order, folds):
        train = np.ones(n, dtype=bool)
        train[fold] = False
        n_train = int(train.sum())
        held = xg[fold]
        mean = -held.sum(axis=0) / n_train     # the rows of xg sum to zero
        s = (gram - held.T @ held) / n_train - np.outer(mean, mean)
        fourth = float((((xg[train] - mean) ** 2).sum(axis=1) ** 2).sum())
        covariance, _ = _shrink(s, fourth, n_train)
        factor = _cholesky(covariance)
        if factor is None:
            distances[fold] = _distances(held, mean, _precision(covariance))
        else:
            white = torch.linalg.solve_triangular(factor, torch.from_numpy(held - mean).T, upper=False)
            distances[fold] = white.square().sum(dim=0).sqrt().numpy()
    return distances


@dataclass
class OODReference:
    """A fitted reference: mean, shrunk covariance and its inverse, and the cross-fitted distances of
    the reference samples (sorted) that percentiles are read from.

    ``features`` says what the rows are (an extractor id such as ``"fid-inception-v3:..."``, or
    ``"latent:pool4"``); scoring other features is refused.
    """

    mean: np.ndarray
    covariance: np.ndarray
    precision: np.ndarray
    reference_scores: np.ndarray
    shrinkage: float
    count: int
    features: str
    details: dict = field(default_factory=dict)
    warning: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def score(self, x: Union[Tensor, np.ndarray]) -> np.ndarray:
        """Mahalanobis distances ``[M]`` of rows ``x`` ``[M, D]``."""
        x = _rows(x, "features")
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions, the reference {self.dim}")
        return _distances(x, self.mean, self.precision)

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Percent of reference scores below each score (ties count half), in 0..100."""
        return percentiles(self.reference_scores, scores)


def _rows(x: Union[Tensor, np.ndarray], name: str) -> np.ndarray:
    array = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, D] rows, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def percentiles(reference_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    reference_scores = np.sort(np.asarray(reference_scores, dtype=np.float64))
    scores = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(reference_scores, scores, side="left")
    at_or_below = np.searchsorted(reference_scores, scores, side="right")
    return 100.0 * (below + at_or_below) / (2.0 * reference_scores.size)


def fit_reference(x: Union[Tensor, np.ndarray], features: str, folds: int = CROSS_FIT_FOLDS,
                  seed: int = 0) -> OODReference:
    """Fit mean + Ledoit-Wolf covariance on reference rows ``x`` ``[N, D]`` (N >= 2; a warning below
    :data:`MIN_REFERENCE_SAMPLES`)."""
    x = _rows(x, "reference features")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"an OOD reference needs at least 2 samples (reliable from {MIN_REFERENCE_SAMPLES}), got {n}")
    warning = ""
    if n < MIN_REFERENCE_SAMPLES:
        warning = (f"the reference has {n} samples; percentiles from fewer than {MIN_REFERENCE_SAMPLES} are coarse "
                   "and the covariance is mostly shrinkage.")
        logger.warning("OOD reference: %s", warning)
    mean, covariance, shrinkage = ledoit_wolf(x)
    precision = _precision(covariance)
    folds = max(2, min(folds, n // 2)) if n >= 4 else 1
    if folds >= 2:
        held_out_scores = _cross_fitted_distances(x, folds, seed)
    else:
        held_out_scores = _distances(x, mean, precision)
    return OODReference(mean, covariance, precision, np.sort(held_out_scores), shrinkage, n, features,
                        {"folds": folds}, warning)


def mahalanobis(reference: OODReference, x: Union[Tensor, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(scores ``[M]``, percentiles ``[M]``) of rows ``x`` against ``reference``."""
    scores = reference.score(x)
    return scores, reference.percentile(scores)


def latent_features(samples: Tensor, pool: int = LATENT_POOL) -> Tensor:
    """Latents ``[B, C, H, W]`` (or ``[B, C, T, H, W]``) -> ``[B, C * pool * pool]`` by adaptive
    average pooling: a full latent has too many dimensions for a covariance (4 x 64 x 64 = 16,384),
    the pooled one keeps per-channel layout and colour."""
    if samples.ndim == 5:
        samples = samples.mean(dim=2)
    if samples.ndim != 4:
        raise ValueError(f"latents must be [B, C, H, W], got shape {tuple(samples.shape)}")
    return F.adaptive_avg_pool2d(samples.float(), pool).flatten(1)


def save_reference(path: Union[str, os.PathLike], reference: OODReference) -> Path:
    tensors = {
        "mean": torch.from_numpy(reference.mean.copy()),
        "covariance": torch.from_numpy(np.ascontiguousarray(reference.covariance)),
        "precision": torch.from_numpy(np.ascontiguousarray(reference.precision)),
        "reference_scores": torch.from_numpy(reference.reference_scores.copy()),
    }
    metadata = {
        "format": OOD_FORMAT,
        "format_version": str(OOD_FORMAT_VERSION),
        "features": reference.features,
        "count": str(reference.count),
        "dim": str(reference.dim),
        "shrinkage": repr(reference.shrinkage),
        "details": json.dumps(reference.details),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_reference(path: Union[str, os.PathLike], expected_features: Optional[str] = None) -> OODReference:
    """Read a fit saved by :func:`save_reference`; with ``expected_features``, refuse a fit of other features."""
    path, metadata, tensors = read_format_file(path, OOD_FORMAT, "OOD reference file", "OOD reference",
                                               "select a file written by Probe-Select OOD Fit.", OODFileError)
    if int(metadata.get("format_version", "0")) > OOD_FORMAT_VERSION:
        raise OODFileError(f"'{path.name}' is newer than this pack reads.", "update Probe-Select.")
    features = metadata.get("features", "")
    if expected_features is not None and features != expected_features:
        raise OODFileError(
            f"'{path.name}' was fitted on {features!r} features, not on {expected_features!r}; distances between "
            "different features mean nothing.",
            "score with the extractor (or latents) the reference was fitted on, or fit a new reference.")
    count = int(metadata.get("count", "0"))
    warning = ""
    if count < MIN_REFERENCE_SAMPLES:
        warning = (f"the reference has {count} samples; percentiles from fewer than {MIN_REFERENCE_SAMPLES} "
                   "are coarse.")
    return OODReference(
        mean=tensors["mean"].double().numpy(),
        covariance=tensors["covariance"].double().numpy(),
        precision=tensors["precision"].double().numpy(),
        reference_scores=tensors["reference_scores"].double().numpy(),
        shrinkage=float(metadata.get("shrinkage", "nan")),
        count=count,
        features=features,
        details=json.loads(metadata.get("details", "{}")),
        warning=warning,
    )
