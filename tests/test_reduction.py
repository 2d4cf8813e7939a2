"""Channel reduction at write time: per-sample PCA (order and sign rule) and the fixed projection, the
manifest and probe records, the round trip write -> train -> probe file -> score live activations,
the refusals of mismatched data, probes and activations, determinism, and the size saved."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from probe_select.probes.features import ActivationSeries, ActivationSet
from probe_select.probes.io import load_probe, read_probe_metadata
from probe_select.probes.model import ProbeConfig
from probe_select.probes.reduction import NO_REDUCTION, ChannelReduction, pca_directions, projection_matrix
from probe_select.probes.scoring import ProbeCompatibilityError, score_candidates
from probe_select.probes.training.dataset import (
    DatasetError,
    DatasetWriter,
    ProbeDataset,
    check_probe_matches,
    list_shards,
    read_manifest,
    rows_from_activations,
)
from probe_select.probes.training.pipeline import evaluate_on_dataset, train_from_dataset
from probe_select.probes.training.train import TrainConfig

CHANNELS, SIZE, KEEP = 640, 8, 48
STEPS, CHECKPOINT_STEPS = 10, (2, 4)
PROMPTS, SEEDS = 12, 4


def centred_maps(features: torch.Tensor) -> torch.Tensor:
    """``[C, P, P]`` -> ``[P*P, C]`` float64 with each channel's spatial mean removed."""
    positions = features.double().reshape(features.shape[0], -1).T
    return positions - positions.mean(dim=0, keepdim=True)


# ---- the reduction itself -------------------------------------------------------------------


def test_pca_orders_components_by_variance_and_fixes_their_sign():
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    u = torch.linalg.qr(u - u.mean(dim=0))[0]                     # two centred orthonormal spatial patterns
    features = torch.zeros(6, 16, dtype=torch.float64)
    features[2] = 3.0 * u[:, 0] + 0.5                               # strongest component: channel 2, offset removed
    features[4] = -1.5 * u[:, 1]                                    # second: channel 4, negative pattern
    features = features.reshape(1, 6, 4, 4)
    reduction = ChannelReduction.create("pca", 2, 6)
    out = reduction.apply(features)[0].double().reshape(2, 16)
    # Ordered by variance, and each direction has positive loadings (+e2, +e4), so the outputs are the
    # centred channels themselves, with their own signs.
    torch.testing.assert_close(out[0], 3.0 * u[:, 0], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out[1], -1.5 * u[:, 1], atol=2e-3, rtol=1e-3)
    # Swapping the strengths swaps the order.
    swapped = features.clone()
    swapped[0, 2], swapped[0, 4] = features[0, 2] / 6.0, features[0, 4] * 4.0
    out = reduction.apply(swapped)[0].double().reshape(2, 16)
    torch.testing.assert_close(out[0], -6.0 * u[:, 1], atol=3e-3, rtol=1e-3)
    # Negating the input keeps the directions (the sign rule looks at loadings, not at the data's sign),
    # so the reduced maps are negated too.
    torch.testing.assert_close(reduction.apply(-features).float(), -reduction.apply(features).float())

    # On random data: orthonormal directions, positive sum of cubed loadings, decreasing variance, and the
    # same subspace as an SVD (up to the sign the rule fixes).
    maps = torch.randn(CHANNELS, SIZE, SIZE, generator=generator)
    centred = centred_maps(maps)
    directions = pca_directions(centred, KEEP)
    torch.testing.assert_close(directions.T @ directions, torch.eye(KEEP, dtype=torch.float64), atol=1e-9, rtol=0)
    assert bool(((directions ** 3).sum(dim=0) > 0).all())
    variances = (centred @ directions).var(dim=0)
    assert bool((variances[1:] <= variances[:-1] + 1e-9).all())
    vh = torch.linalg.svd(centred, full_matrices=False).Vh[:KEEP]
    torch.testing.assert_close((directions * vh.T).sum(dim=0).abs(), torch.ones(KEEP, dtype=torch.float64),
                               atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind", ["pca", "projection"])
def test_reduction_is_per_sample_and_deterministic(kind):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 2, CHANNELS, SIZE, SIZE, generator=generator).half()
    reduction = ChannelReduction.create(kind, KEEP, CHANNELS, seed=5 if kind == "projection" else 0)
    out = reduction.apply(features)
    assert out.shape == (3, 2, KEEP, SIZE, SIZE) and out.dtype == torch.float16
    assert torch.equal(out, reduction.apply(features))                              # repeatable
    assert torch.equal(out[1, 0], reduction.apply(features[1, 0:1])[0])             # one sample alone: same bits
    assert torch.equal(out[2], reduction.apply(features[2]))
    again = ChannelReduction.create(kind, KEEP, CHANNELS, seed=5 if kind == "projection" else 0)
    assert again == reduction and torch.equal(again.apply(features), out)
    if kind == "projection":
        matrix = projection_matrix(CHANNELS, KEEP, 5)
        torch.testing.assert_close(matrix.T @ matrix, torch.eye(KEEP, dtype=torch.float64), atol=1e-12, rtol=0)
        expected = torch.einsum("ck,nmcpq->nmkpq", matrix, features.double()).half()
        assert torch.equal(out, expected) or (out.float() - expected.float()).abs().max() <= 2e-3
        other = ChannelReduction.create("projection", KEEP, CHANNELS, seed=6)
        assert other.digest != reduction.digest and not torch.equal(other.apply(features), out)


def test_reduction_settings_are_checked_and_round_trip():
    pca = ChannelReduction.create("pca", KEEP, CHANNELS)
    projection = ChannelReduction.create("projection", KEEP, CHANNELS, seed=3)
    assert ChannelReduction.create("none", 48, 640) == NO_REDUCTION and not NO_REDUCTION.active
    for reduction in (pca, projection, NO_REDUCTION):
        assert ChannelReduction.from_dict(json.loads(json.dumps(reduction.to_dict()))) == reduction
    assert len(projection.digest) == 16 and pca.digest == ""
    assert pca.describe() == "per-sample PCA 640 -> 48 channels"
    with pytest.raises(ValueError, match="cannot keep 700 of 640 channels"):
        ChannelReduction.create("pca", 700, CHANNELS)
    with pytest.raises(ValueError, match="cannot keep 0 of 640"):
        ChannelReduction.create("projection", 0, CHANNELS)
    with pytest.raises(ValueError, match="must be one of"):
        ChannelReduction.create("svd", KEEP, CHANNELS)
    with pytest.raises(ValueError, match=r"4x4 map has at most 15 components"):
        pca.output_shape((CHANNELS, 4, 4))
    with pytest.raises(ValueError, match="needs 640-channel features, got 320"):
        pca.apply(torch.zeros(1, 320, SIZE, SIZE))
    tampered = {**projection.to_dict(), "digest": "0" * 16}
    with pytest.raises(ValueError, match="another projection"):
        ChannelReduction.from_dict(tampered)
    with pytest.raises(ValueError, match="unknown fields"):
        ChannelReduction.from_dict({**pca.to_dict(), "whiten": True})


# ---- datasets, probes, scoring ------------------------------------------------------------------


def activations(prompt: int, channels: int = CHANNELS) -> ActivationSeries:
    """Activations of one run (SEEDS candidates at two checkpoints) whose score is carried by layout."""
    generator = torch.Generator().manual_seed(1000 + prompt)
    sets = []
    for step in CHECKPOINT_STEPS:
        features = torch.randn(SEEDS, channels, SIZE, SIZE, generator=generator)
        sets.append(ActivationSet(features=features.half(), family="sd1", tap="output_blocks.7.0", step=step,
                                  steps=STEPS, sigma=1.0, seeds=[7 * prompt + s for s in range(SEEDS)],
                                  run_id=f"run{prompt}"))
    return ActivationSeries(tuple(sets))


def run_scores(acts: ActivationSeries) -> dict[str, torch.Tensor]:
    return {"clipscore": acts.sets[-1].features[:, :4].float().mean(dim=(1, 2, 3)) * 10}


def write(root, reduction: ChannelReduction, prompts=range(PROMPTS)) -> None:
    for p in prompts:
        acts = activations(p)
        manifest, rows = rows_from_activations(acts, run_scores(acts), f"prompt {p}", reduction=reduction)
        DatasetWriter(root, manifest, writer_id="w").append(rows)


def tiny_config() -> ProbeConfig:
    return ProbeConfig(in_channels=1, feature_size=SIZE, stem_width=8, widths=(8,), attention=False, pooled_size=2,
                       embed_dim=8, time_embed_dim=8, head_hidden=(8,), mlp_hidden=8)


@pytest.fixture(scope="module")
def reduced_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduction") / "pca"
    write(root, ChannelReduction.create("pca", KEEP, CHANNELS))
    return root


def test_reduced_rows_are_recorded_in_the_manifest_and_shards_and_save_space(reduced_dataset, tmp_path):
    manifest = read_manifest(reduced_dataset)
    assert manifest.reduction == ChannelReduction.create("pca", KEEP, CHANNELS)
    assert manifest.feature_shape == (KEEP, SIZE, SIZE) and manifest.format_version == 2
    data = json.loads((reduced_dataset / "manifest.json").read_text())
    assert data["reduction"] == {"kind": "pca", "channels": KEEP, "in_channels": CHANNELS, "seed": 0, "digest": ""}
    with safe_open(str(list_shards(reduced_dataset)[0]), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "2"
        assert handle.get_slice("features").get_shape() == [SEEDS, 2, KEEP, SIZE, SIZE]
    # The stored rows are the reduction of the tapped ones, row by row.
    acts = activations(3)
    stored = ProbeDataset(reduced_dataset).features(0.4)[3 * SEEDS:4 * SEEDS]
    assert torch.equal(stored, manifest.reduction.apply(acts.sets[1].features))
    # 640 -> 48 channels: the shards shrink to 48/640 of the tapped size (plus the same small tensors).
    write(tmp_path / "raw", NO_REDUCTION)
    raw_bytes = sum(p.stat().st_size for p in list_shards(tmp_path / "raw"))
    reduced_bytes = sum(p.stat().st_size for p in list_shards(reduced_dataset))
    assert reduced_bytes < 0.08 * raw_bytes and reduced_bytes > KEEP / CHANNELS * raw_bytes
    assert read_manifest(tmp_path / "raw").format_version == 1


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_round_trip_train_probe_metadata_and_live_scores_equal_stored_rows(reduced_dataset, tmp_path, streaming):
    dataset = ProbeDataset(reduced_dataset)
    out = tmp_path / "probe.safetensors"
    train_from_dataset(dataset, 0.2, "clipscore", out, train_config=TrainConfig(epochs=2, batch_prompts=4, seed=0),
                       probe_config=tiny_config(), streaming=streaming)
    with safe_open(str(out), framework="pt") as handle:
        header = handle.metadata()
    assert header["format_version"] == "2"
    assert json.loads(header["channel_reduction"])["kind"] == "pca"
    probe, meta = load_probe(out)
    assert meta.reduction == dataset.manifest.reduction and meta == read_probe_metadata(out)
    assert meta.feature_shape == (KEEP, SIZE, SIZE) and meta.activation_shape == (CHANNELS, SIZE, SIZE)
    check_probe_matches(dataset, meta)
    assert evaluate_on_dataset(probe, meta, dataset, "all", streaming=streaming).metrics

    arrays = dataset.arrays(0.2, "clipscore")
    for p in (0, 5):
        live = activations(p).sets[0]                       # as tapped: 640 channels
        scores = score_candidates(probe, meta, live)
        rows = slice(p * SEEDS, (p + 1) * SEEDS)
        with torch.no_grad():
            stored = probe(arrays.features[rows], arrays.t).float() * meta.score_std + meta.score_mean
        assert torch.equal(scores.scores, stored)
        # A candidate's score does not depend on the others scored with it (its reduced features are the
        # same bits, see above; the probe's batched convolutions round in the last place).
        alone = score_candidates(probe, meta, live.select([2])).scores
        torch.testing.assert_close(alone, scores.scores[2:3], atol=1e-6, rtol=1e-5)


def test_mismatched_reductions_are_refused(reduced_dataset, tmp_path):
    acts = activations(0)
    # Appending rows reduced another way, or not at all, to the PCA dataset.
    for other in (NO_REDUCTION, ChannelReduction.create("projection", KEEP, CHANNELS),
                  ChannelReduction.create("pca", 32, CHANNELS)):
        manifest, _ = rows_from_activations(acts, run_scores(acts), "x", reduction=other)
        with pytest.raises(DatasetError, match=r"channel reduction differs \(per-sample PCA 640 -> 48 channels vs "):
            DatasetWriter(reduced_dataset, manifest, writer_id="other")
    # Rows as tapped, appended by hand with the dataset's own manifest.
    _, raw_rows = rows_from_activations(acts, run_scores(acts), "x")
    writer = DatasetWriter(reduced_dataset, read_manifest(reduced_dataset), writer_id="other")
    with pytest.raises(DatasetError, match=r"\(640, 8, 8\) but the dataset stores \(48, 8, 8\) \(reduced by per-sample"):
        writer.append(raw_rows)

    # A probe trained on reduced data against a dataset stored as tapped, and vice versa.
    out = tmp_path / "probe.safetensors"
    train_from_dataset(ProbeDataset(reduced_dataset), 0.2, "clipscore", out,
                       train_config=TrainConfig(epochs=1, batch_prompts=4, seed=0), probe_config=tiny_config())
    probe, meta = load_probe(out)
    write(tmp_path / "proj", ChannelReduction.create("projection", KEEP, CHANNELS, seed=1), prompts=range(2))
    with pytest.raises(DatasetError, match=r"channel reduction: probe per-sample PCA 640 -> 48 channels, dataset "
                                           r"random projection 640 -> 48"):
        check_probe_matches(ProbeDataset(tmp_path / "proj"), meta)

    # Live activations of another width than the probe's data was reduced from.
    narrow = activations(0, channels=320).sets[0]
    with pytest.raises(ProbeCompatibilityError, match=r"reduced by per-sample PCA 640 -> 48 channels .* \(320, 8, 8\)"):
        score_candidates(probe, meta, narrow)
    # Already reduced features are not reduced twice: they are refused.
    reduced = activations(0).sets[0]
    reduced.features = meta.reduction.apply(reduced.features)
    with pytest.raises(ProbeCompatibilityError, match="give it the activations as tapped"):
        score_candidates(probe, meta, reduced)
