"""Tiny, randomly initialised diffusion models built from ComfyUI's own model classes.

Each family uses the real ComfyUI config class (``comfy.supported_models.*``), the real model
wrapper (``comfy.model_base.*``) and the real diffusion network (UNetModel / MMDiT / Flux), only
with tiny widths and depths, so the whole ComfyUI sampling stack (``nodes.common_ksampler``,
model sampling, CFG, conditioning -> extra_conds) runs unchanged on CPU in well under a second.

ComfyUI's layers skip weight initialisation (``torch.empty``), so every parameter and every
floating-point buffer is initialised here, deterministically, from a ``torch.Generator`` seeded
with the ``seed`` argument:

* weights with ndim >= 2 (linear / conv): N(0, 1 / fan_in)
* 1-d weights / scales (GroupNorm, LayerNorm, RMSNorm): 1
* biases: 0
* SD3's ``pos_embed`` buffer: the fixed 2-d sin-cos table used by SD3

Two deterministic adjustments follow (see ``_family_fixups``):

* EPS families (sd1, sdxl): a random network predicts noise uncorrelated with its input, so an
  EPS sampler would never remove the initial noise (latents ~ sigma_max = 14.6 x noise, worse with
  CFG). 8 of the 32 top-level UNet channels are therefore wired as an identity path, so that
  eps ~ x_in + (random, conditioning-dependent part); see ``_eps_identity_path``.
* The output projection (the random part of it, for EPS) is rescaled once, using a fixed probe
  input, so that the raw prediction has std ~``_OUT_STD[family]``.

Sampled latents then stay finite and O(1) in the model's latent space (std ~1-3 after 4-20 Euler
steps at cfg 1-4; ``common_ksampler`` returns them divided by the latent format's scale factor,
e.g. x / 0.18215 for SD1). The original models zero-initialise several output layers; here they are
random, so every block contributes and the prediction depends on the text conditioning.

Usage::

    from tiny_models import build_tiny
    tm = build_tiny("flux", seed=0)
    pos, neg = tm.conditioning(1), tm.conditioning(2)
    (out,) = nodes.common_ksampler(tm.patcher, 0, 4, 1.0, "euler", "normal", pos, neg, tm.empty_latent(size=16))
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import zlib
from dataclasses import dataclass

import torch

import comfy.model_base
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")

# Token width of the text conditioning and width of pooled_output per family.
_CONTEXT_DIM = {"sd1": 64, "sd2": 64, "sdxl": 64, "sd3": 64, "flux": 64}
_POOLED_DIM = {"sd1": 0, "sd2": 0, "sdxl": 32, "sd3": 32, "flux": 32}
_LATENT_CHANNELS = {"sd1": 4, "sd2": 4, "sdxl": 4, "sd3": 16, "flux": 16}
# Target std of the random part of the network output on the calibration input (eps / v / flow
# velocity). For the EPS families an extra identity path (eps ~ x_in) is added on top.
_OUT_STD = {"sd1": 0.1, "sd2": 0.5, "sdxl": 0.1, "sd3": 1.0, "flux": 1.0}
# Gain on the UNet cross-attention output projections (attn2.to_out): how strongly the text
# conditioning moves the prediction.
_XATTN_GAIN = 1.0

# model_base.SDXL.encode_adm: pooled_output ++ 6 Timestep(256) embeddings (h, w, crop_h, crop_w,
# target_h, target_w).
_SDXL_ADM_EXTRA = 6 * 256


@dataclass
class TinyModel:
    family: str
    patcher: "comfy.model_patcher.ModelPatcher"
    latent_channels: int  # 4 for sd1/sd2/sdxl, 16 for sd3/flux
    context_dim: int  # token width of the text conditioning
    pooled_dim: int  # width of pooled_output (0 if the family does not use it)

    def conditioning(self, text_seed: int, tokens: int = 8) -> list:
        """A ComfyUI CONDITIONING list ``[[cond [1, tokens, context_dim], {...}]]``.

        The extras dict holds ``pooled_output`` [1, pooled_dim] for sdxl/sd3/flux (omitted for
        sd1/sd2, whose models ignore it) and ``guidance`` (3.5) for flux. Values are N(0, 1),
        filled deterministically from ``text_seed``; different seeds give different conditionings.
        """
        g = torch.Generator().manual_seed(int(text_seed) & 0xFFFFFFFFFFFF)
        cond = torch.randn(1, tokens, self.context_dim, generator=g)
        extras = {}
        if self.pooled_dim > 0:
            extras["pooled_output"] = torch.randn(1, self.pooled_dim, generator=g)
        if self.family == "flux":
            extras["guidance"] = 3.5
        return [[cond, extras]]

    def empty_latent(self, batch: int = 1, size: int = 16) -> dict:
        """``{"samples": zeros [batch, latent_channels, size, size]}`` (size in latent pixels)."""
        return {"samples": torch.zeros(batch, self.latent_channels, size, size)}


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------

def _unet_common(context_dim: int) -> dict:
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [1, 1, 1],
        "channel_mult": [1, 2, 2],
        "context_dim": context_dim,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def _config_sd1():
    c = _unet_common(_CONTEXT_DIM["sd1"])
    c.update({
        "adm_in_channels": None,
        "transformer_depth": [1, 1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1],
        "use_linear_in_transformer": False,
    })
    cfg = comfy.supported_models.SD15(c)  # adds num_heads=8, num_head_channels=-1
    return cfg


def _config_sd2():
    c = _unet_common(_CONTEXT_DIM["sd2"])
    c.update({
        "adm_in_channels": None,
        "transformer_depth": [1, 1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1],
        "use_linear_in_transformer": True,
    })
    cfg = comfy.supported_models.SD20(c)  # adds num_heads=-1, num_head_channels=64, fp32 attention
    # Real SD2 has 64-channel heads; the tiny level-0 width is 32, so use 32-channel heads.
    cfg.unet_config["num_head_channels"] = 32
    return cfg


def _config_sdxl():
    c = _unet_common(_CONTEXT_DIM["sdxl"])
    c.update({
        "num_classes": "sequential",
        "adm_in_channels": _POOLED_DIM["sdxl"] + _SDXL_ADM_EXTRA,
        # like SDXL: no attention at the first level
        "transformer_depth": [0, 1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [0, 0, 1, 1, 1, 1],
        "use_linear_in_transformer": True,
    })
    cfg = comfy.supported_models.SDXL(c)  # adds num_heads=-1, num_head_channels=64
    cfg.unet_config["num_head_channels"] = 32
    return cfg


_SD3_POS_EMBED_MAX = 32  # latent 64x64 at most


def _config_sd3():
    hidden = 64 * 2  # MMDiT: hidden_size = 64 * depth, num_heads = depth
    c = {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": 2,
        "num_blocks": 4,
        "input_size": None,
        "adm_in_channels": _POOLED_DIM["sd3"],
        "context_embedder_config": {
            "target": "torch.nn.Linear",
            "params": {"in_features": _CONTEXT_DIM["sd3"], "out_features": hidden},
        },
        "num_patches": _SD3_POS_EMBED_MAX * _SD3_POS_EMBED_MAX,
        "pos_embed_max_size": _SD3_POS_EMBED_MAX,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }
    return comfy.supported_models.SD3(c)


def _config_flux():
    # The config ComfyUI's own model detection gives a Flux.1 checkpoint with the tiny sizes (only key
    # names and shapes are read), so fields a version adds are filled as for a real checkpoint (0.33's
    # FluxParams requires txt_ids_dims); detection fixes axes and heads at full size, hence ours on top.
    hidden, double_blocks, single_blocks = 64, 3, 3
    shapes = {
        "img_in.weight": (hidden, _LATENT_CHANNELS["flux"] * 2 * 2),
        "txt_in.weight": (hidden, _CONTEXT_DIM["flux"]),
        "vector_in.in_layer.weight": (hidden, _POOLED_DIM["flux"]),
        "guidance_in.in_layer.weight": (hidden, 256),
        **{f"double_blocks.{i}.img_attn.norm.key_norm.scale": (16,) for i in range(double_blocks)},
        **{f"single_blocks.{i}.norm.key_norm.scale": (16,) for i in range(single_blocks)},
    }
    keys = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    c = comfy.model_detection.detect_unet_config(keys, "")
    c.update({
        "num_heads": 4,
        "axes_dim": [4, 6, 6],  # sums to hidden_size / num_heads = 16
    })
    expected = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
                "patch_size": 2, "hidden_size": hidden, "depth": double_blocks,
                "depth_single_blocks": single_blocks, "vec_in_dim": _POOLED_DIM["flux"],
                "context_in_dim": _CONTEXT_DIM["flux"]}
    got = {k: c.get(k) for k in expected}
    if got != expected:
        raise RuntimeError(f"ComfyUI's detection of the tiny Flux changed: {got} != {expected}")
    return comfy.supported_models.Flux(c)


_CONFIGS = {
    "sd1": _config_sd1,
    "sd2": _config_sd2,
    "sdxl": _config_sdxl,
    "sd3": _config_sd3,
    "flux": _config_flux,
}


def _make_model(family: str, cfg):
    if family == "sd2":
        # SD20.model_type() inspects a state dict; force v-prediction.
        return comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.V_PREDICTION)
    return cfg.get_model({}, "")  # sd1: BaseModel EPS, sdxl: model_base.SDXL EPS, sd3: SD3 FLOW, flux: Flux FLUX


# ----------------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------------

def _init_weights(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1:
                p.fill_(1.0)
            else:
                fan_in = math.prod(p.shape[1:])
                w = torch.randn(p.shape, generator=gen, dtype=torch.float32) / math.sqrt(fan_in)
                p.copy_(w.to(p.dtype))
        dm = model.diffusion_model
        pos = getattr(dm, "pos_embed", None)
        if isinstance(pos, torch.Tensor):
            from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

            table = get_2d_sincos_pos_embed(dm.hidden_size, dm.pos_embed_max_size)
            pos.copy_(torch.from_numpy(table).to(pos.dtype).reshape(pos.shape))
        for name, b in model.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise RuntimeError(f"uninitialised buffer {name}")


def _is_unet(family: str) -> bool:
    return family in ("sd1", "sd2", "sdxl")


def _output_layer(family: str, dm: torch.nn.Module) -> torch.nn.Module:
    if _is_unet(family):
        return dm.out[-1]
    return dm.final_layer.linear


def _scale_cross_attention(dm: torch.nn.Module, gain: float) -> None:
    """Scale every UNet cross-attention output projection (attn2.to_out) by ``gain``."""
    with torch.no_grad():
        for name, mod in dm.named_modules():
            if name.endswith("attn2"):
                lin = mod.to_out[0]
                lin.weight.mul_(gain)
                if lin.bias is not None:
                    lin.bias.mul_(gain)


def _eps_identity_path(dm: torch.nn.Module, channels: int) -> None:
    """Route x_in through the UNet to the eps output: eps = x_in (per-channel standardised) + rest.

    A random network predicts noise uncorrelated with its input, so an EPS sampler never removes
    the initial noise (final latents ~ sigma_max = 14.6 times the noise, far worse with CFG). Here
    the first ``2 * channels`` top-level feature channels carry +x and -x: conv_in copies them,
    the last output block passes them through its skip connection untouched, the final
    GroupNorm(32, 32) (one channel per group) standardises them and the output conv takes
    SiLU(z) - SiLU(-z) = z. All other weights stay random.
    """
    c = channels
    k = 2 * c
    with torch.no_grad():
        conv_in = dm.input_blocks[0][0]
        conv_in.weight[:k].zero_()
        conv_in.bias[:k].zero_()
        mid_y, mid_x = conv_in.weight.shape[2] // 2, conv_in.weight.shape[3] // 2
        for i in range(c):
            conv_in.weight[i, i, mid_y, mid_x] = 1.0
            conv_in.weight[c + i, i, mid_y, mid_x] = -1.0

        last = dm.output_blocks[-1]
        res = last[0]
        skip = res.skip_connection
        # the block input is cat([h, hs[0]]); hs[0] is the conv_in output, so it is the tail
        offset = skip.weight.shape[1] - conv_in.weight.shape[0]
        skip.weight[:k].zero_()
        skip.bias[:k].zero_()
        for i in range(k):
            skip.weight[i, offset + i, 0, 0] = 1.0
        res.out_layers[-1].weight[:k].zero_()
        res.out_layers[-1].bias[:k].zero_()
        for sub in list(last)[1:]:
            proj_out = getattr(sub, "proj_out", None)
            if proj_out is not None:
                proj_out.weight[:k].zero_()
                if proj_out.bias is not None:
                    proj_out.bias[:k].zero_()

        out = dm.out[-1]
        out.weight[:, :k].zero_()


def _set_eps_identity_gain(dm: torch.nn.Module, channels: int, gain: float) -> None:
    c = channels
    out = dm.out[-1]
    mid_y, mid_x = out.weight.shape[2] // 2, out.weight.shape[3] // 2
    with torch.no_grad():
        for i in range(c):
            out.weight[i, i, mid_y, mid_x] = gain
            out.weight[i, c + i, mid_y, mid_x] = -gain


def _calibration_inputs(tm: TinyModel):
    g = torch.Generator().manual_seed(1234)
    size = 8 if _is_unet(tm.family) else 16
    x = torch.randn(1, tm.latent_channels, size, size, generator=g)
    ctx = torch.randn(1, 8, tm.context_dim, generator=g)
    kwargs = {}
    if _is_unet(tm.family):
        t = torch.tensor([500.0])
        if tm.family == "sdxl":
            kwargs["y"] = torch.randn(1, tm.patcher.model.adm_channels, generator=g)
    elif tm.family == "sd3":
        t = torch.tensor([500.0])
        kwargs["y"] = torch.randn(1, tm.pooled_dim, generator=g)
    else:
        t = torch.tensor([0.5])
        kwargs["y"] = torch.randn(1, tm.pooled_dim, generator=g)
        kwargs["guidance"] = torch.tensor([3.5])
    return x, t, ctx, kwargs


def _calibrate(tm: TinyModel) -> float:
    """Rescale the (random part of the) output projection to std ~_OUT_STD[family]."""
    dm = tm.patcher.model.diffusion_model
    x, t, ctx, kwargs = _calibration_inputs(tm)
    with torch.no_grad():
        out = dm(x, t, context=ctx, transformer_options={}, **kwargs)
        std = float(out.float().std())
        if not math.isfinite(std) or std == 0.0:
            raise RuntimeError(f"tiny {tm.family}: degenerate output std {std}")
        scale = _OUT_STD[tm.family] / std
        layer = _output_layer(tm.family, dm)
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.mul_(scale)
    return std


def _family_fixups(tm: TinyModel) -> float:
    dm = tm.patcher.model.diffusion_model
    if _is_unet(tm.family):
        _scale_cross_attention(dm, _XATTN_GAIN)
    eps_identity = tm.patcher.model.model_type == comfy.model_base.ModelType.EPS
    if eps_identity:
        _eps_identity_path(dm, tm.latent_channels)
    raw_std = _calibrate(tm)
    if eps_identity:
        _set_eps_identity_gain(dm, tm.latent_channels, 1.0)
    return raw_std


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------

def _seed_for(family: str, seed: int) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(family.encode())) & 0xFFFFFFFFFFFF


def _construct(family: str, seed: int = 0) -> TinyModel:
    """Build a fresh (uncached) tiny model."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cfg = _CONFIGS[family]()
    cfg.set_inference_dtype(torch.float32, None)
    model = _make_model(family, cfg)
    gen = torch.Generator().manual_seed(_seed_for(family, seed))
    _init_weights(model, gen)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    tm = TinyModel(
        family=family,
        patcher=patcher,
        latent_channels=_LATENT_CHANNELS[family],
        context_dim=_CONTEXT_DIM[family],
        pooled_dim=_POOLED_DIM[family],
    )
    raw_std = _family_fixups(tm)
    log.debug(
        "tiny %s seed=%d: %d params, raw output std %.3g rescaled to %.3g",
        family, seed, sum(p.numel() for p in model.parameters()), raw_std, _OUT_STD[family],
    )
    return tm


@functools.lru_cache(maxsize=None)
def _cached(family: str, seed: int) -> TinyModel:
    return _construct(family, seed)


def build_tiny(family: str, seed: int = 0) -> TinyModel:
    """A tiny random ``family`` model (one of FAMILIES), deterministic in ``seed``.

    Models are cached per (family, seed); each call returns a fresh ``patcher.clone()``
    (the clones share the weights but not patches / model_options).
    """
    tm = _cached(family, int(seed))
    return dataclasses.replace(tm, patcher=tm.patcher.clone())


def param_count(tm: TinyModel) -> int:
    return sum(p.numel() for p in tm.patcher.model.diffusion_model.parameters())
