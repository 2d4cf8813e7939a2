"""Ranking and selection metrics against values computed by hand."""
import itertools
import math

import numpy as np
import pytest
import torch

from probe_select.probes.training.metrics import (
    bootstrap_ci,
    global_spearman,
    kendall_tau,
    per_group_spearman,
    rankdata,
    selection_summary,
    spearman,
    top1_hit_rate,
    within_prompt_spearman,
)


def test_rankdata_average_ties():
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rankdata([1, 1, 1]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5.
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # Without ties: 1 - 6 sum d^2 / (n (n^2 - 1)); d = (0, -2, 1, 1) -> 1 - 36/60 = 0.4.
    assert spearman([1, 2, 3, 4], [1, 4, 2, 3]) == pytest.approx(0.4)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), np.array([3, 5, 9])) == pytest.approx(1.0)


def test_kendall_tau_b_by_hand():
    # One pair tied in x, the other five concordant: 5 / sqrt((6 - 1) * 6).
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / math.sqrt(30))
    # x = (1,1,2,3,3), y = (2,1,1,3,2): concordant 5, discordant 1 (pair 0-2), tied in x 2 pairs,
    # tied in y 2 pairs: (5 - 1) / sqrt((10 - 2) * (10 - 2)) = 0.5.
    assert kendall_tau([1, 1, 2, 3, 3], [2, 1, 1, 3, 2]) == pytest.approx(0.5)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([2, 2, 2], [1, 2, 3]))


def _kendall_brute(x, y):
    n0 = nc = nd = tx = ty = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        n0 += 1
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        tx += dx == 0
        ty += dy == 0
        nc += dx * dy > 0
        nd += dx * dy < 0
    return (nc - nd) / math.sqrt((n0 - tx) * (n0 - ty))


def test_kendall_matches_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    for n in (2, 7, 40):
        x, y = rng.integers(0, 5, n), rng.integers(0, 4, n)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert kendall_tau(x, y) == pytest.approx(_kendall_brute(x, y), abs=1e-12)


def test_within_prompt_and_global_differ():
    # Within each prompt the prediction orders seeds perfectly, but prompt A (targets 10..12) is
    # predicted low and prompt B (targets 0..2) high. Within-prompt: 1. Global: every rank is off
    # by 3, rho = 1 - 6 * 6 * 9 / (6 * 35) = -19/35.
    pred = [0, 1, 2, 10, 11, 12]
    target = [10, 11, 12, 0, 1, 2]
    group = [0, 0, 0, 1, 1, 1]
    assert within_prompt_spearman(pred, target, group) == pytest.approx(1.0)
    assert global_spearman(pred, target) == pytest.approx(-19 / 35)


def test_per_group_spearman_skips_and_zeroes():
    pred = [1, 2, 3, 5, 5, 7, 1, 2, 9]
    target = [1, 2, 3, 1, 2, 3, 4, 4, 0]
    group = [0, 0, 0, 1, 1, 1, 2, 2, 3]
    # group 0: 1.0; group 1: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> 1.5/sqrt(1.5*2) = 0.866;
    # group 2: constant target -> skipped; group 3: one row -> skipped.
    values = per_group_spearman(pred, target, group)
    assert values.tolist() == pytest.approx([1.0, 1.5 / math.sqrt(3.0)])
    # A constant prediction ranks nothing: 0, not NaN.
    assert per_group_spearman([3, 3, 3], [1, 2, 3], [0, 0, 0]).tolist() == [0.0]
    assert math.isnan(within_prompt_spearman([1], [1], [0]))


def test_top1_and_selection_by_hand():
    pred = [0.1, 0.9, 0.5, 0.8, 0.2, 0.3, 0.3, 0.1]
    target = [1, 3, 2, 1, 4, 5, 5, 2]
    group = [0, 0, 0, 1, 1, 2, 2, 2]
    # prompt 0: picks row 1 (target 3 = best): hit.   mean 2,   best 3
    # prompt 1: picks row 3 (target 1, best 4): miss. mean 2.5, best 4
    # prompt 2: pred tie -> first (row 5, target 5 = best, tied with row 6): hit. mean 4, best 5
    assert top1_hit_rate(pred, target, group) == pytest.approx(2 / 3)
    summary = selection_summary(pred, target, group)
    assert summary["selected"] == pytest.approx((3 + 1 + 5) / 3)
    assert summary["mean"] == pytest.approx((2 + 2.5 + 4) / 3)
    assert summary["best"] == pytest.approx((3 + 4 + 5) / 3)
    # (3 - 8.5/3) / (4 - 8.5/3) = (0.5/3) / (3.5/3) = 1/7
    assert summary["oracle_gain_fraction"] == pytest.approx(1 / 7)
    assert summary["n_prompts"] == 3
    # Predicting the target itself is the oracle.
    assert selection_summary(target, target, group)["oracle_gain_fraction"] == pytest.approx(1.0)
    assert top1_hit_rate(target, target, group) == 1.0


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(1).normal(0.7, 0.1, size=50)
    ci = bootstrap_ci(values, n=500, seed=3)
    assert ci == bootstrap_ci(values, n=500, seed=3)
    assert ci["low"] < ci["mean"] < ci["high"]
    assert ci["mean"] == pytest.approx(values.mean())
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * values.std() / math.sqrt(50), rel=0.25)
    flat = bootstrap_ci([0.5, 0.5, 0.5])
    assert flat["low"] == flat["high"] == pytest.approx(0.5)
    assert math.isnan(bootstrap_ci([])["mean"])
