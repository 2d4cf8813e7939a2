"""Blending two scorers (probes/training/blending.py) and its node (ProbeSelectBlendScores)."""
import math

import numpy as np
import pytest
import torch

from probe_select.probes.training.blending import blend_scores, fit_blend_weight, standardize_within
from probe_select.probes.scoring import CandidateScores


def test_standardize_within_each_group_by_hand():
    scores = torch.tensor([1.0, 3.0, 10.0, 10.0, 10.0, 7.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    z = standardize_within(scores, groups)
    # group 0: mean 2, SD 1 (population); group 1: constant -> 0; group 2: one candidate -> 0
    assert torch.allclose(z, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(standardize_within(torch.tensor([2.0, 4.0, 6.0])),
                          torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * math.sqrt(1.5))


def test_standardize_within_keeps_nan_out_of_the_statistics():
    z = standardize_within(torch.tensor([1.0, float("nan"), 3.0]))
    assert math.isnan(z[1]) and torch.allclose(z[[0, 2]], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert torch.isnan(standardize_within(torch.tensor([float("nan")] * 2))).all()
    with pytest.raises(ValueError, match="groups must be"):
        standardize_within(torch.ones(3), torch.zeros(2))


def test_blend_ends_order_as_each_scorer_and_ignore_scale():
    first = torch.tensor([0.9, 0.1, 0.5, 0.3])             # evaluator units
    second = torch.tensor([-3.0, 2.0, 1.0, 0.0])            # a probe's, another scale
    assert blend_scores(first, second, 0.0).argsort().tolist() == first.argsort().tolist()
    assert blend_scores(first, second, 1.0).argsort().tolist() == second.argsort().tolist()
    # standardised first: rescaling or shifting a scorer changes nothing
    rescaled = blend_scores(first * 100 - 7, second / 5 + 2, 0.3)
    assert torch.allclose(blend_scores(first, second, 0.3), rescaled, atol=1e-6)
    by_hand = 0.7 * standardize_within(first) + 0.3 * standardize_within(second)
    assert torch.allclose(blend_scores(first, second, 0.3), by_hand.float())
    assert blend_scores(first, second, 0.3).dtype == torch.float32


def test_blend_keeps_an_unscored_candidate_last_and_refuses_bad_input():
    blended = blend_scores(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0.0, 5.0, 1.0]), 0.5)
    assert math.isnan(blended[1])
    scores = CandidateScores(blended, "blend", "run", [1, 2, 3])
    assert scores.order().tolist()[-1] == 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blend_scores(torch.ones(3), torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="different candidates"):
        blend_scores(torch.ones(3), torch.ones(4), 0.5)


def test_blend_standardises_within_each_prompt():
    # prompt 1's second scores are 100x larger: without standardising per prompt they would swamp prompt 0's
    first = torch.tensor([0.0, 1.0, 0.0, 1.0])
    second = torch.tensor([1.0, 0.0, 100.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1])
    blended = blend_scores(first, second, 0.5, groups)
    assert torch.allclose(blended, torch.zeros(4))          # each prompt: the two scorers cancel exactly


def _synthetic(prompts=60, seeds=8, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(prompts, seeds)), rng.normal(size=(prompts, seeds))
    groups = np.repeat(np.arange(prompts), seeds)
    return a.ravel(), b.ravel(), groups


def test_fit_blend_weight_finds_the_known_mix():
    a, b, groups = _synthetic()
    fit = fit_blend_weight(a, b, a + b, groups)              # target = equal parts of both: the best weight is 0.5
    assert fit.weight == pytest.approx(0.5)
    alone = dict(fit.tried)
    # per prompt, z(a) + z(b) is not exactly a + b (their sample SDs differ), so the best blend ranks near 1, not at it
    assert fit.within > alone[0.0] + 0.2 and fit.within > alone[1.0] + 0.2 and fit.within > 0.95
    assert len(fit.tried) == 21 and [w for w, _ in fit.tried] == pytest.approx(np.linspace(0, 1, 21).tolist())
    assert fit_blend_weight(a, b, a + 3 * b, groups).weight == pytest.approx(0.75)


def test_fit_blend_weight_ties_go_to_the_first_scorer_and_needs_a_target():
    a, b, groups = _synthetic()
    # the second scorer is a monotone copy of the first: every weight ranks alike, the smallest wins
    assert fit_blend_weight(a, a * 3 + 1, a, groups).weight == 0.0
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_blend_weight(a, b, np.ones_like(a), groups)
    with pytest.raises(ValueError, match="grid"):
        fit_blend_weight(a, b, a, groups, grid=1)


def test_blend_node_ranks_one_run_and_names_itself_on_a_mismatch():
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.nodes.nodes_blend_scores import ProbeSelectBlendScores

    preview = CandidateScores(torch.tensor([0.9, 0.1, 0.5, 0.3]), "clipscore (x0 preview)", "run-1", [7, 8, 9, 10])
    probe = CandidateScores(torch.tensor([-3.0, 2.0, 1.0, 0.0]), "clipscore", "run-1", [7, 8, 9, 10])
    out = ProbeSelectBlendScores.execute(preview, probe, 0.25)
    scores = out.result[0]
    assert torch.allclose(scores.scores, blend_scores(preview.scores, probe.scores, 0.25))
    assert scores.run_id == "run-1" and scores.seeds == [7, 8, 9, 10]
    assert scores.evaluator == "blend w=0.25"
    best = int(scores.order()[0])
    assert f"#1  candidate {best}  seed {7 + best}" in out.ui.as_dict()["text"][0]
    other_run = CandidateScores(probe.scores, "clipscore", "run-2", [7, 8, 9, 10])
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectBlendScores\] the two scores are of different "
                                               r"candidates.*Fix: score the same early sampler run"):
        ProbeSelectBlendScores.execute(preview, other_run, 0.5)
    other_seeds = CandidateScores(probe.scores, "clipscore", "run-1", [1, 2, 3, 4])
    with pytest.raises(ProbeSelectError, match="different candidates"):
        ProbeSelectBlendScores.execute(preview, other_seeds, 0.5)
