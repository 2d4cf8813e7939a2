"""Training path inside ComfyUI: collect -> dataset writer -> train -> load -> score -> evaluate."""
import os

import numpy as np
import pytest
import torch

from devtools.tiny_models import build_tiny

PROMPTS = 16
SEEDS = 4


@pytest.fixture(scope="module")
def comfy_dirs(pack, tmp_path_factory):
    import folder_paths

    out = tmp_path_factory.mktemp("output")
    probes = tmp_path_factory.mktemp("probes_train")
    old_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("probes", str(probes), is_default=True)
    yield out, probes
    folder_paths.set_output_directory(old_out)


def _nodes():
    from probe_select.nodes import (nodes_dataset as dataset, nodes_evaluators as evaluators,
                                    nodes_sampling as sampling, nodes_selection as selection, nodes_tap as tap,
                                    nodes_training as training)
    return tap, sampling, dataset, evaluators, selection, training


@pytest.fixture(scope="module")
def collected(comfy_dirs):
    """A small dataset whose score is a property of each finished image (mean latent brightness)."""
    tap, sampling, dataset, evaluators, _, _ = _nodes()
    sd1 = build_tiny("sd1")
    tapped = tap.ProbeSelectTap.execute(sd1.patcher, "auto", 4).result[0]
    total = 0
    for p in range(PROMPTS):
        positive, negative = sd1.conditioning(100 + p), sd1.conditioning(2)
        finished, acts = sampling.ProbeSelectCollectSampler.execute(
            tapped, positive, negative, sd1.empty_latent(1, 8), 1000 * p, SEEDS, 10, 3.0, "euler", "normal",
            "0.2,0.4").result
        values = finished["samples"][:, 0].mean(dim=(1, 2)).tolist()
        (scores,) = evaluators.ProbeSelectScoresFromFloats.execute(values, ["brightness"], [f"prompt {p}"]).result
        total = dataset.ProbeSelectDatasetWriter.execute(acts, scores, f"prompt {p}", "tiny_ds").result[0]
    return sd1, tapped, total


def test_writer_fills_a_dataset(comfy_dirs, collected):
    from probe_select.probes.training.dataset import ProbeDataset
    _, _, total = collected
    assert total == PROMPTS * SEEDS
    ds = ProbeDataset(os.path.join(comfy_dirs[0], "probe_select_datasets", "tiny_ds"))
    assert len(ds) == PROMPTS * SEEDS and ds.manifest.checkpoints == [0.2, 0.4]
    assert ds.manifest.evaluators == ["brightness"] and ds.manifest.backbone_family == "sd1"
    assert ds.features(0.4).shape[1:] == tuple(ds.manifest.feature_shape)


def test_train_load_score_evaluate_round_trip(comfy_dirs, collected):
    tap, sampling, dataset, evaluators, selection, training = _nodes()
    sd1, tapped, _ = collected
    probe, curves, report = training.ProbeSelectTrain.execute(
        "tiny_ds", 0.2, "", "tiny_probe", 3, 4, 1e-3, 0.2, 10.0, True, 0, 0).result
    assert os.path.isfile(os.path.join(comfy_dirs[1], "tiny_probe.safetensors"))
    assert curves.ndim == 4 and curves.shape[-1] == 3 and float(curves.std()) > 0
    assert "epochs run: 3" in report and probe.metadata.checkpoint_t == pytest.approx(0.2)
    assert probe.metadata.evaluator == "brightness" and probe.metadata.training

    loaded = selection.ProbeSelectLoadProbe.execute("tiny_probe.safetensors").result[0]
    early, _, acts = sampling.ProbeSelectEarlySampler.execute(
        tapped, sd1.conditioning(100), sd1.conditioning(2), sd1.empty_latent(1, 8), 0, 4, 10, 3.0, "euler",
        "normal", 0.2).result
    scores = selection.ProbeSelectScore.execute(loaded, acts).result[0]
    assert scores.scores.shape == (4,) and torch.isfinite(scores.scores).all()

    report, scatter = training.ProbeSelectEvaluateProbe.execute(loaded, "tiny_ds", "all", 0).result
    assert "within-prompt Spearman" in report and f"{PROMPTS * SEEDS} candidates of {PROMPTS} prompts" in report
    assert scatter.shape[0] == 1 and scatter.shape[-1] == 3


def test_dataset_for_another_tap_is_refused(comfy_dirs, collected):
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.probes.io import ProbeMetadata
    from probe_select.probes.model import ProbeConfig, build_probe
    _, _, _, _, selection, training = _nodes()
    config = ProbeConfig(in_channels=64, feature_size=4, stem_width=16, widths=(16,), embed_dim=16,
                         time_embed_dim=16, head_hidden=(16,), mlp_hidden=16)
    meta = ProbeMetadata(backbone_family="sd1", tap="output_blocks.0.0", checkpoint_t=0.2, feature_shape=(64, 4, 4),
                         pooling="adaptive_avg", evaluator="brightness", config=config)
    other = selection.LoadedProbe(build_probe(config), meta, "other.safetensors")
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectEvaluateProbe\].*tap"):
        training.ProbeSelectEvaluateProbe.execute(other, "tiny_ds", "all", 0)


def test_writer_refuses_mismatched_scores(comfy_dirs, collected):
    from probe_select.nodes.errors import ProbeSelectError
    tap, sampling, dataset, evaluators, _, _ = _nodes()
    sd1, tapped, _ = collected
    _, acts = sampling.ProbeSelectCollectSampler.execute(
        tapped, sd1.conditioning(5), sd1.conditioning(2), sd1.empty_latent(1, 8), 0, 3, 10, 3.0, "euler", "normal",
        "0.2,0.4").result
    (two,) = evaluators.ProbeSelectScoresFromFloats.execute([0.1, 0.2], ["brightness"], ["p"]).result
    with pytest.raises(ProbeSelectError, match="2 'brightness' scores for 3 candidates"):
        dataset.ProbeSelectDatasetWriter.execute(acts, two, "p", "tiny_ds")
    (three,) = evaluators.ProbeSelectScoresFromFloats.execute([0.1, 0.2, 0.3], ["brightness"], ["p"]).result
    with pytest.raises(ProbeSelectError, match="plain folder name"):
        dataset.ProbeSelectDatasetWriter.execute(acts, three, "p", "../escape")


def test_cancel_stops_training_and_keeps_a_probe(comfy_dirs, collected):
    import comfy.model_management as mm
    from probe_select.probes.io import load_probe
    *_, training = _nodes()
    mm.interrupt_current_processing(True)           # what the Cancel button does
    try:
        with pytest.raises(mm.InterruptProcessingException):
            training.ProbeSelectTrain.execute("tiny_ds", 0.2, "", "cancelled_probe", 50, 4, 1e-3, 0.2, 10.0, True,
                                              0, 0)
    finally:
        mm.interrupt_current_processing(False)
    path = os.path.join(comfy_dirs[1], "cancelled_probe.safetensors")
    _, meta = load_probe(path)                     # the best probe so far is on disk and loads
    assert meta.training["stopped"] == "should_stop" and meta.training["epochs_run"] < 50


@pytest.fixture(scope="module")
def six_step_dataset(comfy_dirs, collected):
    """Collected with 6 steps at 0.2 and 0.5: stored as t = 1/6 (step 1) and 0.5 (step 3)."""
    tap, sampling, dataset, evaluators, _, _ = _nodes()
    sd1, tapped, _ = collected
    for p in range(PROMPTS):
        finished, acts = sampling.ProbeSelectCollectSampler.execute(
            tapped, sd1.conditioning(100 + p), sd1.conditioning(2), sd1.empty_latent(1, 8), 1000 * p, 2, 6, 3.0,
            "euler", "normal", "0.2,0.5").result
        values = finished["samples"][:, 0].mean(dim=(1, 2)).tolist()
        (scores,) = evaluators.ProbeSelectScoresFromFloats.execute(values, ["brightness"], [f"prompt {p}"]).result
        dataset.ProbeSelectDatasetWriter.execute(acts, scores, f"prompt {p}", "six_steps")
    return os.path.join(comfy_dirs[0], "probe_select_datasets", "six_steps")


def test_cli_train_node_and_scoring_pick_the_same_stored_checkpoint(comfy_dirs, collected, six_step_dataset, tmp_path):
    """One rule (probes/checkpoints.py): a fraction the command line accepts is accepted by the Train
    node and by scoring, and all pick the same stored value (0.2 of 6 steps is stored as 1/6)."""
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.probes.io import read_probe_metadata
    from probe_select.probes.training.dataset import ProbeDataset
    from tools.cli import EXIT_OK, EXIT_USAGE, main

    _, sampling, _, _, selection, training = _nodes()
    sd1, tapped, _ = collected
    stored = ProbeDataset(six_step_dataset).manifest.checkpoints
    assert stored == [pytest.approx(1 / 6), 0.5]

    cli_probe = tmp_path / "cli_probe.safetensors"
    assert main(["train", "--dataset", six_step_dataset, "--checkpoint", "0.2", "--out", str(cli_probe),
                 "--epochs", "1"]) == EXIT_OK
    node_probe = training.ProbeSelectTrain.execute("six_steps", 0.2, "", "six_steps_probe", 1, 4, 1e-3, 0.2, 10.0,
                                                   True, 0, 0).result[0]
    assert read_probe_metadata(cli_probe).checkpoint_t == node_probe.metadata.checkpoint_t == stored[0]

    # Scoring: the early sampler at 0.2 of 6 steps stops at step 1; a collect series gives the same member.
    early, _, acts = sampling.ProbeSelectEarlySampler.execute(
        tapped, sd1.conditioning(100), sd1.conditioning(2), sd1.empty_latent(1, 8), 0, 2, 6, 3.0, "euler", "normal",
        0.2).result
    assert acts.t == stored[0] and acts.step == 1
    scores = selection.ProbeSelectScore.execute(node_probe, acts).result[0]
    assert scores.scores.shape == (2,)
    _, series = sampling.ProbeSelectCollectSampler.execute(
        tapped, sd1.conditioning(100), sd1.conditioning(2), sd1.empty_latent(1, 8), 0, 2, 6, 3.0, "euler", "normal",
        "0.2,0.5").result
    assert series.at(0.2).t == stored[0]
    assert torch.equal(selection.ProbeSelectScore.execute(node_probe, series).result[0].scores, scores.scores)

    # A fraction the command line refuses (no stored value near 0.33) is refused by the node too.
    assert main(["train", "--dataset", six_step_dataset, "--checkpoint", "0.33", "--out",
                 str(tmp_path / "refused.safetensors"), "--epochs", "1"]) == EXIT_USAGE
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectTrain\].*t=0.33"):
        training.ProbeSelectTrain.execute("six_steps", 0.33, "", "refused", 1, 4, 1e-3, 0.2, 10.0, True, 0, 0)


def test_train_and_evaluate_nodes_stream_a_dataset_too_big_for_memory(comfy_dirs, collected, monkeypatch):
    from probe_select.probes.training.dataset import ProbeDataset
    from probe_select.probes.training import streamed_train
    from probe_select.probes.training.evaluation import format_report
    from probe_select.probes.training.pipeline import evaluate_on_dataset

    _, _, _, _, _, training = _nodes()
    monkeypatch.setattr(streamed_train, "STREAM_AUTO_BYTES", 0)       # every dataset is "too big" now
    probe, curves, report = training.ProbeSelectTrain.execute(
        "tiny_ds", 0.2, "", "tiny_streamed", 2, 4, 1e-3, 0.2, 10.0, True, 0, 0).result
    assert probe.metadata.training["trainer"] == "probes.streamed_train"
    assert "epochs run: 2" in report and probe.metadata.checkpoint_t == pytest.approx(0.2)
    streamed_report = training.ProbeSelectEvaluateProbe.execute(probe, "tiny_ds", "all", 0).result[0]
    assert f"{PROMPTS * SEEDS} candidates of {PROMPTS} prompts" in streamed_report

    # The node's report is the streamed reader's, and the in-memory path predicts the same scores for the same
    # rows. Predictions are compared, not printed figures: the two paths batch differently, so a float-rounding
    # difference may flip a near-tie in a rank statistic's third decimal.
    data = ProbeDataset(os.path.join(comfy_dirs[0], "probe_select_datasets", "tiny_ds"))
    streamed = evaluate_on_dataset(probe.model, probe.metadata, data, "all", streaming="on")
    assert format_report(streamed.metrics, probe.metadata.evaluator,
                         f"{probe.name} on tiny_ds (all)") == streamed_report
    in_memory = evaluate_on_dataset(probe.model, probe.metadata, data, "all", streaming="off")
    assert in_memory.metrics["rows"] == streamed.metrics["rows"] == PROMPTS * SEEDS
    assert np.array_equal(in_memory.actual, streamed.actual) and np.array_equal(in_memory.group, streamed.group)
    np.testing.assert_allclose(in_memory.predicted, streamed.predicted, rtol=1e-5, atol=1e-6)


REDUCED_PROMPTS = 8


@pytest.fixture(scope="module")
def reduced_collected(comfy_dirs, collected):
    """The same kind of runs as ``collected``, written with per-sample PCA to 8 channels."""
    _, sampling, dataset, evaluators, _, _ = _nodes()
    sd1, tapped, _ = collected
    runs = []
    for p in range(REDUCED_PROMPTS):
        positive, negative = sd1.conditioning(100 + p), sd1.conditioning(2)
        finished, acts = sampling.ProbeSelectCollectSampler.execute(
            tapped, positive, negative, sd1.empty_latent(1, 8), 1000 * p, 3, 10, 3.0, "euler", "normal",
            "0.2,0.4").result
        values = finished["samples"][:, 0].mean(dim=(1, 2)).tolist()
        (scores,) = evaluators.ProbeSelectScoresFromFloats.execute(values, ["brightness"], [f"prompt {p}"]).result
        dataset.ProbeSelectDatasetWriter.execute(acts, scores, f"prompt {p}", "tiny_pca", channel_reduction="pca",
                                                 reduced_channels=8)
        runs.append((acts, scores))
    return runs


def test_writer_reduces_channels_and_the_probe_scores_live_activations_the_same_way(comfy_dirs, collected,
                                                                                     reduced_collected):
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.probes.features import ActivationSet
    from probe_select.probes.training.dataset import ProbeDataset, prompt_id
    _, sampling, dataset, _, selection, training = _nodes()
    sd1, tapped, _ = collected
    data = ProbeDataset(os.path.join(comfy_dirs[0], "probe_select_datasets", "tiny_pca"))
    tapped_shape = reduced_collected[0][0].sets[0].feature_shape
    assert data.manifest.reduction.kind == "pca" and data.manifest.reduction.in_channels == tapped_shape[0]
    assert data.manifest.feature_shape == (8, *tapped_shape[1:]) and len(data) == REDUCED_PROMPTS * 3

    probe = training.ProbeSelectTrain.execute("tiny_pca", 0.2, "", "tiny_pca_probe", 2, 4, 1e-3, 0.2, 10.0, True, 0,
                                              0).result[0]
    assert probe.metadata.reduction == data.manifest.reduction
    loaded = selection.ProbeSelectLoadProbe.execute("tiny_pca_probe.safetensors").result[0]
    assert loaded.metadata.reduction == data.manifest.reduction
    # Live activations as tapped (not reduced by hand): scored through the probe's reduction, equal to scoring
    # the stored rows of the same run.
    acts, _ = reduced_collected[2]
    scores = selection.ProbeSelectScore.execute(loaded, acts).result[0]
    stored = data.arrays(0.2, "brightness")
    rows = [i for i, pid in enumerate(stored.prompt_ids) if pid == prompt_id("prompt 2")]    # shards: any order
    assert torch.equal(stored.features[rows], loaded.metadata.reduction.apply(acts.at(0.2).features))
    with torch.no_grad():      # the live text embedding: the stored one is its fp16 rounding
        expected = loaded.model(stored.features[rows], stored.t, acts.at(0.2).text_embedding).float()
    assert torch.equal(scores.scores, expected * loaded.metadata.score_std + loaded.metadata.score_mean)

    # Appending without the reduction, or with another one, is refused by name with the fix.
    acts, image_scores = reduced_collected[0]
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectDatasetWriter\].*channel reduction differs.*"
                                               r"Fix:.*channel_reduction"):
        dataset.ProbeSelectDatasetWriter.execute(acts, image_scores, "prompt 0", "tiny_pca")
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectDatasetWriter\].*at most 15 components"):
        dataset.ProbeSelectDatasetWriter.execute(acts, image_scores, "prompt 0", "tiny_pca_2", channel_reduction="pca",
                                                 reduced_channels=16)
    assert "reduced_channels is 0" in dataset.ProbeSelectDatasetWriter.validate_inputs("x", "pca", 0, 0)
    # Activations of another width than the probe's data was reduced from.
    other = acts.sets[0]
    wide = ActivationSet(features=torch.zeros(3, tapped_shape[0] * 2, *tapped_shape[1:]).half(), family=other.family,
                         tap=other.tap, step=other.step, steps=other.steps, sigma=other.sigma, seeds=other.seeds,
                         run_id=other.run_id, text_embedding=other.text_embedding)
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectScore\].*reduced by per-sample PCA"):
        selection.ProbeSelectScore.execute(loaded, wide)


def test_compact_dataset_node_reports_and_compacts(comfy_dirs, reduced_collected):
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.probes.training.compaction import dataset_checksum
    from probe_select.probes.training.dataset import list_shards
    _, _, dataset, _, _, _ = _nodes()
    root = os.path.join(comfy_dirs[0], "probe_select_datasets", "tiny_pca")
    before = dataset_checksum(root)
    report, rows = dataset.ProbeSelectCompactDataset.execute("tiny_pca", "report", 512).result
    assert rows == REDUCED_PROMPTS * 3 and len(list_shards(root)) == REDUCED_PROMPTS
    assert f"{REDUCED_PROMPTS} shards" in report and f"of {REDUCED_PROMPTS} prompts" in report
    assert "evaluators: brightness" in report and "channel reduction: per-sample PCA" in report
    # Cancel (after the first new shard): the dataset keeps every row, the old shards and the new copy.
    import comfy.model_management as mm
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            dataset.ProbeSelectCompactDataset.execute("tiny_pca", "compact", 512)
    finally:
        mm.interrupt_current_processing(False)
    assert len(list_shards(root)) == REDUCED_PROMPTS + 1 and dataset_checksum(root) == before
    report, rows = dataset.ProbeSelectCompactDataset.execute("tiny_pca", "compact", 512).result
    assert report.startswith(f"compacted tiny_pca: {REDUCED_PROMPTS + 1} shards -> 1, {REDUCED_PROMPTS * 6} stored "
                             f"rows -> {REDUCED_PROMPTS * 3} ({REDUCED_PROMPTS * 3} duplicates dropped)")
    assert rows == REDUCED_PROMPTS * 3 and len(list_shards(root)) == 1 and dataset_checksum(root) == before
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectCompactDataset\] dataset 'nothing_here' does not exist"):
        dataset.ProbeSelectCompactDataset.execute("nothing_here", "report", 512)
    assert "plain folder name" in dataset.ProbeSelectCompactDataset.validate_inputs("../up")
