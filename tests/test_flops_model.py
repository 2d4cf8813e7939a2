"""The compute-ratio formulas behind bench/results/flops.md (bench/flops_model.py), by hand."""
import pytest

from bench.flops_model import Components, method_costs, method_ratios, scorer_costs
from probe_select.probes.pruning import StageCosts

# Made-up component costs in one unit: a step 10, a full decode 15, a preview decode 1, the probe 0.01,
# the evaluator 2.
PARTS = Components(step=10.0, decode=15.0, preview_decode=1.0, probe=0.01, evaluator=2.0)


def test_costs_n5_k1_by_hand():
    # T = 20, t = 0.2 -> c = 4. K = 1: one finished candidate, no final evaluation.
    costs = {name: value * PARTS.step for name, value in method_costs(PARTS, 5, 1, 20, 0.2).items()}
    assert costs["generate_all"] == pytest.approx(5 * 20 * 10 + 5 * 15 + 5 * 2)                   # 1085
    assert costs["probe_select"] == pytest.approx(5 * 4 * 10 + 5 * 0.01 + 1 * 16 * 10 + 1 * 15)    # 375.05
    assert costs["x0_preview_vae"] == pytest.approx(5 * 4 * 10 + 5 * (15 + 2) + 16 * 10 + 15)     # 460
    assert costs["x0_preview_taesd"] == pytest.approx(5 * 4 * 10 + 5 * (1 + 2) + 16 * 10 + 15)    # 390


def test_ratios_n20_k2_by_hand():
    # K = 2: both finished candidates are decoded and evaluated for the final pick.
    ratios = method_ratios(PARTS, 20, 2, 20, 0.2)
    generate_all = 20 * 20 * 10 + 20 * 15 + 20 * 2                                                # 4340
    assert ratios["generate_all"] == pytest.approx(1.0)
    assert ratios["probe_select"] == pytest.approx((20 * 40 + 20 * 0.01 + 2 * 160 + 2 * 15 + 2 * 2) / generate_all)
    assert ratios["x0_preview_vae"] == pytest.approx((20 * 40 + 20 * 17 + 2 * 160 + 2 * 15 + 2 * 2) / generate_all)
    assert ratios["x0_preview_taesd"] == pytest.approx((20 * 40 + 20 * 3 + 2 * 160 + 2 * 15 + 2 * 2) / generate_all)
    assert ratios["steps_only"] == pytest.approx((20 * 4 + 2 * 16) / (20 * 20))                   # 0.28


def test_ratios_do_not_depend_on_the_unit():
    scaled = Components(*(value * 1e12 for value in (10.0, 15.0, 1.0, 0.01, 2.0)))
    assert method_ratios(scaled, 5, 1, 20, 0.2) == pytest.approx(method_ratios(PARTS, 5, 1, 20, 0.2))


def test_checkpoint_rounds_like_the_sampler():
    # T = 10, t = 0.25 -> round(2.5) = 2 (half to even): steps only = (4*2 + 1*8) / 40.
    assert method_ratios(PARTS, 4, 1, 10, 0.25)["steps_only"] == pytest.approx(16 / 40)


def test_free_extras_reduce_to_the_steps_only_ratio():
    steps_only = Components(step=1.0, decode=0.0, preview_decode=0.0, probe=0.0, evaluator=0.0)
    ratios = method_ratios(steps_only, 5, 1, 20, 0.2)
    for name in ("probe_select", "x0_preview_vae", "x0_preview_taesd"):
        assert ratios[name] == pytest.approx(ratios["steps_only"]) == pytest.approx(0.36)


def test_scorer_costs_in_step_equivalents():
    costs = scorer_costs(PARTS)
    assert costs["random"] == StageCosts(score=0.0, decode=1.5, final_score=0.2)
    assert costs["probe"] == StageCosts(score=pytest.approx(0.001), decode=1.5, final_score=0.2)
    assert costs["x0_preview_vae"].score == pytest.approx(1.7)
    assert costs["x0_preview_taesd"].score == pytest.approx(0.3)
