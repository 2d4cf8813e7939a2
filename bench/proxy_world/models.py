"""Two small proxy-world text-to-image diffusion models, built from ComfyUI's own model classes.

* ``"unet"``: an SD1.x-family UNet: ``comfy.supported_models.SD15`` config, ``comfy.model_base.BaseModel``
  (EPS prediction, discrete 1000-step sigmas), ComfyUI's ``UNetModel``; 64 channels at 32 -> 16 -> 8
  pixels, attention (self + cross) at 8x8 only; 1.87 M parameters. The pack's taps, samplers and
  ``auto`` tap (``output_blocks.3.0``, 16x16) run on it unchanged.
* ``"dit"``: an SD3-family MMDiT: ``comfy.supported_models.SD3`` config, ``comfy.model_base.SD3``
  (FLOW / CONST sampling with SD3's shift 3.0, what it samples with), ComfyUI's
  ``OpenAISignatureMMDITWrapper``; hidden 192, 3 heads, 4 joint blocks, patch 2 on a 16x16 latent (64
  image tokens); 5.10 M parameters, trained for 58 minutes. ``auto`` tap: ``joint_blocks.3``.

Both sample with the noise schedules of their real families (SD1.5's scaled-linear eps; SD3's flow
shift 3), so a checkpoint fraction lands on the log-SNR it lands on there (bench/proxy_world/sample.py
reports it). Trained weights are stored as float16 and widened to float32 on load.

There is no autoencoder: the latent is the image itself, in pixel space.

Let ``rgb`` be the image in [-1, 1]. Over the proxy world its mean is -0.80 and its std only 0.33
(a dark background with small bright objects), so the model works on the standardised
``3 * (rgb + 0.8)`` (``DATA_SCALE * (rgb - DATA_CENTER)``: mean ~0, std 0.99, like the latents of
the real models; the background is -0.3):

* SD1.x (4 latent channels, 32x32): ``data`` = ``3 * (rgb + 0.8)`` plus one zero channel. ComfyUI's
  SD15 latent format multiplies the LATENT by 0.18215 before the model sees it
  (``process_latent_in``), so the LATENT a user handles is ``data / 0.18215``.
* SD3 (16 latent channels, 16x16): ``data`` = pixel-unshuffle(2) of ``3 * (rgb + 0.8)`` (32x32x3 ->
  16x16x12) plus 4 zero channels; SD3's latent format is ``process_in(latent) = (latent - 0.0609) *
  1.5305``, so the LATENT is ``data / 1.5305 + 0.0609``.

:func:`image_to_latent` and :func:`latent_to_image` convert between images ``[B, 3, H, W]`` in 0..1
and LATENT tensors (exact inverses on the RGB part, up to float rounding).

ComfyUI's layers skip weight initialisation, so :func:`build` initialises every parameter
deterministically from ``seed`` (N(0, 1/fan_in) matrices, zero biases, unit norms, SD3's fixed
sin-cos ``pos_embed``) and zeroes the usual "zero modules" (UNet residual output convs, transformer
``proj_out`` and the output conv; MMDiT adaLN modulations and final linear), so that training starts
from identity residual branches. :func:`load` reads a trained weights file (diffusion model and the
jointly trained :class:`~.text.TextEncoder`) written by ``train_models.py``; committed weights in
``bench/proxy_world/weights/`` are preferred over the git-ignored ``bench/cache/proxy_world/``.

ComfyUI must be importable (in-process: ``devtools.bootstrap_comfy()``, see bench/bench_core.py).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models

from .text import CONTEXT_DIM, POOLED_DIM, TEXT_LENGTH, TextEncoder

log = logging.getLogger(__name__)

FAMILIES = ("unet", "dit")
COMFY_FAMILY = {"unet": "sd1", "dit": "sd3"}       # the pack's family ids (nodes/families.py)
IMAGE_SIZE = 32
# data = DATA_SCALE * (rgb - DATA_CENTER), rgb in [-1, 1]: the rendered images have mean -0.80 and
# std 0.33 there (a dark background), so the model gets data with mean ~0 and std ~1 (0.99), like
# the latents of the real models. The mean matters for the EPS UNet (see _unet_identity_pairs).
DATA_SCALE = 3.0
DATA_CENTER = -0.8
LATENT_CHANNELS = {"unet": 4, "dit": 16}
# Flow shift the DiT samples with: SD3's own 3.0 (its model_sampling default, what SD3-medium samples
# with), so that a checkpoint fraction lands where it lands on the real model: 20% of 20 steps is
# log-SNR -4.80 (bench/results/noise_levels.md). The training covers every sigma (half the batch
# with this shift, half unshifted), so another shift (load(shift=...)) also samples correctly. (Until
# calibration round 2 the DiT sampled with 1.0, which made t = 0.2 far less noisy than on SD3/Flux
# and the x0 preview far too informative there.)
DIT_SAMPLING_SHIFT = 3.0
# CFG each model samples with (against the empty prompt), chosen on 16 held-out prompts the reports do not
# show (bench/results/proxy_models.md, CFG sweep 2, 4, 6): the one whose figures come closest to the
# calibration targets. DiT: at 4 it meets three and its x0-preview Spearman is at the band's edge (0.353);
# at 2 and 6 the x0 preview ranks far better than on real models (0.55, 0.49). UNet: no CFG reaches the
# success target (5-6% at all three); 4 as before. (That sweep sampled with euler, in calibration round 2:
# see the git history of proxy_models.md; the samplers below were compared at these CFGs.)
DEFAULT_CFG = {"unet": 4.0, "dit": 4.0}
# Sampler each model samples with, chosen on the same 16 held-out prompts (bench/results/proxy_models.md,
# sampler sweep). With plain euler both models settle the layout, and with it the reward, in their first
# steps: the x0 preview after 4 of 20 steps ranks the seeds of a prompt far better than on real FLUX.1-dev
# and SDXL (0.17-0.27). A stochastic sampler adds fresh noise at every step, so the layout keeps moving
# after the checkpoint, as it does in large models. DiT: euler_ancestral, the one sampler inside the band
# on the sweep prompts (0.33; euler 0.35, dpmpp_2m_sde 0.38, intervals overlapping); on the 40 report
# prompts euler gave 0.59 (round 2) and euler_ancestral 0.31. UNet (calibration round 4, attention at
# 16x16 as well): euler_ancestral, on the 40 report prompts 33% success and x0-preview Spearman 0.39,
# against dpmpp_2m_sde's 43% and 0.71; the earlier, weaker UNets failed under euler_ancestral (0-14%):
# in a batch-1 KSampler run ComfyUI seeds the ancestral noise with the same seed as the initial noise,
# so the first step adds the initial noise back along itself, which they did not recover from. Each
# candidate's noise comes from its own seed (the pack's per-candidate noise sampler), so a split run is
# still exact and equals a batch-1 KSampler run.
DEFAULT_SAMPLER = {"unet": "euler_ancestral", "dit": "euler_ancestral"}
LATENT_DOWNSCALE = {"unet": 1, "dit": 2}           # latent pixels per image pixel (per side)

ROOT = Path(__file__).resolve().parents[2]
COMMITTED_WEIGHTS = Path(__file__).resolve().parent / "weights"
CACHE_WEIGHTS = ROOT / "bench" / "cache" / "proxy_world"
WEIGHTS_NAME = "proxy_{family}.safetensors"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------

UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": IMAGE_SIZE,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    # 64 channels at every level: ComfyUI's GroupNorm has 32 groups, and with 32 channels (one per
    # group) the final norm erases each channel's per-image mean, so the network could not see or
    # remove the mean of the noise (samples kept a seed-dependent colour cast); two per group can.
    "model_channels": 64,
    "num_res_blocks": [1, 1, 1],
    # 64 channels at every level. (Calibration round 2 trained a 128-channel variant, [1, 2, 2], for 58
    # minutes: its shapes came out crisp but it lost colour binding, 34% of its samples with the prompt's
    # colours present at CFG 8, against 88% here; not committed, cause not found yet.)
    "channel_mult": [1, 1, 1],
    # attention (self + cross to the text) at the 8x8 level, where relations are decided, and at 16x16,
    # where a shape is 2-4 cells wide, so that a colour and a shape word bind to the same cells
    # (calibration round 4: success 11% -> 33%, the same training otherwise)
    "transformer_depth": [0, 1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

DIT_POS_EMBED_MAX = 16   # token grid up to 16x16: images up to 64x64 pixels
DIT_CONFIG = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": 3,          # MMDiT: hidden = 64 * depth = 192, heads = depth
    "num_blocks": 4,
    "input_size": None,
    "adm_in_channels": POOLED_DIM,
    "context_embedder_config": {
        "target": "torch.nn.Linear",
        "params": {"in_features": CONTEXT_DIM, "out_features": 192},
    },
    "num_patches": DIT_POS_EMBED_MAX * DIT_POS_EMBED_MAX,
    "pos_embed_max_size": DIT_POS_EMBED_MAX,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

TEXT_CONFIG = {"width": CONTEXT_DIM, "pooled_dim": POOLED_DIM, "length": TEXT_LENGTH}
# The pooled output each family's conditioning carries (text.POOLINGS): the DiT reads its pooled output as y (a
# trained projection of the token mean); the UNet never reads it, so it is the order-aware token features that a
# probe reads as the prompt, as a real SD1.x pooled output (CLIP's end-of-text token) depends on word order.
TEXT_POOLING = {"unet": "tokens", "dit": "mean"}


def text_config(family: str) -> dict:
    """The text encoder's config for ``family`` (:data:`TEXT_CONFIG` and the family's pooling)."""
    _check_family(family)
    return {**TEXT_CONFIG, "pooling": TEXT_POOLING[family]}


def default_config(family: str) -> dict:
    """Deep copy of the network config of ``family`` (ComfyUI pops from its lists)."""
    _check_family(family)
    return copy.deepcopy(UNET_CONFIG if family == "unet" else DIT_CONFIG)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown proxy-world model family {family!r}; expected one of {FAMILIES}")


def model_config(family: str, config: Optional[dict] = None):
    """The ComfyUI config object (``supported_models.SD15`` / ``SD3``), fp32."""
    c = copy.deepcopy(config) if config is not None else default_config(family)
    cfg = comfy.supported_models.SD15(c) if family == "unet" else comfy.supported_models.SD3(c)
    cfg.set_inference_dtype(torch.float32, None)
    return cfg


def latent_format(family: str):
    _check_family(family)
    return comfy.latent_formats.SD15() if family == "unet" else comfy.latent_formats.SD3()


# ----------------------------------------------------------------------------------------------
# latents <-> images
# ----------------------------------------------------------------------------------------------

def image_to_data(images: torch.Tensor, family: str) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in 0..1 -> what the model is trained on (after ``process_latent_in``)."""
    _check_family(family)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    x = (images.float() * 2.0 - 1.0 - DATA_CENTER) * DATA_SCALE
    b, _, h, w = x.shape
    if family == "unet":
        return torch.cat([x, x.new_zeros(b, 1, h, w)], 1)
    if h % 2 or w % 2:
        raise ValueError(f"dit images need even sides, got {h}x{w}")
    x = F.pixel_unshuffle(x, 2)                                   # [B, 12, H/2, W/2]
    return torch.cat([x, x.new_zeros(b, 4, h // 2, w // 2)], 1)


def data_to_image(data: torch.Tensor, family: str, clamp: bool = True) -> torch.Tensor:
    """Inverse of :func:`image_to_data` on the RGB part (the zero channels are dropped)."""
    _check_family(family)
    if family == "unet":
        x = data[:, :3]
    else:
        x = F.pixel_shuffle(data[:, :12], 2)
    img = (x.float() / DATA_SCALE + DATA_CENTER + 1.0) / 2.0
    return img.clamp(0.0, 1.0) if clamp else img


def image_to_latent(images: torch.Tensor, family: str) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in 0..1 -> LATENT samples (what ``{"samples": ...}`` holds)."""
    return latent_format(family).process_out(image_to_data(images, family))


def latent_to_image(latent: torch.Tensor, family: str, clamp: bool = True) -> torch.Tensor:
    """LATENT samples -> images ``[B, 3, H, W]`` in 0..1 (clamped unless ``clamp=False``)."""
    if isinstance(latent, dict):
        latent = latent["samples"]
    return data_to_image(latent_format(family).process_in(latent.float()), family, clamp=clamp)


def empty_latent(family: str, batch: int = 1, size: int = IMAGE_SIZE) -> dict:
    """``{"samples": zeros}`` of the right shape for ``size`` x ``size`` images."""
    _check_family(family)
    s = size // LATENT_DOWNSCALE[family]
    return {"samples": torch.zeros(batch, LATENT_CHANNELS[family], s, s)}


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------

def _is_zero_module(family: str, name: str) -> bool:
    if family == "unet":
        return (".out_layers.3." in name or ".proj_out." in name or name.startswith("out.2."))
    return "adaLN_modulation.1." in name or name.startswith("final_layer.linear.")


def _seed_for(family: str, seed: int) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(family.encode())) & 0xFFFFFFFFFFFF


def init_weights(model: "comfy.model_base.BaseModel", family: str, generator: torch.Generator) -> None:
    """Deterministic initialisation of every parameter and floating buffer (see the module doc)."""
    dm = model.diffusion_model
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if _is_zero_module(family, name) or name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1:
                p.fill_(1.0)
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) / math.sqrt(fan_in))
        pos = getattr(dm, "pos_embed", None)
        if isinstance(pos, torch.Tensor):
            from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

            table = get_2d_sincos_pos_embed(dm.hidden_size, dm.pos_embed_max_size)
            pos.copy_(torch.from_numpy(table).to(pos.dtype).reshape(pos.shape))
        for name, b in dm.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise RuntimeError(f"uninitialised buffer {name}")
    if family == "unet":
        _unet_identity_pairs(dm)


def _unet_identity_pairs(dm) -> None:
    """Start the UNet with eps ~ its input, carried by +x / -x channel pairs.

    ComfyUI's UNet normalises with GroupNorm(32 groups) before every convolution, down to the
    output layer, which removes each group's per-image mean. A network built only from such blocks
    can hardly see the mean of its input, yet an EPS model must, at high noise, predict the mean of
    the noise almost exactly (x0 = x - sigma * eps): otherwise the image keeps the mean of the initial
    noise (a seed-dependent colour, a grey background). Here the first 8 top-level channels hold
    +x_c and -x_c for the 4 input channels, each pair in one GroupNorm group (2 channels per group at
    64 channels), so the group's mean is 0 and its scale is the rms of x_c: the normalised pair keeps
    x_c's mean. conv_in writes the pairs, the last output block's skip connection copies them from
    its skip input (the conv_in output), and the output conv reads SiLU(z) - SiLU(-z) = z. All other
    weights stay as initialised; training adjusts everything.
    """
    conv_in = dm.input_blocks[0][0]
    c = conv_in.weight.shape[1]
    k = 2 * c
    groups = 32
    if conv_in.weight.shape[0] // groups != 2:
        raise RuntimeError("identity pairs need exactly 2 channels per GroupNorm group at the top level")
    with torch.no_grad():
        my, mx = conv_in.weight.shape[2] // 2, conv_in.weight.shape[3] // 2
        conv_in.weight[:k].zero_()
        conv_in.bias[:k].zero_()
        for i in range(c):
            conv_in.weight[2 * i, i, my, mx] = 1.0
            conv_in.weight[2 * i + 1, i, my, mx] = -1.0
        res = dm.output_blocks[-1][0]
        skip = res.skip_connection
        offset = skip.weight.shape[1] - conv_in.weight.shape[0]    # input is cat([h, conv_in output])
        skip.weight[:k].zero_()
        skip.bias[:k].zero_()
        for i in range(k):
            skip.weight[i, offset + i, 0, 0] = 1.0
        out = dm.out[-1]
        oy, ox = out.weight.shape[2] // 2, out.weight.shape[3] // 2
        for i in range(c):
            out.weight[i, 2 * i, oy, ox] = 1.0
            out.weight[i, 2 * i + 1, oy, ox] = -1.0


def _make_model(family: str, config: Optional[dict] = None) -> "comfy.model_base.BaseModel":
    cfg = model_config(family, config)
    model = cfg.get_model({}, "")   # unet: BaseModel (EPS); dit: model_base.SD3 (FLOW)
    if family == "unet" and model.model_type != comfy.model_base.ModelType.EPS:
        raise RuntimeError(f"expected an EPS model, got {model.model_type}")
    return model


def _patcher(model) -> "comfy.model_patcher.ModelPatcher":
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build(family: str, seed: int = 0, config: Optional[dict] = None) -> "comfy.model_patcher.ModelPatcher":
    """A freshly initialised (untrained) proxy-world model, as a ComfyUI MODEL (ModelPatcher)."""
    _check_family(family)
    model = _make_model(family, config)
    init_weights(model, family, torch.Generator().manual_seed(_seed_for(family, seed)))
    return _patcher(model)


def build_text_encoder(family: str, seed: int = 0, config: Optional[dict] = None) -> TextEncoder:
    """A freshly initialised text encoder for ``family`` (deterministic in ``seed``)."""
    _check_family(family)
    enc = TextEncoder(**(config or text_config(family)))
    enc.init_weights(torch.Generator().manual_seed(_seed_for("text-" + family, seed)))
    return enc.eval()


def param_count(module) -> int:
    if isinstance(module, comfy.model_patcher.ModelPatcher):
        module = module.model.diffusion_model
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# weights files
# ----------------------------------------------------------------------------------------------

def weights_candidates(family: str):
    """Committed weights first, then the git-ignored cache."""
    _check_family(family)
    name = WEIGHTS_NAME.format(family=family)
    return [COMMITTED_WEIGHTS / name, CACHE_WEIGHTS / name]


def weights_path(family: str) -> Path:
    """The weights file :func:`load` reads (committed preferred); raises if there is none."""
    for path in weights_candidates(family):
        if path.is_file():
            return path
    shown = " or ".join(str(p) for p in weights_candidates(family))
    raise FileNotFoundError(
        f"no trained proxy-world {family} weights ({shown}); train them with "
        f"`.venv/bin/python bench/proxy_world/train_models.py --family {family}`")


def save(path, patcher, text_encoder: TextEncoder, family: str, info: Optional[dict] = None,
         config: Optional[dict] = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write the diffusion model and the text encoder to one safetensors file (atomic). Floating
    tensors are stored as ``dtype`` (the trained weights: float16, which halves the committed files;
    :func:`load` widens them back to float32)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = patcher.model if isinstance(patcher, comfy.model_patcher.ModelPatcher) else patcher
    tensors: Dict[str, torch.Tensor] = {}
    def stored(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().cpu()
        return (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()

    for k, v in model.diffusion_model.state_dict().items():
        tensors[f"diffusion_model.{k}"] = stored(v)
    for k, v in text_encoder.state_dict().items():
        tensors[f"text_encoder.{k}"] = stored(v)
    meta = {
        "format": "probe_select_proxy_world_model",
        "format_version": str(FORMAT_VERSION),
        "stored_dtype": str(dtype).replace("torch.", ""),
        "family": family,
        "comfy_family": COMFY_FAMILY[family],
        "data_scale": repr(float(DATA_SCALE)),
        "data_center": repr(float(DATA_CENTER)),
        "model_config": json.dumps(config if config is not None else default_config(family)),
        "text_config": json.dumps(text_config(family)),
        "info": json.dumps(info or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    tmp.replace(path)
    return path


def read_info(path) -> dict:
    """The metadata of a weights file (training info decoded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for key in ("info", "model_config", "text_config"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


def load(family: str, path=None, shift: Optional[float] = None) -> Tuple["comfy.model_patcher.ModelPatcher", TextEncoder]:
    """(MODEL, text encoder) of the trained ``family`` model from ``path`` or :func:`weights_path`.

    The DiT samples with ``shift`` (default :data:`DIT_SAMPLING_SHIFT`, SD3's own); another shift is
    patched on through ComfyUI's own ``ModelSamplingSD3`` node, as a workflow would do it.
    """
    from safetensors.torch import load_file

    _check_family(family)
    path = Path(path) if path is not None else weights_path(family)
    meta = read_info(path)
    if meta.get("format") != "probe_select_proxy_world_model":
        raise ValueError(f"{path} is not a proxy-world model file")
    if meta.get("family") != family:
        raise ValueError(f"{path} holds a {meta.get('family')} model, not {family}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')}; this code reads "
                         f"{FORMAT_VERSION}")
    if (float(meta.get("data_scale", "nan")) != DATA_SCALE
            or float(meta.get("data_center", "nan")) != DATA_CENTER):
        raise ValueError(f"{path} was trained on data = {meta.get('data_scale')} x (rgb - {meta.get('data_center')}); "
                         f"this code uses {DATA_SCALE} x (rgb - {DATA_CENTER}); retrain it")
    state = load_file(str(path), device="cpu")
    model = _make_model(family, meta["model_config"])
    dm_state = {k[len("diffusion_model."):]: v for k, v in state.items() if k.startswith("diffusion_model.")}
    model.diffusion_model.load_state_dict(dm_state, strict=True)
    # A file written before the pooling was a setting holds the same tensors: it gets its family's pooling.
    enc = TextEncoder(**{"pooling": TEXT_POOLING[family], **meta["text_config"]})
    enc.load_state_dict({k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")},
                        strict=True)
    enc.eval()
    log.debug("loaded proxy-world %s from %s", family, path)
    patcher = _patcher(model)
    if family == "dit":
        shift = DIT_SAMPLING_SHIFT if shift is None else float(shift)
        if shift != patcher.get_model_object("model_sampling").shift:
            from comfy_extras.nodes_model_advanced import ModelSamplingSD3
            (patcher,) = ModelSamplingSD3().patch(patcher, shift)
    return patcher, enc
