"""Schedule inspector: log-SNR math against ComfyUI's model sampling and closed forms, every scheduler, the node."""
import math
import re

import pytest
import torch

import comfy.model_sampling
import comfy.samplers

from probe_select.probes.analysis import schedules as S


class _Sampling:
    """Model sampling objects built the way ComfyUI's model_base builds them (type mixin + schedule)."""

    @staticmethod
    def eps():
        class ModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
            pass
        return ModelSampling()   # SD1.5 defaults: scaled_linear, beta 0.00085..0.012, 1000 steps

    @staticmethod
    def flow(shift):
        class ModelSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass
        sampling = ModelSampling()
        sampling.set_parameters(shift=shift)
        return sampling

    @staticmethod
    def flux(mu):
        class ModelSampling(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
            pass
        sampling = ModelSampling()
        sampling.set_parameters(shift=mu)
        return sampling


def test_sd15_scaled_linear_log_snr_runs_from_7_07_to_minus_5_36_strictly_decreasing():
    sampling = _Sampling.eps()
    sigmas = sampling.sigmas.double()            # index = timestep 0..999
    assert sigmas.numel() == 1000
    lsnr = S.log_snr(sigmas, S.VP)
    assert float(lsnr[0]) == pytest.approx(7.07, abs=0.005)
    assert float(lsnr[-1]) == pytest.approx(-5.36, abs=0.005)
    assert bool((lsnr[1:] < lsnr[:-1]).all())
    # the VP identities, against the scaled-linear betas written out: alpha_cumprod = 1 / (1 + sigma^2)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    assert torch.allclose(S.signal_fraction(sigmas, S.VP), alphas_cumprod, rtol=1e-5)
    assert torch.allclose(lsnr, torch.log(alphas_cumprod / (1 - alphas_cumprod)), atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedules_match_the_closed_form(shift):
    sampling = _Sampling.flow(shift)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    sigmas = sampling.sigmas.double()
    assert torch.allclose(sigmas, S.shift_flow_time(t, shift), atol=1e-6)
    inner = slice(0, 999)                        # t = 1 is pure noise: log-SNR -inf on both sides
    lsnr = S.log_snr(sigmas[inner], S.FLOW)
    closed = 2 * torch.log((1 - t[inner]) / t[inner]) - 2 * math.log(shift)
    # ComfyUI keeps sigmas in float32: near t = 1, 1 - sigma ~ 3e-4 carries a relative error ~2e-4
    assert torch.allclose(lsnr, closed, atol=2e-3)
    assert float((lsnr[:900] - closed[:900]).abs().max()) < 1e-4
    assert torch.allclose(S.flow_log_snr_closed_form(t, shift)[inner], closed, atol=1e-12)
    assert float(S.log_snr(sigmas[-1:], S.FLOW)[0]) == -math.inf
    # signal fraction is SNR / (1 + SNR)
    snr = torch.exp(lsnr)
    assert torch.allclose(S.signal_fraction(sigmas[inner], S.FLOW), snr / (1 + snr), atol=1e-6)


def test_flux_time_shift_is_the_sd3_shift_with_exp_mu():
    mu = 1.15
    sampling = _Sampling.flux(mu)
    t = torch.arange(1, 10001, dtype=torch.float64) / 10000
    assert torch.allclose(sampling.sigmas.double(), S.shift_flow_time(t, math.exp(mu)), atol=1e-6)


@pytest.mark.parametrize("scheduler", comfy.samplers.SCHEDULER_NAMES)
@pytest.mark.parametrize("kind", [S.VP, S.FLOW])
def test_every_comfyui_scheduler(scheduler, kind):
    sampling = _Sampling.eps() if kind == S.VP else _Sampling.flow(3.0)
    steps = 10
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps)
    curves = S.ScheduleCurves(scheduler, kind, sigmas)
    assert curves.steps == steps
    assert float(curves.sigmas[-1]) == 0.0 and float(curves.log_snr[-1]) == math.inf
    assert float(curves.sigmas[0]) <= float(sampling.sigma_max) * (1 + 1e-6)
    if scheduler != "ddim_uniform":   # ddim_uniform starts at its first multiple of 1000/steps, below sigma_max
        assert float(curves.sigmas[0]) == pytest.approx(float(sampling.sigma_max), rel=1e-3)
    # finite between the ends; a flow schedule may start at t = 1 exactly (pure noise, -inf)
    assert bool(torch.isfinite(curves.log_snr[1:-1]).all())
    assert curves.starts_at_pure_noise == (kind == S.FLOW and float(sigmas[0]) == 1.0)
    if curves.starts_at_pure_noise:
        assert "logSNR -inf (t = 1, pure noise)" in S.summary_text([curves])
    assert bool((curves.sigmas[1:] <= curves.sigmas[:-1]).all())
    lo, hi = curves.log_snr_range()
    first = 1 if curves.starts_at_pure_noise else 0
    assert lo == pytest.approx(float(S.log_snr(sigmas[first:first + 1], kind)[0]))
    assert hi == pytest.approx(float(S.log_snr(sigmas[-2:-1], kind)[0]))
    assert sum(count for _, count in S.step_budget(curves)) == steps
    text = S.summary_text([curves], 0.2)
    assert text.startswith(f"{scheduler} [{kind}, {steps} steps]")
    expected = float(S.log_snr(sigmas[2:3], kind)[0])     # 20% of 10 steps = step 2
    assert f"step 2/{steps}" in text and f"logSNR {expected:.2f}" in text


def test_monotonicity_and_step_budget_are_reported():
    curves = S.ScheduleCurves("flat", S.VP, torch.tensor([10.0, 10.0, 1.0, 0.1, 0.0]))
    assert not curves.strictly_decreasing_sigma() and curves.repeated_sigmas() == 1
    assert "NOT strictly decreasing (1 repeated sigmas)" in S.summary_text([curves])
    # steps start at sigma 10, 10 (logSNR -4.6: noise), 1 (0: mid), 0.1 (4.6: signal)
    assert [count for _, count in S.step_budget(curves)] == [2, 1, 1]


def test_plot_marks_the_checkpoint_and_draws_each_schedule():
    from probe_select.probes.plots import COLORS, MARGIN

    a = S.ScheduleCurves("a", S.VP, torch.tensor([14.6, 3.0, 1.0, 0.03, 0.0]))
    b = S.ScheduleCurves("b", S.VP, torch.tensor([14.6, 1.0, 0.0]))
    width, height = 720, 220
    image = S.schedule_plot([a, b], 0.5, width=width, panel_height=height)
    assert image.size == (width, 3 * height)
    left, right = MARGIN[0], width - MARGIN[2]
    x_ckpt = round(left + 0.5 * (right - left))
    column = [image.getpixel((x_ckpt, y)) for y in range(MARGIN[1] + 1, height - MARGIN[3])]
    assert (120, 120, 120) in column
    pixels = set(image.getdata())
    assert COLORS[0] in pixels and COLORS[1] in pixels


@pytest.fixture(scope="module")
def schedule_node(pack):
    from probe_select.nodes.nodes_schedules import ProbeSelectScheduleInspector
    return ProbeSelectScheduleInspector


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux"])
def test_node_uses_the_models_own_sampling(schedule_node, family):
    from devtools.tiny_models import build_tiny

    tm = build_tiny(family)
    out = schedule_node.execute(tm.patcher, ",".join(comfy.samplers.SCHEDULER_NAMES), 20, 0.2).result
    image, summary = out
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    kind = S.FLOW if family in ("sd3", "flux") else S.VP
    sampling = tm.patcher.get_model_object("model_sampling")
    for name in comfy.samplers.SCHEDULER_NAMES:
        sigmas = comfy.samplers.calculate_sigmas(sampling, name, 20)
        expected = float(S.log_snr(sigmas[4:5], kind)[0])
        line = re.search(rf"^{name} \[{kind}, 20 steps\].*\n.*\n.*checkpoint 20% = step 4/20: .*logSNR (-?[\d.]+)",
                         summary, re.M)
        assert line is not None, summary
        assert float(line.group(1)) == pytest.approx(expected, abs=0.006)
    if family == "sd3":
        assert "shift 3" in summary.splitlines()[0]


def test_node_overlays_sigmas_and_second_model(schedule_node):
    from devtools.tiny_models import build_tiny

    sd1, flux = build_tiny("sd1"), build_tiny("flux")
    custom = torch.tensor([10.0, 2.0, 0.5, 0.0])
    _, summary = schedule_node.execute(sd1.patcher, "karras", 8, 0.25, sigmas=custom, model_2=flux.patcher).result
    assert "model 1: karras [vp" in summary and "model 2: karras [flow" in summary
    assert "sigmas input [vp, 3 steps]" in summary


def test_node_rejects_unknown_scheduler(schedule_node):
    from probe_select.nodes.errors import ProbeSelectError
    from devtools.tiny_models import build_tiny

    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectScheduleInspector\] unknown scheduler 'karas'"):
        schedule_node.execute(build_tiny("sd1").patcher, "normal,karas", 8, 0.2)
    with pytest.raises(ProbeSelectError, match="no scheduler named"):
        schedule_node.execute(build_tiny("sd1").patcher, " , ", 8, 0.2)


def test_analysis_nodes_are_registered_in_the_analysis_category(pack):
    import asyncio

    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    schemas = {node.define_schema().node_id: node.define_schema() for node in nodes}
    for node_id in ("ProbeSelectScheduleInspector", "ProbeSelectActivationPCA", "ProbeSelectLatentSlerp",
                    "ProbeSelectConditioningDirection"):
        assert schemas[node_id].category == "sampling/probe_select/analysis", node_id
