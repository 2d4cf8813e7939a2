"""Blending two scorers of the same candidates: the x0 preview's evaluator score and a probe's prediction.

The two scorers fail differently. The x0 preview runs the evaluator itself on a blurry estimate of the finished
image, so it tells the candidates that will satisfy the prompt; a probe, trained on the finished images' scores,
orders the rest. Their scales differ (an evaluator's units against a probe's), so each is standardised within
the candidates of one prompt (mean 0, SD 1) and the blend is ``(1 - weight) * z(first) + weight * z(second)``:
only the order within a prompt matters to selection, and a standardised score keeps each scorer's margins, which
a rank would discard. The weight is chosen on validation data (:func:`fit_blend_weight`), never on the prompts a
blend is judged on.

Unlike :class:`~probes.scoring.CandidateScores` from one scorer, blended scores are relative to their batch: a
candidate's blended score changes with the other candidates it is scored among.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .metrics import within_prompt_spearman

__all__ = ["BlendFit", "standardize_within", "blend_scores", "fit_blend_weight"]

WEIGHT_GRID = 21        # weights 0, 0.05, ..., 1 tried by fit_blend_weight


def standardize_within(scores: Tensor, groups: Optional[Tensor] = None) -> Tensor:
    """``scores`` [N] standardised within each group (all rows one group when ``groups`` is None): mean 0 and
    SD 1 over the group's finite scores. A group whose finite scores are all equal (or a single candidate) gets 0:
    it orders nothing. NaN stays NaN."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be [N], got shape {tuple(scores.shape)}")
    groups = torch.zeros(len(scores), dtype=torch.long) if groups is None else torch.as_tensor(groups)
    if groups.shape != scores.shape:
        raise ValueError(f"groups must be [N] like the scores ({len(scores)}), got shape {tuple(groups.shape)}")
    out = torch.full_like(scores, float("nan"))
    for group in torch.unique(groups):
        rows = (groups == group) & torch.isfinite(scores)
        values = scores[rows]
        if len(values) == 0:
            continue
        spread = values.std(unbiased=False)
        out[rows] = (values - values.mean()) / spread if spread > 0 else torch.zeros_like(values)
    return out


def blend_scores(first: Tensor, second: Tensor, weight: float, groups: Optional[Tensor] = None) -> Tensor:
    """``(1 - weight) * z(first) + weight * z(second)``, each standardised within its group
    (:func:`standardize_within`), float32. ``weight`` 0 orders as ``first``, 1 as ``second``. A candidate that
    either scorer could not score (NaN) stays NaN, and ranks last."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"blend weight must be in [0, 1], got {weight}")
    first, second = torch.as_tensor(first), torch.as_tensor(second)
    if first.shape != second.shape:
        raise ValueError(f"the two scorers scored different candidates: shapes {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    blended = (1.0 - weight) * standardize_within(first, groups) + weight * standardize_within(second, groups)
    return blended.float()


@dataclass(frozen=True)
class BlendFit:
    """The weight :func:`fit_blend_weight` chose, the validation within-prompt Spearman it reached, and that of
    every weight tried (``(weight, spearman)`` pairs, in order)."""

    weight: float
    within: float
    tried: tuple[tuple[float, float], ...]


def fit_blend_weight(first, second, target, groups, grid: int = WEIGHT_GRID) -> BlendFit:
    """The weight in ``linspace(0, 1, grid)`` whose blend ranks ``target`` best within its groups (mean
    within-prompt Spearman) on validation rows. Ties go to the smaller weight (the first scorer, in this pack the
    training-free one). Raises ValueError when no group has two rows with different targets."""
    if grid < 2:
        raise ValueError(f"grid must be >= 2 weights, got {grid}")
    groups_t = torch.as_tensor(np.asarray(groups))
    target = np.asarray(target, dtype=np.float64)
    tried = []
    for weight in np.linspace(0.0, 1.0, grid):
        blended = blend_scores(torch.as_tensor(np.asarray(first)), torch.as_tensor(np.asarray(second)),
                               float(weight), groups_t).double().numpy()
        blended = np.nan_to_num(blended, nan=-np.inf)     # as selection treats them: last
        tried.append((float(weight), within_prompt_spearman(blended, target, groups_t.numpy())))
    if all(np.isnan(rho) for _, rho in tried):
        raise ValueError("no validation prompt has two candidates with different targets: nothing to fit the "
                         "blend weight on")
    weight, within = max(tried, key=lambda pair: (np.nan_to_num(pair[1], nan=-np.inf), -pair[0]))
    return BlendFit(weight=weight, within=within, tried=tuple(tried))
