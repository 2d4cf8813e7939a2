"""Split sampling: N candidates to a checkpoint step, then finish any subset of them.

The early phase and the resume are the two halves of one KSampler run: same sigmas (computed by
`comfy.samplers.KSampler` from steps, scheduler, denoise), split at step s. Both phases hand the
sampler the FULL schedule, as a plain run does, so samplers that read ahead in it (uni_pc's and
sa_solver's lower orders near the end, deis' coefficients, the Brownian tree's interval) and model
patches that read `sample_sigmas` behave as in one run.

The early phase stops the sampler function at its first model call of step s (found by a dry run of
the sampler with a stand-in denoiser, see `_calls_before_step`) and records, per candidate, every
conditioning output the model produced before it (a CALC_COND_BATCH wrapper: the cond/uncond
predictions, below ComfyUI's CFG, pre- and post-CFG functions). The resume runs the sampler again
over the whole schedule from the recorded starting x, with those outputs replayed for the early
calls instead of evaluating the model, and the per-candidate noise sources started afresh
(see `noise.py`): the sampler rebuilds its own history (multistep buffers, the x/x_pred pair of
sa_solver, the noise draws) exactly, so the kept candidate equals a batch-1 KSampler run of its
seed for every sampler that steps through the schedule, and the model is evaluated only for steps
s..T-1.

What the resume needs travels in the LATENT under `PACK_KEY`, row-aligned with the samples, so a
user can't finish a candidate with other steps or another scheduler than it started with. A LATENT
changed after the early phase (or a resume with another cfg) can't be replayed; it restarts from the
given latent at sigma_s, which is exact only for single-step samplers.
"""
from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ...probes.checkpoints import checkpoint_step
from ...probes.features import ActivationSeries, ActivationSet
from .capture import RUN_KEY, find_tap
from .families import model_family
from .noise import UNSPLITTABLE_SAMPLERS, build_noise_sampler, initial_noise, sampler_object

log = logging.getLogger(__name__)

PACK_KEY = "probe_select"
X0_KEY = "probe_select_x0"
METADATA_VERSION = 2
RECORD_KEY = "probe_select_record"
REPLAY_KEY = "probe_select_replay"


class ScheduleMismatchError(ValueError):
    """The model given to the resume computes other sigmas than the early run recorded."""


@dataclass(frozen=True)
class EarlyRun:
    """What the early sampler recorded in a LATENT, for the nodes (the rest of the metadata is this
    module's own). ``version``, ``steps`` and ``stop_step`` are None for an x0 preview."""

    run_id: str
    seeds: list[int]
    version: Optional[int] = None
    steps: Optional[int] = None
    stop_step: Optional[int] = None


def early_run(latent) -> Optional[EarlyRun]:
    """The run of an early (or kept, or pruned) LATENT; None for a LATENT the early sampler did not make."""
    meta = latent.get(PACK_KEY) if isinstance(latent, dict) else None
    if meta is None:
        return None
    return EarlyRun(meta.get("run_id"), list(meta.get("seeds", [])), meta.get("version"), meta.get("steps"),
                    meta.get("stop_step"))


def preview_run(latent) -> Optional[EarlyRun]:
    """The run of the early sampler's x0 preview LATENT; None for any other LATENT."""
    meta = latent.get(X0_KEY) if isinstance(latent, dict) else None
    if meta is None:
        return None
    return EarlyRun(meta["run_id"], list(meta["seeds"]))


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


class _EarlyStop(Exception):
    """Raised at the sampler's first model call of the stop step; carries the x it was called with."""

    def __init__(self, x: torch.Tensor):
        super().__init__("early phase done")
        self.x = x


class _SamplerModel:
    """Stands in for the model a sampler function calls (ComfyUI's KSamplerX0Inpaint): counts the calls
    and stops the sampler at call `stop_at`. Attribute reads (model_sampling, ...) go to the real model.
    """

    def __init__(self, model, stop_at: Optional[int] = None):
        self._model, self._stop_at = model, stop_at
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x, sigma, **kwargs):
        if self.calls == self._stop_at:
            raise _EarlyStop(x)
        self.calls += 1
        return self._model(x, sigma, **kwargs)


class _ModelOutputRecorder:
    """CALC_COND_BATCH wrapper: keeps every call's outputs, one [N, ...] CPU tensor per conditioning.

    An absent conditioning (the uncond that CFG 1 skips) gives zeros in ComfyUI; it is kept as None.
    In `dry` mode it evaluates nothing and answers zeros, for counting the sampler's calls while
    ComfyUI's CFG code (and the cfg_pp samplers' hooks in it) still runs.
    """

    def __init__(self):
        self.calls: list[list[Optional[torch.Tensor]]] = []
        self.sigmas: list[float] = []
        self.dry = False

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        if self.dry:
            return [torch.zeros_like(x_in) for _ in conds]
        out = executor(model, conds, x_in, timestep, model_options)
        self.calls.append([o.detach().to("cpu", copy=True) if c is not None else None for c, o in zip(conds, out)])
        self.sigmas.append(float(timestep.flatten()[0]))
        return out


class _ModelOutputReplay:
    """CALC_COND_BATCH wrapper: answers the first calls with recorded outputs, then evaluates the model."""

    def __init__(self, calls: list, sigmas: list[float]):
        self.calls, self.sigmas = calls, sigmas
        self.replayed = 0

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        if self.replayed >= len(self.calls):
            return executor(model, conds, x_in, timestep, model_options)
        expected, sigma = self.sigmas[self.replayed], float(timestep.flatten()[0])
        if abs(sigma - expected) > 1e-5 * max(abs(expected), 1e-3):
            raise ValueError(f"replay out of step: the sampler asked for sigma {sigma} at call {self.replayed}, "
                             f"the early phase evaluated sigma {expected}")
        out = [o.to(x_in.device, copy=True) if o is not None else torch.zeros_like(x_in)
               for o in self.calls[self.replayed]]
        self.replayed += 1
        return out


def _calls_before_step(function, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict, options: dict,
                       step: int, recorder: _ModelOutputRecorder) -> int:
    """How many model calls `function` makes before its first call of `step`.

    Every ComfyUI sampler reports step i through its callback right after the first model call of that
    step (further calls of the step, e.g. heun's corrector, come after it). A dry run on one row, with
    the recorder answering zeros instead of evaluating the model, counts the calls before that report;
    the call structure depends on the schedule only, never on the model's values.
    """
    counter = _SamplerModel(model)
    calls_at_report = {}

    def on_report(info):
        calls_at_report.setdefault(int(info["i"]), counter.calls)

    options = dict(options)
    if options.get("noise_sampler") is not None:
        row = x[:1]
        options["noise_sampler"] = lambda sigma, sigma_next: torch.zeros_like(row)
    recorder.dry = True
    try:
        # A copy: the cfg_pp samplers put their post-CFG hook into extra_args["model_options"].
        function(counter, x[:1].clone(), sigmas, extra_args=dict(extra_args), callback=on_report, disable=True,
                 **options)
    finally:
        recorder.dry = False
    if step not in calls_at_report:
        raise ValueError(f"the sampler reported no step {step}")
    return calls_at_report[step] - 1


def _stopping_at_step(sampler, stop_step: int, recorder: _ModelOutputRecorder, holder: dict):
    """Run the sampler over the full schedule and stop it at its first model call of `stop_step`.

    `holder` gets the sampler's starting x and its x at that call (model space, CPU float32), and the
    sampler returns the latter.
    """
    function = sampler.sampler_function

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        holder["start"] = x.detach().to("cpu", torch.float32, copy=True)
        stop_at = _calls_before_step(function, model, x, sigmas, extra_args, options, stop_step, recorder)
        try:
            function(_SamplerModel(model, stop_at=stop_at), x, sigmas, extra_args=extra_args, callback=callback,
                     disable=disable, **options)
        except _EarlyStop as stop:
            holder["x"] = stop.x.detach().to("cpu", torch.float32, copy=True)
            return stop.x
        raise RuntimeError(f"the sampler finished without reaching step {stop_step}")
    sampler.sampler_function = run
    return sampler


def _latent_from_state(model, sigma: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The LATENT samples of a run stopped at `sigma` (what KSamplerAdvanced with leftover noise returns)."""
    import comfy.model_management

    model_sampling = model.get_model_object("model_sampling")
    samples = model_sampling.inverse_noise_scaling(sigma, state).to(torch.float32)
    return model.model.process_latent_out(samples).to(comfy.model_management.intermediate_device())


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
    import comfy.patcher_extension

    seeds = [int(seed) + i for i in range(candidates)]
    rows = _rows_for(latent, model, candidates)
    sigmas = full_sigmas(model, steps, sampler_name, scheduler, denoise)
    if sampler_name in UNSPLITTABLE_SAMPLERS:
        raise ValueError(f"sampler {sampler_name} picks its own steps and can't be split")
    capture_at = sorted(set(int(k) for k in capture_at))

    noise = initial_noise(rows, seeds)
    noise_sampler = build_noise_sampler(sampler_name, rows.to(model.load_device), seeds, sigmas)
    sampler = sampler_object(sampler_name, noise_sampler)
    stopped = {}
    recorder = _ModelOutputRecorder()

    run_id = uuid.uuid4().hex
    tap = find_tap(model)
    work_model = model.clone()
    work_model.model_options.setdefault("transformer_options", {})[RUN_KEY] = run_id
    if stop_step < steps:
        sampler = _stopping_at_step(sampler, stop_step, recorder, stopped)
        work_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, RECORD_KEY, recorder)
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
            work_model, noise, cfg, sampler, sigmas.clone(), positive, negative, rows,
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
        out["samples"] = _latent_from_state(model, sigmas[stop_step], stopped["x"])
        out[PACK_KEY] = {
            "version": METADATA_VERSION, "run_id": run_id, "family": family, "seeds": seeds,
            "row_ids": list(range(candidates)), "steps": steps, "stop_step": stop_step, "sampler": sampler_name,
            "scheduler": scheduler, "denoise": denoise, "cfg": cfg, "sigmas": sigmas.tolist(),
            "noise_kind": getattr(noise_sampler, "kind", "none"),
            "noise_states": noise_sampler.states() if noise_sampler is not None else None,
            "state": stopped["x"], "start": stopped["start"],
            # Per model call of the early phase: the outputs per conditioning ([N, ...] or None), and its sigma.
            "calls": recorder.calls, "call_sigmas": recorder.sigmas,
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
            for name in ("state", "start"):
                if isinstance(meta.get(name), torch.Tensor):
                    meta[name] = meta[name].index_select(0, index)
            if meta.get("calls") is not None:
                meta["calls"] = [[o.index_select(0, index) if o is not None else None for o in call]
                                 for call in meta["calls"]]
            out[key] = meta
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n and n > 1:
            out[key] = value.index_select(0, index.to(value.device))   # e.g. a per-candidate noise_mask
        elif isinstance(value, list) and len(value) == n and n > 1:
            out[key] = [value[i] for i in indices]                    # e.g. batch_index
        else:
            out[key] = value                                          # broadcast entries pass through
    return out


def _replayable(model, meta: dict, rows: torch.Tensor, cfg: float, sigma: torch.Tensor) -> bool:
    """Whether the recorded early phase can be replayed: same latent and cfg as when it was recorded."""
    state = meta.get("state")
    if not isinstance(state, torch.Tensor) or meta.get("calls") is None or meta.get("start") is None:
        return False
    if not _stored_state_matches(model, rows, state, sigma):
        log.info("Probe-Select: the early latent was changed after sampling; resuming from it as given")
        return False
    if not math.isclose(float(cfg), float(meta["cfg"]), rel_tol=1e-9, abs_tol=1e-9):
        log.info("Probe-Select: resuming with cfg %s instead of the early phase's %s; the early steps can't be "
                 "replayed, so the candidates continue from their early latents", cfg, meta["cfg"])
        return False
    return True


def resume(model, positive, negative, latent: dict, cfg: float,
           callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> dict:
    """Finish the rows of a split-sampling LATENT from their stop step to the end.

    Replays the recorded early phase (no model evaluation) so the sampler's history is rebuilt, then
    evaluates the model for steps s..T-1; see the module docstring.
    """
    import comfy.sample
    import comfy.model_management
    import comfy.patcher_extension

    meta = latent[PACK_KEY]
    steps, s = meta["steps"], meta["stop_step"]
    sigmas = full_sigmas(model, steps, meta["sampler"], meta["scheduler"], meta["denoise"])
    expected = torch.tensor(meta["sigmas"], dtype=torch.float32)
    if sigmas.shape != expected.shape or not torch.allclose(sigmas, expected, rtol=1e-5, atol=1e-6):
        raise ScheduleMismatchError("noise schedule differs")
    rows = latent["samples"]
    seeds = meta["seeds"]
    replay = None
    if _replayable(model, meta, rows, cfg, sigmas[s]):
        # Fresh noise sources: the replayed early steps draw the early phase's noise again, in order.
        noise_sampler = build_noise_sampler(meta["sampler"], rows.to(model.load_device), seeds, sigmas)
        sampler = _starting_from_state(sampler_object(meta["sampler"], noise_sampler), meta["start"])
        replay = _ModelOutputReplay(meta["calls"], meta["call_sigmas"])
        work_model = model.clone()
        work_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, REPLAY_KEY, replay)
        run_sigmas, first_step = sigmas, s
    else:
        noise_sampler = build_noise_sampler(meta["sampler"], rows.to(model.load_device), seeds, sigmas,
                                            states=meta.get("noise_states"))
        sampler = sampler_object(meta["sampler"], noise_sampler)
        work_model, run_sigmas, first_step = model, sigmas[s:], 0

    def on_step(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None and step >= first_step:
            callback(step - first_step + 1, steps - s)

    samples = comfy.sample.sample_custom(
        work_model, torch.zeros_like(rows), cfg, sampler, run_sigmas.clone(), positive, negative, rows,
        noise_mask=latent.get("noise_mask"), callback=on_step, disable_pbar=disable_pbar, seed=seeds[0])
    if replay is not None and replay.replayed != len(meta["calls"]):
        raise RuntimeError(f"the sampler replayed {replay.replayed} of the {len(meta['calls'])} recorded model calls")
    out = {k: v for k, v in latent.items() if k != PACK_KEY}
    out["samples"] = samples
    return out
