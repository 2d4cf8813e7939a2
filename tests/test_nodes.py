"""The public nodes, called as ComfyUI calls them, on tiny models: selection, errors, interrupts."""
import json
import struct

import pytest
import torch

from devtools.tiny_models import build_tiny


@pytest.fixture(scope="module")
def probes_dir(pack, tmp_path_factory):
    import folder_paths

    path = tmp_path_factory.mktemp("probes")
    folder_paths.add_model_folder_path("probes", str(path), is_default=True)
    return path


@pytest.fixture(scope="module")
def sd1(pack):
    return build_tiny("sd1")


def _nodes():
    from probe_select.nodes import nodes_sampling as sampling, nodes_selection as selection, nodes_tap as tap
    return tap, sampling, selection


def _save_probe(path, family, tap_path, channels, size=4, t=0.25, mean=0.0, std=1.0):
    from probe_select.probes.io import ProbeMetadata, save_probe
    from probe_select.probes.model import ProbeConfig, build_probe

    config = ProbeConfig(in_channels=channels, feature_size=size, stem_width=16, widths=(16, 32), embed_dim=32,
                         time_embed_dim=16, head_hidden=(32,), mlp_hidden=32)
    meta = ProbeMetadata(backbone_family=family, tap=tap_path, checkpoint_t=t, feature_shape=(channels, size, size),
                         pooling="adaptive_avg", evaluator="clipscore", score_mean=mean, score_std=std, config=config)
    save_probe(path, build_probe(config, seed=3), meta)
    return path.name


def _early(sd1, model, n=4, steps=8, checkpoint=0.25, seed=10, **kw):
    _, sampling, _ = _nodes()
    latent = kw.pop("latent", None) or sd1.empty_latent(1, 8)
    out = sampling.ProbeSelectEarlySampler.execute(model, sd1.conditioning(1), sd1.conditioning(2), latent, seed, n,
                                                   steps, 4.0, kw.pop("sampler", "euler"), "normal", checkpoint)
    return out.result


@pytest.fixture(scope="module")
def tapped(sd1):
    tap, _, _ = _nodes()
    return tap.ProbeSelectTap.execute(sd1.patcher, "auto", 4).result[0]


@pytest.fixture(scope="module")
def probe(probes_dir, tapped):
    from probe_select.nodes.engine.capture import find_tap
    tap, _, selection = _nodes()
    t = find_tap(tapped)
    channels = tapped.model.diffusion_model.get_submodule(t.path).out_channels
    name = _save_probe(probes_dir / "sd1_tiny.safetensors", "sd1", t.path, channels)
    return selection.ProbeSelectLoadProbe.execute(name).result[0]


def test_load_score_topk_resume_pipeline(sd1, tapped, probe):
    _, sampling, selection = _nodes()
    early, x0, acts = _early(sd1, tapped)
    scores = selection.ProbeSelectScore.execute(probe, acts).result[0]
    assert scores.scores.shape == (4,) and scores.seeds == [10, 11, 12, 13]
    # Scores are per candidate: scoring one candidate alone gives the same number.
    alone = selection.ProbeSelectScore.execute(probe, acts.select([2])).result[0]
    assert torch.allclose(alone.scores[0], scores.scores[2], atol=1e-5)

    out = selection.ProbeSelectTopK.execute(early, scores, 2)
    kept, pruned, best_seed, kept_seeds, kept_idx = out.result
    order = torch.argsort(scores.scores, descending=True, stable=True).tolist()
    assert kept_idx == ",".join(map(str, order[:2])) and best_seed == 10 + order[0]
    assert kept_seeds == f"{10 + order[0]},{10 + order[1]}"
    assert torch.equal(kept["samples"], early["samples"][order[:2]])
    assert torch.equal(pruned["samples"], early["samples"][order[2:]])
    assert kept["probe_select"]["seeds"] == [10 + i for i in order[:2]]
    assert "candidate" in out.ui["text"][0]

    finished = sampling.ProbeSelectResume.execute(sd1.patcher, sd1.conditioning(1), sd1.conditioning(2), kept,
                                                  4.0).result[0]
    assert finished["samples"].shape == (2, 4, 8, 8) and "probe_select" not in finished

    # The one-box node does the same thing (it taps the model with the probe's tap itself).
    box = sampling.ProbeSelectSampler.execute(sd1.patcher, sd1.conditioning(1), sd1.conditioning(2),
                                              sd1.empty_latent(1, 8), probe, 10, 4, 2, 8, 4.0, "euler", "normal",
                                              0.25).result
    assert torch.allclose(box[0]["samples"], finished["samples"], atol=1e-6)
    assert box[2] == kept_seeds


def test_topk_keeps_per_sample_entries_aligned_and_ties_stable(sd1, tapped):
    from probe_select.probes.scoring import CandidateScores
    _, _, selection = _nodes()
    early, _, acts = _early(sd1, tapped, n=4)
    early = dict(early)
    early["noise_mask"] = torch.arange(4, dtype=torch.float32).reshape(4, 1, 1, 1).expand(4, 1, 8, 8).clone()
    early["batch_index"] = [20, 21, 22, 23]
    scores = CandidateScores(torch.tensor([0.5, 0.9, 0.5, 0.9]), "t", acts.run_id, acts.seeds)
    kept, pruned, best, seeds, idx = selection.ProbeSelectTopK.execute(early, scores, 3).result
    assert idx == "1,3,0" and best == 11 and seeds == "11,13,10"
    assert kept["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 3.0, 0.0]
    assert kept["batch_index"] == [21, 23, 20] and pruned["batch_index"] == [22]
    assert len(kept["probe_select"]["noise_states"] or [None] * 3) == 3
    # K >= N passes everything through, best first.
    everything = selection.ProbeSelectTopK.execute(early, scores, 10).result
    assert everything[0]["samples"].shape[0] == 4 and everything[1]["samples"].shape[0] == 0


@pytest.mark.parametrize("kwargs, needle", [
    (dict(n=0), "candidates"),
    (dict(checkpoint=0.0), "outside (0, 1)"),
    (dict(checkpoint=1.0), "outside (0, 1)"),
    (dict(checkpoint=0.02), "rounds to step 0"),
    (dict(checkpoint=0.97), "rounds to step 8"),
    (dict(sampler="dpm_adaptive"), "can't stop at a checkpoint"),
    (dict(latent={"samples": torch.zeros(3, 4, 8, 8)}), "batch of 3"),
])
def test_early_sampler_rejects_bad_input(sd1, tapped, kwargs, needle):
    from probe_select.nodes.errors import ProbeSelectError
    with pytest.raises(ProbeSelectError) as err:
        _early(sd1, tapped, **kwargs)
    assert str(err.value).startswith("[ProbeSelectEarlySampler]") and needle in str(err.value)
    assert "Fix:" in str(err.value)


def test_selection_errors(sd1, tapped, probe, probes_dir):
    from probe_select.nodes.errors import ProbeSelectError
    _, sampling, selection = _nodes()
    early, _, acts = _early(sd1, tapped)
    scores = selection.ProbeSelectScore.execute(probe, acts).result[0]
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectTopK\] keep is 0"):
        selection.ProbeSelectTopK.execute(early, scores, 0)
    other_run, _, other_acts = _early(sd1, tapped)
    with pytest.raises(ProbeSelectError, match="different run"):
        selection.ProbeSelectTopK.execute(other_run, scores, 1)
    # A model without a tap gives no activations: the score node says where the tap goes.
    _, _, no_acts = _early(sd1, sd1.patcher)
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectScore\].*insert ProbeSelectTap"):
        selection.ProbeSelectScore.execute(probe, no_acts)
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectResume\].*did not come from"):
        sampling.ProbeSelectResume.execute(sd1.patcher, sd1.conditioning(1), sd1.conditioning(2),
                                           sd1.empty_latent(1, 8), 4.0)


@pytest.mark.parametrize("field, value, needle", [
    ("family", "sdxl", "sdxl"),
    ("tap", "output_blocks.0.0", "output_blocks.0.0"),
    ("channels", 7, "7"),
])
def test_probe_for_another_model_is_refused(sd1, tapped, probes_dir, field, value, needle):
    from probe_select.nodes.engine.capture import find_tap
    from probe_select.nodes.errors import ProbeSelectError
    _, _, selection = _nodes()
    t = find_tap(tapped)
    channels = tapped.model.diffusion_model.get_submodule(t.path).out_channels
    args = {"family": "sd1", "tap": t.path, "channels": channels}
    args[field] = value
    name = _save_probe(probes_dir / f"other_{field}.safetensors", args["family"], args["tap"], args["channels"])
    other = selection.ProbeSelectLoadProbe.execute(name).result[0]
    _, _, acts = _early(sd1, tapped, n=2)
    with pytest.raises(ProbeSelectError) as err:
        selection.ProbeSelectScore.execute(other, acts)
    assert str(err.value).startswith("[ProbeSelectScore]") and needle in str(err.value)


def test_bad_probe_files_are_clear_errors(probes_dir, probe):
    from probe_select.nodes.errors import ProbeSelectError
    _, _, selection = _nodes()
    with pytest.raises(ProbeSelectError, match="not in models/probes"):
        selection.ProbeSelectLoadProbe.execute("missing.safetensors")
    (probes_dir / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectLoadProbe\].*corrupt.safetensors"):
        selection.ProbeSelectLoadProbe.execute("corrupt.safetensors")
    # Same weights, but a format version from the future.
    good = (probes_dir / "sd1_tiny.safetensors").read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    header["__metadata__"]["format_version"] = "99"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (probes_dir / "future.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + good[8 + n:])
    with pytest.raises(ProbeSelectError, match="99"):
        selection.ProbeSelectLoadProbe.execute("future.safetensors")


def test_interrupt_during_early_sampling_stops_cleanly(sd1, tapped):
    import comfy.model_management as mm
    import comfy.patcher_extension
    from probe_select.nodes.engine.capture import find_tap

    calls = []

    def interrupt_at_third_call(executor, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            mm.interrupt_current_processing(True)
        return executor(*args, **kw)

    model = tapped.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_interrupt", interrupt_at_third_call)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _early(sd1, model, n=3, steps=20, checkpoint=0.5)
    finally:
        mm.interrupt_current_processing(False)     # what the executor does before the next prompt
    assert len(calls) == 3                          # stopped at the step it was cancelled in
    assert find_tap(tapped).sessions == {}          # no capture session left behind
    first, _, acts = _early(sd1, tapped, n=3, steps=20, checkpoint=0.5)
    again, _, acts2 = _early(sd1, tapped, n=3, steps=20, checkpoint=0.5)
    assert torch.equal(first["samples"], again["samples"]) and torch.equal(acts.features, acts2.features)


def test_collect_sampler_records_the_same_activations_as_inference(sd1, tapped):
    """Training data must match what the early sampler shows the probe at inference time."""
    import nodes
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.probes.features import ActivationSeries
    _, sampling, _ = _nodes()
    pos, neg, latent = sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8)
    finished, series = sampling.ProbeSelectCollectSampler.execute(
        tapped, pos, neg, latent, 30, 3, 10, 4.0, "euler_ancestral", "normal", "0.1, 0.2,0.4").result
    assert isinstance(series, ActivationSeries) and series.checkpoints == [0.1, 0.2, 0.4]
    assert "probe_select" not in finished
    early, _, acts = _early(sd1, tapped, n=3, steps=10, checkpoint=0.2, seed=30, sampler="euler_ancestral")
    assert torch.equal(series.at(0.2).features, acts.features)
    for i in range(3):            # every candidate is finished exactly as a batch-1 KSampler would
        (ref,) = nodes.common_ksampler(sd1.patcher, 30 + i, 10, 4.0, "euler_ancestral", "normal", pos, neg, latent)
        diff = (finished["samples"][i] - ref["samples"][0]).abs().max() / ref["samples"].abs().max()
        assert diff <= 1e-5
    with pytest.raises(ProbeSelectError, match="round to the same step"):
        sampling.ProbeSelectCollectSampler.execute(tapped, pos, neg, latent, 0, 2, 10, 4.0, "euler", "normal",
                                                   "0.2,0.21")
    with pytest.raises(ProbeSelectError, match="no activation tap"):
        sampling.ProbeSelectCollectSampler.execute(sd1.patcher, pos, neg, latent, 0, 2, 10, 4.0, "euler", "normal",
                                                   "0.2")


class _BrightnessEvaluator:
    """Stands in for an evaluator model: the mean of each image."""

    def score(self, images, prompts):
        from probe_select.probes.evaluators import ImageScores
        return ImageScores(images.mean(dim=(1, 2, 3)), "brightness", [prompts] * images.shape[0])


class _SigmoidVAE:
    def decode(self, samples):
        return torch.sigmoid(samples[:, :3]).movedim(1, -1)


def test_preview_score_ranks_by_the_decoded_x0(sd1, tapped):
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.nodes.nodes_preview_score import ProbeSelectPreviewScore
    _, _, selection = _nodes()
    early, x0, _ = _early(sd1, tapped, n=4)
    scores = ProbeSelectPreviewScore.execute(x0, _SigmoidVAE(), _BrightnessEvaluator(), "a prompt").result[0]
    expected = torch.sigmoid(x0["samples"][:, :3]).mean(dim=(1, 2, 3))
    assert torch.allclose(scores.scores, expected) and scores.seeds == [10, 11, 12, 13]
    kept, _, best, _, idx = selection.ProbeSelectTopK.execute(early, scores, 1).result
    assert idx == str(int(expected.argmax())) and best == 10 + int(expected.argmax())
    with pytest.raises(ProbeSelectError, match="x0 preview"):
        ProbeSelectPreviewScore.execute({"samples": x0["samples"]}, _SigmoidVAE(), _BrightnessEvaluator(), "p")


def test_errors_name_the_node_id_when_comfyui_runs_a_clone_of_the_class(sd1, tapped, probe, probes_dir):
    """ComfyUI executes a V3 node through PREPARE_CLASS_CLONE, a copy of the class named `<Class>Clone`:
    the messages must carry the node id the user sees in the graph, never the class name."""
    from probe_select.nodes import NODES
    from probe_select.nodes.errors import ProbeSelectError
    _, sampling, selection = _nodes()
    assert all(cls.NODE_ID == cls.GET_SCHEMA().node_id for cls in NODES)
    early_clone = sampling.ProbeSelectEarlySampler.PREPARE_CLASS_CLONE({})
    assert early_clone.__name__ == "ProbeSelectEarlySamplerClone"
    with pytest.raises(ProbeSelectError) as err:
        early_clone.execute(tapped, sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8), 10, 2, 8, 4.0,
                            "euler", "normal", 0.0)
    assert str(err.value).startswith("[ProbeSelectEarlySampler] checkpoint") and "Clone" not in str(err.value)
    with pytest.raises(ProbeSelectError) as err:
        selection.ProbeSelectLoadProbe.PREPARE_CLASS_CLONE({}).execute("missing.safetensors")
    assert str(err.value).startswith("[ProbeSelectLoadProbe] ")
    early, _, acts = _early(sd1, tapped, n=2)
    scores = selection.ProbeSelectScore.PREPARE_CLASS_CLONE({}).execute(probe, acts).result[0]
    with pytest.raises(ProbeSelectError) as err:
        selection.ProbeSelectTopK.PREPARE_CLASS_CLONE({}).execute(early, scores, 0)
    assert str(err.value).startswith("[ProbeSelectTopK] keep is 0")


def test_one_box_sampler_names_a_family_mismatch_and_a_fix_it_offers(sd1, probes_dir):
    """A probe saved for SDXL output_blocks.4.0 on an SD1 model: the message says the families and
    offers what the one-box node has (another probe), not a block input it does not have."""
    from probe_select.nodes.errors import ProbeSelectError
    _, sampling, selection = _nodes()
    pos, neg, latent = sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8)
    sdxl = selection.ProbeSelectLoadProbe.execute(
        _save_probe(probes_dir / "sdxl_probe.safetensors", "sdxl", "output_blocks.4.0", 640)).result[0]
    with pytest.raises(ProbeSelectError) as err:
        sampling.ProbeSelectSampler.execute(sd1.patcher, pos, neg, latent, sdxl, 10, 2, 1, 8, 4.0, "euler", "normal",
                                            0.25)
    message = str(err.value)
    assert message.startswith("[ProbeSelectSampler]") and "sdxl" in message and "this model is sd1" in message
    assert "Fix: load a probe trained for sd1 in ProbeSelectLoadProbe" in message and "'auto'" not in message
    # Same family, a block this model does not have: the fix is again another probe.
    missing = selection.ProbeSelectLoadProbe.execute(
        _save_probe(probes_dir / "sd1_missing_block.safetensors", "sd1", "output_blocks.40.0", 32)).result[0]
    with pytest.raises(ProbeSelectError) as err:
        sampling.ProbeSelectSampler.execute(sd1.patcher, pos, neg, latent, missing, 10, 2, 1, 8, 4.0, "euler",
                                            "normal", 0.25)
    message = str(err.value)
    assert message.startswith("[ProbeSelectSampler]") and "output_blocks.40.0" in message
    assert "ProbeSelectLoadProbe" in message and "'auto'" not in message
