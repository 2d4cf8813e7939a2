"""probes.training.distillation: flips, the distillation loop, the linear ranker and its fold into a scalar probe."""
import numpy as np
import pytest
import torch

from probe_select.probes.io import ProbeMetadata, load_probe, save_probe
from probe_select.probes.model import ProbeConfig, build_probe
from probe_select.probes.training.distillation import (
    DistillConfig, LinearRanker, centre_within_groups, distill_probe, fit_linear_ranker, flip_view, fold_ranker, widen_head)
from probe_select.probes.training.metrics import within_prompt_spearman

TINY = ProbeConfig(in_channels=8, feature_size=4, inputs=("x0",), x0_size=8, x0_stem_width=8, x0_widths=(16,),
                   embed_dim=16, mlp_hidden=32, head_hidden=(16,), pooled_size=2, attention=False, text_dim=6,
                   text_film=True)


def test_flip_views_mirror_the_latent_left_right_upside_down_and_both():
    latent = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    assert torch.equal(flip_view(latent, 0), latent)
    assert torch.equal(flip_view(latent, 1)[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert torch.equal(flip_view(latent, 2)[0, 0, :, 0], torch.tensor([12.0, 8.0, 4.0, 0.0]))
    assert flip_view(latent, 3)[0, 1, 0, 0] == latent[0, 1, 3, 3]


def _teacher(x0: torch.Tensor) -> torch.Tensor:
    """Readings a probe can learn: each channel's mean, and the horizontal centre of mass of channel 0's positive
    part (which a left-right flip mirrors)."""
    xs = torch.linspace(-1, 1, x0.shape[-1])
    mass = x0[:, 0].clamp(min=0)
    centre = (mass.sum(1) * xs).sum(1) / mass.sum((1, 2)).clamp(min=1e-6)
    return torch.cat([x0.mean((2, 3)), centre[:, None]], 1)


def _latents(rows: int) -> torch.Tensor:
    """Noise with a per-channel offset and a bright blob in channel 0 at a random column."""
    x0 = torch.randn(rows, 4, 8, 8) + torch.randn(rows, 4, 1, 1)
    column = torch.randint(0, 8, (rows,))
    x0[torch.arange(rows), 0, :, column] += 4.0
    return x0


def test_distillation_learns_the_teachers_readings_in_every_view_and_keeps_the_epoch_validation_prefers():
    torch.manual_seed(0)
    rows = 512
    x0 = _latents(rows)
    t = torch.rand(rows)
    text = torch.randn(rows, 6)
    targets = torch.stack([_teacher(flip_view(x0, v)) for v in range(2)], 1)
    held = _latents(128)
    held_t, held_text = torch.rand(128), torch.randn(128, 6)
    seen = []

    def validate(probe):
        with torch.no_grad():
            pred = probe(None, held_t, held_text, x0=held) * probe.reading_std + probe.reading_mean
        corr = np.corrcoef(pred[:, -1].numpy(), _teacher(held)[:, -1].numpy())[0, 1]
        seen.append(corr)
        return -abs(len(seen) - 2)          # prefers the second epoch, whatever it scores

    probe, history = distill_probe(TINY, x0, t, text, targets, DistillConfig(epochs=4, batch_size=64), validate)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and history[-1]["loss"] < history[0]["loss"]
    assert probe.head[-1].out_features == 5
    assert torch.allclose(probe.reading_mean, targets[:, 0].mean(0))
    # the kept weights are the second epoch's: validate again gives that epoch's figure
    validate(probe)
    assert seen[-1] == pytest.approx(seen[1], abs=1e-9)
    # trained longer, the channel means and the (flip-dependent) centre are learned on new latents
    probe, _ = distill_probe(TINY, x0, t, text, targets, DistillConfig(epochs=10, batch_size=32))
    with torch.no_grad():
        pred = probe(None, held_t, held_text, x0=held) * probe.reading_std + probe.reading_mean
        flipped = probe(None, held_t, held_text, x0=flip_view(held, 1)) * probe.reading_std + probe.reading_mean
    truth = _teacher(held)
    assert np.corrcoef(pred[:, 0], truth[:, 0])[0, 1] > 0.9
    assert np.corrcoef(pred[:, -1], truth[:, -1])[0, 1] > 0.6
    assert np.corrcoef(flipped[:, -1], -truth[:, -1])[0, 1] > 0.6


def test_distillation_refuses_a_probe_that_reads_activations_and_mismatched_rows():
    x0, t, targets = torch.randn(8, 4, 8, 8), torch.rand(8), torch.randn(8, 1, 3)
    with pytest.raises(ValueError, match="x0 latent only"):
        distill_probe(ProbeConfig(in_channels=8, feature_size=4, inputs=("activations", "x0"), x0_size=8), x0, t,
                      None, targets)
    with pytest.raises(ValueError, match="t has 7 rows, x0 has 8"):
        distill_probe(TINY, x0, t[:7], torch.randn(8, 6), targets)
    with pytest.raises(ValueError, match="views"):
        distill_probe(TINY, x0, t, torch.randn(8, 6), torch.randn(8, 5, 3))


def test_the_linear_ranker_orders_rows_within_prompts_by_the_readings_that_decide_the_target():
    rng = np.random.default_rng(0)
    readings = rng.normal(size=(600, 3)) * np.array([1.0, 5.0, 0.1])
    groups = np.repeat(np.arange(60), 10)
    target = 2 * readings[:, 0] - readings[:, 1] / 5 + 3 * groups        # the prompt's offset ranks nothing
    ranker = fit_linear_ranker(torch.tensor(readings), torch.tensor(target), torch.tensor(groups))
    assert ranker.weights[0] > 0 > ranker.weights[1]
    assert abs(ranker.weights[2]) < 0.2 * ranker.weights[0]
    assert within_prompt_spearman(ranker(torch.tensor(readings)).numpy(), target, groups) > 0.95
    with pytest.raises(ValueError, match="nothing to rank"):
        fit_linear_ranker(torch.tensor(readings[:10]), torch.ones(10), torch.arange(10))


def test_a_folded_probe_scores_exactly_as_the_ranker_on_the_distilled_readings_and_round_trips_as_a_probe_file(
        tmp_path):
    torch.manual_seed(1)
    distilled = widen_head(build_probe(TINY, seed=3), 4)
    distilled.register_buffer("reading_mean", torch.tensor([1.0, -2.0, 0.5, 0.0]))
    distilled.register_buffer("reading_std", torch.tensor([2.0, 0.5, 1.0, 3.0]))
    ranker = LinearRanker(torch.tensor([0.7, -1.2, 0.0, 0.3], dtype=torch.float64),
                          torch.tensor([0.9, -1.5, 0.2, 0.1], dtype=torch.float64),
                          torch.tensor([1.5, 0.7, 1.0, 2.5], dtype=torch.float64))
    x0, t, text = torch.randn(5, 4, 8, 8), torch.rand(5), torch.randn(5, 6)
    with torch.no_grad():
        readings = distilled(None, t, text, x0=x0) * distilled.reading_std + distilled.reading_mean
    folded = fold_ranker(distilled, ranker, scale=0.5, shift=-1.0)
    with torch.no_grad():
        scores = folded(None, t, text, x0=x0)
    assert scores.shape == (5,)
    assert torch.allclose(scores.double(), 0.5 * ranker(readings) - 1.0, atol=1e-4)
    meta = ProbeMetadata(backbone_family="sd1", tap="x0", checkpoint_t=0.2, feature_shape=(8, 4, 4),
                         pooling="adaptive_avg", evaluator="proxy", config=TINY)
    probe, _ = load_probe(save_probe(tmp_path / "distilled.safetensors", folded, meta))
    with torch.no_grad():
        assert torch.allclose(probe(None, t, text, x0=x0), scores, atol=1e-6)
    with pytest.raises(ValueError, match="reverse the ranking"):
        fold_ranker(distilled, ranker, scale=-1.0)
    with pytest.raises(ValueError, match="reads \\(3,\\) readings, the head predicts 4"):
        fold_ranker(distilled, LinearRanker(torch.zeros(3), torch.zeros(3), torch.ones(3)))


def test_distillation_is_reproducible_from_its_seed_whatever_the_global_random_state():
    x0, t, text = torch.randn(64, 4, 8, 8), torch.rand(64), torch.randn(64, 6)
    targets = torch.randn(64, 2, 3)
    outputs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        probe, _ = distill_probe(TINY, x0, t, text, targets, DistillConfig(epochs=1, batch_size=32, seed=5))
        with torch.no_grad():
            outputs.append(probe(None, t, text, x0=x0))
    assert torch.equal(outputs[0], outputs[1])


def test_centring_within_groups_leaves_only_how_a_groups_rows_differ_in_every_view_and_reading():
    torch.manual_seed(0)
    groups = np.array([3, 7, 3, 3, 7, 9])                    # any labels, rows of one group anywhere
    targets = torch.randn(6, 2, 5) + torch.tensor([10.0, -4.0, 0.0, 2.0, 8.0, 1.0]).view(6, 1, 1)
    centred = centre_within_groups(targets, groups)
    assert centred.shape == targets.shape and centred.dtype == targets.dtype
    for g in (3, 7, 9):
        rows = torch.as_tensor(groups == g)
        assert torch.allclose(centred[rows].mean(0), torch.zeros(2, 5), atol=1e-6)
        # differences between a group's rows are kept exactly
        assert torch.allclose(centred[rows] - centred[rows][:1], targets[rows] - targets[rows][:1], atol=1e-5)
    assert torch.equal(centred[5], torch.zeros(2, 5))         # a group of one row has nothing to rank
    with pytest.raises(ValueError, match="one group per row"):
        centre_within_groups(targets, groups[:5])
