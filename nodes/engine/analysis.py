"""Small helpers shared by the analysis nodes (ComfyUI-side, no node classes here)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

ANALYSIS_CATEGORY = "sampling/probe_select/analysis"


def pil_to_image(pil_image: Image.Image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE ``[1, H, W, 3]`` float in 0..1."""
    return torch.from_numpy(np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One ComfyUI IMAGE row ``[H, W, C]`` (0..1) -> PIL RGB."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array[..., :3])


def parse_name_list(text: str) -> list[str]:
    """``"normal, karras;exponential"`` -> ``["normal", "karras", "exponential"]`` (order kept, no repeats)."""
    names = []
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        part = part.strip()
        if part and part not in names:
            names.append(part)
    return names
