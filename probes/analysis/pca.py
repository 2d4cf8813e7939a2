"""Principal components of activation maps shown as RGB: the first three PCs of the channel vectors
of every spatial position, fitted on all candidates and checkpoints together, so that one colour
means one direction in feature space across the whole grid (where layout is already stable at an
early checkpoint, the colours of late checkpoints appear there already)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PCAResult", "fit_pca", "pca_rgb", "rgb_grid"]

QUANTILE_ROWS = 1_000_000


@dataclass
class PCAResult:
    mean: Tensor                  # [C]
    components: Tensor            # [k, C], unit rows, signs fixed (largest loading positive)
    explained_ratio: Tensor       # [k]: share of the total variance of each component


def fit_pca(vectors: Tensor, k: int = 3) -> PCAResult:
    """PCA of ``vectors`` ``[M, C]`` through the eigenvectors of the covariance (float64).

    Signs are made deterministic: each component's largest-magnitude loading is positive. With
    fewer than ``k`` channels the missing components are zero (shown as mid grey).
    """
    x = vectors.double()
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / max(x.shape[0] - 1, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)          # ascending
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, eigenvectors = eigenvalues[order].clamp_min(0.0), eigenvectors[:, order]
    kept = min(k, eigenvectors.shape[1])
    components = eigenvectors[:, :kept].T.clone()
    for row in components:
        if row[int(row.abs().argmax())] < 0:
            row.neg_()
    total = eigenvalues.sum()
    ratio = eigenvalues[:kept] / total if total > 0 else torch.zeros(kept, dtype=torch.float64)
    if kept < k:
        components = torch.cat([components, torch.zeros(k - kept, components.shape[1], dtype=torch.float64)])
        ratio = torch.cat([ratio, torch.zeros(k - kept, dtype=torch.float64)])
    return PCAResult(mean, components, ratio)


def pca_rgb(maps: Sequence[Tensor], quantile: float = 0.01) -> tuple[list[Tensor], PCAResult]:
    """First three PCs of feature maps as RGB images in 0..1.

    Args:
        maps: feature maps ``[N_i, C, H_i, W_i]`` (one per checkpoint, same C), fitted together.
        quantile: each PC is scaled so that its ``quantile`` and ``1 - quantile`` values over all
            maps land on 0 and 1 (robust to a few extreme positions), then clipped.

    Returns:
        one ``[N_i, 3, H_i, W_i]`` float32 tensor per input map (R = PC1, G = PC2, B = PC3) and the
        fitted PCA.
    """
    if not maps:
        raise ValueError("pca_rgb needs at least one feature map")
    channels = {int(m.shape[1]) for m in maps}
    if len(channels) != 1:
        raise ValueError(f"pca_rgb: all maps need the same channel count, got {sorted(channels)}")
    vectors = torch.cat([m.double().permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps])
    pca = fit_pca(vectors, 3)
    projected_all = (vectors - pca.mean) @ pca.components.T                 # [M, 3]
    # torch.quantile refuses inputs above 2^24 elements: an even subsample gives the same scale
    stride = max(1, projected_all.shape[0] // QUANTILE_ROWS)
    sample = projected_all[::stride]
    lo = torch.quantile(sample, quantile, dim=0)
    hi = torch.quantile(sample, 1.0 - quantile, dim=0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    images = []
    for m in maps:
        n, c, h, w = m.shape
        flat = (m.double().permute(0, 2, 3, 1).reshape(-1, c) - pca.mean) @ pca.components.T
        rgb = ((flat - lo) / span).clamp(0.0, 1.0)
        rgb = torch.where(hi > lo, rgb, torch.full_like(rgb, 0.5))          # flat component: grey
        images.append(rgb.reshape(n, h, w, 3).permute(0, 3, 1, 2).float())
    return images, pca


def rgb_grid(columns: Sequence[Tensor], cell: int = 64, gap: int = 2) -> Tensor:
    """Lay out RGB maps as a grid: one column per entry of ``columns`` (``[N, 3, h, w]`` each, same
    N), one row per candidate; cells upscaled to ``cell`` pixels (nearest, so tokens stay visible).

    Returns an IMAGE-style ``[H, W, 3]`` float tensor with white gaps.
    """
    rows = {int(c.shape[0]) for c in columns}
    if len(rows) != 1:
        raise ValueError(f"rgb_grid: every column needs the same number of rows, got {sorted(rows)}")
    n = rows.pop()
    grid = torch.ones(n * cell + (n - 1) * gap, len(columns) * cell + (len(columns) - 1) * gap, 3)
    for j, column in enumerate(columns):
        cells = F.interpolate(column.float(), size=(cell, cell), mode="nearest")
        for i in range(n):
            y, x = i * (cell + gap), j * (cell + gap)
            grid[y:y + cell, x:x + cell] = cells[i].permute(1, 2, 0)
    return grid
