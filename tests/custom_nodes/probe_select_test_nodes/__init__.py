"""Test-only ComfyUI nodes for Probe-Select's end-to-end tests; never shipped with the pack.

The real-server tests symlink this folder into a test server's `custom_nodes` next to the pack
(see tests/test_cli.py). It registers, classic NODE_CLASS_MAPPINGS style:

- `ProbeSelectTestBrightness`: IMAGE -> FLOAT list, the mean brightness (0..1) of each image of the
  batch, in batch order. A cheap, deterministic stand-in for an image evaluator, so that a collect
  workflow runs without evaluator weights (connect it to ProbeSelectScoresFromFloats).
- `ProbeSelectTestFluxTextEncoder`: seed -> CLIP, a Flux text encoder with random weights for the
  Flux stand-in checkpoint (devtools/stand_ins.py), which holds no text encoder: ComfyUI's Flux text
  encoder always includes a full T5-XXL (4.7 B parameters, fixed config), too big to write in tests.
  It is ComfyUI's own Flux text encoder (`comfy.text_encoders.flux.FluxClipModel`: its tokenizer,
  its encode, wrapped in `comfy.sd.CLIP`) with a full random CLIP-L and a one-layer T5 of T5-XXL's
  width, vocabulary and relative-attention buckets (`TINY_T5_CONFIG`). `CLIPTextEncode` on it gives
  Flux-shaped conditioning: context [1, n, 4096] (T5 tokens), pooled_output [1, 768] (CLIP-L).
  One departure from ComfyUI's Flux tokenizer: T5 prompts are padded to `T5_MIN_LENGTH` (16) tokens,
  not 256, through ComfyUI's own `t5xxl_min_length` tokenizer option. The tests check what the
  templates do with the conditioning, not its token count, and the Flux stand-in's 3072-wide blocks
  attend over text and image tokens together: 256 text tokens against 16 image tokens of a 64x64
  test image made every Flux model call ~8x dearer than the image alone needs.
"""
import json
import math
import os

import torch

import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.text_encoders.flux
import comfy.text_encoders.t5

# T5-XXL's own config (ComfyUI's file) with one narrow layer: the output keeps T5-XXL's width (4096),
# the embedding keeps its vocabulary (the tokenizer's ids).
with open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_config_xxl.json")) as _f:
    TINY_T5_CONFIG = {**json.load(_f), "num_layers": 1, "num_heads": 2, "d_kv": 16, "d_ff": 64}
T5_MIN_LENGTH = 16      # ComfyUI's Flux tokenizer pads to 256 (module docstring: why not here)


class ProbeSelectTestBrightness:
    CATEGORY = "sampling/probe_select/testing"
    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("brightness",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "measure"
    DESCRIPTION = "Test only: mean brightness of every image of the batch, one FLOAT per image."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def measure(self, images):
        # images: [B, H, W, C] float in 0..1
        values = images.float().mean(dim=tuple(range(1, images.ndim))).tolist()
        return (values,)


class TinyT5FluxClipModel(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's Flux text encoder (encode, load_sd, clip options inherited) with a tiny T5."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        # FluxClipModel.__init__ would build the full T5-XXL: set up the same two members instead.
        torch.nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                 model_options=model_options)
        # As comfy.text_encoders.sd3_clip.T5XXLModel builds T5-XXL, from the tiny config.
        self.t5xxl = comfy.sd1_clip.SDClipModel(device=device, layer="last", textmodel_json_config=dict(TINY_T5_CONFIG),
                                                dtype=dtype, special_tokens={"end": 1, "pad": 0},
                                                model_class=comfy.text_encoders.t5.T5,
                                                model_options={**model_options, "model_name": "t5xxl"})
        self.dtypes = {dtype}


def random_init(module, seed):
    """Matrices ~ N(0, 1/fan_in), 1-d weights 1, other parameters 0, from one seeded generator."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def flux_text_encoder(seed=0):
    """A comfy.sd.CLIP with Flux's tokenizer and TinyT5FluxClipModel, random weights from `seed`."""
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyT5FluxClipModel)
    clip = comfy.sd.CLIP(target, tokenizer_data={"t5xxl_min_length": T5_MIN_LENGTH})
    random_init(clip.cond_stage_model, seed)
    return clip


class ProbeSelectTestFluxTextEncoder:
    CATEGORY = "sampling/probe_select/testing"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    FUNCTION = "build"
    DESCRIPTION = ("Test only: a random Flux text encoder (full CLIP-L + a one-layer T5 of width 4096) for the Flux "
                   "stand-in checkpoint, which has no text encoder. CLIPTextEncode gives context [1, n, 4096] (T5 "
                   "padded to 16 tokens, not 256) and pooled_output [1, 768].")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    def build(self, seed):
        return (flux_text_encoder(seed),)


NODE_CLASS_MAPPINGS = {
    "ProbeSelectTestBrightness": ProbeSelectTestBrightness,
    "ProbeSelectTestFluxTextEncoder": ProbeSelectTestFluxTextEncoder,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ProbeSelectTestBrightness": "Probe-Select Test Brightness",
    "ProbeSelectTestFluxTextEncoder": "Probe-Select Test Flux Text Encoder",
}
