"""Pins on the ComfyUI-bound engine (issue 11): which rows and which denoiser call the tap keeps, the
tuple outputs of DiT blocks, per-sample latent entries, and where the Brownian tree lives."""
import pytest
import torch

from helpers import ApplyModelRecorder, with_recorder
from devtools.tiny_models import FAMILIES, build_tiny


@pytest.fixture(scope="module")
def mods(pack):
    from probe_select.nodes import nodes_tap as tap
    from probe_select.nodes.engine import capture, noise, split_sampling
    from probe_select.probes import features

    class M:
        pass
    m = M()
    m.capture, m.noise, m.split, m.tap, m.features = capture, noise, split_sampling, tap, features
    return m


class ReverseChunks:
    """An APPLY_MODEL wrapper that hands the calls inside it the CFG chunks in reverse order.

    ComfyUI batches the chunks as `cond_or_uncond` lists them; on these models that is always
    [uncond, cond] ([1, 0]). Placed outside the tap, this wrapper lets the tap see [cond, uncond]
    ([0, 1]) in a real sampling run: every per-row input is permuted, the flags and uuids are
    reversed, and the output is permuted back, so the sampler itself sees no difference.
    """

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        flags = list(transformer_options.get("cond_or_uncond", [0]))
        if len(flags) < 2:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        rows = x.shape[0]
        per_chunk = rows // len(flags)
        order = torch.cat([torch.arange(i * per_chunk, (i + 1) * per_chunk) for i in reversed(range(len(flags)))])

        def permute(value):
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
                return value.index_select(0, order.to(value.device))
            return value

        options = dict(transformer_options)
        options["cond_or_uncond"] = flags[::-1]
        if "uuids" in options:
            options["uuids"] = list(options["uuids"])[::-1]
        out = executor(permute(x), permute(t), permute(c_concat), permute(c_crossattn), control, options,
                       **{key: permute(value) for key, value in kw.items()})
        return out.index_select(0, order.to(out.device))      # reversing chunks is its own inverse


def _patch_of(tiny) -> int:
    patch = getattr(tiny.patcher.model.diffusion_model, "patch_size", 1)
    return patch[-1] if isinstance(patch, (tuple, list)) else int(patch)


def _positive_rows(mods, call, family, path, latent_hw, patch, feature_size=4, chunk_flag=0):
    fmap = mods.capture.block_output_to_map(call["output"], family, path, latent_hw, patch, 8)
    return mods.features.pool_feature_map(fmap.chunk(len(call["flags"]))[call["flags"].index(chunk_flag)], feature_size)


def _run(mods, model, tiny, sampler="euler", n=3, steps=3, checkpoint=0.67, cfg=5.0):
    latent = tiny.empty_latent(1, 16 if tiny.latent_channels == 16 else 8)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    return mods.split.run_early(model, pos, neg, latent, 100, n, steps, cfg, sampler, "normal", checkpoint)


@pytest.mark.parametrize("family", FAMILIES)
def test_tap_keeps_the_positive_rows_in_either_chunk_order(mods, family):
    """The tap reads the chunk flagged 0 wherever it sits: [uncond, cond] as ComfyUI batches these
    models, and [cond, uncond] (chunk order is ComfyUI's choice, not a contract)."""
    tiny = build_tiny(family)
    plain = _run(mods, mods.tap.apply_tap(tiny.patcher, "auto", 4), tiny).activations

    swapped_base = with_recorder(tiny.patcher, ReverseChunks(), key="test_reverse_chunks")   # outside the tap
    tapped = mods.tap.apply_tap(swapped_base, "auto", 4)
    tap = mods.capture.find_tap(tapped)
    recorder = ApplyModelRecorder(tap.path)                                                 # inside the tap
    result = _run(mods, with_recorder(tapped, recorder), tiny)
    acts = result.activations

    assert [call["flags"] for call in recorder.calls] == [[0, 1], [0, 1]]
    latent_hw = tuple(result.latent["samples"].shape[-2:])
    checkpoint_call = recorder.calls[1]
    cond = _positive_rows(mods, checkpoint_call, family, tap.path, latent_hw, _patch_of(tiny), chunk_flag=0)
    uncond = _positive_rows(mods, checkpoint_call, family, tap.path, latent_hw, _patch_of(tiny), chunk_flag=1)
    assert torch.equal(acts.features, cond)
    assert not torch.allclose(acts.features.float(), uncond.float(), atol=1e-3)
    # The same candidates, whatever the chunk order.
    assert plain.features.shape == acts.features.shape == (3, cond.shape[1], 4, 4)
    torch.testing.assert_close(acts.features.float(), plain.features.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_two_evaluation_samplers_capture_the_checkpoint_steps_first_evaluation(mods, sampler):
    """heun and dpm_2 evaluate twice per step and report the step between the two, so the tap's
    step counter reads k-1 both for the extra evaluation of step k-2 and for the first evaluation of
    step k-1. The tap keeps the latter: the evaluation on x_{k-1} at the schedule's sigma_{k-1}."""
    tiny = build_tiny("sd1")
    tapped = mods.tap.apply_tap(tiny.patcher, "auto", 4)
    tap = mods.capture.find_tap(tapped)
    recorder = ApplyModelRecorder(tap.path)
    steps, checkpoint = 5, 0.6                     # s = 3: the tap reads step index 2
    result = _run(mods, with_recorder(tapped, recorder), tiny, sampler=sampler, n=2, steps=steps, checkpoint=checkpoint)
    acts = result.activations
    s = mods.split.checkpoint_step(steps, checkpoint)
    assert acts.step == s == 3

    # Two evaluations per step (none of the early steps ends at sigma 0): call 2i is step i's first.
    assert len(recorder.calls) == 2 * s
    latent_hw = tuple(result.latent["samples"].shape[-2:])
    first_of_step = _positive_rows(mods, recorder.calls[2 * (s - 1)], "sd1", tap.path, latent_hw, 1)
    extra_of_previous = _positive_rows(mods, recorder.calls[2 * (s - 1) - 1], "sd1", tap.path, latent_hw, 1)
    assert not torch.allclose(first_of_step.float(), extra_of_previous.float(), atol=1e-3)
    assert torch.equal(acts.features, first_of_step)
    sigmas = mods.split.full_sigmas(tiny.patcher, steps, sampler, "normal", 1.0)
    assert acts.sigma == pytest.approx(float(sigmas[s - 1]), rel=1e-6)


def test_tap_call_rule_keeps_the_schedule_sigma_evaluation(mods):
    """The rule on its own: at a capture step the first call is kept unless a later call evaluates at
    the step's schedule sigma; an off-schedule call never replaces an on-schedule one."""
    tiny = build_tiny("sd1")
    tapped = mods.tap.apply_tap(tiny.patcher, "auto", 4)
    tap = mods.capture.find_tap(tapped)
    cond = tiny.conditioning(1)[0][0].repeat(2, 1, 1)
    schedule = torch.tensor([5.0, 2.0, 0.0])
    inputs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    class Exec:
        class_obj = tiny.patcher.model

        def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kw):
            return tiny.patcher.model.apply_model(x, t, c_crossattn=c_crossattn, transformer_options={})

    def call(run, x, sigma):
        tap(Exec(), x, torch.full((2,), sigma), None, cond, None,
            {"probe_select_run": run, "cond_or_uncond": [0], "sample_sigmas": schedule})

    def alone(x, sigma):
        session = tap.open_session("alone", (0,))
        call("alone", x, sigma)
        tap.close_session("alone")
        return session.features[0]

    on_schedule = tap.open_session("a", (0,))
    call("a", inputs[0], 5.0)
    call("a", inputs[1], 3.5)               # an intermediate sigma (a midpoint evaluation)
    tap.close_session("a")
    assert torch.equal(on_schedule.features[0], alone(inputs[0], 5.0))
    assert on_schedule.sigmas[0] == 5.0

    late = tap.open_session("b", (0,))
    call("b", inputs[1], 3.5)
    call("b", inputs[2], 5.0)               # the step's own evaluation comes second
    call("b", inputs[0], 3.5)
    tap.close_session("b")
    assert torch.equal(late.features[0], alone(inputs[2], 5.0))
    assert late.sigmas[0] == 5.0

    off_only = tap.open_session("c", (0,))
    call("c", inputs[1], 3.5)
    call("c", inputs[2], 4.0)               # no call at the schedule sigma: the first one stays
    tap.close_session("c")
    assert torch.equal(off_only.features[0], alone(inputs[1], 3.5))
    assert not torch.equal(alone(inputs[1], 3.5), alone(inputs[2], 4.0))


def test_flux_double_block_tuple_output_taps_the_image_stream(mods):
    """Flux double blocks return (img, txt): the tap reads img, the cond chunk, as a token grid."""
    tiny = build_tiny("flux")
    tapped = mods.tap.apply_tap(tiny.patcher, "double_blocks.1", 4)
    tap = mods.capture.find_tap(tapped)
    assert tap.path == "double_blocks.1"
    recorder = ApplyModelRecorder(tap.path)
    result = _run(mods, with_recorder(tapped, recorder), tiny, n=2)
    output = recorder.calls[1]["output"]
    assert isinstance(output, tuple) and len(output) == 2
    img, txt = output
    latent_hw = tuple(result.latent["samples"].shape[-2:])          # 16x16 latent, patch 2: 8x8 tokens
    assert img.shape[1] == 64 and txt.shape[1] == 8
    flags = recorder.calls[1]["flags"]
    expected = mods.features.pool_feature_map(
        mods.features.tokens_to_grid(img.chunk(len(flags))[flags.index(0)], 8, 8), 4)
    assert torch.equal(result.activations.features, expected)
    assert result.activations.features.shape == (2, img.shape[-1], 4, 4)
    # The text stream is no image grid: reading it instead would be an error, not other features.
    with pytest.raises(ValueError, match="matches no image grid"):
        mods.capture.block_output_to_map(txt, "flux", tap.path, latent_hw, 2, 8)


def test_batch_one_latent_list_entries_follow_the_candidates(mods):
    """A batch-1 latent's per-sample list (batch_index) becomes one entry per candidate, so that
    selecting rows keeps it aligned; tensors and other entries pass through."""
    assert mods.split._per_sample([5], 1, 3) == [5, 5, 5]
    assert mods.split._per_sample([5, 6], 2, 3) == [5, 6]          # only batch-1 lists are repeated
    mask = torch.ones(1, 8, 8)
    assert mods.split._per_sample(mask, 1, 3) is mask

    tiny = build_tiny("sd1")
    latent = dict(tiny.empty_latent(1, 8), batch_index=[5])
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = mods.split.run_early(tiny.patcher, pos, neg, latent, 7, 3, 4, 3.0, "euler", "normal", 0.5)
    assert early.latent["samples"].shape[0] == 3
    assert early.latent["batch_index"] == [5, 5, 5]
    kept = mods.split.select_rows(early.latent, [2, 0])
    assert kept["batch_index"] == [5, 5] and kept["probe_select"]["seeds"] == [9, 7]
    finished = mods.split.resume(tiny.patcher, pos, neg, kept, 3.0)
    assert finished["samples"].shape[0] == 2 and finished["batch_index"] == [5, 5]


class _TreeBuilt(Exception):
    pass


class _ModelCalled(Exception):
    pass


def test_brownian_tree_placement_matches_comfyui_per_sampler(mods, monkeypatch):
    """For every splittable k-diffusion sampler, the pack builds a Brownian tree exactly when
    ComfyUI's own sampler function would, with the same CPU/GPU placement (`cpu=`). Read off
    ComfyUI's functions by running them on a stand-in tree that records its arguments; needs no GPU."""
    import comfy.k_diffusion.sampling as kds
    import comfy.samplers

    built = []

    class RecordingTree:
        def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda v: v, cpu=False):
            built.append(cpu)
            raise _TreeBuilt

    class StopAtModel:
        """The denoiser: a sampler that uses it (or reads anything from it) has chosen its noise."""

        def __call__(self, *_args, **_kw):
            raise _ModelCalled

        def __getattr__(self, _name):
            raise _ModelCalled

    monkeypatch.setattr(kds, "BrownianTreeNoiseSampler", RecordingTree)
    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.0])
    x = torch.zeros(2, 4, 8, 8)
    comfy_choice, pack_choice = {}, {}
    names = [n for n in comfy.samplers.KSAMPLER_NAMES if n not in mods.noise.UNSPLITTABLE_SAMPLERS]
    for name in names:
        function = getattr(kds, f"sample_{name}")
        built.clear()
        try:
            function(StopAtModel(), x.clone(), sigmas.clone(), extra_args={"seed": 3}, disable=True)
        except (_TreeBuilt, _ModelCalled):
            pass
        comfy_choice[name] = built[0] if built else None

        built.clear()
        try:
            mods.noise.build_noise_sampler(name, x, [3, 4], sigmas)
        except _TreeBuilt:
            pass
        pack_choice[name] = built[0] if built else None
    assert pack_choice == comfy_choice
    # The table is not vacuous: both placements occur.
    trees = {name: cpu for name, cpu in comfy_choice.items() if cpu is not None}
    assert trees["dpmpp_sde"] is True and trees["dpmpp_2m_sde_gpu"] is False
    assert set(trees) == set(mods.noise.BROWNIAN_SAMPLERS)


def test_resume_refuses_another_schedule_and_continues_a_changed_latent_as_given(mods):
    """A resume whose scheduler gives other sigmas of the same length is refused; an early latent
    changed between the nodes is continued from as given, not replaced by the recorded replay."""
    tiny = build_tiny("sd1")
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = mods.split.run_early(tiny.patcher, pos, neg, tiny.empty_latent(1, 8), 7, 2, 4, 3.0, "dpmpp_2m",
                                 "normal", 0.5)
    other = mods.split.select_rows(early.latent, [0, 1])
    other["probe_select"] = dict(other["probe_select"], scheduler="karras")
    with pytest.raises(mods.split.ScheduleMismatchError):
        mods.split.resume(tiny.patcher, pos, neg, other, 3.0)

    kept = mods.split.select_rows(early.latent, [0, 1])
    as_recorded = mods.split.resume(tiny.patcher, pos, neg, kept, 3.0)["samples"]
    changed = dict(kept, samples=kept["samples"] + 0.5)
    as_given = mods.split.resume(tiny.patcher, pos, neg, changed, 3.0)["samples"]
    assert as_given.shape == as_recorded.shape
    assert not torch.allclose(as_given, as_recorded)


def test_custom_form_reads_the_text_embedding_from_the_guiders_positive(mods):
    import comfy.samplers

    tiny = build_tiny("sd1")
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    guider = comfy.samplers.CFGGuider(tiny.patcher)
    guider.set_conds(pos, neg)
    from_guider = mods.split.text_embedding_from_guider(guider)
    expected = mods.split.text_embedding_from_conditioning(pos)
    assert from_guider is not None and expected is not None and torch.equal(from_guider, expected)
    assert mods.split.text_embedding_from_guider(object()) is None       # a guider without conditioning


def test_splittable_samplers_are_comfyuis_list_less_those_that_choose_their_own_steps(mods):
    import comfy.samplers

    names = mods.noise.splittable_samplers()
    assert names == [n for n in comfy.samplers.SAMPLER_NAMES if n not in mods.noise.UNSPLITTABLE_SAMPLERS]
    assert "euler" in names and "dpm_fast" not in names and "dpm_adaptive" not in names


def test_custom_noise_rows_follow_the_latents_batch_index(mods):
    """Row i is what RandomNoise(seed_i) draws for a batch-1 latent with that row's batch_index (a batch-1
    latent's single index serves every candidate)."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise

    def plain(seed, rows, index):
        return Noise_RandomNoise(seed).generate_noise({"samples": rows, "batch_index": index})

    one = torch.zeros(1, 4, 8, 8)
    got = mods.noise.initial_noise_from(Noise_RandomNoise(0), one.expand(2, -1, -1, -1), [7, 8],
                                        {"samples": one, "batch_index": [3]})
    for i, seed in enumerate([7, 8]):
        assert torch.equal(got[i:i + 1], plain(seed, one, [3]))
    two = torch.zeros(2, 4, 8, 8)
    got = mods.noise.initial_noise_from(Noise_RandomNoise(0), two, [7, 8], {"samples": two, "batch_index": [3, 5]})
    for i, (seed, index) in enumerate([(7, 3), (8, 5)]):
        assert torch.equal(got[i:i + 1], plain(seed, two[i:i + 1], [index]))
