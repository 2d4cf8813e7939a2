"""Pins on the metrics and losses (issue 11): values a mutation of probes/metrics.py or
probes/losses.py would change while the hand-computed tests still pass."""
import math
import warnings

import pytest
import torch

from probe_select.probes.training.losses import ProbeLoss, anneal, combined_loss, info_nce_loss, listwise_ranking_loss, pearson_loss
from probe_select.probes.training.metrics import (bootstrap_ci, kendall_tau, per_group_spearman, selection_summary, spearman,
                                                 top1_hit_rate, within_prompt_spearman)
from probe_select.probes.model import ProbeConfig, build_probe

# ---- metrics --------------------------------------------------------------------------------


def test_constant_prediction_counts_as_zero_and_constant_target_is_skipped():
    # Prompt a: perfect order (rho 1). Prompt b: the probe predicts one value for every seed while
    # the targets differ: it ranks nothing, which counts as 0 (skipping it would report 1.0).
    pred = [1.0, 2.0, 3.0, 0.5, 0.5, 0.5]
    target = [10.0, 20.0, 30.0, 1.0, 3.0, 2.0]
    group = ["a", "a", "a", "b", "b", "b"]
    assert per_group_spearman(pred, target, group).tolist() == [1.0, 0.0]
    assert within_prompt_spearman(pred, target, group) == 0.5
    # Prompt c: every seed has the same target, so there is nothing to rank: skipped whatever the
    # prediction (counting it as 0 would report 0.5).
    pred = [1.0, 2.0, 3.0, 3.0, 1.0, 2.0]
    target = [10.0, 20.0, 30.0, 7.0, 7.0, 7.0]
    group = ["a", "a", "a", "c", "c", "c"]
    assert per_group_spearman(pred, target, group).tolist() == [1.0]
    assert within_prompt_spearman(pred, target, group) == 1.0


def test_spearman_of_two_values_is_plus_or_minus_one():
    # Two distinct values on each side are fully ranked: rho is +1 or -1, never NaN.
    assert spearman([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert spearman([1.0, 2.0], [4.0, 3.0]) == -1.0
    assert per_group_spearman([0.2, 0.1], [1.0, 2.0], [0, 0]).tolist() == [-1.0]
    # Undefined cases stay NaN: one value, or a constant side.
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(spearman([1.0, 1.0], [2.0, 3.0]))


def test_nan_prediction_never_wins_top1():
    # In each prompt the best target sits on the row whose prediction is NaN: picking NaN would be a hit.
    pred = [math.nan, 0.2, 0.1, 0.3, math.nan, 0.0]
    target = [9.0, 1.0, 2.0, 5.0, 8.0, 6.0]
    group = [0, 0, 0, 1, 1, 1]
    assert top1_hit_rate(pred, target, group) == 0.0
    summary = selection_summary(pred, target, group)
    assert summary["selected"] == pytest.approx((1.0 + 5.0) / 2)   # rows 1 and 3 are picked
    assert summary["top1_hit_rate"] == 0.0
    # All NaN: the first row is picked (the documented fallback), here a hit.
    assert top1_hit_rate([math.nan, math.nan], [2.0, 1.0], [0, 0]) == 1.0


def test_selection_summary_by_value():
    # Prompt 0: pick row 0 (target 3, best 3): hit. Prompt 1: pick row 4 (target 1, best 2): miss.
    # Prompt 2: pick row 7 (target 5; rows 6 and 7 tie for best): hit. Prompt 3 has one row: ignored.
    # (Picking by target and checking the prediction instead would miss prompt 2: 1/3.)
    pred = [0.9, 0.1, 0.5, 0.2, 0.8, 0.1, 0.6, 0.7, 0.4]
    target = [3.0, 1.0, 2.0, 2.0, 1.0, 0.0, 5.0, 5.0, 100.0]
    group = [0, 0, 0, 1, 1, 1, 2, 2, 3]
    summary = selection_summary(pred, target, group)
    assert summary["top1_hit_rate"] == pytest.approx(2 / 3)
    assert summary["n_prompts"] == 3
    selected, mean, best = (3 + 1 + 5) / 3, (2 + 1 + 5) / 3, (3 + 2 + 5) / 3
    assert summary["selected"] == pytest.approx(selected)
    assert summary["mean"] == pytest.approx(mean)
    assert summary["best"] == pytest.approx(best)
    assert summary["oracle_gain_fraction"] == pytest.approx((selected - mean) / (best - mean))
    assert top1_hit_rate(pred, target, group) == summary["top1_hit_rate"]


# ---- losses ---------------------------------------------------------------------------------


U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
TEXT = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
PRED = torch.tensor([0.3, -0.2, 0.5, 0.1])
TARGET = torch.tensor([1.0, 0.0, 0.5, 2.0])
GROUP = torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("weight", [0.1, 0.5, 1.0])
def test_alignment_term_is_used_for_weights_up_to_one(weight):
    """The Train node allows lambda_align in 0.1 steps: every weight > 0 adds weight * InfoNCE."""
    align = info_nce_loss(U, TEXT, GROUP)
    ranking = listwise_ranking_loss(PRED, TARGET, GROUP, 0.5, 0.0)
    assert align.item() > 0.1
    terms = combined_loss(PRED, TARGET, GROUP, 0.5, 0.0, u=U, text_proj=TEXT, lambda_align=weight)
    assert terms.align.item() == pytest.approx(align.item(), rel=1e-6)
    assert terms.total.item() == pytest.approx(ranking.item() + weight * align.item(), rel=1e-6)
    off = combined_loss(PRED, TARGET, GROUP, 0.5, 0.0, u=U, text_proj=TEXT, lambda_align=0.0)
    assert off.align.item() == 0.0 and off.total.item() == pytest.approx(ranking.item(), rel=1e-6)


@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_probe_loss_reads_the_text_branch_for_weights_up_to_one(weight):
    config = ProbeConfig(in_channels=4, feature_size=8, stem_width=16, widths=(16,), pooled_size=2,
                         embed_dim=8, time_embed_dim=8, head_hidden=(8,), mlp_hidden=16, text_dim=6)
    probe = build_probe(config, seed=0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    text = torch.randn(4, 6, generator=generator)
    _, terms = ProbeLoss(lambda_align=weight)(probe, x, 0.2, TARGET, GROUP, 0.5, 0.0, text)
    with torch.no_grad():
        expected = info_nce_loss(probe.encode(x, 0.2), probe.project_text(text), GROUP)
    assert expected.item() > 0
    assert terms.align.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(terms.ranking.item() + weight * expected.item(), rel=1e-5)


def test_tied_targets_do_not_push_each_other_down():
    """Only rows *clearly* worse (y_j + alpha < y_i, strictly) enter a row's comparison set."""
    group = torch.zeros(2, dtype=torch.long)
    pred = torch.tensor([0.0, 1.0])
    # Equal targets, no margin: neither row is worse than the other, every set is {i}: loss 0.
    assert listwise_ranking_loss(pred, torch.tensor([1.0, 1.0]), group, tau=1.0, alpha=0.0).item() == 0.0
    # A gap exactly equal to the margin is not "clearly worse" either.
    assert listwise_ranking_loss(pred, torch.tensor([1.5, 1.0]), group, tau=1.0, alpha=0.5).item() == 0.0
    # A gap above the margin is: row 0 (y 1.5) is compared with row 1, l_0 = log(1 + e^(1 - 0)).
    expected = math.log(1 + math.exp(1.0)) / 2
    assert listwise_ranking_loss(pred, torch.tensor([1.5, 1.0]), group, tau=1.0, alpha=0.25).item() == pytest.approx(expected, rel=1e-6)
    assert listwise_ranking_loss(pred, torch.tensor([1.5, 1.0]), group, tau=1.0, alpha=0.0).item() == pytest.approx(expected, rel=1e-6)
    # However small the gap above the margin (2^-10 here, exact in float32).
    barely = torch.tensor([1.0 + 2.0**-10, 1.0])
    assert listwise_ranking_loss(pred, barely, group, tau=1.0, alpha=0.0).item() == pytest.approx(expected, rel=1e-6)
    # Tied rows get no gradient from each other.
    tied = pred.clone().requires_grad_(True)
    listwise_ranking_loss(tied, torch.tensor([1.0, 1.0]), group, tau=1.0, alpha=0.0).backward()
    assert torch.equal(tied.grad, torch.zeros(2))


# ---- pins from the second mutation run (issue 11) -------------------------------------------


def test_ranking_loss_and_anneal_refuse_bad_arguments():
    pred, target, group = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, 0.0, 2.0]), torch.zeros(3)
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        listwise_ranking_loss(pred, target, group, tau=0.0, alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be >= 0, got -0.1"):
        listwise_ranking_loss(pred, target, group, tau=1.0, alpha=-0.1)
    with pytest.raises(ValueError, match="listwise_ranking_loss: inputs must share their first dimension"):
        listwise_ranking_loss(pred, torch.tensor([1.0, 0.0]), group, tau=1.0, alpha=0.0)
    with pytest.raises(ValueError, match=r"pred must be \[B\], got \(3, 1\)"):
        listwise_ranking_loss(pred[:, None], target, group, tau=1.0, alpha=0.0)
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        anneal(0, 0, 1.0)
    for epoch in (-1, 4):
        with pytest.raises(ValueError, match=r"epoch must be in \[0, 4\)"):
            anneal(epoch, 4, 1.0)


def test_anneal_schedule_by_value():
    assert anneal(0, 1, 2.0) == (1.0, 2.0)                       # a one-epoch run is allowed
    assert anneal(0, 10, 2.0) == (1.0, 2.0)
    tau, alpha = anneal(5, 10, 2.0)
    assert tau == pytest.approx(0.5) and alpha == pytest.approx(1.0)
    tau, alpha = anneal(9, 10, 2.0)                               # floor at the default tau_min 0.1
    assert tau == pytest.approx(0.1) and alpha == pytest.approx(0.2)
    assert anneal(19, 20, 1.0)[0] == pytest.approx(0.1)          # 1/20 < 0.1: the floor wins
    assert anneal(19, 20, 1.0, tau_min=0.01)[0] == pytest.approx(0.05)


def test_info_nce_and_pearson_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="u and text must be"):
        info_nce_loss(U, torch.ones(4, 3), GROUP)                 # same rows, other width
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce_loss(U, TEXT, GROUP, temperature=0.0)
    with pytest.raises(ValueError, match="pearson_loss: inputs must share their first dimension"):
        pearson_loss(PRED, TARGET[:3])


def test_pearson_term_by_value():
    expected = pearson_loss(PRED, TARGET)
    p, y = PRED - PRED.mean(), TARGET - TARGET.mean()
    assert expected.item() == pytest.approx(1.0 - (p * y).sum().item() / math.sqrt((p * p).sum().item() * (y * y).sum().item()), rel=1e-5)
    ranking = listwise_ranking_loss(PRED, TARGET, GROUP, 0.5, 0.0)
    terms = combined_loss(PRED, TARGET, GROUP, 0.5, 0.0, lambda_align=0.0, lambda_pearson=0.5)
    assert terms.pearson.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms.total.item() == pytest.approx(ranking.item() + 0.5 * expected.item(), rel=1e-6)
    # Without u / text_proj the alignment term is off whatever its weight.
    terms = combined_loss(PRED, TARGET, GROUP, 0.5, 0.0, lambda_align=10.0)
    assert terms.align.item() == 0.0 and terms.pearson.item() == 0.0
    assert terms.total.item() == pytest.approx(ranking.item(), rel=1e-6)
    # InfoNCE is not symmetric in (u, text): the image side is the one normalised per row.
    assert info_nce_loss(U, TEXT, GROUP).item() != pytest.approx(info_nce_loss(TEXT, U, GROUP).item(), rel=1e-3)


def test_probe_loss_defaults_and_text_free_probe():
    assert ProbeLoss() == ProbeLoss(lambda_align=10.0, lambda_pearson=0.0, temperature=0.07)   # documented defaults
    config = ProbeConfig(in_channels=4, feature_size=8, stem_width=16, widths=(16,), pooled_size=2,
                         embed_dim=8, time_embed_dim=8, head_hidden=(8,), mlp_hidden=16, text_dim=0)
    probe = build_probe(config, seed=0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    text = torch.randn(4, 6, generator=generator)
    # A probe without a text branch ignores a given text and never aligns, whatever lambda_align.
    for loss in (ProbeLoss(), ProbeLoss(lambda_align=0.0)):
        for given in (text, None):
            pred, terms = loss(probe, x, 0.2, TARGET, GROUP, 0.5, 0.1, given)
            assert terms.align.item() == 0.0
            # The ranking term compares the predictions with the targets (in that order).
            expected = listwise_ranking_loss(pred, TARGET, GROUP, 0.5, 0.1)
            assert terms.ranking.item() == pytest.approx(expected.item(), rel=1e-6)
            assert listwise_ranking_loss(TARGET, pred, GROUP, 0.5, 0.1).item() != pytest.approx(expected.item(), rel=1e-3)


def test_probe_loss_leaves_no_hooks_behind():
    config = ProbeConfig(in_channels=4, feature_size=8, stem_width=16, widths=(16,), pooled_size=2,
                         embed_dim=8, time_embed_dim=8, head_hidden=(8,), mlp_hidden=16, text_dim=6)
    probe = build_probe(config, seed=0)
    generator = torch.Generator().manual_seed(1)
    x, text = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 6, generator=generator)
    _, terms = ProbeLoss()(probe, x, 0.2, TARGET, GROUP, 0.5, 0.0, text)
    assert terms.align.item() > 0
    assert len(probe.image_mlp._forward_hooks) == 0 and len(probe.text_mlp._forward_hooks) == 0


def test_metrics_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="x and y must have the same length, got 3 and 4"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="group must be 1-D with 3 entries"):
        per_group_spearman([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 0])
    with pytest.raises(ValueError, match="group must be 1-D with 3 entries"):
        top1_hit_rate([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 0, 0, 0])


def test_undefined_cases_are_quiet_nans():
    """Empty inputs give NaN (or the empty summary) without numpy's empty-slice warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(spearman([], []))
        assert math.isnan(spearman([1.0, 1.0, 1.0], [2.0, 3.0, 1.0]))       # a constant side: 0 / 0
        assert per_group_spearman([0.5, 0.5], [1.0, 2.0], [0, 0]).tolist() == [0.0]
        assert math.isnan(kendall_tau([1.0], [2.0]))
        assert math.isnan(kendall_tau([], []))
        summary = selection_summary([1.0, 2.0], [3.0, 4.0], [0, 1])      # no prompt with two rows
        assert summary["n_prompts"] == 0
        assert all(math.isnan(summary[k]) for k in ("selected", "mean", "best", "oracle_gain_fraction", "top1_hit_rate"))
        assert math.isnan(top1_hit_rate([1.0, 2.0], [3.0, 4.0], [0, 1]))
        ci = bootstrap_ci([math.nan, math.nan])
        assert ci["n_groups"] == 0 and math.isnan(ci["low"]) and math.isnan(ci["high"])


def test_top1_picks_by_prediction_and_checks_the_target():
    # Tied best targets: the prediction picks row 1, whose target is a best one: a hit. Picking by
    # target instead (first maximum, row 0) and checking its prediction (0.1, not the top 0.9) misses.
    assert top1_hit_rate([0.1, 0.9], [5.0, 5.0], [0, 0]) == 1.0
    assert top1_hit_rate([5.0, 5.0], [0.1, 0.9], [0, 0]) == 0.0


def test_bootstrap_ci_bounds_and_arguments():
    values = [0.1, 0.4, 0.2, 0.9, 0.5, 0.3]
    ci = bootstrap_ci(values, n=200, seed=1, confidence=0.5)
    wide = bootstrap_ci(values, n=200, seed=1, confidence=0.99)
    assert ci["low"] < ci["mean"] < ci["high"] and ci["n_groups"] == 6
    assert wide["low"] < ci["low"] and ci["high"] < wide["high"]
    assert bootstrap_ci([0.7], n=1) == {"mean": 0.7, "low": 0.7, "high": 0.7, "n_groups": 1}
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence must be in"):
            bootstrap_ci(values, confidence=confidence)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        bootstrap_ci(values, n=0)
