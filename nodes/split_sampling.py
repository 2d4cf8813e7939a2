"""Split sampling: N candidates to a checkpoint step, then finish any subset of them.

The early phase and the resume are the two halves of one KSampler run: same sigmas (computed by
`comfy.samplers.KSampler` from steps, scheduler, denoise), split at step s. The resume starts from
the early latent with zero noise and `sigmas[s:]`, which reconstructs x_s exactly for EPS and flow
models (ComfyUI's noise scaling with zero noise is the identity on the latent).

What the resume needs travels in the LATENT under `PACK_KEY`, row-aligned with the samples, so a
user can't finish a candidate with other steps or another scheduler than it started with. That
includes the sampler's internal state x_s: a LATENT holds x_s after `inverse_noise_scaling` and
`process_latent_out`, whose float round trip costs ~1e-7 relative error that some models amplify
over the remaining steps; resuming from the stored x_s makes the split exact.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..probes.features import ActivationSeries, ActivationSet
from ..probes.pruning import checkpoint_step  # noqa: F401  (the one rounding of a checkpoint to a step: see there)
from .capture import RUN_KEY, find_tap
from .families import model_family
from .noise import UNSPLITTABLE_SAMPLERS, build_noise_sampler, initial_noise, sampler_object

log = logging.getLogger(__name__)

PACK_KEY = "probe_select"
X0_KEY = "probe_select_x0"
METADATA_VERSION = 1


def full_sigmas(model, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    import comfy.samplers

    ksampler = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name,
                                       scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    return ksampler.sigmas.detach().to("cpu", torch.float32).clone()


def text_embedding_from_conditioning(conditioning) -> Optional[torch.Tensor]:
    """The pooled text embedding of the first positive entry ([1, D]); mean of tokens if none."""
    if not conditioning:
        return None
    tokens, extra = conditioning[0][0], conditioning[0][1]
    pooled = extra.get("pooled_output")
    if isinstance(pooled, torch.Tensor):
        return pooled.detach().float().reshape(pooled.shape[0], -1)[:1].cpu()
    if isinstance(tokens, torch.Tensor) and tokens.ndim == 3:
        return tokens.detach().float().mean(dim=1)[:1].cpu()
    return None


def _rows_for(latent: dict, model, candidates: int) -> torch.Tensor:
    import comfy.sample

    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if samples.shape[0] == candidates:
        return samples
    if samples.shape[0] == 1:
        return samples.repeat((candidates,) + (1,) * (samples.ndim - 1))
    raise ValueError(f"latent batch {samples.shape[0]}")


def _per_sample(value, n_old: int, n_new: int):
    """Repeat a per-sample entry of a batch-1 latent to n_new rows; leave broadcastable ones alone."""
    if isinstance(value, list) and len(value) == n_old == 1:
        return value * n_new
    return value


def _keeping_final_state(sampler, holder: dict):
    """Record the sampler's own final x (model space, before ComfyUI's output scaling)."""
    function = sampler.sampler_function

    def run(model, x, sigmas, *args, **kwargs):
        out = function(model, x, sigmas, *args, **kwargs)
        holder["x"] = out.detach().to("cpu", torch.float32, copy=True)
        return out
    sampler.sampler_function = run
    return sampler


def _starting_from_state(sampler, state: torch.Tensor):
    """Start the sampler at a recorded x instead of ComfyUI's scaled (noise, latent)."""
    function = sampler.sampler_function

    def run(model, x, sigmas, *args, **kwargs):
        return function(model, state.to(x.device, x.dtype), sigmas, *args, **kwargs)
    sampler.sampler_function = run
    return sampler


def _stored_state_matches(model, samples: torch.Tensor, state: torch.Tensor, sigma: torch.Tensor) -> bool:
    """Whether `samples` are still the early latents that `state` was recorded with."""
    inner = model.model
    rebuilt = inner.model_sampling.noise_scaling(sigma, torch.zeros_like(samples),
                                                 inner.process_latent_in(samples.float()))
    scale = state.abs().max().clamp_min(1e-6)
    return rebuilt.shape == state.shape and bool(((rebuilt - state).abs().max() / scale) < 1e-4)


@dataclass
class EarlyResult:
    latent: dict               # N rows at step s, with PACK_KEY metadata
    x0: dict                   # the model's x0 prediction at the last early step (LATENT)
    activations: Optional[ActivationSet]
    x0_at: Optional[dict] = None   # checkpoint step k -> x0 prediction (LATENT samples) of the step reaching k


def run_early(model, positive, negative, latent: dict, seed: int, candidates: int, steps: int, cfg: float,
              sampler_name: str, scheduler: str, checkpoint: float, denoise: float = 1.0,
              callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> EarlyResult:
    """Sample `candidates` seeds (seed, seed+1, ...) up to step round(checkpoint*steps).

    Arguments are validated by the node; this raises ValueError/LookupError on what it can't run.
    """
    s = checkpoint_step(steps, checkpoint)
    return run_candidates(model, positive, negative, latent, seed, candidates, steps, cfg, sampler_name, scheduler,
                          stop_step=s, capture_at=(s,), denoise=denoise, callback=callback, disable_pbar=disable_pbar)


def run_candidates(model, positive, negative, latent: dict, seed: int, candidates: int, steps: int, cfg: float,
                   sampler_name: str, scheduler: str, stop_step: int, capture_at: Sequence[int],
                   denoise: float = 1.0, callback: Optional[Callable[[int, int], None]] = None,
                   disable_pbar: bool = True) -> EarlyResult:
    """Sample the candidates to `stop_step` (== steps: to the end), capturing at each step of `capture_at`.

    A checkpoint k means "k steps done": the tap reads the last denoiser evaluation before it,
    the one at sigma_{k-1} that produces x_k, so no extra evaluation is spent on capturing. With
    several checkpoints `activations` is an ActivationSeries, with one an ActivationSet.
    """
    import comfy.sample
    import comfy.model_management

    seeds = [int(seed) + i for i in range(candidates)]
    rows = _rows_for(latent, model, candidates)
    sigmas = full_sigmas(model, steps, sampler_name, scheduler, denoise)
    if sampler_name in UNSPLITTABLE_SAMPLERS:
        raise ValueError(f"sampler {sampler_name} picks its own steps and can't be split")
    capture_at = sorted(set(int(k) for k in capture_at))

    noise = initial_noise(rows, seeds)
    noise_sampler = build_noise_sampler(sampler_name, rows.to(model.load_device), seeds, sigmas)
    final_state = {}
    sampler = _keeping_final_state(sampler_object(sampler_name, noise_sampler), final_state)

    run_id = uuid.uuid4().hex
    tap = find_tap(model)
    work_model = model.clone()
    work_model.model_options.setdefault("transformer_options", {})[RUN_KEY] = run_id
    session = tap.open_session(run_id, tuple(k - 1 for k in capture_at)) if tap is not None else None
    x0_holder = {}
    x0_at = {}

    def on_step(step, x0, x, total_steps):
        x0_holder["x0"] = x0
        if step + 1 in capture_at:
            x0_at[step + 1] = x0.detach().to("cpu", copy=True)
        if session is not None:
            session.step = step + 1
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(step + 1, total_steps)

    try:
        samples = comfy.sample.sample_custom(
            work_model, noise, cfg, sampler, sigmas[: stop_step + 1].clone(), positive, negative, rows,
            noise_mask=latent.get("noise_mask"), callback=on_step, disable_pbar=disable_pbar, seed=seeds[0])
    finally:
        if tap is not None:
            tap.close_session(run_id)

    family = model_family(model)
    activations = None
    if session is not None:
        text = text_embedding_from_conditioning(positive)
        sets = []
        for k in capture_at:
            features = session.features.get(k - 1)
            if features is None:
                raise RuntimeError(f"the tap on {tap.path} did not fire at step {k - 1}")
            sets.append(ActivationSet(
                features=features, family=family, tap=tap.path, step=k, steps=steps, sigma=session.sigmas[k - 1],
                seeds=seeds, run_id=run_id, text_embedding=text, pooling="adaptive_avg"))
        activations = sets[0] if len(sets) == 1 else ActivationSeries(tuple(sets))

    out = {k: _per_sample(v, latent["samples"].shape[0], candidates) for k, v in latent.items()}
    out["samples"] = samples
    if stop_step < steps:
        out[PACK_KEY] = {
            "version": METADATA_VERSION, "run_id": run_id, "family": family, "seeds": seeds,
            "row_ids": list(range(candidates)), "steps": steps, "stop_step": stop_step, "sampler": sampler_name,
            "scheduler": scheduler, "denoise": denoise, "cfg": cfg, "sigmas": sigmas.tolist(),
            "noise_kind": getattr(noise_sampler, "kind", "none"),
            "noise_states": noise_sampler.states() if noise_sampler is not None else None,
            "state": final_state["x"],
        }
    x0 = x0_holder["x0"].to("cpu")
    # The run id and seeds travel with the previews so that preview-based scores can be matched to the
    # early latent by ProbeSelectTopK, like probe scores are.
    x0_latent = {"samples": model.model.process_latent_out(x0), X0_KEY: {"run_id": run_id, "seeds": seeds}}
    x0_at = {k: model.model.process_latent_out(v) for k, v in x0_at.items()}
    return EarlyResult(latent=out, x0=x0_latent, activations=activations, x0_at=x0_at)


def select_rows(latent: dict, indices: list[int]) -> dict:
    """Rows `indices` of a split-sampling LATENT, with every per-sample entry kept aligned."""
    samples = latent["samples"]
    n = samples.shape[0]
    index = torch.tensor(indices, dtype=torch.long)
    out = {}
    for key, value in latent.items():
        if key == "samples":
            out[key] = samples.index_select(0, index)
        elif key == PACK_KEY:
            meta = dict(value)
            for name in ("seeds", "row_ids", "noise_states"):
                if meta.get(name) is not None:
                    meta[name] = [meta[name][i] for i in indices]
            if isinstance(meta.get("state"), torch.Tensor):
                meta["state"] = meta["state"].index_select(0, index)
            out[key] = meta
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n and n > 1:
            out[key] = value.index_select(0, index.to(value.device))   # e.g. a per-candidate noise_mask
        elif isinstance(value, list) and len(value) == n and n > 1:
            out[key] = [value[i] for i in indices]                    # e.g. batch_index
        else:
            out[key] = value                                          # broadcast entries pass through
    return out


def resume(model, positive, negative, latent: dict, cfg: float,
           callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> dict:
    """Finish the rows of a split-sampling LATENT from their stop step to the end."""
    import comfy.sample
    import comfy.model_management

    meta = latent[PACK_KEY]
    steps, s = meta["steps"], meta["stop_step"]
    sigmas = full_sigmas(model, steps, meta["sampler"], meta["scheduler"], meta["denoise"])
    expected = torch.tensor(meta["sigmas"], dtype=torch.float32)
    if sigmas.shape != expected.shape or not torch.allclose(sigmas, expected, rtol=1e-5, atol=1e-6):
        raise ValueError("noise schedule differs")
    rows = latent["samples"]
    seeds = meta["seeds"]
    noise_sampler = build_noise_sampler(meta["sampler"], rows.to(model.load_device), seeds, sigmas,
                                        states=meta.get("noise_states"))
    sampler = sampler_object(meta["sampler"], noise_sampler)
    state = meta.get("state")
    if isinstance(state, torch.Tensor) and _stored_state_matches(model, rows, state, sigmas[s]):
        sampler = _starting_from_state(sampler, state)
    else:
        log.info("Probe-Select: the early latent was changed after sampling; resuming from it as given")

    def on_step(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback(step + 1, total_steps)

    samples = comfy.sample.sample_custom(
        model, torch.zeros_like(rows), cfg, sampler, sigmas[s:].clone(), positive, negative, rows,
        noise_mask=latent.get("noise_mask"), callback=on_step, disable_pbar=disable_pbar, seed=seeds[0])
    out = {k: v for k, v in latent.items() if k != PACK_KEY}
    out["samples"] = samples
    return out
