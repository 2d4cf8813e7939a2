"""Small shared helpers for the ComfyUI-side tests."""
from __future__ import annotations

import numpy as np
import torch


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the figure the reproducibility targets are stated in."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


class ApplyModelRecorder:
    """A test-side APPLY_MODEL wrapper: counts denoiser evaluations and can record a block's output."""

    def __init__(self, module_path: str | None = None):
        self.module_path = module_path
        self.calls: list[dict] = []

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        flags = list(transformer_options.get("cond_or_uncond", [0]))
        record = {"rows": x.shape[0], "flags": flags, "per_candidate": x.shape[0] // len(flags), "output": None}
        handle = None
        if self.module_path is not None:
            module = executor.class_obj.diffusion_model.get_submodule(self.module_path)

            def hook(_m, _i, output):
                # Clone: later blocks may update this tensor in place (Flux single blocks do).
                if isinstance(output, torch.Tensor):
                    record["output"] = output.detach().clone()
                else:
                    record["output"] = tuple(o.detach().clone() if isinstance(o, torch.Tensor) else o for o in output)
            handle = module.register_forward_hook(hook)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        finally:
            if handle is not None:
                handle.remove()
            self.calls.append(record)

    @property
    def evaluations(self) -> int:
        """Denoiser evaluations per candidate row, summed over calls (cond and uncond count once)."""
        return sum(c["per_candidate"] for c in self.calls)


def with_recorder(model, recorder: ApplyModelRecorder, key: str = "test_recorder"):
    import comfy.patcher_extension

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, recorder)
    return m


def ceiling_arrays(prompts: int, seeds: int, late_noise: float, seed: int = 0) -> dict:
    """What bench/proxy_ceiling.py caches and summarises, made up: final = state + late noise, and redraws of
    the same states (3 from t = 0.2, 2 from t = 0.4); the t = 0.4 preview is the state, the t = 0.2 one noise."""
    rng = np.random.default_rng(seed)
    state = rng.random(prompts * seeds)

    def draw(n: int) -> np.ndarray:
        return state[:, None] + late_noise * rng.random((prompts * seeds, n))

    return {"final": draw(1)[:, 0], "redraws_0.2": draw(3), "redraws_0.4": draw(2),
            "preview_0.2": rng.random(prompts * seeds), "preview_0.4": state,
            "groups": np.repeat(np.arange(prompts), seeds)}
