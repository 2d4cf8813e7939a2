"""Bench-only ComfyUI nodes of the proxy world; never part of the pack's node list.

The demo / benchmark loads this folder as a separate custom node folder (symlink or copy it into
``ComfyUI/custom_nodes/``, or point an ``extra_model_paths.yaml`` ``custom_nodes`` entry at
``bench/proxy_world``). It imports ``bench.proxy_world`` from the repository this file lives in.
Classic ``NODE_CLASS_MAPPINGS`` style:

- ``ProxyWorldLoader``: family (unet / dit) -> MODEL + PROXY_TEXT (the jointly trained text encoder),
  from the trained weights (``bench/proxy_world/weights/`` preferred, else ``bench/cache/proxy_world/``).
- ``ProxyWorldEncode``: PROXY_TEXT + prompt -> CONDITIONING (``""`` is the unconditional negative).
- ``ProxyWorldDecode``: LATENT + family -> IMAGE ``[B, 32, 32, 3]`` in 0..1 (the latents are pixels).
- ``ProxyWorldVAE``: family -> VAE, the same pixel map as a VAE object (``decode(samples)``), for nodes that
  take a VAE (ProbeSelectPreviewScore decodes the x0 preview with it).
- ``ProxyWorldEvaluator``: -> PS_EVALUATOR, the proxy-world evaluator with the pack's evaluator
  interface (``score(images [B, H, W, 3], prompts) -> ImageScores``), for ProbeSelectEvaluateImages,
  ProbeSelectPreviewScore and the dataset writer.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

from bench.proxy_world import models as _models  # noqa: E402
from bench.proxy_world.evaluator import score_terms as _score_terms  # noqa: E402
from bench.proxy_world.grammar import parse_prompt as _parse_prompt  # noqa: E402

CATEGORY = "probe_select_bench/proxy_world"
FAMILIES = list(_models.FAMILIES)
EVALUATOR_NAME = "proxy_world"


def _evaluators_module():
    """The pack's ``probes.evaluators`` as ComfyUI loaded it (so ImageScores is the pack's own
    class; ComfyUI imports the pack under its folder's name); ``probe_select.probes.evaluators``
    (the library's one import name outside ComfyUI) when the pack is not loaded."""
    for name, module in list(sys.modules.items()):
        if name.endswith(".probes.evaluators") and hasattr(module, "ImageEvaluator") and hasattr(module, "ImageScores"):
            return module
    # Imported here: only needed when no ComfyUI-loaded pack provides the module.
    import tools  # noqa: F401  (registers the package probe_select)
    import probe_select.probes.evaluators as module

    return module


@functools.lru_cache(maxsize=None)
def _evaluator_class(module):
    class ProxyWorldImageEvaluator(module.ImageEvaluator):
        """The analytic proxy-world evaluator (``bench/proxy_world/evaluator.py``), one score in [0, 1]
        per image against its proxy-world prompt. A prompt outside the grammar is a ValueError."""

        name = EVALUATOR_NAME
        max_prompt_tokens = 12

        def count_tokens(self, prompt: str):
            return len(str(prompt).split())

        def _score_batch(self, images, prompts):
            scenes = [_parse_prompt(p) for p in prompts]
            return _score_terms(images.permute(0, 3, 1, 2).float(), scenes)["score"].float()

    return ProxyWorldImageEvaluator


def make_evaluator(batch_size: int = 64):
    """A PS_EVALUATOR object: ``score(images [B, H, W, 3] in 0..1, prompts) -> ImageScores``."""
    return _evaluator_class(_evaluators_module())(device="cpu", batch_size=batch_size)


class ProxyWorldLoader:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "PROXY_TEXT")
    RETURN_NAMES = ("model", "text_encoder")
    FUNCTION = "load"
    DESCRIPTION = ("Bench only: a trained proxy-world diffusion model (unet: SD1.x family, eps; dit: SD3 family, "
                   "flow) and its text encoder.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES, {"default": "unet"})}}

    def load(self, family):
        patcher, text_encoder = _models.load(family)
        return (patcher, text_encoder)


class ProxyWorldEncode:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    DESCRIPTION = "Bench only: a proxy-world prompt as CONDITIONING. The empty prompt is the unconditional negative."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("PROXY_TEXT",),
            "prompt": ("STRING", {"multiline": False, "default": "a red circle left of a blue square"}),
        }}

    def encode(self, text_encoder, prompt):
        return (text_encoder.conditioning(prompt),)


class ProxyWorldDecode:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "decode"
    DESCRIPTION = "Bench only: proxy-world latents (pixel space) -> IMAGE [B, 32, 32, 3] in 0..1."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "family": (FAMILIES, {"default": "unet"})}}

    def decode(self, samples, family):
        latent = samples["samples"] if isinstance(samples, dict) else samples
        want = _models.LATENT_CHANNELS[family]
        if latent.ndim != 4 or latent.shape[1] != want:
            raise ValueError(f"ProxyWorldDecode: a {family} latent has {want} channels [B, {want}, H, W]; got shape "
                             f"{tuple(latent.shape)}. Pick the family of the model that made it.")
        images = _models.latent_to_image(latent, family)
        return (images.permute(0, 2, 3, 1).contiguous().cpu(),)


class PixelVAE:
    """The proxy world's "VAE": its latents are the image's pixels, so decoding is :func:`models.latent_to_image`.
    Has what the pack's nodes call on a ComfyUI VAE: ``decode(samples) -> IMAGE [B, H, W, 3]`` in 0..1."""

    def __init__(self, family: str):
        self.family = family

    def decode(self, samples, vae_options=None):
        return ProxyWorldDecode().decode(samples, self.family)[0]


class ProxyWorldVAE:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    RETURN_NAMES = ("vae",)
    FUNCTION = "make"
    DESCRIPTION = ("Bench only: the proxy world's pixel-space latents as a VAE, for nodes that decode with one "
                   "(ProbeSelectPreviewScore).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES, {"default": "unet"})}}

    def make(self, family):
        return (PixelVAE(family),)


class ProxyWorldEvaluator:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PS_EVALUATOR",)
    RETURN_NAMES = ("evaluator",)
    FUNCTION = "make"
    DESCRIPTION = ("Bench only: the analytic proxy-world evaluator (score in [0, 1]: objects, colours, shapes, "
                   "relation and count of the prompt) for Probe-Select's evaluate / dataset nodes.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def make(self):
        return (make_evaluator(),)


NODE_CLASS_MAPPINGS = {
    "ProxyWorldLoader": ProxyWorldLoader,
    "ProxyWorldEncode": ProxyWorldEncode,
    "ProxyWorldDecode": ProxyWorldDecode,
    "ProxyWorldVAE": ProxyWorldVAE,
    "ProxyWorldEvaluator": ProxyWorldEvaluator,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ProxyWorldLoader": "Proxy World Loader (bench)",
    "ProxyWorldEncode": "Proxy World Encode (bench)",
    "ProxyWorldDecode": "Proxy World Decode (bench)",
    "ProxyWorldVAE": "Proxy World VAE (bench)",
    "ProxyWorldEvaluator": "Proxy World Evaluator (bench)",
}
