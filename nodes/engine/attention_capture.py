"""Recording cross-attention during sampling, on a clone of the model, through ComfyUI's own hooks.

* Every attention call of the model goes through ``transformer_options["optimized_attention_override"]``
  (``comfy.ldm.modules.attention.wrap_attn``). The recorder installs a function there on a CLONE of
  the model. An override already present (another pack's) is kept: it is called with a recording
  wrapper of the attention function, so what is recorded is what the model really computes and
  the other pack keeps working.
* UNets (SD1.x, SD2, SDXL): the same override sees self-attention (attn1) and cross-attention
  (attn2). An ``attn2_patch`` (a list patch, so it composes) marks the next attention call as the
  cross-attention of that block, with its query and context lengths; an ``attn2_output_patch``
  clears the mark (another pack's ``attn2`` replace patch would skip the override).
* SD3 (MMDiT joint blocks): one attention over ``[text; image]`` tokens; the image queries' rows
  and the text keys' columns are kept (the image-to-text part). SD3.5's extra image-only
  self-attention has no text keys and is skipped by its length.
* Flux: the double blocks (``transformer_options["block_type"] == "double"``), text tokens first.

State lives in a closure, not in ``model_options``: ``ModelPatcher.clone()`` deep-copies
``model_options`` (functions are copied by reference, objects are not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...probes.analysis.attention import FLAT, HEADS, AttentionMaps, text_attention_probs, tokens_to_map
from .families import model_family


OVERRIDE_KEY = "optimized_attention_override"
UNET, MMDIT, FLUX = "unet", "mmdit", "flux"


class AttentionUnsupported(LookupError):
    """The model family has no attention the recorder knows how to read."""


def attention_kind(model) -> str:
    """UNET, MMDIT or FLUX for the model's diffusion network; AttentionUnsupported otherwise."""
    dm = model.model.diffusion_model
    family = model_family(model)
    if hasattr(dm, "input_blocks") and any(name.endswith("attn2") for name, _ in dm.named_modules()):
        return UNET
    if hasattr(dm, "joint_blocks"):
        return MMDIT
    if family == "flux" and hasattr(dm, "double_blocks"):
        return FLUX
    raise AttentionUnsupported(
        f"attention maps support SD1.x/SD2/SDXL UNets (cross-attention), SD3 (joint attention) and Flux "
        f"(double blocks); this model is '{family}' ({type(dm).__name__})")


@dataclass
class RecordingSpec:
    kind: str
    context_tokens: int                 # token count of the positive conditioning
    labels: list                        # [(label, [context positions])]
    latent_hw: tuple                    # latent height, width
    patch: int                          # DiT patch size (1 for UNets)
    resolutions: object                 # None = all, else a set of downsampling factors to keep
    text_offset: int = 0                # tokens before the conditioning in a joint sequence (SD3 registers)


def _grid(latent_hw: tuple, factor: int) -> tuple[int, int]:
    return math.ceil(latent_hw[0] / factor), math.ceil(latent_hw[1] / factor)


def _unet_grid(spec: RecordingSpec, queries: int, transformer_options: dict) -> tuple[int, tuple[int, int]]:
    shape = transformer_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == queries:
        h, w = int(shape[2]), int(shape[3])
        return max(1, round(spec.latent_hw[0] / h)), (h, w)
    for power in range(8):
        factor = 2 ** power
        grid = _grid(spec.latent_hw, factor)
        if grid[0] * grid[1] == queries:
            return factor, grid
    raise ValueError(f"{queries} attention queries match no downsampling of a {spec.latent_hw} latent")


class AttentionRecorder:
    """Per-step token maps of one sampling run. Install on a clone with :meth:`install`."""

    def __init__(self, spec: RecordingSpec):
        self.spec = spec
        self.maps = AttentionMaps(size=spec.latent_hw, tokens=len(spec.labels))
        self.step = 0
        self.calls = 0
        self.pending_cross = None       # UNet: (queries, keys) of the cross-attention about to run
        self.factors_seen = set()

    # --- sampler side ---------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        """Sampler callback: ``step`` (0-based) is done; what follows belongs to ``step + 1``."""
        self.step = step + 1

    # --- model side -------------------------------------------------------------------------------
    def _columns(self, text_keys: int) -> tuple[torch.Tensor, int, list[int]]:
        """Key columns of every selected position, with their copies when ComfyUI repeated the
        conditioning to batch it with a longer one (lengths padded to a common multiple)."""
        content = text_keys - self.spec.text_offset
        repeats = max(1, content // self.spec.context_tokens)
        positions = [p for _, group in self.spec.labels for p in group]
        columns = [self.spec.text_offset + j * self.spec.context_tokens + p for j in range(repeats) for p in positions]
        return torch.tensor(columns, dtype=torch.long), repeats, positions

    def _label_maps(self, probs: torch.Tensor, repeats: int, positions: list[int]) -> torch.Tensor:
        """``[Nq, repeats * P]`` -> ``[Nq, labels]``: copies and the pieces of a word summed."""
        per_position = probs.reshape(probs.shape[0], repeats, len(positions)).sum(dim=1)
        out, start = [], 0
        for _, group in self.spec.labels:
            out.append(per_position[:, start:start + len(group)].sum(dim=1))
            start += len(group)
        return torch.stack(out, dim=1)

    def _record(self, q, k, heads, layout, query_rows, text_keys, grid, factor, transformer_options) -> None:
        if self.spec.resolutions is not None and factor not in self.spec.resolutions:
            return
        flags = list(transformer_options.get("cond_or_uncond", [0]))
        chunk = q.shape[0] // max(len(flags), 1)
        rows = [i * chunk + r for i, flag in enumerate(flags) if flag == 0 for r in range(chunk)]
        if not rows:
            return
        columns, repeats, positions = self._columns(text_keys)
        probs = text_attention_probs(q, k, heads, layout, query_rows, columns, rows)
        maps = tokens_to_map(self._label_maps(probs, repeats, positions), grid, self.spec.latent_hw)
        self.maps.add(self.step, maps)
        self.factors_seen.add(factor)
        self.calls += 1

    def observe(self, q, k, heads, layout, transformer_options) -> None:
        """Look at one attention call; record it when it is a text attention of interest."""
        spec = self.spec
        if spec.kind == UNET:
            pending, self.pending_cross = self.pending_cross, None
            if pending is None or layout != FLAT or (q.shape[1], k.shape[1]) != pending:
                return
            factor, grid = _unet_grid(spec, q.shape[1], transformer_options)
            self._record(q, k, heads, layout, slice(None), k.shape[1], grid, factor, transformer_options)
            return
        length = q.shape[1] if layout == FLAT else q.shape[2]
        grid = _grid(spec.latent_hw, spec.patch)
        image_tokens = grid[0] * grid[1]
        text_keys = length - image_tokens
        if spec.kind == FLUX and transformer_options.get("block_type") != "double":
            return
        if text_keys < spec.context_tokens + spec.text_offset:
            return                      # an image-only attention (SD3.5 extra self-attention, ...)
        self._record(q, k, heads, layout, slice(text_keys, length), text_keys, grid, spec.patch, transformer_options)

    # --- installation -----------------------------------------------------------------------------
    def install(self, model):
        """A clone of ``model`` that records into this recorder; ``model`` itself is not touched."""
        recorder = self
        clone = model.clone()
        options = clone.model_options.setdefault("transformer_options", {})
        previous = options.get(OVERRIDE_KEY)

        def recording_override(func, *args, **kwargs):
            def recording_attention(*a, **kw):
                q, k = a[0], a[1]
                heads = a[3] if len(a) > 3 else kw.get("heads")
                layout = HEADS if kw.get("skip_reshape", False) else FLAT
                recorder.observe(q, k, heads, layout, kw.get("transformer_options") or {})
                return func(*a, **kw)
            if previous is not None:
                return previous(recording_attention, *args, **kwargs)
            return recording_attention(*args, **kwargs)

        options[OVERRIDE_KEY] = recording_override
        if self.spec.kind == UNET:
            def mark_cross_attention(n, context, value, extra_options):
                recorder.pending_cross = (n.shape[1], context.shape[1])
                return n, context, value

            def clear_mark(n, extra_options):
                recorder.pending_cross = None
                return n

            clone.set_model_attn2_patch(mark_cross_attention)
            clone.set_model_attn2_output_patch(clear_mark)
        return clone
