"""The smallest SD1.x checkpoint that stock `CheckpointLoaderSimple` detects, with random weights.

Built with ComfyUI's own classes in the calling process (tests/conftest.py has already made
ComfyUI importable): SD1.5 widths (model_channels 320, context_dim 768) so that ComfyUI's model
detection recognises it, but a single level with a single res block; a random CLIP-L (its config
is fixed by ComfyUI); TAESD as the VAE (stored under `first_stage_model.taesd_*`, which ComfyUI
detects as TAESD), with `vae_scale` 1 or decoded images are black. Saved in fp16 (~284 MB).

The weights come from one seeded generator and every tensor is set explicitly (ComfyUI layers
skip init), so the same seed always gives the same file contents.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the recipe changes: cached files are named after it.
RECIPE_VERSION = 1
DEFAULT_SEED = 0

TINY_SD15_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    in_channels=4, out_channels=4, use_linear_in_transformer=False, context_dim=768,
    use_temporal_resblock=False, use_temporal_attention=False,
    model_channels=320, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
    transformer_depth_output=[1, 1], transformer_depth_middle=0,
)


def checkpoint_file_name(seed: int = DEFAULT_SEED) -> str:
    return f"probe_select_tiny_sd15_v{RECIPE_VERSION}_s{seed}.safetensors"


def _rand_init(module, gen) -> None:
    """Matrices ~ N(0, 1/fan_in), 1-d weights 1 (norms), everything else 0."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


class _StateDictVAE:
    """What `comfy.sd.save_checkpoint` reads from a VAE (`get_sd()`), for a bare TAESD state dict."""

    def __init__(self, state_dict):
        self.state_dict = state_dict

    def get_sd(self):
        return self.state_dict


def write_tiny_sd15_checkpoint(path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny SD1.x checkpoint to `path` (atomically) and return the path."""
    import torch

    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.taesd.taesd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    gen = torch.Generator().manual_seed(seed)

    # fp16 weights from the start (copying the fp32 draws into them rounds as a cast would), so that
    # ComfyUI's own saver writes the file as it is.
    config = comfy.supported_models.SD15(dict(TINY_SD15_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "")
    _rand_init(model.diffusion_model, gen)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)

    clip = comfy.sd.CLIP(config.clip_target(), model_options={"dtype": torch.float16})
    _rand_init(clip.cond_stage_model, gen)

    vae = comfy.taesd.taesd.TAESD()
    _rand_init(vae, gen)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)      # TAESD's scalar parameters: scale 1, shift 0
        vae.vae_shift.fill_(0.0)
    vae_sd = {k: v.to(torch.float16) for k, v in vae.state_dict().items()}

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # ComfyUI's own checkpoint saver (what its CheckpointSave node calls): the state-dict methods
        # under it changed their arguments between versions (0.33 takes the UNet's state dict first).
        comfy.sd.save_checkpoint(str(tmp), patcher, clip, _StateDictVAE(vae_sd))
        os.chmod(tmp, 0o644)          # safetensors creates files 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("wrote tiny SD1.x checkpoint %s (%.1f MB) in %.1f s", path,
             path.stat().st_size / 2**20, time.monotonic() - t0)
    return path


def cached_tiny_sd15_checkpoint(cache_dir, seed: int = DEFAULT_SEED) -> Path:
    """The checkpoint in `cache_dir`, written only when it is not there yet."""
    path = Path(cache_dir) / checkpoint_file_name(seed)
    if path.is_file() and path.stat().st_size > 0:
        log.info("using cached tiny SD1.x checkpoint %s", path)
        return path
    return write_tiny_sd15_checkpoint(path, seed)
