"""Stand-in checkpoints: random-weight files under the public file names users download.

No weights can be downloaded in the tests, yet the example workflows must run through stock
`CheckpointLoaderSimple` on every supported family. These writers build each family with ComfyUI's
own classes (config class, model wrapper, text encoders, TAESD) in the calling process and save it
with ComfyUI's own saver (`comfy.sd.save_checkpoint`, what its CheckpointSave node calls), so that
ComfyUI's model detection reads the file as that family. The diffusion networks are as small as
detection allows; the text encoders whose configs ComfyUI fixes (CLIP-L, CLIP-G) are full size.

| family | config class detected | diffusion model | text encoders in the file | VAE |
| --- | --- | --- | --- | --- |
| sd15 | SD15 | UNet, 1 level, 1 res block | CLIP-L | TAESD, 4 channels |
| sdxl | SDXL | UNet 320 wide at every level, SDXL's input transformer depths | CLIP-L + CLIP-G | TAESD, 4 channels |
| sd35 | SD3 (MMDiT-X, qk rms-norm) | 2 joint blocks, hidden 128 | CLIP-L + CLIP-G (no T5) | TAESD, 16 channels |
| flux | Flux (dev, guidance) | 1 double + 1 single block, hidden 3072 | none | TAESD, 16 channels |

Why these shapes (ComfyUI 0.3.75 and 0.33.0 alike):

- SDXL: the `SDXL` config class matches on `transformer_depth == [0, 0, 2, 2, 10, 10]` (the input
  blocks), model_channels 320, context 2048 and adm 2816; channel_mult, the output transformer
  depths and the middle block are read from the keys but not matched, so here every level is 320
  wide, the output blocks have no transformers and the middle block is one res block (134 M params).
- SD3: detection derives depth from the x_embedder width (hidden = 64 * depth, heads = depth).
  Without T5 keys `SD3.clip_target` builds the CLIP-L + CLIP-G encoder alone, whose context is
  still [1, 77, 4096] (the CLIP features zero-padded) with pooled [1, 2048]. T5-XXL (4.7 B params,
  fixed config) is not written. CLIP-G is kept (as in the public file; CLIP-L alone would also load,
  1.3 GB smaller, with the CLIP-G half of the pooled vector zero).
- Flux: detection fixes 24 heads and rotary axes (16, 56, 56), i.e. 128 per head, so the hidden
  size is 3072 whatever the file says; depth and single depth follow the keys (1 and 1 here). Flux's
  text encoder always includes a full T5-XXL (fixed config), so the file has none and
  `CheckpointLoaderSimple` returns no CLIP for it: use the test node `ProbeSelectTestFluxTextEncoder`
  (tests/custom_nodes/probe_select_test_nodes), CLIP-L + a one-layer T5 of width 4096.

Weights: every tensor is set from one seeded generator (ComfyUI layers skip init): matrices
N(0, 1/fan_in), 1-d weights 1, biases 0, SD3's position table the fixed 2-d sin-cos one, TAESD's
scale 1 and shift 0 (or decoded images are black). fp16 throughout, so the same seed always gives
the same file contents, under ComfyUI 0.3.75 and 0.33.0 alike (see `stand_in_metadata`).

open_clip (`write_open_clip_stand_in`): the CLIPScore evaluator's weights, open_clip's own random
init under a seed with the two towers aligned, so that CLIPScore spreads and varies with the image
(random towers score ~0 everywhere, and training refuses constant targets).
"""
from __future__ import annotations

import gc
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sdxl", "sd35", "flux")
CHECKPOINT_NAMES = {   # the public file names (folder models/checkpoints)
    "sd15": "v1-5-pruned-emaonly-fp16.safetensors",
    "sdxl": "sd_xl_base_1.0.safetensors",
    "sd35": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
    "flux": "flux1-dev-fp8.safetensors",
}
# Bump a family's version when its recipe changes: cached files live under it.
RECIPE_VERSIONS = {"sd15": 1, "sdxl": 1, "sd35": 1, "flux": 2}    # flux 2: the public `.scale` key names
OPEN_CLIP_RECIPE_VERSION = 2       # 2: towers aligned (CLIPScore varies)
DEFAULT_SEED = 0

# The config class ComfyUI's detection gives each file, and the latent channels of its VAE.
DETECTED_CONFIG = {"sd15": "SD15", "sdxl": "SDXL", "sd35": "SD3", "flux": "Flux"}
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "sd35": 16, "flux": 16}

TINY_SD15_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    in_channels=4, out_channels=4, use_linear_in_transformer=False, context_dim=768,
    use_temporal_resblock=False, use_temporal_attention=False,
    model_channels=320, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
    transformer_depth_output=[1, 1], transformer_depth_middle=0,
)

# SDXL's level layout (3 levels of 2 res blocks, so the pack's auto tap output_blocks.4.0 sits where
# it does on SDXL) and its input transformer depths, which the SDXL config class matches on; every
# level 320 wide, no transformers in the output blocks, a middle block of one res block.
TINY_SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4,
    use_linear_in_transformer=True, context_dim=2048, use_temporal_resblock=False, use_temporal_attention=False,
    model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 9, transformer_depth_middle=-1,
)

SD35_DEPTH = 2                    # joint blocks; hidden = 64 * depth (ComfyUI's MMDiT detection)
SD35_POS_EMBED_MAX = 384          # SD3.5 Medium's position table (latents up to 768x768, 6144 px)
SD35_SELF_ATTN_LAYERS = (0,)      # MMDiT-X: the extra x-block self-attention, as SD3.5 Medium has it
FLUX_HIDDEN = 3072                # fixed by detection's heads (24) and rotary axes (16 + 56 + 56)
FLUX_DEPTH, FLUX_SINGLE_DEPTH = 1, 1
T5_WIDTH, CLIP_L_WIDTH, CLIP_G_WIDTH = 4096, 768, 1280


def cached_file_path(family: str, cache_dir, seed: int = DEFAULT_SEED) -> Path:
    """Where `cached_checkpoint_stand_in` keeps a family's file: the public name, in a folder per
    recipe version and seed (so a server's models/checkpoints can link it under its own name)."""
    _check_family(family)
    return Path(cache_dir) / f"stand_in_{family}_v{RECIPE_VERSIONS[family]}_s{seed}" / CHECKPOINT_NAMES[family]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


# ---- weights --------------------------------------------------------------------------------------

def rand_init(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Matrices ~ N(0, 1/fan_in), 1-d weights 1 (norms), everything else 0; in parameter order."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight") or name.endswith(".scale"):   # .scale: Flux's RMSNorm
                p.fill_(1.0)
            else:
                p.zero_()


def _check_buffers(module: torch.nn.Module, handled: tuple[str, ...] = ()) -> None:
    """Every floating-point buffer ComfyUI would save must have been set (they start as torch.empty)."""
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and name not in handled:
            raise RuntimeError(f"stand-in: buffer {name} is not initialised by the recipe")


class _StateDictVAE:
    """What `comfy.sd.save_checkpoint` reads from a VAE (`get_sd()`), for a bare TAESD state dict."""

    def __init__(self, state_dict):
        self.state_dict = state_dict

    def get_sd(self):
        return self.state_dict


def _taesd(latent_channels: int, gen: torch.Generator) -> _StateDictVAE:
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    rand_init(vae, gen)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)      # TAESD's scalar parameters: scale 1, shift 0
        vae.vae_shift.fill_(0.0)
    return _StateDictVAE({k: v.to(torch.float16) for k, v in vae.state_dict().items()})


def _patcher(model):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _clip(target, gen: torch.Generator):
    import comfy.sd

    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float16})
    rand_init(clip.cond_stage_model, gen)
    _check_buffers(clip.cond_stage_model)
    return clip


def _fake_keys(shapes: dict) -> dict:
    """Keys and shapes only (meta tensors), for ComfyUI's detection to derive a config from."""
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


# ---- families -------------------------------------------------------------------------------------

def _build_sd15(gen):
    import comfy.supported_models

    # fp16 weights from the start (copying the fp32 draws into them rounds as a cast would), so that
    # ComfyUI's own saver writes the file as it is.
    config = comfy.supported_models.SD15(dict(TINY_SD15_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "")
    rand_init(model.diffusion_model, gen)
    _check_buffers(model.diffusion_model)
    clip = _clip(config.clip_target(), gen)
    return model, clip, _taesd(4, gen)


def _build_sdxl(gen):
    import comfy.supported_models

    config = comfy.supported_models.SDXL(dict(TINY_SDXL_UNET))   # adds num_head_channels 64
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "")
    rand_init(model.diffusion_model, gen)
    _check_buffers(model.diffusion_model)
    clip = _clip(config.clip_target(), gen)
    return model, clip, _taesd(4, gen)


def _sd35_config():
    import comfy.model_detection
    import comfy.supported_models

    hidden = 64 * SD35_DEPTH
    prefix = "joint_blocks.0."
    shapes = {
        f"{prefix}context_block.attn.qkv.weight": (3 * hidden, hidden),
        f"{prefix}context_block.attn.ln_q.weight": (64,),
        "x_embedder.proj.weight": (hidden, 16, 2, 2),
        "final_layer.linear.weight": (2 * 2 * 16, hidden),
        "y_embedder.mlp.0.weight": (hidden, CLIP_L_WIDTH + CLIP_G_WIDTH),
        "context_embedder.weight": (hidden, T5_WIDTH),
        "pos_embed": (1, SD35_POS_EMBED_MAX ** 2, hidden),
        **{f"joint_blocks.{i}.x_block.attn2.qkv.weight": (3 * hidden, hidden) for i in SD35_SELF_ATTN_LAYERS},
    }
    unet_config = comfy.model_detection.detect_unet_config(_fake_keys(shapes), "")
    return comfy.supported_models.SD3(unet_config)


def _build_sd35(gen):
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    config = _sd35_config()
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "")
    dm = model.diffusion_model
    rand_init(dm, gen)
    with torch.no_grad():
        table = get_2d_sincos_pos_embed(dm.hidden_size, dm.pos_embed_max_size)
        dm.pos_embed.copy_(torch.from_numpy(table).reshape(dm.pos_embed.shape))
    _check_buffers(dm, handled=("pos_embed",))
    # The keys SD3.clip_target looks for: CLIP-L and CLIP-G, no T5.
    te_keys = _fake_keys({f"text_encoders.{name}.transformer.text_model.final_layer_norm.weight": (width,)
                          for name, width in (("clip_l", CLIP_L_WIDTH), ("clip_g", CLIP_G_WIDTH))})
    clip = _clip(config.clip_target(state_dict=te_keys), gen)
    return model, clip, _taesd(16, gen)


def _flux_config():
    import comfy.model_detection
    import comfy.supported_models

    hidden = FLUX_HIDDEN
    shapes = {
        "img_in.weight": (hidden, 16 * 2 * 2),
        "txt_in.weight": (hidden, T5_WIDTH),
        "vector_in.in_layer.weight": (hidden, CLIP_L_WIDTH),
        "guidance_in.in_layer.weight": (hidden, 256),
        **{f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(FLUX_DEPTH)},
        **{f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(FLUX_SINGLE_DEPTH)},
    }
    unet_config = comfy.model_detection.detect_unet_config(_fake_keys(shapes), "")
    return comfy.supported_models.Flux(unet_config)


def _build_flux(gen):
    config = _flux_config()
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "")
    rand_init(model.diffusion_model, gen)
    _check_buffers(model.diffusion_model)
    return model, None, _taesd(16, gen)


_BUILDERS = {"sd15": _build_sd15, "sdxl": _build_sdxl, "sd35": _build_sd35, "flux": _build_flux}


def family_seed(family: str, seed: int) -> int:
    """One generator seed per (family, seed); sd15 keeps make_checkpoint's (the seed itself)."""
    return int(seed) if family == "sd15" else int(seed) * 1_000_003 + FAMILIES.index(family)


# ---- writers ----------------------------------------------------------------------------------------

def stand_in_metadata(family: str, seed: int = DEFAULT_SEED) -> dict[str, str]:
    """The safetensors metadata of a stand-in: what the file is (ComfyUI ignores the key). Given
    explicitly, so ComfyUI 0.3.75 and 0.33 write the same header (0.33 would add an empty one); one
    key only, because safetensors writes several in a random order (a hash map)."""
    return {"probe_select.stand_in": f"{family} recipe v{RECIPE_VERSIONS[family]} seed {int(seed)}: random weights, "
                                     "a test stand-in, not a real model"}


def write_checkpoint_stand_in(family: str, path, seed: int = DEFAULT_SEED) -> Path:
    """Write `family`'s stand-in checkpoint to `path` (atomically) and return the path.

    Deterministic: the same family and seed give the same bytes.
    """
    import comfy.model_management
    import comfy.sd

    _check_family(family)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    gen = torch.Generator().manual_seed(family_seed(family, seed))
    model, clip, vae = _BUILDERS[family](gen)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # ComfyUI's own checkpoint saver (what its CheckpointSave node calls): the state-dict methods
        # under it changed their arguments between versions (0.33 takes the UNet's state dict first).
        metadata = stand_in_metadata(family, seed)
        comfy.sd.save_checkpoint(str(tmp), _patcher(model), clip, vae, metadata=metadata)
        _public_key_names(tmp, family, metadata)
        os.chmod(tmp, 0o644)          # safetensors creates files 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        # save_checkpoint registered the models with ComfyUI's memory manager: let them go.
        del model, clip, vae
        comfy.model_management.cleanup_models()
        gc.collect()
    log.info("wrote %s stand-in %s (%.1f MB) in %.1f s", family, path, path.stat().st_size / 2**20,
             time.monotonic() - t0)
    return path


# Keys that ComfyUI's saver names differently from the public download, by family: 0.33.0's Flux norms hold
# `weight` where the public file (and 0.3.75's model) has `scale`; 0.3.75's detection looks for `scale`, and
# 0.33.0 loads either. Written the public way, one file serves both versions.
PUBLIC_KEY_NAMES = {"flux": (re.compile(r"(\.norm\.(?:key|query)_norm)\.weight$"), r"\1.scale")}


def _public_key_names(path: Path, family: str, metadata: dict[str, str]) -> None:
    """Rename, in place, the keys ComfyUI's saver wrote under another name than the public file's."""
    if family not in PUBLIC_KEY_NAMES:
        return
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    pattern, replacement = PUBLIC_KEY_NAMES[family]
    with safe_open(str(path), framework="pt") as f:     # the names alone: no tensor is read when none differs
        if not any(pattern.search(key) for key in f.keys()):
            return
    tensors = load_file(str(path))
    save_file({pattern.sub(replacement, key): value for key, value in tensors.items()}, str(path), metadata=metadata)


def cached_checkpoint_stand_in(family: str, cache_dir, seed: int = DEFAULT_SEED) -> Path:
    """The family's stand-in in `cache_dir` (see `cached_file_path`), written only when it is not
    there yet: once per recipe version and seed."""
    path = cached_file_path(family, cache_dir, seed)
    if path.is_file() and path.stat().st_size > 0:
        log.info("using cached %s stand-in %s", family, path)
        return path
    written = write_checkpoint_stand_in(family, path, seed)
    remove_stale_versions(path.parent)
    return written


def remove_stale_versions(folder: Path) -> list[Path]:
    """Delete the cache folders of older (or other) recipe versions beside `folder`, a cache folder
    named `<stem>_v<version>_s<seed>`, and return them.

    A recipe bump writes a new folder of the same size (up to 1.8 GB here); the old one is never read
    again, and keeping both has filled CI's disk. Folders of other seeds or other names are kept.
    """
    match = re.fullmatch(r"(.+)_v\d+_(s\d+)", folder.name)
    if match is None:
        raise ValueError(f"{folder.name!r} is not a cache folder named <stem>_v<version>_s<seed>")
    stem, seed = match.groups()
    stale = [other for other in folder.parent.iterdir()
             if other != folder and other.is_dir() and re.fullmatch(rf"{re.escape(stem)}_v\d+_{seed}", other.name)]
    for other in stale:
        log.info("removing the stale stand-in cache %s (now %s)", other, folder.name)
        shutil.rmtree(other, ignore_errors=True)
    return stale


def write_open_clip_stand_in(model_name: str, path, seed: int = DEFAULT_SEED) -> Path:
    """Random open_clip weights of `model_name` (both towers, fp16 safetensors) at `path`, atomically,
    with the towers aligned so that CLIPScore varies with the image.

    The file the pack's CLIPScore evaluator node loads from models/evaluators (or models/clip) with
    that model name; open_clip's own initialisation under a seeded RNG, so the same seed gives the
    same bytes without disturbing the caller's global RNG. Random towers put image and text
    embeddings at cosine ~0, so CLIPScore = 100 max(cos, 0) is 0 for most images and a dataset's
    targets are constant (training refuses them). Both towers' final LayerNorm biases are therefore
    shifted so that their embeddings share one random direction (scaled to each tower's typical
    embedding norm): the scores then spread and still vary with the image and the text.
    """
    import open_clip
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None).eval()
        gen = torch.Generator().manual_seed(seed)
        direction = torch.nn.functional.normalize(torch.randn(model.text_projection.shape[1], generator=gen), dim=0)
        size = model.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        with torch.no_grad():
            image_norm = model.encode_image(torch.randn(2, 3, *size, generator=gen)).norm(dim=-1).mean()
            tokens = open_clip.get_tokenizer(model_name)(["a photo of a red fox", "a house"])
            text_norm = model.encode_text(tokens).norm(dim=-1).mean()
            model.visual.ln_post.bias += torch.linalg.pinv(model.visual.proj.T) @ (direction * image_norm)
            model.ln_final.bias += torch.linalg.pinv(model.text_projection.T) @ (direction * text_norm)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("wrote open_clip %s stand-in %s (%.1f MB) in %.1f s", model_name, path,
             path.stat().st_size / 2**20, time.monotonic() - t0)
    return path


def cached_open_clip_stand_in(model_name: str, cache_dir, seed: int = DEFAULT_SEED) -> Path:
    """`write_open_clip_stand_in`'s file in `cache_dir` (`<model_name>.safetensors` in a folder per recipe
    version and seed), written only when it is not there yet."""
    path = Path(cache_dir) / f"open_clip_{model_name}_v{OPEN_CLIP_RECIPE_VERSION}_s{seed}" / f"{model_name}.safetensors"
    if path.is_file() and path.stat().st_size > 0:
        return path
    written = write_open_clip_stand_in(model_name, path, seed)
    remove_stale_versions(path.parent)
    return written
