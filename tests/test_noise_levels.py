"""Checkpoints by noise level: every node that takes a checkpoint fraction reports the sigma and log-SNR it
lands on, read from the model's own model_sampling (eps: -2 log sigma; flow: log((1 - t)^2 / t^2)), and the
table of the real families' levels at 20% of their default steps matches ComfyUI's own schedules."""
import json
import math

import comfy.model_sampling
import comfy.samplers
import pytest
import torch
from comfy_extras import nodes_custom_sampler as ccs
from comfy_extras.nodes_flux import FluxGuidance

from devtools.tiny_models import build_tiny

STEPS, CHECKPOINT = 10, 0.3


@pytest.fixture(scope="module")
def levels(pack):
    from probe_select.probes.analysis import noise_levels

    return noise_levels


def _flow_log_snr(t: float) -> float:
    return math.log((1.0 - t) ** 2 / t ** 2)


def test_pure_noise_level_follows_the_schedule_kind(levels):
    sigmas = torch.tensor([14.6, 7.0, 3.2, 1.1, 0.4, 0.0])
    vp = levels.noise_level_at_fraction(sigmas, "vp", 0.6)          # round(0.6 * 5) = 3
    assert (vp.step, vp.steps) == (3, 5) and vp.sigma == pytest.approx(1.1)
    assert vp.log_snr == pytest.approx(-2 * math.log(1.1)) and vp.t == pytest.approx(0.6)
    flow_sigmas = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.1, 0.0])
    flow = levels.noise_level_at_step(flow_sigmas, "flow", 2)
    assert flow.sigma == pytest.approx(0.7) and flow.log_snr == pytest.approx(_flow_log_snr(0.7))
    assert flow.as_dict()["log_snr"] == flow.log_snr and "log-SNR" in flow.describe() and "flow" in flow.describe()
    assert levels.noise_level_at_step(flow_sigmas, "flow", 5).log_snr == math.inf
    with pytest.raises(ValueError, match="outside 0..5"):
        levels.noise_level_at_step(sigmas, "vp", 6)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        levels.noise_level_at_step(sigmas, "eps", 1)


def test_ksampler_early_sampler_reports_the_level_of_its_stop_step(pack):
    """Tiny SD1 (eps): the sigma is the KSampler schedule's sigma at round(0.3 * 10) = 3, log-SNR -2 log sigma,
    in the early latent's metadata, the x0 preview's and the node's UI text."""
    from probe_select.nodes.nodes_sampling import ProbeSelectEarlySampler

    tiny = build_tiny("sd1")
    out = ProbeSelectEarlySampler.execute(tiny.patcher, tiny.conditioning(1), tiny.conditioning(2),
                                          tiny.empty_latent(1, 8), 5, 2, STEPS, 3.0, "euler", "karras", CHECKPOINT)
    early, x0, _ = out.args
    schedule = comfy.samplers.KSampler(tiny.patcher, steps=STEPS, device="cpu", sampler="euler",
                                       scheduler="karras").sigmas.double()
    level = early["probe_select"]["noise_level"]
    assert level["step"] == 3 and level["kind"] == "vp"
    assert level["sigma"] == pytest.approx(float(schedule[3]), rel=1e-6)
    assert level["log_snr"] == pytest.approx(-2 * math.log(float(schedule[3])), rel=1e-6)
    assert x0["probe_select_x0"]["noise_level"] == level
    text = out.ui["text"][0]
    assert f"sigma {level['sigma']:.4g}" in text and f"log-SNR {level['log_snr']:.3f}" in text
    assert "step 3 of 10" in text and "2 candidates" in text


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_custom_early_sampler_reports_the_flow_level(pack, family):
    """Tiny Flux and SD3 (flow, their own shifts): sigma = the SIGMAS at the stop step, log-SNR log((1-t)^2/t^2)."""
    from probe_select.nodes.nodes_custom_sampling import ProbeSelectEarlySamplerCustom

    tiny = build_tiny(family)
    assert isinstance(tiny.patcher.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    if family == "flux":
        guider = ccs.BasicGuider.execute(tiny.patcher, FluxGuidance.execute(tiny.conditioning(1), 3.5)[0])[0]
    else:
        guider = ccs.CFGGuider.execute(tiny.patcher, tiny.conditioning(1), tiny.conditioning(2), 2.0)[0]
    (sigmas,) = ccs.BasicScheduler.execute(tiny.patcher, "simple", STEPS, 1.0)
    out = ProbeSelectEarlySamplerCustom.execute(ccs.RandomNoise.execute(3)[0], guider,
                                                ccs.KSamplerSelect.execute("euler")[0], sigmas,
                                                tiny.empty_latent(1, 16), 2, CHECKPOINT)
    level = out.args[0]["probe_select"]["noise_level"]
    t = float(sigmas[3])
    assert level["kind"] == "flow" and level["step"] == 3 and level["sigma"] == pytest.approx(t, rel=1e-6)
    assert level["log_snr"] == pytest.approx(_flow_log_snr(t), rel=1e-6)
    assert abs(level["log_snr"] - (-2 * math.log(t))) > 0.1          # not the eps formula
    assert f"log-SNR {level['log_snr']:.3f} (flow)" in out.ui["text"][0]


def test_real_family_table_is_comfyuis_own_schedules(pack, levels):
    """The committed table equals a fresh computation from comfy.model_sampling objects built from
    comfy.supported_models configs, and each row is its schedule's sigma at round(0.2 T)."""
    from probe_select.nodes.engine import noise_levels as engine_levels

    fresh = engine_levels.real_family_levels(0.2)
    committed = levels.load_family_levels()
    assert [row.family for row in committed] == ["sd15", "sdxl", "sd3", "flux-dev"]
    for mine, theirs in zip(committed, fresh):
        assert mine.family == theirs.family and mine.step == theirs.step and mine.steps == theirs.steps
        assert mine.sigma == pytest.approx(theirs.sigma, rel=1e-9) and mine.log_snr == pytest.approx(theirs.log_snr)
    sd3 = engine_levels.family_sampling("sd3")
    flux = engine_levels.family_sampling("flux-dev")
    assert isinstance(sd3, comfy.model_sampling.ModelSamplingDiscreteFlow) and sd3.shift == 3.0
    assert isinstance(flux, comfy.model_sampling.ModelSamplingFlux) and flux.shift == pytest.approx(1.15)
    assert isinstance(engine_levels.family_sampling("sd15"), comfy.model_sampling.ModelSamplingDiscrete)
    for row in fresh:
        schedule = next(s for s in levels.REAL_FAMILIES if s.family == row.family)
        sigmas = comfy.samplers.calculate_sigmas(engine_levels.family_sampling(row.family), schedule.scheduler,
                                                 schedule.steps).double()
        assert row.step == round(0.2 * schedule.steps) and row.sigma == pytest.approx(float(sigmas[row.step]))
        expected = _flow_log_snr(row.sigma) if row.kind == "flow" else -2 * math.log(row.sigma)
        assert row.log_snr == pytest.approx(expected)
    by_family = {row.family: row.log_snr for row in fresh}
    # The flow families with their real shifts are noisier at 20% than the eps UNets.
    assert max(by_family["sd3"], by_family["flux-dev"]) < min(by_family["sd15"], by_family["sdxl"]) - 1.0
    text = (levels.FAMILY_LEVELS_PATH.with_suffix(".md")).read_text()
    assert all(f"| {row.label} |" in text and f"{row.log_snr:.2f}" in text for row in fresh)
    assert json.loads(levels.FAMILY_LEVELS_PATH.read_text())["levels"][0]["fraction"] == 0.2


def test_collect_sampler_reports_the_level_of_every_checkpoint(pack):
    from probe_select.nodes.nodes_sampling import ProbeSelectCollectSampler
    from probe_select.nodes.nodes_tap import ProbeSelectTap

    tiny = build_tiny("sd1")
    tapped = ProbeSelectTap.execute(tiny.patcher, "auto", 2).result[0]
    out = ProbeSelectCollectSampler.execute(tapped, tiny.conditioning(1), tiny.conditioning(2),
                                            tiny.empty_latent(1, 8), 0, 2, STEPS, 3.0, "euler", "normal", "0.2,0.5")
    schedule = comfy.samplers.KSampler(tiny.patcher, steps=STEPS, device="cpu", sampler="euler",
                                       scheduler="normal").sigmas.double()
    text = out.ui["text"][0]
    for step in (2, 5):
        sigma = float(schedule[step])
        assert f"step {step} of 10" in text and f"sigma {sigma:.4g}, log-SNR {-2 * math.log(sigma):.3f}" in text


def test_resumed_stage_reports_the_level_of_its_later_checkpoint(pack):
    from probe_select.nodes.nodes_sampling import ProbeSelectEarlySampler, ProbeSelectResume

    tiny = build_tiny("sd1")
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = ProbeSelectEarlySampler.execute(tiny.patcher, pos, neg, tiny.empty_latent(1, 8), 5, 2, STEPS, 3.0,
                                            "euler", "normal", 0.2).args[0]
    out = ProbeSelectResume.execute(tiny.patcher, pos, neg, early, 3.0, 0.6)
    later, x0, _ = out.args
    schedule = comfy.samplers.KSampler(tiny.patcher, steps=STEPS, device="cpu", sampler="euler",
                                       scheduler="normal").sigmas.double()
    level = later["probe_select"]["noise_level"]
    assert level["step"] == 6 and level["sigma"] == pytest.approx(float(schedule[6]), rel=1e-6)
    assert level["log_snr"] == pytest.approx(-2 * math.log(float(schedule[6])), rel=1e-6)
    assert x0["probe_select_x0"]["noise_level"] == level and "step 6 of 10" in out.ui["text"][0]
