"""Probe losses against values computed by hand."""
import math

import pytest
import torch

from probe_select.probes.training.losses import (
    ProbeLoss,
    anneal,
    combined_loss,
    info_nce_loss,
    listwise_ranking_loss,
    pearson_loss,
)
from probe_select.probes.model import ProbeConfig, build_probe

log, exp = math.log, math.exp

# Two prompts x three seeds. With tau = 0.5: s = pred / tau = [4, 2, 0 | 1, 3, -2].
PRED = torch.tensor([2.0, 1.0, 0.0, 0.5, 1.5, -1.0])
TARGET = torch.tensor([3.0, 2.0, 1.0, 0.0, 1.0, 0.5])
GROUP = torch.tensor([0, 0, 0, 1, 1, 1])


def test_ranking_loss_by_hand_no_margin():
    # Sets S_i = {i} U {j in i's prompt : y_j < y_i}:
    #   row 0 (y=3): {0, 1, 2}  l = logsumexp(4, 2, 0) - 4 = log(1 + e^-2 + e^-4)
    #   row 1 (y=2): {1, 2}     l = logsumexp(2, 0) - 2    = log(1 + e^-2)
    #   row 2 (y=1): {2}        l = 0
    #   row 3 (y=0): {3}        l = 0
    #   row 4 (y=1): {4, 3, 5}  l = logsumexp(3, 1, -2) - 3 = log(1 + e^-2 + e^-5)
    #   row 5 (y=.5): {5, 3}    l = logsumexp(-2, 1) + 2   = log(1 + e^3)
    # Rows of the other prompt never enter a set (row 4 outscores prompt 0's rows but is not
    # compared with them). Mean over all six rows, empty-set rows included.
    expected = (log(1 + exp(-2) + exp(-4)) + log(1 + exp(-2)) + 0 + 0
                + log(1 + exp(-2) + exp(-5)) + log(1 + exp(3))) / 6
    loss = listwise_ranking_loss(PRED, TARGET, GROUP, tau=0.5, alpha=0.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ranking_loss_by_hand_margin_drops_pairs():
    # alpha = 0.6: j is in S_i only if y_j + 0.6 < y_i.
    #   prompt 0: gaps are 1 and 2 > 0.6, so rows 0 and 1 keep their sets.
    #   row 4 (y=1): row 3 (0 + .6 < 1) stays, row 5 (0.5 + .6 = 1.1) drops: log(1 + e^-2)
    #   row 5 (y=.5): row 3 (0 + .6 = 0.6 > 0.5) drops: set {5}, l = 0
    expected = (log(1 + exp(-2) + exp(-4)) + log(1 + exp(-2)) + log(1 + exp(-2))) / 6
    loss = listwise_ranking_loss(PRED, TARGET, GROUP, tau=0.5, alpha=0.6)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # A margin above every gap empties all sets: the loss is exactly 0.
    assert listwise_ranking_loss(PRED, TARGET, GROUP, tau=0.5, alpha=5.0).item() == 0.0


def test_ranking_loss_perfect_order_goes_to_zero_as_tau_shrinks():
    pred = torch.tensor([3.0, 2.0, 1.0])
    target = torch.tensor([3.0, 2.0, 1.0])
    group = torch.zeros(3, dtype=torch.long)
    wide = listwise_ranking_loss(pred, target, group, tau=1.0, alpha=0.0).item()
    sharp = listwise_ranking_loss(pred, target, group, tau=0.1, alpha=0.0).item()
    # tau = 1: rows 0 and 1 give log(1 + e^-1 + e^-2) and log(1 + e^-1).
    assert wide == pytest.approx((log(1 + exp(-1) + exp(-2)) + log(1 + exp(-1))) / 3, rel=1e-5)
    assert sharp < 1e-4
    # Reversed predictions are penalised.
    assert listwise_ranking_loss(-pred, target, group, tau=1.0, alpha=0.0).item() > wide


def test_ranking_loss_gradient_and_errors():
    pred = PRED.clone().requires_grad_(True)
    listwise_ranking_loss(pred, TARGET, GROUP, tau=0.5, alpha=0.0).backward()
    # Rows 2 and 3 are never "i" with a non-trivial set but are in others' sets: pushed down.
    assert pred.grad[2] > 0 and pred.grad[3] > 0 and pred.grad[0] < 0
    with pytest.raises(ValueError):
        listwise_ranking_loss(PRED, TARGET, GROUP, tau=0.0, alpha=0.0)
    with pytest.raises(ValueError):
        listwise_ranking_loss(PRED, TARGET[:5], GROUP, tau=1.0, alpha=0.0)


def test_ranking_loss_top_weight_by_hand():
    # g = 1: row i of prompt p weighs |p| * e^{y_i} / sum_{j in p} e^{y_j}; the per-row terms are those above.
    terms = [log(1 + exp(-2) + exp(-4)), log(1 + exp(-2)), 0.0, 0.0, log(1 + exp(-2) + exp(-5)), log(1 + exp(3))]
    first = [exp(3), exp(2), exp(1)]
    second = [exp(0), exp(1), exp(0.5)]
    weights = [3 * w / sum(first) for w in first] + [3 * w / sum(second) for w in second]
    expected = sum(w * term for w, term in zip(weights, terms)) / 6
    loss = listwise_ranking_loss(PRED, TARGET, GROUP, tau=0.5, alpha=0.0, top_weight=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The best row of each prompt weighs more than the unweighted loss gives it: its share of the loss grows.
    assert weights[0] > 1 and weights[4] > 1 and weights[2] < 1
    # g = 0 is the unweighted loss exactly; shifting every target by a constant changes no weight.
    assert listwise_ranking_loss(PRED, TARGET, GROUP, 0.5, 0.0, top_weight=0.0).item() == \
        listwise_ranking_loss(PRED, TARGET, GROUP, 0.5, 0.0).item()
    shifted = listwise_ranking_loss(PRED, TARGET + 100.0, GROUP, tau=0.5, alpha=0.0, top_weight=1.0)
    assert shifted.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="top_weight"):
        listwise_ranking_loss(PRED, TARGET, GROUP, tau=0.5, alpha=0.0, top_weight=-1.0)


def test_top_weight_reaches_the_trainer_config():
    from probe_select.probes.training.train import TrainConfig

    assert TrainConfig(top_weight=2.0).to_dict()["top_weight"] == 2.0
    with pytest.raises(ValueError, match="top_weight"):
        TrainConfig(top_weight=-0.5)
    # ProbeLoss hands it to the ranking term.
    assert combined_loss(PRED, TARGET, GROUP, 0.5, 0.0, lambda_align=0.0, top_weight=1.0).ranking.item() == \
        pytest.approx(listwise_ranking_loss(PRED, TARGET, GROUP, 0.5, 0.0, top_weight=1.0).item())
    assert ProbeLoss(top_weight=1.0).top_weight == 1.0


def test_anneal_first_and_last_epoch():
    assert anneal(0, 10, alpha_max=0.2) == pytest.approx((1.0, 0.2))
    # Last epoch e = E - 1: tau = max(1/E, tau_min), alpha = alpha_max / E.
    assert anneal(9, 10, alpha_max=0.2) == pytest.approx((0.1, 0.02))
    assert anneal(3, 4, alpha_max=0.2) == pytest.approx((0.25, 0.05))
    assert anneal(19, 20, alpha_max=0.3) == pytest.approx((0.1, 0.015))  # tau clamped at tau_min
    assert anneal(5, 10, alpha_max=0.2, tau_min=0.6) == pytest.approx((0.6, 0.1))
    with pytest.raises(ValueError):
        anneal(10, 10, alpha_max=0.2)


def test_info_nce_by_hand_multi_positive():
    # u rows: (1,0), (0,1), (1,1); projected text rows: (1,0), (0,1), (0,1). Rows 1 and 2 are two
    # seeds of one prompt (group 1), so both text rows 1 and 2 are positives for them.
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    group = torch.tensor([0, 1, 1])
    # cos / 0.5:  row 0: [2, 0, 0]   row 1: [0, 2, 2]   row 2: [sqrt2, sqrt2, sqrt2]
    r2 = math.sqrt(2)
    l0 = log(exp(2) + 2) - 2                       # positives {0}
    l1 = log(1 + 2 * exp(2)) - log(2 * exp(2))     # positives {1, 2}
    l2 = log(3 * exp(r2)) - log(2 * exp(r2))       # = log(3/2)
    loss = info_nce_loss(u, text, group, temperature=0.5)
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-5)
    # Cosine similarity: scaling an embedding changes nothing.
    assert info_nce_loss(3 * u, 0.5 * text, group, temperature=0.5).item() == pytest.approx(loss.item(), rel=1e-5)


def test_info_nce_single_positive_is_cross_entropy_and_one_prompt_is_zero():
    # 2x2, distinct prompts: cos / 1.0 = [[1, 0], [0.6, 0.8]] with u = (1,0), (0.6,0.8), text = I.
    u = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.eye(2)
    expected = ((log(exp(1) + exp(0)) - 1) + (log(exp(0.6) + exp(0.8)) - 0.8)) / 2
    assert info_nce_loss(u, text, torch.tensor([0, 1]), temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    # One prompt only: every row is a positive, nothing to contrast.
    assert info_nce_loss(u, text, torch.tensor([4, 4]), temperature=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_pearson_loss_by_hand():
    # Deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / sqrt(2 * 2) = 0.5.
    assert pearson_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])).item() == pytest.approx(0.5, rel=1e-5)
    assert pearson_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])).item() == pytest.approx(0.0, abs=1e-6)
    assert pearson_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])).item() == pytest.approx(2.0, abs=1e-6)
    assert pearson_loss(torch.ones(3), torch.tensor([3.0, 2.0, 1.0])).item() == pytest.approx(1.0)


def test_combined_loss_weights_terms():
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [0.5, 0.2], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    terms = combined_loss(PRED, TARGET, GROUP, 0.5, 0.0, u=u, text_proj=text, lambda_align=10.0, lambda_pearson=2.0)
    ranking = listwise_ranking_loss(PRED, TARGET, GROUP, 0.5, 0.0)
    align = info_nce_loss(u, text, GROUP)
    pearson = pearson_loss(PRED, TARGET)
    assert terms.ranking.item() == pytest.approx(ranking.item())
    assert terms.align.item() == pytest.approx(align.item())
    assert terms.total.item() == pytest.approx((ranking + 10 * align + 2 * pearson).item(), rel=1e-5)
    # No text: no alignment term; lambda_pearson 0: no Pearson term.
    plain = combined_loss(PRED, TARGET, GROUP, 0.5, 0.0)
    assert plain.align.item() == 0.0 and plain.pearson.item() == 0.0
    assert plain.total.item() == pytest.approx(ranking.item())


def test_probe_loss_reads_embeddings_of_the_forward_pass():
    config = ProbeConfig(in_channels=4, feature_size=8, stem_width=16, widths=(16,), pooled_size=2,
                         embed_dim=8, time_embed_dim=8, head_hidden=(8,), mlp_hidden=16, text_dim=6)
    probe = build_probe(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=gen)
    text = torch.randn(6, 6, generator=gen)
    pred, terms = ProbeLoss(lambda_align=10.0)(probe, x, 0.2, TARGET, GROUP, 0.5, 0.1, text)
    with torch.no_grad():
        assert torch.allclose(pred, probe(x, 0.2, text))
        u, e = probe.encode(x, 0.2), probe.project_text(text)
    assert terms.align.item() == pytest.approx(info_nce_loss(u, e, GROUP).item(), rel=1e-5)
    assert terms.total.item() == pytest.approx(terms.ranking.item() + 10 * terms.align.item(), rel=1e-5)
    assert not probe.image_mlp._forward_hooks and not probe.text_mlp._forward_hooks  # hooks removed
    assert not probe.image_embedding._forward_hooks
    terms.total.backward()
    assert probe.text_mlp[0].weight.grad is not None
