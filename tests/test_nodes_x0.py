"""Nodes with probes that read the x0 prediction latent, on tiny models: ProbeSelectScore's x0_preview input,
the one-box sampler, and collect -> dataset writer (x0_size) -> train (probe_inputs) -> load -> score."""
import dataclasses
import os

import pytest
import torch

from devtools.tiny_models import build_tiny

PROMPTS = 10
SEEDS = 3


@pytest.fixture(scope="module")
def comfy_dirs(pack, tmp_path_factory):
    import folder_paths

    out = tmp_path_factory.mktemp("output_x0")
    probes = tmp_path_factory.mktemp("probes_x0")
    old_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    folder_paths.add_model_folder_path("probes", str(probes), is_default=True)
    yield out, probes
    folder_paths.set_output_directory(old_out)


@pytest.fixture(scope="module")
def sd1(pack):
    return build_tiny("sd1")


def _nodes():
    from probe_select.nodes import (nodes_dataset as dataset, nodes_evaluators as evaluators,
                                    nodes_sampling as sampling, nodes_selection as selection, nodes_tap as tap,
                                    nodes_training as training)
    return tap, sampling, selection, dataset, evaluators, training


@pytest.fixture(scope="module")
def tapped(sd1):
    tap, *_ = _nodes()
    return tap.ProbeSelectTap.execute(sd1.patcher, "auto", 4).result[0]


def _save_probe(path, tap_path, channels, inputs, x0_channels=4):
    from probe_select.probes.io import ProbeMetadata, save_probe
    from probe_select.probes.model import ProbeConfig, build_probe

    config = ProbeConfig(in_channels=channels, feature_size=4, stem_width=16, widths=(16,), embed_dim=16,
                         time_embed_dim=16, head_hidden=(16,), mlp_hidden=16, inputs=inputs, x0_channels=x0_channels,
                         x0_size=4, x0_stem_width=8, x0_widths=(8,))
    meta = ProbeMetadata(backbone_family="sd1", tap=tap_path, checkpoint_t=0.25, feature_shape=(channels, 4, 4),
                         pooling="adaptive_avg", evaluator="clipscore", config=config)
    save_probe(path, build_probe(config, seed=7), meta)
    return path.name


@pytest.fixture(scope="module", params=[("x0",), ("activations", "x0")], ids=["x0", "both"])
def x0_probe(request, comfy_dirs, tapped):
    from probe_select.nodes.engine.capture import find_tap
    *_, selection = _nodes()[:3]
    t = find_tap(tapped)
    channels = tapped.model.diffusion_model.get_submodule(t.path).out_channels
    name = _save_probe(comfy_dirs[1] / f"x0_{'_'.join(request.param)}.safetensors", t.path, channels, request.param)
    return selection.ProbeSelectLoadProbe.execute(name).result[0]


def _early(sd1, model, n=4, seed=10):
    _, sampling, *_ = _nodes()
    return sampling.ProbeSelectEarlySampler.execute(model, sd1.conditioning(1), sd1.conditioning(2),
                                                    sd1.empty_latent(1, 8), seed, n, 8, 4.0, "euler", "normal",
                                                    0.25).result


def test_score_node_reads_the_x0_preview(sd1, tapped, x0_probe):
    from probe_select.probes.scoring import score_candidates
    _, _, selection, *_ = _nodes()
    early, x0, acts = _early(sd1, tapped)
    assert x0_probe.metadata.config.reads_x0
    # The early sampler's activations carry the x0 preview of their checkpoint.
    assert acts.x0 is not None and torch.equal(acts.x0, x0["samples"])
    scores = selection.ProbeSelectScore.execute(x0_probe, acts, None, x0).result[0]
    assert scores.scores.shape == (4,) and torch.isfinite(scores.scores).all() and scores.seeds == [10, 11, 12, 13]
    expected = score_candidates(x0_probe.model, x0_probe.metadata, acts, x0=x0["samples"]).scores
    assert torch.equal(scores.scores, expected)
    assert torch.equal(selection.ProbeSelectScore.execute(x0_probe, acts).result[0].scores, expected)
    # The score follows the x0 input: another x0 for candidate 1 changes its score only.
    changed = dict(x0)
    changed["samples"] = x0["samples"].clone()
    changed["samples"][1] = torch.randn_like(changed["samples"][1]) * 3
    other = selection.ProbeSelectScore.execute(x0_probe, acts, None, changed).result[0].scores
    assert other[1] != expected[1] and torch.allclose(other[[0, 2, 3]], expected[[0, 2, 3]], atol=1e-6)
    # Per candidate: one candidate scored alone gets the same score.
    alone = selection.ProbeSelectScore.execute(x0_probe, acts.select([2])).result[0].scores
    assert torch.allclose(alone[0], expected[2], atol=1e-6)
    kept = selection.ProbeSelectTopK.execute(early, scores, 2).result[4]
    assert kept == ",".join(map(str, scores.order().tolist()[:2]))


def test_score_node_x0_errors_name_the_node_and_the_fix(sd1, tapped, x0_probe):
    from probe_select.nodes.errors import ProbeSelectError
    _, _, selection, *_ = _nodes()
    early, x0, acts = _early(sd1, tapped)
    bare = dataclasses.replace(acts, x0=None)
    with pytest.raises(ProbeSelectError) as err:
        selection.ProbeSelectScore.execute(x0_probe, bare)
    message = str(err.value)
    assert message.startswith("[ProbeSelectScore]") and "reads the x0 prediction latent" in message
    assert "connect the early sampler's 'x0 preview' output" in message
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectScore\].*not the x0 preview"):
        selection.ProbeSelectScore.execute(x0_probe, bare, None, early)
    _, other_x0, _ = _early(sd1, tapped)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectScore\].*different run"):
        selection.ProbeSelectScore.execute(x0_probe, acts, None, other_x0)
    wrong = dict(x0)
    wrong["samples"] = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectScore\].*4-channel x0 latents.*3 channels"):
        selection.ProbeSelectScore.execute(x0_probe, acts, None, wrong)


def test_one_box_sampler_scores_with_the_x0(sd1, tapped, x0_probe):
    _, sampling, selection, *_ = _nodes()
    early, x0, acts = _early(sd1, tapped)
    scores = selection.ProbeSelectScore.execute(x0_probe, acts, None, x0).result[0]
    kept_seeds = selection.ProbeSelectTopK.execute(early, scores, 2).result[3]
    box = sampling.ProbeSelectSampler.execute(sd1.patcher, sd1.conditioning(1), sd1.conditioning(2),
                                              sd1.empty_latent(1, 8), x0_probe, 10, 4, 2, 8, 4.0, "euler", "normal",
                                              0.25).result
    assert torch.allclose(box[1].scores, scores.scores, atol=1e-5) and box[2] == kept_seeds


def _collect(sd1, tapped, name, x0_size, prompts=PROMPTS):
    _, sampling, _, dataset, evaluators, _ = _nodes()
    total = 0
    for p in range(prompts):
        finished, acts = sampling.ProbeSelectCollectSampler.execute(
            tapped, sd1.conditioning(100 + p), sd1.conditioning(2), sd1.empty_latent(1, 8), 1000 * p, SEEDS, 10,
            3.0, "euler", "normal", "0.2,0.4").result
        values = finished["samples"][:, 0].mean(dim=(1, 2)).tolist()
        (scores,) = evaluators.ProbeSelectScoresFromFloats.execute(values, ["brightness"], [f"prompt {p}"]).result
        total = dataset.ProbeSelectDatasetWriter.execute(acts, scores, f"prompt {p}", name,
                                                         x0_size=x0_size).result[0]
    return acts, total


def test_collect_write_train_score_with_x0(comfy_dirs, sd1, tapped):
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.probes.training.dataset import ProbeDataset
    _, sampling, selection, dataset, evaluators, training = _nodes()
    acts, total = _collect(sd1, tapped, "x0_ds", 4)
    assert total == PROMPTS * SEEDS
    assert [s.x0.shape for s in acts.sets] == [(SEEDS, 4, 8, 8)] * 2     # the collect sampler records x0 per checkpoint
    ds = ProbeDataset(os.path.join(comfy_dirs[0], "probe_select_datasets", "x0_ds"))
    assert ds.manifest.x0_shape == (4, 4, 4) and ds.x0(0.4).shape == (PROMPTS * SEEDS, 4, 4, 4)
    # The last prompt's rows hold its pooled x0 at each checkpoint.
    from probe_select.probes.features import pool_x0
    rows = [i for i, prompt in enumerate(ds.prompts) if prompt == f"prompt {PROMPTS - 1}"]
    assert ds.seeds[rows].tolist() == acts.seeds
    for k, t in enumerate((0.2, 0.4)):
        assert torch.equal(ds.x0(t)[rows], pool_x0(acts.sets[k].x0, 4))
    # Appending rows without x0 to it is refused, naming x0_size.
    (scores,) = evaluators.ProbeSelectScoresFromFloats.execute([0.1] * SEEDS, ["brightness"], ["p"]).result
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectDatasetWriter\].*x0_shape differs.*x0_size"):
        dataset.ProbeSelectDatasetWriter.execute(acts, scores, "p", "x0_ds")

    probe, _curves, report = training.ProbeSelectTrain.execute(
        "x0_ds", 0.2, "", "x0_probe", 2, 4, 1e-3, 0.2, 10.0, True, 0, 0, probe_inputs="x0").result
    assert "reads x0" in report and probe.metadata.inputs == ("x0",) and probe.metadata.x0_shape == (4, 4, 4)
    loaded = selection.ProbeSelectLoadProbe.execute("x0_probe.safetensors").result[0]
    early, x0, early_acts = _early(sd1, tapped)
    scores = selection.ProbeSelectScore.execute(loaded, early_acts, None, x0).result[0]
    assert scores.scores.shape == (4,) and torch.isfinite(scores.scores).all()


def test_train_node_refuses_an_x0_probe_on_a_dataset_without_x0(comfy_dirs, sd1, tapped):
    from probe_select.nodes.errors import ProbeSelectError
    *_, training = _nodes()
    _collect(sd1, tapped, "plain_ds", 0, prompts=3)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectTrain\].*stores no x0 latents.*x0_size"):
        training.ProbeSelectTrain.execute("plain_ds", 0.2, "", "never", 1, 4, 1e-3, 0.2, 10.0, True, 0, 0,
                                          probe_inputs="activations+x0")
    assert not os.path.exists(os.path.join(comfy_dirs[1], "never.safetensors"))


def test_train_node_conditions_the_encoders_on_the_prompt_when_asked(comfy_dirs, sd1, tapped):
    from probe_select.nodes.errors import ProbeSelectError
    _, _sampling, selection, *_, training = _nodes()
    _collect(sd1, tapped, "film_ds", 4)
    probe, _curves, _report = training.ProbeSelectTrain.execute(
        "film_ds", 0.2, "", "film_probe", 1, 4, 1e-3, 0.2, 10.0, True, 0, 0, probe_inputs="x0",
        condition_on_prompt=True).result
    config = selection.ProbeSelectLoadProbe.execute("film_probe.safetensors").result[0].metadata.config
    assert config.text_film and config.text_dim > 0 and probe.metadata.config == config
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectTrain\].*text_film.*Train with the text"):
        training.ProbeSelectTrain.execute("film_ds", 0.2, "", "film_never", 1, 4, 1e-3, 0.2, 10.0, False, 0, 0,
                                          probe_inputs="x0", condition_on_prompt=True)
    assert not os.path.exists(os.path.join(comfy_dirs[1], "film_never.safetensors"))


def test_later_checkpoint_activations_carry_their_x0(sd1, tapped, x0_probe):
    """ProbeSelectResume to a later checkpoint (a multi-stage schedule's next stage) records that checkpoint's x0."""
    _, sampling, selection, *_ = _nodes()
    early, x0, acts = _early(sd1, tapped)
    later, later_x0, later_acts = sampling.ProbeSelectResume.execute(tapped, sd1.conditioning(1), sd1.conditioning(2),
                                                                     early, 4.0, 0.5).result
    assert later_acts.step == 4 and later_acts.run_id != acts.run_id
    assert torch.equal(later_acts.x0, later_x0["samples"]) and not torch.allclose(later_x0["samples"], x0["samples"])
    with pytest.raises(Exception, match="different run"):
        selection.ProbeSelectScore.execute(x0_probe, later_acts, None, x0)
