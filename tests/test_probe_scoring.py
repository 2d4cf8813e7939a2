"""Scoring: fixed denormalisation, batch-size independence, stable order, compatibility checks;
and the feature helpers that produce the activations being scored."""
import dataclasses
import logging

import pytest
import torch

from probe_select.probes.features import FEATURE_DTYPE, ActivationSet, pool_feature_map, tokens_to_grid
from probe_select.probes.io import ProbeMetadata
from probe_select.probes.model import ProbeConfig, build_probe
from probe_select.probes.scoring import CandidateScores, ProbeCompatibilityError, check_compatible, score_candidates

C, P, TEXT = 8, 8, 12


def make_probe(text_dim=TEXT):
    config = ProbeConfig(in_channels=C, feature_size=P, stem_width=16, widths=(16, 32), pooled_size=2,
                         embed_dim=32, time_embed_dim=16, head_hidden=(32,), mlp_hidden=64, text_dim=text_dim)
    probe = build_probe(config, seed=11).eval()
    meta = ProbeMetadata(backbone_family="sd2", tap="output_blocks.7.0", checkpoint_t=0.2,
                         feature_shape=(C, P, P), pooling="adaptive_avg", evaluator="imagereward",
                         score_mean=0.3594, score_std=0.9424, config=config)
    return probe, meta


def make_acts(n=5, text_rows=None, **overrides):
    generator = torch.Generator().manual_seed(0)
    text_rows = n if text_rows is None else text_rows
    fields = dict(
        features=(3 * torch.randn(n, C, P, P, generator=generator)).to(FEATURE_DTYPE),
        family="sd2", tap="output_blocks.7.0", step=4, steps=20, sigma=7.5,
        seeds=list(range(100, 100 + n)), run_id="run-1",
        text_embedding=torch.randn(text_rows, TEXT, generator=generator) if text_rows else None,
    )
    return ActivationSet(**{**fields, **overrides})


# ---- features -------------------------------------------------------------------------------


def test_pool_feature_map_downsamples_by_averaging():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(2, 3, 1, 1).to(torch.bfloat16)
    pooled = pool_feature_map(x, 2)
    assert pooled.shape == (2, 3, 2, 2) and pooled.dtype == FEATURE_DTYPE
    # Top-left 2x2 block is 0, 1, 4, 5 -> 2.5.
    torch.testing.assert_close(pooled[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=FEATURE_DTYPE))


def test_pool_feature_map_upsamples_small_maps():
    x = torch.ones(1, 2, 3, 3)
    pooled = pool_feature_map(x, 6)
    assert pooled.shape == (1, 2, 6, 6)
    torch.testing.assert_close(pooled.float(), torch.ones(1, 2, 6, 6))
    # Mixed: one axis pooled, the other upsampled.
    mixed = pool_feature_map(torch.randn(1, 2, 12, 3), 6)
    assert mixed.shape == (1, 2, 6, 6)
    with pytest.raises(ValueError, match="B, C, H, W"):
        pool_feature_map(torch.zeros(2, 3, 4), 2)


def test_tokens_to_grid_is_row_major():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    grid = tokens_to_grid(tokens, 2, 3)
    assert grid.shape == (2, 3, 2, 3)
    # Token 4 sits at row 1, column 1; channel d of it is tokens[:, 4, d].
    assert torch.equal(grid[:, :, 1, 1], tokens[:, 4, :])
    with pytest.raises(ValueError, match=r"7 tokens do not fill a 2x3 grid"):
        tokens_to_grid(torch.zeros(1, 7, 3), 2, 3)


def test_activation_set_properties_and_select():
    acts = make_acts(5)
    assert len(acts) == 5
    assert acts.t == pytest.approx(0.2)
    assert acts.feature_shape == (C, P, P)
    picked = acts.select([3, 1])
    assert picked.seeds == [103, 101]
    assert torch.equal(picked.features, acts.features[[3, 1]])
    assert torch.equal(picked.text_embedding, acts.text_embedding[[3, 1]])
    shared = make_acts(5, text_rows=1).select(torch.tensor([4]))
    assert shared.text_embedding.shape == (1, TEXT) and shared.seeds == [104]


def test_activation_set_validation():
    with pytest.raises(ValueError, match="N, C, P, P"):
        make_acts(features=torch.zeros(5, C, P))
    with pytest.raises(ValueError, match="5 feature rows but 4 seeds"):
        make_acts(seeds=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="text_embedding"):
        make_acts(5, text_rows=3)
    with pytest.raises(ValueError, match="step"):
        make_acts(step=21)


# ---- scoring --------------------------------------------------------------------------------


def test_scores_are_denormalised_with_fixed_mean_and_std():
    probe, meta = make_probe()
    acts = make_acts(5)
    result = score_candidates(probe, meta, acts)
    with torch.no_grad():
        pred = probe(acts.features, acts.t, acts.text_embedding)
    torch.testing.assert_close(result.scores, pred * 0.9424 + 0.3594)
    assert result.scores.dtype == torch.float32 and result.scores.device.type == "cpu"
    assert result.evaluator == "imagereward" and result.run_id == "run-1" and result.seeds == acts.seeds
    shifted = score_candidates(probe, dataclasses.replace(meta, score_mean=10.0, score_std=2.0), acts)
    torch.testing.assert_close(shifted.scores, pred * 2.0 + 10.0)


def test_score_of_a_candidate_does_not_depend_on_n_or_chunking():
    probe, meta = make_probe()
    acts = make_acts(5)
    full = score_candidates(probe, meta, acts).scores
    chunked = score_candidates(probe, meta, acts, batch_size=2).scores
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)
    for i in range(5):
        alone = score_candidates(probe, meta, acts.select([i])).scores
        assert alone.shape == (1,)
        assert abs(alone.item() - full[i].item()) < 1e-5
    assert full.std() > 0


def test_text_override_and_broadcast():
    probe, meta = make_probe()
    acts = make_acts(5, text_rows=0)
    text = torch.randn(1, TEXT)
    broadcast = score_candidates(probe, meta, acts, text_embedding=text).scores
    per_row = score_candidates(probe, meta, acts, text_embedding=text.expand(5, -1).clone(), batch_size=2).scores
    torch.testing.assert_close(broadcast, per_row, rtol=0, atol=1e-5)
    own = score_candidates(probe, meta, make_acts(5)).scores
    assert not torch.allclose(own, broadcast)


def test_probe_without_text_ignores_text_in_activations():
    probe, meta = make_probe(text_dim=0)
    with_text = score_candidates(probe, meta, make_acts(3)).scores
    without = score_candidates(probe, meta, make_acts(3, text_rows=0)).scores
    assert torch.equal(with_text, without)


def test_order_is_stable_with_ties():
    result = CandidateScores(scores=torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), evaluator="x", run_id="r",
                             seeds=[10, 11, 12, 13, 14])
    assert result.order().tolist() == [1, 2, 4, 0, 3]
    assert result.order(descending=False).tolist() == [3, 0, 1, 2, 4]
    assert len(result) == 5
    with_nan = CandidateScores(scores=torch.tensor([float("nan"), 2.0, 1.0]), evaluator="x", run_id="r", seeds=[1, 2, 3])
    assert with_nan.order().tolist() == [1, 2, 0]
    assert with_nan.order(descending=False).tolist() == [2, 1, 0]


def test_candidate_scores_validation():
    with pytest.raises(ValueError, match="2 scores but 3 seeds"):
        CandidateScores(scores=torch.zeros(2), evaluator="x", run_id="r", seeds=[1, 2, 3])


@pytest.mark.parametrize(
    "overrides, names",
    [
        (dict(family="sd3"), ["sd2", "sd3"]),
        (dict(tap="output_blocks.8.0"), ["output_blocks.7.0", "output_blocks.8.0"]),
        (dict(features=torch.zeros(5, C, 4, 4, dtype=FEATURE_DTYPE)), [f"({C}, {P}, {P})", f"({C}, 4, 4)"]),
        (dict(features=torch.zeros(5, 16, P, P, dtype=FEATURE_DTYPE)), [f"({C}, {P}, {P})", f"(16, {P}, {P})"]),
        (dict(step=10), ["t=0.200", "t=0.500", "step 4 of 20"]),
        (dict(text_embedding=None), ["text branch", "12", "no text embedding"]),
        (dict(text_embedding=torch.zeros(5, 7)), ["width 12", "width 7"]),
    ],
)
def test_compatibility_errors(overrides, names):
    probe, meta = make_probe()
    acts = make_acts(5, **overrides)
    with pytest.raises(ProbeCompatibilityError) as caught:
        check_compatible(meta, acts)
    for name in names:
        assert name in str(caught.value)
    with pytest.raises(ProbeCompatibilityError):
        score_candidates(probe, meta, acts)


def test_small_t_gap_warns(caplog):
    _, meta = make_probe()
    with caplog.at_level(logging.WARNING, logger="probe_select.probes.scoring"):
        check_compatible(meta, make_acts(step=4, steps=20))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="probe_select.probes.scoring"):
        check_compatible(meta, make_acts(step=5, steps=20))
    assert any("t=0.250" in record.getMessage() for record in caplog.records)
    with pytest.raises(ProbeCompatibilityError, match="t=0.250"):
        check_compatible(meta, make_acts(step=5, steps=20), t_tolerance=0.01)


def test_probe_and_metadata_must_agree():
    probe, meta = make_probe()
    other, _ = make_probe(text_dim=0)
    with pytest.raises(ProbeCompatibilityError, match="metadata"):
        score_candidates(other, meta, make_acts(3))
