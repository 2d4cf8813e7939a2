"""The SamplerCustomAdvanced form of split sampling (ProbeSelectEarlySamplerCustom / ProbeSelectResumeCustom).

A kept candidate, resumed, equals a plain SamplerCustomAdvanced run with RandomNoise(its seed) and the same
guider, sampler and sigmas: with a CFG guider on the tiny SD1 model and Flux's BasicGuider with
FluxGuidance on the tiny Flux model.
"""
import pytest
import torch
from comfy_extras import nodes_custom_sampler as ccs
from comfy_extras.nodes_flux import FluxGuidance

from devtools.tiny_models import build_tiny
from helpers import ApplyModelRecorder, max_rel_diff, with_recorder

STEPS, CHECKPOINT, STOP = 6, 0.34, 2
SEED, CANDIDATES, KEPT = 10, 3, [2, 0]


@pytest.fixture(scope="module")
def nodes_custom(pack):
    from probe_select.nodes import nodes_custom_sampling

    return nodes_custom_sampling


@pytest.fixture(scope="module")
def split(pack):
    from probe_select.nodes.engine import split_sampling

    return split_sampling


def _row_by_row(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """APPLY_MODEL wrapper: every row evaluated as a batch of one, so batched matrix products round like
    the batch-1 reference (see test_exact_resume.py); what is left is the split itself."""
    rows = x.shape[0]

    def row(value, i):
        return value[i:i + 1] if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows else value
    return torch.cat([executor(x[i:i + 1], row(t, i), row(c_concat, i), row(c_crossattn, i), control,
                               transformer_options, **{k: row(v, i) for k, v in kwargs.items()}) for i in range(rows)])


def _counted(model, recorder, row_by_row=True):
    import comfy.patcher_extension

    counted = with_recorder(model, recorder)
    if row_by_row:
        counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_row_by_row", _row_by_row)
    return counted


def _guider(family, model, tiny):
    """SD1: CFGGuider at cfg 3 (cond and uncond evaluated). Flux: BasicGuider on FluxGuidance(3.5)."""
    if family == "sd1":
        return ccs.CFGGuider.execute(model, tiny.conditioning(1), tiny.conditioning(2), 3.0)[0]
    (positive,) = FluxGuidance.execute(tiny.conditioning(1), 3.5)
    return ccs.BasicGuider.execute(model, positive)[0]


def _setup(family):
    tiny = build_tiny(family)
    latent = tiny.empty_latent(1, 16 if tiny.latent_channels == 16 else 8)
    scheduler = "simple" if family == "flux" else "karras"
    (sigmas,) = ccs.BasicScheduler.execute(tiny.patcher, scheduler, STEPS, 1.0)
    return tiny, latent, sigmas


def _sampler(name):
    return ccs.KSamplerSelect.execute(name)[0]


def _plain(guider, seed, sampler, sigmas, latent):
    out, _denoised = ccs.SamplerCustomAdvanced.execute(ccs.RandomNoise.execute(seed)[0], guider, sampler, sigmas,
                                                       latent)
    return out["samples"]


def _early(nodes_custom, guider, sampler, sigmas, latent, candidates=CANDIDATES, seed=SEED, checkpoint=CHECKPOINT):
    return nodes_custom.ProbeSelectEarlySamplerCustom.execute(ccs.RandomNoise.execute(seed)[0], guider, sampler,
                                                              sigmas, latent, candidates, checkpoint)


@pytest.mark.parametrize("family", ["sd1", "flux"])
@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "heun"])
def test_kept_candidate_equals_plain_sampler_custom_advanced(split, nodes_custom, family, sampler_name):
    """N=3, the best 2 kept (reordered), resumed: the first equals SamplerCustomAdvanced with RandomNoise(its
    seed); the model is evaluated N*s + K*(T-s) times (per evaluation of a step) and never for replayed steps."""
    tiny, latent, sigmas = _setup(family)
    recorder = ApplyModelRecorder()
    guider = _guider(family, _counted(tiny.patcher, recorder), tiny)
    sampler = _sampler(sampler_name)
    early, x0, _activations = _early(nodes_custom, guider, sampler, sigmas, latent).args
    meta = early["probe_select"]
    assert meta["stop_step"] == STOP and meta["seeds"] == [SEED, SEED + 1, SEED + 2] and meta["form"] == "custom"
    assert x0["samples"].shape == early["samples"].shape
    early_evaluations = recorder.evaluations
    kept = split.select_rows(early, KEPT)
    finished = nodes_custom.ProbeSelectResumeCustom.execute(guider, sampler, kept, sigmas).args[0]
    resume_evaluations = recorder.evaluations - early_evaluations

    plain_recorder = ApplyModelRecorder()
    plain_guider = _guider(family, _counted(tiny.patcher, plain_recorder), tiny)
    reference = _plain(plain_guider, SEED + KEPT[0], sampler, sigmas, latent)
    other = _plain(plain_guider, SEED + KEPT[1], sampler, sigmas, latent)
    plain_evaluations = plain_recorder.evaluations // 2
    assert finished["samples"].shape[0] == len(KEPT)
    assert max_rel_diff(finished["samples"][:1], reference) <= 1e-5
    assert max_rel_diff(finished["samples"][1:], other) <= 1e-5
    assert max_rel_diff(reference, other) > 1e-2          # the seeds differ, so the check can fail

    assert early_evaluations % CANDIDATES == 0
    per_candidate_early = early_evaluations // CANDIDATES
    assert STOP <= per_candidate_early < plain_evaluations
    assert resume_evaluations == len(KEPT) * (plain_evaluations - per_candidate_early)
    if plain_evaluations == STEPS:
        assert early_evaluations + resume_evaluations == CANDIDATES * STOP + len(KEPT) * (STEPS - STOP)


@pytest.mark.parametrize("family", ["sd1", "flux"])
@pytest.mark.parametrize("sampler_name", ["dpmpp_2m", "euler_ancestral"])
def test_single_candidate_is_bit_identical(nodes_custom, family, sampler_name):
    """With N=1 nothing is batched differently: early + resume is exactly one SamplerCustomAdvanced run,
    with the sigmas taken from the latent when none are given."""
    tiny, latent, sigmas = _setup(family)
    guider = _guider(family, tiny.patcher, tiny)
    sampler = _sampler(sampler_name)
    early = _early(nodes_custom, guider, sampler, sigmas, latent, candidates=1).args[0]
    finished = nodes_custom.ProbeSelectResumeCustom.execute(guider, sampler, early).args[0]
    assert torch.equal(finished["samples"], _plain(guider, SEED, sampler, sigmas, latent))


def test_dual_cfg_guider_and_custom_sigmas_with_sampler_options(split, nodes_custom):
    """DualCFGGuider, hand-written sigmas (part denoise, not a scheduler's) and SamplerEulerAncestral's own
    eta / s_noise: still the plain run of the kept seed."""
    tiny, latent, _ = _setup("sd1")
    model = _counted(tiny.patcher, ApplyModelRecorder())
    guider = ccs.DualCFGGuider.execute(model, tiny.conditioning(1), tiny.conditioning(3), tiny.conditioning(2),
                                       2.5, 1.5, "regular")[0]
    sigmas = torch.tensor([9.0, 6.0, 3.5, 2.0, 1.0, 0.3, 0.0])
    sampler = ccs.SamplerEulerAncestral.execute(0.7, 0.9)[0]
    early = _early(nodes_custom, guider, sampler, sigmas, latent).args[0]
    finished = nodes_custom.ProbeSelectResumeCustom.execute(guider, sampler, split.select_rows(early, [1])).args[0]
    reference = _plain(guider, SEED + 1, sampler, sigmas, latent)
    assert max_rel_diff(finished["samples"], reference) <= 1e-5
    assert max_rel_diff(finished["samples"], _plain(guider, SEED + 1, _sampler("euler_ancestral"), sigmas,
                                                    latent)) > 1e-3   # the sampler's options matter


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_early_phase_evaluates_to_the_checkpoint_and_captures_the_tap(pack, nodes_custom, family):
    """Denoiser calls: N candidates x s steps (SD1 CFG: cond and uncond in one call each; Flux: cond only).
    A tap on the guider's model gives one activation row per candidate at the checkpoint, and the node
    sends the gallery its previews."""
    from probe_select.nodes.engine.gallery import PREVIEWS_KEY
    from probe_select.nodes.nodes_tap import apply_tap

    tiny, latent, sigmas = _setup(family)
    recorder = ApplyModelRecorder()
    guider = _guider(family, with_recorder(apply_tap(tiny.patcher, "auto", 2), recorder), tiny)
    output = _early(nodes_custom, guider, _sampler("euler"), sigmas, latent)
    _early_latent, _x0, activations = output.args
    assert recorder.evaluations == CANDIDATES * STOP
    flags = [0, 1] if family == "sd1" else [0]
    assert all(call["rows"] == len(flags) * CANDIDATES and sorted(call["flags"]) == flags for call in recorder.calls)
    assert activations.seeds == [SEED, SEED + 1, SEED + 2] and activations.step == STOP
    assert activations.features.shape[0] == CANDIDATES and activations.steps == STEPS
    assert PREVIEWS_KEY in output.ui


def test_ksampler_form_and_custom_form_share_the_engine(split, nodes_custom):
    """A KSampler-form early run (CFGGuider built inside) finished by the custom resume with an equal
    CFGGuider and KSamplerSelect gives what the KSampler-form resume gives."""
    tiny, latent, _ = _setup("sd1")
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = split.run_early(tiny.patcher, pos, neg, latent, SEED, 2, STEPS, 3.0, "dpmpp_2m", "karras", CHECKPOINT)
    by_ksampler = split.resume(tiny.patcher, pos, neg, early.latent, 3.0)["samples"]
    guider = ccs.CFGGuider.execute(tiny.patcher, pos, neg, 3.0)[0]
    by_custom = nodes_custom.ProbeSelectResumeCustom.execute(guider, _sampler("dpmpp_2m"), early.latent).args[0]
    assert torch.equal(by_custom["samples"], by_ksampler)


def _error(call, *fragments):
    from probe_select.nodes.errors import ProbeSelectError

    with pytest.raises(ProbeSelectError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_bad_inputs_name_the_node_and_the_fix(split, nodes_custom):
    tiny, latent, sigmas = _setup("sd1")
    guider = _guider("sd1", tiny.patcher, tiny)
    sampler = _sampler("euler")
    early_node = nodes_custom.ProbeSelectEarlySamplerCustom
    noise = ccs.RandomNoise.execute(SEED)[0]
    _error(lambda: early_node.execute(ccs.DisableNoise.execute()[0], guider, sampler, sigmas, latent, 3, 0.34),
           "[ProbeSelectEarlySamplerCustom]", "draws no noise", "RandomNoise")
    _error(lambda: early_node.execute(object(), guider, sampler, sigmas, latent, 3, 0.34),
           "[ProbeSelectEarlySamplerCustom]", "has no seed", "RandomNoise")
    _error(lambda: early_node.execute(noise, guider, sampler, sigmas, latent, 0, 0.34),
           "[ProbeSelectEarlySamplerCustom]", "candidates is 0", "1 or more")
    for checkpoint in (0.0, 1.0):
        _error(lambda: early_node.execute(noise, guider, sampler, sigmas, latent, 3, checkpoint),
               "[ProbeSelectEarlySamplerCustom]", "outside (0, 1)", "Fix:")
    _error(lambda: early_node.execute(noise, guider, sampler, sigmas[-2:], latent, 3, 0.34),
           "[ProbeSelectEarlySamplerCustom]", "1 steps", "Fix:")
    _error(lambda: early_node.execute(noise, guider, _sampler("dpm_adaptive"), sigmas, latent, 3, 0.34),
           "[ProbeSelectEarlySamplerCustom]", "dpm_adaptive", "Fix:")
    _error(lambda: early_node.execute(noise, tiny.patcher, sampler, sigmas, latent, 3, 0.34),
           "[ProbeSelectEarlySamplerCustom]", "not a ComfyUI guider", "CFGGuider")

    early = early_node.execute(noise, guider, sampler, sigmas, latent, 2, 0.34).args[0]
    resume_node = nodes_custom.ProbeSelectResumeCustom
    _error(lambda: resume_node.execute(guider, _sampler("heun"), early), "[ProbeSelectResumeCustom]",
           "sampler euler, not heun", "early sampler's SAMPLER")
    _error(lambda: resume_node.execute(guider, sampler, early, sigmas * 0.5), "[ProbeSelectResumeCustom]",
           "sigmas given differ", "Fix:")
    _error(lambda: resume_node.execute(guider, sampler, latent), "[ProbeSelectResumeCustom]",
           "did not come from ProbeSelectEarlySampler")

    from probe_select.nodes.nodes_sampling import ProbeSelectResume
    _error(lambda: ProbeSelectResume.execute(tiny.patcher, tiny.conditioning(1), tiny.conditioning(2), early, 3.0),
           "[ProbeSelectResume]", "ProbeSelectResumeCustom")
