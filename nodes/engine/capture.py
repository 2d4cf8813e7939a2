"""The activation tap: an APPLY_MODEL wrapper that reads one block's output at a chosen step.

How it fits ComfyUI (no monkeypatching, composes with other packs):
- `ProbeSelectTap` clones the MODEL and adds one `ActivationTap` object as an APPLY_MODEL wrapper
  under the key `probe_select_tap`. Clones share the object (ComfyUI copies wrapper lists, not
  the wrappers), which is how the early sampler finds it again.
- The early sampler opens a `CaptureSession` on the tap for its run and puts the run id (a plain
  string, so ComfyUI's deep copies of model_options keep it) in transformer_options. The sampler
  callback advances the session's step counter.
- On a denoiser call at a capture step the wrapper registers a forward hook on the target block,
  calls the model, and removes the hook in `finally`. Other steps cost one dict lookup.
- Which call of a capture step counts: the callback of step i fires after its first evaluation, so
  two-evaluation samplers (heun, dpm_2, dpmpp_sde, ...) make their extra evaluation of step i
  after the counter has moved to i + 1, next to the first evaluation of step i + 1. The tap keeps
  the last call at the step's own schedule sigma (`sample_sigmas[step]`: step i's first
  evaluation on x_i, the one the x0 preview of that step also comes from), else the first call.
- Only the conditional chunk is kept: under CFG the batch is the concatenation of chunks listed in
  `transformer_options["cond_or_uncond"]` (0 = positive), one row per candidate. With cfg 1 there
  is no uncond chunk; under memory pressure cond and uncond arrive in separate calls (the uncond
  call is ignored).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import comfy.patcher_extension
import torch
import torch.nn as nn

from ...probes.features import pool_feature_map, tokens_to_grid

log = logging.getLogger(__name__)

WRAPPER_KEY = "probe_select_tap"
RUN_KEY = "probe_select_run"


@dataclass
class CaptureSession:
    """What one early-sampling run wants captured, and what was captured."""

    capture_steps: tuple[int, ...]
    step: int = 0                                   # sampler steps completed so far (callback count)
    features: dict[int, torch.Tensor] = field(default_factory=dict)   # step -> [N, C, P, P] fp16 CPU
    sigmas: dict[int, float] = field(default_factory=dict)

    def wants_capture(self, on_schedule: bool = False) -> bool:
        """Whether a call now should be captured: the first call of a capture step, or any later one
        evaluated at the step's schedule sigma (see the module notes)."""
        return self.step in self.capture_steps and (self.step not in self.features or on_schedule)


def at_schedule_sigma(t: Optional[torch.Tensor], sample_sigmas: Optional[torch.Tensor], step: int) -> bool:
    """Whether a denoiser call at sigma `t` evaluates at `sample_sigmas[step]` (not at a sampler's
    intermediate sigma)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or not isinstance(sample_sigmas, torch.Tensor):
        return False
    if not 0 <= step < sample_sigmas.shape[0]:
        return False
    expected = float(sample_sigmas[step])
    return abs(float(t.flatten()[0]) - expected) <= 1e-5 * max(abs(expected), 1e-12)


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for item in output:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"block output of type {type(output).__name__} holds no tensor")


def _grid_sizes(latent_hw: tuple[int, int], patch: int) -> list[tuple[int, int]]:
    h, w = latent_hw
    ceil = (-(-h // patch), -(-w // patch))          # SD3 pads to a multiple of the patch
    rounded = ((h + patch // 2) // patch, (w + patch // 2) // patch)   # Flux's h_len
    return [ceil] if ceil == rounded else [ceil, rounded]


def block_output_to_map(output, family: str, path: str, latent_hw: tuple[int, int], patch: int,
                        text_tokens: int) -> torch.Tensor:
    """Turn a block's output into an image-aligned feature map [B, C, h, w].

    UNet blocks give maps already. DiT blocks give image tokens [B, L, D], alone or in a tuple
    with the text stream: SD3 joint blocks return (context, x), Flux double blocks (img, txt),
    Flux single blocks one tensor with the text tokens first.
    """
    if isinstance(output, (tuple, list)):
        if family == "sd3" and path.startswith("joint_blocks") and len(output) > 1:
            output = output[1]
        output = _first_tensor(output)
    if output.ndim == 4:
        return output
    if output.ndim != 3:
        raise ValueError(f"can't read a feature map from a block output of shape {tuple(output.shape)}")
    length = output.shape[1]
    for h, w in _grid_sizes(latent_hw, patch):
        n = h * w
        if length == n:
            return tokens_to_grid(output, h, w)
        if length > n:
            # Text tokens first (Flux single blocks), then image tokens, then any reference latents.
            start = text_tokens if family == "flux" and path.startswith("single_blocks") else 0
            if start + n <= length:
                return tokens_to_grid(output[:, start:start + n], h, w)
    raise ValueError(
        f"block output has {length} tokens, which matches no image grid of the {latent_hw} latent "
        f"(patch {patch})"
    )


class ActivationTap:
    """APPLY_MODEL wrapper that captures one block's output for the open capture sessions."""

    def __init__(self, family: str, path: str, feature_size: int):
        self.family = family
        self.path = path                  # normalised module path; recorded in activations and probes
        self.feature_size = feature_size
        self.sessions: dict[str, CaptureSession] = {}

    def open_session(self, run_id: str, capture_steps: tuple[int, ...]) -> CaptureSession:
        session = CaptureSession(capture_steps=tuple(capture_steps))
        self.sessions[run_id] = session
        return session

    def close_session(self, run_id: str) -> Optional[CaptureSession]:
        return self.sessions.pop(run_id, None)

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                 transformer_options={}, **kwargs):
        session = self.sessions.get(transformer_options.get(RUN_KEY)) if self.sessions else None
        # The step test first: other steps must stay one dict lookup (the sigma test reads a tensor).
        if session is None or session.step not in session.capture_steps or not session.wants_capture(
                at_schedule_sigma(t, transformer_options.get("sample_sigmas"), session.step)):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        flags = list(transformer_options.get("cond_or_uncond", [0]))
        if 0 not in flags:      # an uncond-only call (cond and uncond split under memory pressure)
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

        dm = executor.class_obj.diffusion_model
        module = dm.get_submodule(self.path)
        patch = getattr(dm, "patch_size", 1)
        patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
        text_tokens = c_crossattn.shape[1] if isinstance(c_crossattn, torch.Tensor) and c_crossattn.ndim == 3 else 0
        step = session.step
        cond_chunk = flags.index(0)

        def hook(_module: nn.Module, _inputs, output):
            fmap = block_output_to_map(output, self.family, self.path, tuple(x.shape[-2:]), patch, text_tokens)
            rows = fmap.chunk(len(flags))[cond_chunk]
            # Pool on the model's device, copy only the compact map.
            session.features[step] = pool_feature_map(rows.detach(), self.feature_size).to("cpu")
            session.sigmas[step] = float(t.flatten()[0])

        handle = module.register_forward_hook(hook)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            handle.remove()


def find_tap(model_patcher) -> Optional[ActivationTap]:
    wrappers = model_patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return wrappers[-1] if wrappers else None
