"""Which backbone a ComfyUI model is, where to tap it by default, and how to find a block by path.

ComfyUI knows the family through the model's config class (`comfy.supported_models.*`). The
default taps follow the paper: a middle-to-late block that already shows the layout at ~20% of
the trajectory. For UNets that is the up level at half the latent resolution (SD1.x/SD2:
`output_blocks.7.0`, the reference's `up_blocks[2].resnets[1]`; SDXL: `output_blocks.4.0`); for
SD3 `joint_blocks.20` (the reference tap, clamped for shallower models); for Flux the middle single
block. Any other module of the diffusion model can be named by path.
"""
from __future__ import annotations

import re

import torch.nn as nn

# comfy.supported_models config class name -> family id stored in activations and probe files.
_CONFIG_FAMILIES = {
    "SD15": "sd1",
    "SD15_instructpix2pix": "sd1",
    "SD20": "sd2",
    "SD21UnclipL": "sd2",
    "SD21UnclipH": "sd2",
    "SDXL": "sdxl",
    "SDXLRefiner": "sdxl",
    "SSD1B": "sdxl",
    "Segmind_Vega": "sdxl",
    "KOALA_700M": "sdxl",
    "KOALA_1B": "sdxl",
    "SDXL_instructpix2pix": "sdxl",
    "SD3": "sd3",
    "Flux": "flux",
    "FluxInpaint": "flux",
    "FluxSchnell": "flux",
}

# Block lists of DiT-style models, in the order they are looked for.
_DIT_BLOCK_LISTS = ("joint_blocks", "double_blocks", "transformer_blocks", "blocks", "layers")


def model_family(model_patcher) -> str:
    """Family id of a ComfyUI MODEL: sd1, sd2, sdxl, sd3, flux, or the config class name."""
    config = getattr(model_patcher.model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model_patcher.model).__name__
    return _CONFIG_FAMILIES.get(name, name.lower())


def diffusion_model(model_patcher) -> nn.Module:
    return model_patcher.model.diffusion_model


def normalise_path(path: str) -> str:
    """`output_blocks[7][0]` and `output_blocks.7.0` name the same module."""
    path = path.strip()
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def _is_unet(dm: nn.Module) -> bool:
    return hasattr(dm, "output_blocks") and hasattr(dm, "input_blocks")


def auto_tap_path(model_patcher) -> str:
    """The tested default tap of the model's family (see the module docstring)."""
    dm = diffusion_model(model_patcher)
    family = model_family(model_patcher)
    if _is_unet(dm):
        levels = len(dm.channel_mult)
        per_level = dm.num_res_blocks[0] + 1          # output blocks per up level
        level = max(levels - 2, 0)                    # the up level at half the latent resolution
        block = level * per_level + min(1, per_level - 1)
        block = min(block, len(dm.output_blocks) - 1)
        return f"output_blocks.{block}.0"
    if family == "flux" and len(getattr(dm, "single_blocks", [])) > 0:
        return f"single_blocks.{len(dm.single_blocks) // 2}"
    for name in _DIT_BLOCK_LISTS:
        blocks = getattr(dm, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            if name == "joint_blocks":
                index = min(20, len(blocks) * 5 // 6)
            else:
                index = (2 * len(blocks)) // 3
            return f"{name}.{min(index, len(blocks) - 1)}"
    raise LookupError(
        f"no default tap for a {type(dm).__name__} diffusion model; name a block path instead"
    )


def block_paths(model_patcher) -> list[str]:
    """Paths worth tapping (block outputs), for error messages and the UI."""
    dm = diffusion_model(model_patcher)
    paths = []
    if _is_unet(dm):
        for list_name in ("input_blocks", "output_blocks"):
            for i, block in enumerate(getattr(dm, list_name)):
                paths.extend(f"{list_name}.{i}.{j}" for j in range(len(block)))
        paths.extend(f"middle_block.{j}" for j in range(len(dm.middle_block)))
        return paths
    for name in _DIT_BLOCK_LISTS + ("single_blocks",):
        blocks = getattr(dm, name, None)
        if isinstance(blocks, nn.ModuleList):
            paths.extend(f"{name}.{i}" for i in range(len(blocks)))
    return paths


def resolve_module(model_patcher, path: str) -> tuple[str, nn.Module]:
    """Find the module at `path`; raise LookupError listing valid block paths when it is unknown.

    A UNet `TimestepEmbedSequential` is run child by child (its own forward is never called), so
    a hook on it would never fire: such a container resolves to its last child.
    """
    dm = diffusion_model(model_patcher)
    path = normalise_path(path)
    try:
        module = dm.get_submodule(path) if path else None
    except AttributeError:
        module = None
    if module is None:
        valid = block_paths(model_patcher)
        shown = ", ".join(valid[:60]) + (f" ... ({len(valid)} in all)" if len(valid) > 60 else "")
        raise LookupError(f"'{path}' is not a module of this {type(dm).__name__}. Valid block paths: {shown}")
    if type(module).__name__ == "TimestepEmbedSequential" and len(module) > 0:
        path = f"{path}.{len(module) - 1}"
        module = module[len(module) - 1]
    return path, module
