"""Evaluation metrics for probes: rank correlations (global and within prompt) and selection.

Everything takes 1-D tensors, numpy arrays or lists, computes in float64 numpy, and returns Python
floats (or dicts of them). Ties are handled with average ranks (Spearman) and tau-b (Kendall).

Selection is among the seeds of one prompt, so the metrics that matter for Probe-Select are the
within-prompt ones: :func:`within_prompt_spearman`, :func:`top1_hit_rate` and
:func:`selection_summary`. Group-level metrics use only prompts with at least two rows (a prompt
with one candidate has nothing to select); all prompts weigh the same, whatever their row count.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Union

import numpy as np

__all__ = [
    "rankdata",
    "spearman",
    "kendall_tau",
    "per_group_spearman",
    "within_prompt_spearman",
    "global_spearman",
    "top1_hit_rate",
    "selection_summary",
    "bootstrap_ci",
]

ArrayLike = Union[np.ndarray, Sequence[float], Any]  # Any: torch tensors (converted with .numpy())


def _as_array(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {arr.shape}")
    return arr


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_array(x), _as_array(y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def rankdata(x: ArrayLike) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (like ``scipy.stats.rankdata``)."""
    x = _as_array(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    average = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    if denom == 0.0:
        return math.nan
    return float((x * y).sum() / denom)


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks of ``x`` and ``y``.

    NaN when fewer than two values or either side is constant (undefined).
    """
    x, y = _pair(x, y)
    if len(x) < 2:
        return math.nan
    return _pearson(rankdata(x), rankdata(y))


def _tie_pairs(sorted_values: np.ndarray) -> int:
    """Sum over runs of equal values (in sorted input) of ``n (n - 1) / 2``."""
    if len(sorted_values) == 0:
        return 0
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    counts = np.diff(np.r_[starts, len(sorted_values)])
    return int((counts * (counts - 1) // 2).sum())


def _count_inversions(values: np.ndarray) -> int:
    """Number of pairs i < j with ``values[i] > values[j]`` (strictly), by a Fenwick tree."""
    ranks = np.unique(values, return_inverse=True)[1].astype(np.int64) + 1  # dense ranks, 1-based
    size = int(ranks.max()) if len(ranks) else 0
    tree = [0] * (size + 1)
    inversions = 0
    for seen, r in enumerate(ranks.tolist()):
        # Seen values <= r, then those > r are inversions with the current one.
        i, not_greater = r, 0
        while i > 0:
            not_greater += tree[i]
            i -= i & -i
        inversions += seen - not_greater
        i = r
        while i <= size:
            tree[i] += 1
            i += i & -i
    return inversions


def kendall_tau(x: ArrayLike, y: ArrayLike) -> float:
    """Kendall's tau-b (ties in either variable accounted for), in O(n log n)::

        tau_b = (n_c - n_d) / sqrt((n_0 - n_x) * (n_0 - n_y))

    with ``n_0 = n (n - 1) / 2``, ``n_x``/``n_y`` the pairs tied in x/y, and ``n_c``/``n_d`` the
    concordant/discordant pairs. NaN when fewer than two values or either side is constant.
    """
    x, y = _pair(x, y)
    n = len(x)
    if n < 2:
        return math.nan
    order = np.lexsort((y, x))  # by x, then y
    xs, ys = x[order], y[order]
    n0 = n * (n - 1) // 2
    n_x = _tie_pairs(xs)
    n_y = _tie_pairs(np.sort(y))
    # Pairs tied in both: runs of equal (x, y) in the lexicographic order.
    both_change = np.r_[True, (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])]
    starts = np.flatnonzero(both_change)
    counts = np.diff(np.r_[starts, n])
    n_xy = int((counts * (counts - 1) // 2).sum())
    # Sorted by (x, y), an inversion in y is a pair with x_i < x_j and y_i > y_j: discordant.
    discordant = _count_inversions(ys)
    concordant = n0 - n_x - n_y + n_xy - discordant
    denom = math.sqrt(float(n0 - n_x) * float(n0 - n_y))
    if denom == 0.0:
        return math.nan
    return float((concordant - discordant) / denom)


def _groups(group: ArrayLike, n: int) -> list[np.ndarray]:
    """Row indices of each group with at least two rows, in order of first appearance."""
    if hasattr(group, "detach"):
        group = group.detach().cpu().numpy()
    g = np.asarray(group)
    if g.ndim != 1 or len(g) != n:
        raise ValueError(f"group must be 1-D with {n} entries, got shape {g.shape}")
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
    rows = [order[bounds[k]:bounds[k + 1]] for k in range(len(first))]
    rows = [rows[k] for k in np.argsort(first, kind="stable")]
    return [r for r in rows if len(r) >= 2]


def per_group_spearman(pred: ArrayLike, target: ArrayLike, group: ArrayLike) -> np.ndarray:
    """Spearman of ``pred`` and ``target`` within each group with >= 2 rows and a non-constant
    target, in order of first appearance. A constant prediction within such a group counts as 0
    (it ranks nothing), not NaN."""
    pred, target = _pair(pred, target)
    values = []
    for rows in _groups(group, len(pred)):
        y = target[rows]
        if np.all(y == y[0]):
            continue
        rho = spearman(pred[rows], y)
        values.append(0.0 if math.isnan(rho) else rho)
    return np.asarray(values, dtype=np.float64)


def within_prompt_spearman(pred: ArrayLike, target: ArrayLike, group: ArrayLike) -> float:
    """Mean over prompts of the within-prompt Spearman (see :func:`per_group_spearman`); NaN if no
    prompt qualifies."""
    values = per_group_spearman(pred, target, group)
    return float(values.mean()) if len(values) else math.nan


def global_spearman(pred: ArrayLike, target: ArrayLike) -> float:
    """Spearman over all rows, across prompts (includes how well prompts are ranked against each
    other, which selection never needs)."""
    return spearman(pred, target)


def _selected(pred: np.ndarray, rows: np.ndarray) -> int:
    """Row picked by the probe in a group: the first maximum of ``pred`` (stable, like
    ``CandidateScores.order``); NaN predictions never win unless all are NaN."""
    p = pred[rows]
    p = np.where(np.isnan(p), -np.inf, p)
    return int(rows[int(np.argmax(p))])


def top1_hit_rate(pred: ArrayLike, target: ArrayLike, group: ArrayLike) -> float:
    """Fraction of prompts (>= 2 rows) whose top row by ``pred`` has the prompt's best target
    (any of the tied best counts); NaN if no prompt has two rows."""
    pred, target = _pair(pred, target)
    groups = _groups(group, len(pred))
    if not groups:
        return math.nan
    hits = [target[_selected(pred, rows)] == target[rows].max() for rows in groups]
    return float(np.mean(hits))


def selection_summary(pred: ArrayLike, target: ArrayLike, group: ArrayLike) -> dict[str, float]:
    """What top-1 selection by ``pred`` achieves, in the units of ``target``.

    Over prompts with >= 2 rows (each prompt weighs the same):

    - ``selected``: mean target of the row picked by ``pred`` (first maximum).
    - ``mean``: mean of the prompts' average target (what a random seed gets on average).
    - ``best``: mean of the prompts' best target (the oracle).
    - ``oracle_gain_fraction``: ``(selected - mean) / (best - mean)``; 1 = oracle, 0 = random,
      negative = worse than random; NaN when ``best == mean``.
    - ``top1_hit_rate`` and ``n_prompts``.
    """
    pred, target = _pair(pred, target)
    groups = _groups(group, len(pred))
    if not groups:
        nan = math.nan
        return {"selected": nan, "mean": nan, "best": nan, "oracle_gain_fraction": nan,
                "top1_hit_rate": nan, "n_prompts": 0}
    selected = float(np.mean([target[_selected(pred, rows)] for rows in groups]))
    mean = float(np.mean([target[rows].mean() for rows in groups]))
    best = float(np.mean([target[rows].max() for rows in groups]))
    gain = (selected - mean) / (best - mean) if best != mean else math.nan
    return {
        "selected": selected,
        "mean": mean,
        "best": best,
        "oracle_gain_fraction": float(gain),
        "top1_hit_rate": top1_hit_rate(pred, target, group),
        "n_prompts": len(groups),
    }


def bootstrap_ci(values_per_group: ArrayLike, n: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap confidence interval of the mean of per-prompt values.

    Prompts (not rows) are resampled with replacement ``n`` times with a seeded generator, so the
    same input gives the same interval. Returns ``{"mean", "low", "high", "n_groups"}``; NaN
    bounds for an empty input.
    """
    values = _as_array(values_per_group)
    values = values[~np.isnan(values)]
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence}")
    if n < 1:
        raise ValueError(f"bootstrap_ci: n must be >= 1, got {n}")
    if len(values) == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n_groups": 0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n_groups": int(len(values))}
