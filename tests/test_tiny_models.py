"""Tests for tests/tiny_models.py: tiny random ComfyUI models of five families."""
import pytest
import torch

import comfy.model_base
import comfy.model_sampling
import comfy.supported_models
import nodes

from devtools import tiny_models
from devtools.tiny_models import FAMILIES, TinyModel, build_tiny

UNETS = ("sd1", "sd2", "sdxl")
# latent size (in latent pixels) used for sampling: tiny for the UNets, 16 for the DiTs
SIZE = {"sd1": 8, "sd2": 8, "sdxl": 8, "sd3": 16, "flux": 16}
# flux is guidance-distilled (guidance goes in through the conditioning), so it samples at cfg 1
CFG = {"sd1": 4.0, "sd2": 4.0, "sdxl": 4.0, "sd3": 4.0, "flux": 1.0}

EXPECTED = {
    # family: (config class, model_base class, ModelType, prediction class, sampling schedule class)
    "sd1": (comfy.supported_models.SD15, comfy.model_base.BaseModel, comfy.model_base.ModelType.EPS,
            comfy.model_sampling.EPS, comfy.model_sampling.ModelSamplingDiscrete),
    "sd2": (comfy.supported_models.SD20, comfy.model_base.BaseModel, comfy.model_base.ModelType.V_PREDICTION,
            comfy.model_sampling.V_PREDICTION, comfy.model_sampling.ModelSamplingDiscrete),
    "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL, comfy.model_base.ModelType.EPS,
             comfy.model_sampling.EPS, comfy.model_sampling.ModelSamplingDiscrete),
    "sd3": (comfy.supported_models.SD3, comfy.model_base.SD3, comfy.model_base.ModelType.FLOW,
            comfy.model_sampling.CONST, comfy.model_sampling.ModelSamplingDiscreteFlow),
    "flux": (comfy.supported_models.Flux, comfy.model_base.Flux, comfy.model_base.ModelType.FLUX,
             comfy.model_sampling.CONST, comfy.model_sampling.ModelSamplingFlux),
}


def _sample(tm: TinyModel, pos_seed: int, neg_seed: int = 1000, seed: int = 42, steps: int = 4):
    latent = tm.empty_latent(batch=1, size=SIZE[tm.family])
    (out,) = nodes.common_ksampler(
        tm.patcher, seed, steps, CFG[tm.family], "euler", "normal",
        tm.conditioning(pos_seed), tm.conditioning(neg_seed), latent,
    )
    return out["samples"]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request) -> TinyModel:
    return build_tiny(request.param, seed=0)


def test_families_constant():
    assert FAMILIES == ("sd1", "sd2", "sdxl", "sd3", "flux")


def test_unknown_family_raises():
    with pytest.raises(ValueError):
        build_tiny("sd4")


def test_model_classes_and_sampling_type(tiny):
    cfg_cls, base_cls, model_type, pred_cls, sched_cls = EXPECTED[tiny.family]
    model = tiny.patcher.model
    assert type(model) is base_cls
    assert type(model.model_config) is cfg_cls
    assert model.model_type == model_type
    ms = model.model_sampling
    assert isinstance(ms, pred_cls)
    assert isinstance(ms, sched_cls)
    if tiny.family in ("sd1", "sdxl"):
        assert not isinstance(ms, comfy.model_sampling.V_PREDICTION)
    if tiny.family in ("sd3", "flux"):
        assert not isinstance(ms, comfy.model_sampling.EPS)
    assert model.get_dtype() == torch.float32


def test_dims(tiny):
    expected_channels = 16 if tiny.family in ("sd3", "flux") else 4
    assert tiny.latent_channels == expected_channels
    assert tiny.context_dim > 0
    if tiny.family in ("sdxl", "sd3", "flux"):
        assert tiny.pooled_dim > 0
    else:
        assert tiny.pooled_dim == 0
    if tiny.family == "sdxl":  # pooled ++ 6 x Timestep(256)
        assert tiny.patcher.model.adm_channels == tiny.pooled_dim + 6 * 256
    n = tiny_models.param_count(tiny)
    assert 10_000 < n <= 2_500_000, n


def test_block_lists(tiny):
    dm = tiny.patcher.model.diffusion_model
    if tiny.family in UNETS:
        assert len(dm.input_blocks) >= 3
        assert len(dm.output_blocks) >= 3
        assert dm.middle_block is not None and len(dm.middle_block) >= 3  # res, transformer, res
        # several resolution levels in the decoder: 3 levels -> 2 upsamplers
        from comfy.ldm.modules.diffusionmodules.openaimodel import Upsample

        n_up = sum(isinstance(m, Upsample) for b in dm.output_blocks for m in b)
        assert n_up >= 2, n_up
        # the UNet has cross attention to the text conditioning
        assert any(name.endswith("attn2") for name, _ in dm.named_modules())
    elif tiny.family == "sd3":
        assert len(dm.joint_blocks) >= 3
    else:
        assert len(dm.double_blocks) >= 3
        assert len(dm.single_blocks) >= 3


def test_conditioning(tiny):
    a = tiny.conditioning(1)
    a2 = tiny.conditioning(1)
    b = tiny.conditioning(2)
    assert isinstance(a, list) and len(a) == 1 and len(a[0]) == 2
    cond, extras = a[0]
    assert cond.shape == (1, 8, tiny.context_dim)
    assert tiny.conditioning(1, tokens=5)[0][0].shape == (1, 5, tiny.context_dim)
    assert torch.equal(cond, a2[0][0])
    assert not torch.allclose(cond, b[0][0])
    if tiny.pooled_dim:
        assert extras["pooled_output"].shape == (1, tiny.pooled_dim)
        assert torch.equal(extras["pooled_output"], a2[0][1]["pooled_output"])
        assert not torch.allclose(extras["pooled_output"], b[0][1]["pooled_output"])
    else:
        assert "pooled_output" not in extras
    lat = tiny.empty_latent(batch=2, size=6)["samples"]
    assert lat.shape == (2, tiny.latent_channels, 6, 6)
    assert not lat.any()


def test_sampling_finite_and_conditioned(tiny):
    a = _sample(tiny, pos_seed=1)
    a_again = _sample(tiny, pos_seed=1)
    b = _sample(tiny, pos_seed=2)
    size = SIZE[tiny.family]
    assert a.shape == (1, tiny.latent_channels, size, size)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # stable magnitudes: common_ksampler returns latent-format samples (process_latent_out, e.g.
    # x / 0.18215 for SD1); check them in the model's own latent space
    for s in (a, b):
        internal = tiny.patcher.model.process_latent_in(s)
        assert 0.1 < float(internal.std()) < 5.0, float(internal.std())
        assert float(internal.abs().max()) < 30.0, float(internal.abs().max())
    # deterministic for the same inputs, different for a different positive prompt
    assert torch.allclose(a, a_again, atol=1e-5)
    rel = float((a - b).norm() / a.norm())
    assert rel > 0.05, rel


def test_prediction_depends_on_context(tiny):
    """One direct model call: the raw prediction is non-trivial and depends on the text tokens."""
    model = tiny.patcher.model
    size = SIZE[tiny.family]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, tiny.latent_channels, size, size, generator=g)
    sigma = torch.tensor([1.0]) if tiny.family in UNETS else torch.tensor([0.5])
    outs = []
    for text_seed in (1, 2):
        cond, extras = tiny.conditioning(text_seed)[0]
        conds = model.extra_conds(cross_attn=cond, device=x.device, noise=x, **extras)
        kwargs = {k: v.cond for k, v in conds.items()}
        with torch.no_grad():
            outs.append(model.apply_model(x, sigma, **kwargs))
    d1, d2 = outs
    assert torch.isfinite(d1).all()
    assert float(d1.std()) > 1e-2
    assert float((d1 - d2).abs().max()) > 1e-3


def test_denoised_is_order_one_at_max_noise(tiny):
    """At the first sampling step (pure noise) the x0 estimate is O(1), not O(sigma_max).

    For the EPS families this needs eps ~ noise (the identity path in tiny_models); a plain random
    UNet gives x0 ~ 14.6 x noise here.
    """
    model = tiny.patcher.model
    ms = model.model_sampling
    size = SIZE[tiny.family]
    noise = torch.randn(1, tiny.latent_channels, size, size, generator=torch.Generator().manual_seed(9))
    sigma = ms.sigma_max.reshape(1).float()
    x = ms.noise_scaling(sigma, noise, torch.zeros_like(noise))
    cond, extras = tiny.conditioning(1)[0]
    conds = model.extra_conds(cross_attn=cond, device=x.device, noise=x, **extras)
    with torch.no_grad():
        d = model.apply_model(x, sigma, **{k: v.cond for k, v in conds.items()})
    assert torch.isfinite(d).all()
    assert float(d.std()) < 4.0, float(d.std())


def test_same_seed_same_weights_different_seed_differs():
    for family in FAMILIES:
        sd1 = tiny_models._construct(family, 3).patcher.model.state_dict()
        sd2 = tiny_models._construct(family, 3).patcher.model.state_dict()
        sd3 = tiny_models._construct(family, 4).patcher.model.state_dict()
        assert sd1.keys() == sd2.keys()
        for k in sd1:
            assert torch.equal(sd1[k], sd2[k]), (family, k)
            assert torch.isfinite(sd1[k]).all() if sd1[k].is_floating_point() else True
        n_diff = sum(
            1 for k in sd1 if sd1[k].is_floating_point() and sd1[k].numel() > 1 and not torch.equal(sd1[k], sd3[k])
        )
        assert n_diff > len(sd1) // 4, (family, n_diff)


def test_build_tiny_returns_independent_clones():
    t1 = build_tiny("sd1", seed=0)
    t2 = build_tiny("sd1", seed=0)
    assert t1.patcher is not t2.patcher
    assert t1.patcher.is_clone(t2.patcher)  # same underlying weights
    t1.patcher.set_model_unet_function_wrapper(lambda apply, args: apply(args["input"], args["timestep"], **args["c"]))
    assert "model_function_wrapper" in t1.patcher.model_options
    assert "model_function_wrapper" not in t2.patcher.model_options
    assert "model_function_wrapper" not in build_tiny("sd1", seed=0).patcher.model_options


def test_flux_guidance_from_conditioning():
    """Flux takes guidance from the conditioning dict ("guidance", default 3.5) via extra_conds."""
    tm = build_tiny("flux", seed=0)
    model = tm.patcher.model
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    cond, extras = tm.conditioning(1)[0]
    assert extras["guidance"] == 3.5
    outs = []
    for g in (1.0, 3.5):
        conds = model.extra_conds(cross_attn=cond, device=x.device, noise=x, **{**extras, "guidance": g})
        assert float(conds["guidance"].cond) == g
        with torch.no_grad():
            outs.append(model.apply_model(x, torch.tensor([0.5]), **{k: v.cond for k, v in conds.items()}))
    assert float((outs[0] - outs[1]).abs().max()) > 1e-3
