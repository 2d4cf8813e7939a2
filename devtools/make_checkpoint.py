"""The smallest SD1.x checkpoint that stock `CheckpointLoaderSimple` detects, with random weights.

Kept for its callers: the recipe now lives in :mod:`devtools.stand_ins` (family ``sd15``, the same
bytes as before): SD1.5 widths (model_channels 320, context_dim 768) so that ComfyUI's model
detection recognises it, but a single level with a single res block; a random CLIP-L (its config
is fixed by ComfyUI); TAESD as the VAE, with `vae_scale` 1. Saved in fp16 (~284 MB).
"""
from __future__ import annotations

from pathlib import Path

from devtools.stand_ins import DEFAULT_SEED, RECIPE_VERSIONS, TINY_SD15_UNET, write_checkpoint_stand_in

__all__ = ["RECIPE_VERSION", "DEFAULT_SEED", "TINY_SD15_UNET", "checkpoint_file_name",
           "write_tiny_sd15_checkpoint", "cached_tiny_sd15_checkpoint"]

# Bump RECIPE_VERSIONS["sd15"] in stand_ins when the recipe changes: cached files are named after it.
RECIPE_VERSION = RECIPE_VERSIONS["sd15"]


def checkpoint_file_name(seed: int = DEFAULT_SEED) -> str:
    return f"probe_select_tiny_sd15_v{RECIPE_VERSION}_s{seed}.safetensors"


def write_tiny_sd15_checkpoint(path, seed: int = DEFAULT_SEED) -> Path:
    """Write the tiny SD1.x checkpoint to `path` (atomically) and return the path."""
    return write_checkpoint_stand_in("sd15", path, seed)


def cached_tiny_sd15_checkpoint(cache_dir, seed: int = DEFAULT_SEED) -> Path:
    """The checkpoint in `cache_dir`, written only when it is not there yet."""
    path = Path(cache_dir) / checkpoint_file_name(seed)
    if path.is_file() and path.stat().st_size > 0:
        return path
    return write_tiny_sd15_checkpoint(path, seed)
