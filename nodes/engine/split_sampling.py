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
changed after the early phase (or a resume with another cfg or guider setting) can't be replayed; it
restarts from the given latent at sigma_s, which is exact only for single-step samplers.

Both forms of the graph share one implementation: the engine samples through a guider
(`comfy.samplers.CFGGuider` or a subclass), a SAMPLER object and a sigma tensor. The KSampler form
builds them the way `comfy.samplers.sample` does (a CFGGuider with positive, negative and cfg; the
sampler by name; the sigmas from steps, scheduler and denoise); the custom form
(`SamplerCustomAdvanced`'s NOISE, GUIDER, SAMPLER, SIGMAS) passes the user's own.
"""
from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ...probes.checkpoints import checkpoint_step
from ...probes.features import ActivationSeries, ActivationSet
from ...probes.analysis.noise_levels import NoiseLevel
from .capture import RUN_KEY, find_tap
from .families import model_family
from .noise import (UNSPLITTABLE_SAMPLERS, build_noise_sampler, initial_noise, initial_noise_from, sampler_name_of,
                    sampler_object, with_noise_source)
from .noise_levels import model_noise_level

log = logging.getLogger(__name__)

PACK_KEY = "probe_select"
X0_KEY = "probe_select_x0"
METADATA_VERSION = 3
RECORD_KEY = "probe_select_record"
REPLAY_KEY = "probe_select_replay"


class ScheduleMismatchError(ValueError):
    """The model (or SIGMAS) given to the resume gives other sigmas than the early run recorded."""


class SamplerMismatchError(ValueError):
    """The SAMPLER given to the custom resume is not the one the early run used."""


class FormMismatchError(ValueError):
    """A LATENT started by the custom early sampler given to the KSampler-form resume."""


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
    """CALC_COND_BATCH wrapper: answers the first calls with recorded outputs, then evaluates the model.

    With ``record``, it also keeps the outputs of the evaluated calls (as `_ModelOutputRecorder` does),
    so that a resume stopped at a later checkpoint hands on the whole history: the replayed calls and
    its own. ``dry`` answers zeros without replaying or evaluating (the call count of
    `_calls_before_step`).
    """

    def __init__(self, calls: list, sigmas: list[float], record: bool = False):
        self.calls, self.sigmas = calls, sigmas
        self.replayed = 0
        self.record = record
        self.recorded = _ModelOutputRecorder()

    @property
    def dry(self) -> bool:
        return self.recorded.dry

    @dry.setter
    def dry(self, value: bool) -> None:
        self.recorded.dry = value

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        if self.dry:
            return [torch.zeros_like(x_in) for _ in conds]
        if self.replayed >= len(self.calls):
            if self.record:
                return self.recorded(executor, model, conds, x_in, timestep, model_options)
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
    noise_level: Optional[NoiseLevel] = None   # where the stop step lands (sigma, log-SNR); None when run to the end


def cfg_guider(model, positive, negative, cfg: float):
    """The guider a KSampler samples with (what `comfy.samplers.sample` builds)."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def guidance_of(guider) -> dict:
    """The guider's class and plain settings (cfg; DualCFGGuider's cfg1, cfg2, nested): what the recorded
    per-conditioning outputs were combined with, so a resume can tell whether it may replay them."""
    settings = {k: v for k, v in sorted(vars(guider).items()) if isinstance(v, (bool, int, float, str))}
    return {"class": type(guider).__name__, **settings}


def _guider_on_clone(guider, run_id: Optional[str], wrappers: Sequence[tuple[str, object]] = ()):
    """A copy of `guider` on a clone of its model, with the run id and our CALC_COND_BATCH wrappers.

    The user's guider and model are left untouched; a guider's own model_options (which may differ
    from its patcher's) are carried over.
    """
    import comfy.patcher_extension

    work_model = guider.model_patcher.clone()
    if guider.model_options is not guider.model_patcher.model_options:
        work_model.model_options = copy.deepcopy(guider.model_options)
    if run_id is not None:
        work_model.model_options.setdefault("transformer_options", {})[RUN_KEY] = run_id
    for key, wrapper in wrappers:
        work_model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, key, wrapper)
    guided = copy.copy(guider)
    guided.model_patcher, guided.model_options = work_model, work_model.model_options
    return guided


def _sample(guider, noise: torch.Tensor, rows: torch.Tensor, sampler, sigmas: torch.Tensor, latent: dict,
            callback, disable_pbar: bool, seed: int) -> torch.Tensor:
    """What `comfy.sample.sample_custom` and SamplerCustomAdvanced do with a guider."""
    import comfy.model_management

    samples = guider.sample(noise, rows, sampler, sigmas.clone(), denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=disable_pbar, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())


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
    """The KSampler form of `run_guided`: a CFGGuider, the sampler by name, sigmas from the scheduler."""
    if sampler_name in UNSPLITTABLE_SAMPLERS:
        raise ValueError(f"sampler {sampler_name} picks its own steps and can't be split")
    seeds = [int(seed) + i for i in range(candidates)]
    return run_guided(
        cfg_guider(model, positive, negative, cfg), latent, seeds, lambda rows: initial_noise(rows, seeds),
        sampler_name, lambda noise_sampler: sampler_object(sampler_name, noise_sampler),
        full_sigmas(model, steps, sampler_name, scheduler, denoise), stop_step, capture_at,
        text_embedding_from_conditioning(positive),
        {"form": "ksampler", "scheduler": scheduler, "denoise": denoise, "cfg": cfg},
        callback=callback, disable_pbar=disable_pbar)


def run_custom(guider, noise_source, sampler, sigmas: torch.Tensor, latent: dict, candidates: int, stop_step: int,
               callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> EarlyResult:
    """The SamplerCustomAdvanced form of `run_guided`: the user's guider, SAMPLER and sigmas; candidate i
    starts from the noise `noise_source` draws with seed + i for a batch-1 latent (see noise.py)."""
    name = sampler_name_of(sampler)
    if name in UNSPLITTABLE_SAMPLERS:
        raise ValueError(f"sampler {name} picks its own steps and can't be split")
    seeds = [int(noise_source.seed) + i for i in range(candidates)]
    return run_guided(
        guider, latent, seeds, lambda rows: initial_noise_from(noise_source, rows, seeds, latent),
        name, lambda noise_sampler: with_noise_source(sampler, noise_sampler),
        sigmas.detach().to("cpu", torch.float32).clone(), stop_step, (stop_step,),
        text_embedding_from_guider(guider), {"form": "custom"}, callback=callback, disable_pbar=disable_pbar)


def text_embedding_from_guider(guider) -> Optional[torch.Tensor]:
    """`text_embedding_from_conditioning` for a guider's (converted) positive conditioning."""
    conds = guider.original_conds.get("positive") if hasattr(guider, "original_conds") else None
    if not conds:
        return None
    first = conds[0]
    return text_embedding_from_conditioning([[first.get("cross_attn"), first]])


def run_guided(guider, latent: dict, seeds: list[int], draw_noise: Callable[[torch.Tensor], torch.Tensor],
               sampler_name: str, make_sampler: Callable, sigmas: torch.Tensor, stop_step: int,
               capture_at: Sequence[int], text_embedding: Optional[torch.Tensor], form: dict,
               callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> EarlyResult:
    """Sample the candidates to `stop_step` (== steps: to the end), capturing at each step of `capture_at`.

    `draw_noise(rows)` gives the candidates' initial noise, `make_sampler(noise_sampler)` the SAMPLER with
    our per-row noise source (None for samplers that draw none), `sigmas` the full schedule; `form` goes
    into the metadata (how the resume rebuilds the schedule).

    A checkpoint k means "k steps done": the tap reads the last denoiser evaluation before it,
    the one at sigma_{k-1} that produces x_k, so no extra evaluation is spent on capturing. With
    several checkpoints `activations` is an ActivationSeries, with one an ActivationSet.
    """
    import comfy.model_management

    model = guider.model_patcher
    candidates = len(seeds)
    steps = sigmas.shape[-1] - 1
    rows = _rows_for(latent, model, candidates)
    capture_at = sorted(set(int(k) for k in capture_at))

    noise = draw_noise(rows)
    noise_sampler = build_noise_sampler(sampler_name, rows.to(model.load_device), seeds, sigmas)
    sampler = make_sampler(noise_sampler)
    stopped = {}
    recorder = _ModelOutputRecorder()

    run_id = uuid.uuid4().hex
    tap = find_tap(model)
    wrappers = ()
    if stop_step < steps:
        sampler = _stopping_at_step(sampler, stop_step, recorder, stopped)
        wrappers = ((RECORD_KEY, recorder),)
    guided = _guider_on_clone(guider, run_id, wrappers)
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
        samples = _sample(guided, noise, rows, sampler, sigmas, latent, on_step, disable_pbar, seeds[0])
    finally:
        if tap is not None:
            tap.close_session(run_id)

    family = model_family(model)
    x0_at = {k: model.model.process_latent_out(v) for k, v in x0_at.items()}
    activations = _captured(session, tap, [(k, k - 1) for k in capture_at], family, steps, seeds, run_id,
                            text_embedding, x0_at)

    out = {k: _per_sample(v, latent["samples"].shape[0], candidates) for k, v in latent.items()}
    out["samples"] = samples
    level = None
    if stop_step < steps:
        level = model_noise_level(model, sigmas, stop_step)
        out["samples"] = _latent_from_state(model, sigmas[stop_step], stopped["x"])
        out[PACK_KEY] = {
            "version": METADATA_VERSION, "run_id": run_id, "family": family, "seeds": seeds,
            "row_ids": list(range(candidates)), "steps": steps, "stop_step": stop_step, "sampler": sampler_name,
            **form, "guidance": guidance_of(guider), "sigmas": sigmas.tolist(),
            "noise_kind": getattr(noise_sampler, "kind", "none"),
            "noise_states": noise_sampler.states() if noise_sampler is not None else None,
            "state": stopped["x"], "start": stopped["start"],
            # Per model call of the early phase: the outputs per conditioning ([N, ...] or None), and its sigma.
            "calls": recorder.calls, "call_sigmas": recorder.sigmas,
            # Where the stop step lands: sigma, log-SNR (from the model's own model_sampling), t.
            "noise_level": level.as_dict(), "stops": [stop_step],
        }
    x0_latent = _x0_latent(model, x0_holder["x0"], run_id, seeds, level)
    return EarlyResult(latent=out, x0=x0_latent, activations=activations, x0_at=x0_at, noise_level=level)


def _captured(session, tap, steps_and_keys: Sequence[tuple[int, int]], family: str, steps: int, seeds: list[int],
              run_id: str, text_embedding: Optional[torch.Tensor], x0_at: Optional[dict] = None):
    """The tap's activations of a run: one ActivationSet per (checkpoint step, the session's capture key),
    an ActivationSeries for several; None without a tap. Each set carries the x0 prediction of its
    checkpoint (``x0_at[k]``, LATENT samples) when there is one, for probes and datasets that read x0."""
    if session is None:
        return None
    sets = []
    for k, key in steps_and_keys:
        features = session.features.get(key)
        if features is None:
            raise RuntimeError(f"the tap on {tap.path} did not fire at step {k - 1}")
        x0 = (x0_at or {}).get(k)
        if x0 is not None and x0.shape[0] != len(seeds):
            x0 = None
        sets.append(ActivationSet(
            features=features, family=family, tap=tap.path, step=k, steps=steps, sigma=session.sigmas[key],
            seeds=seeds, run_id=run_id, text_embedding=text_embedding, pooling="adaptive_avg", x0=x0))
    return sets[0] if len(sets) == 1 else ActivationSeries(tuple(sets))


def _x0_latent(model, x0: torch.Tensor, run_id: str, seeds: list[int], level: Optional[NoiseLevel]) -> dict:
    """The x0-preview LATENT. The run id and seeds travel with the previews so that preview-based scores
    can be matched to the early latent by ProbeSelectTopK, like probe scores are; the noise level is the
    checkpoint's."""
    meta = {"run_id": run_id, "seeds": seeds}
    if level is not None:
        meta["noise_level"] = level.as_dict()
    return {"samples": model.model.process_latent_out(x0.to("cpu")), X0_KEY: meta}


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


def _replayable(model, meta: dict, rows: torch.Tensor, guidance: dict, sigma: torch.Tensor) -> bool:
    """Whether the recorded early phase can be replayed: same latent and guider settings as when recorded."""
    state = meta.get("state")
    if not isinstance(state, torch.Tensor) or meta.get("calls") is None or meta.get("start") is None:
        return False
    if not _stored_state_matches(model, rows, state, sigma):
        log.info("Probe-Select: the early latent was changed after sampling; resuming from it as given")
        return False
    if guidance != meta.get("guidance"):
        log.info("Probe-Select: resuming with guider settings %s instead of the early phase's %s; the early steps "
                 "can't be replayed, so the candidates continue from their early latents", guidance,
                 meta.get("guidance"))
        return False
    return True


def _ksampler_parts(model, positive, negative, latent: dict, cfg: float) -> tuple:
    """The guider, sampler factory and sigmas a KSampler-form resume samples with (checked against the latent)."""
    meta = latent[PACK_KEY]
    if meta.get("form") != "ksampler":
        raise FormMismatchError("the latent was started with the custom sampler")
    sigmas = full_sigmas(model, meta["steps"], meta["sampler"], meta["scheduler"], meta["denoise"])
    expected = torch.tensor(meta["sigmas"], dtype=torch.float32)
    if sigmas.shape != expected.shape or not torch.allclose(sigmas, expected, rtol=1e-5, atol=1e-6):
        raise ScheduleMismatchError("noise schedule differs")
    return (cfg_guider(model, positive, negative, cfg),
            lambda noise_sampler: sampler_object(meta["sampler"], noise_sampler), sigmas)


def _custom_parts(sampler, latent: dict, sigmas: Optional[torch.Tensor]) -> tuple:
    """The sampler factory and sigmas a custom-form resume samples with: the latent's own sigmas (given ones
    must equal them) and the user's SAMPLER (which must be the early one)."""
    meta = latent[PACK_KEY]
    expected = torch.tensor(meta["sigmas"], dtype=torch.float32)
    if sigmas is not None:
        given = sigmas.detach().to("cpu", torch.float32)
        if given.shape != expected.shape or not torch.allclose(given, expected, rtol=1e-5, atol=1e-6):
            raise ScheduleMismatchError("sigmas differ")
    name = sampler_name_of(sampler)
    if name != meta["sampler"]:
        raise SamplerMismatchError(f"the candidates were started with sampler {meta['sampler']}, not {name}")
    return lambda noise_sampler: with_noise_source(sampler, noise_sampler), expected


def resume(model, positive, negative, latent: dict, cfg: float,
           callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> dict:
    """The KSampler form of `resume_guided`: the schedule and sampler named in the latent, a CFGGuider."""
    guider, make_sampler, sigmas = _ksampler_parts(model, positive, negative, latent, cfg)
    return resume_guided(guider, latent, make_sampler, sigmas, callback=callback, disable_pbar=disable_pbar)


def resume_custom(guider, sampler, latent: dict, sigmas: Optional[torch.Tensor] = None,
                  callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> dict:
    """The SamplerCustomAdvanced form of `resume_guided`: the user's guider and SAMPLER; the sigmas are the
    latent's own (given ones must equal them)."""
    make_sampler, expected = _custom_parts(sampler, latent, sigmas)
    return resume_guided(guider, latent, make_sampler, expected, callback=callback, disable_pbar=disable_pbar)


def advance(model, positive, negative, latent: dict, cfg: float, until_step: int,
            callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> EarlyResult:
    """The KSampler form of `advance_guided`."""
    guider, make_sampler, sigmas = _ksampler_parts(model, positive, negative, latent, cfg)
    return advance_guided(guider, latent, make_sampler, sigmas, until_step, text_embedding_from_conditioning(positive),
                          callback=callback, disable_pbar=disable_pbar)


def advance_custom(guider, sampler, latent: dict, until_step: int, sigmas: Optional[torch.Tensor] = None,
                   callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> EarlyResult:
    """The SamplerCustomAdvanced form of `advance_guided`."""
    make_sampler, expected = _custom_parts(sampler, latent, sigmas)
    return advance_guided(guider, latent, make_sampler, expected, until_step, text_embedding_from_guider(guider),
                          callback=callback, disable_pbar=disable_pbar)


def _continuation(guider, latent: dict, make_sampler: Callable, sigmas: torch.Tensor,
                  until_step: Optional[int], run_id: Optional[str]):
    """What a resume samples with: (guider on a clone, sampler, sigmas of the run, first step of the run,
    replay wrapper or None, recorder or None, holder of the stopped state, noise sampler).

    Replayable (the latent and guider settings are the early phase's): the sampler runs the whole
    schedule from the recorded start, the recorded calls answered by the replay wrapper (the model is not
    evaluated for them) and fresh noise sources drawing the same noise again. Otherwise it continues
    from the latent at sigma_s with the recorded noise states (exact for single-step samplers only).
    With ``until_step`` < steps the sampler stops at its first model call of that step; the replay
    wrapper (or the recorder) then keeps the outputs of the calls it evaluated.
    """
    model = guider.model_patcher
    meta = latent[PACK_KEY]
    steps, s = meta["steps"], meta["stop_step"]
    rows = latent["samples"]
    seeds = meta["seeds"]
    stopping = until_step is not None and until_step < steps
    stopped: dict = {}
    replay = recorder = None
    if _replayable(model, meta, rows, guidance_of(guider), sigmas[s]):
        # Fresh noise sources: the replayed early steps draw the early phase's noise again, in order.
        noise_sampler = build_noise_sampler(meta["sampler"], rows.to(model.load_device), seeds, sigmas)
        replay = _ModelOutputReplay(meta["calls"], meta["call_sigmas"], record=stopping)
        sampler = make_sampler(noise_sampler)
        if stopping:
            sampler = _stopping_at_step(sampler, until_step, replay, stopped)
        sampler = _starting_from_state(sampler, meta["start"])
        guided = _guider_on_clone(guider, run_id, ((REPLAY_KEY, replay),))
        run_sigmas, first_step = sigmas, s
    else:
        noise_sampler = build_noise_sampler(meta["sampler"], rows.to(model.load_device), seeds, sigmas,
                                            states=meta.get("noise_states"))
        sampler = make_sampler(noise_sampler)
        wrappers = ()
        if stopping:
            recorder = _ModelOutputRecorder()
            sampler = _stopping_at_step(sampler, until_step - s, recorder, stopped)
            wrappers = ((RECORD_KEY, recorder),)
        guided = _guider_on_clone(guider, run_id, wrappers) if (wrappers or run_id is not None) else guider
        run_sigmas, first_step = sigmas[s:], 0
    return guided, sampler, run_sigmas, first_step, replay, recorder, stopped, noise_sampler


def resume_guided(guider, latent: dict, make_sampler: Callable, sigmas: torch.Tensor,
                  callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> dict:
    """Finish the rows of a split-sampling LATENT from their stop step to the end.

    Replays the recorded early phase (no model evaluation) so the sampler's history is rebuilt, then
    evaluates the model for steps s..T-1; see the module docstring.
    """
    import comfy.model_management

    meta = latent[PACK_KEY]
    steps, s = meta["steps"], meta["stop_step"]
    rows = latent["samples"]
    guided, sampler, run_sigmas, first_step, replay, _, _, _ = _continuation(guider, latent, make_sampler, sigmas,
                                                                             None, None)

    def on_step(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None and step >= first_step:
            callback(step - first_step + 1, steps - s)

    samples = _sample(guided, torch.zeros_like(rows), rows, sampler, run_sigmas, latent, on_step, disable_pbar,
                      meta["seeds"][0])
    if replay is not None and replay.replayed != len(meta["calls"]):
        raise RuntimeError(f"the sampler replayed {replay.replayed} of the {len(meta['calls'])} recorded model calls")
    out = {k: v for k, v in latent.items() if k != PACK_KEY}
    out["samples"] = samples
    return out


def advance_guided(guider, latent: dict, make_sampler: Callable, sigmas: torch.Tensor, until_step: int,
                   text_embedding: Optional[torch.Tensor],
                   callback: Optional[Callable[[int, int], None]] = None, disable_pbar: bool = True) -> EarlyResult:
    """Run the rows of a split-sampling LATENT from their stop step s on to a later checkpoint `until_step`
    (s < until_step < steps), for another round of scoring and top-K: a multi-stage schedule.

    The result is what the early phase gives: a LATENT stopped at `until_step` (new run id, same seeds,
    the recorded model calls extended by this stage's, so the next resume replays all of them), the x0
    prediction at the checkpoint and the tap's activations. The model is evaluated for steps
    s..until_step-1 only.
    """
    import comfy.model_management

    model = guider.model_patcher
    meta = latent[PACK_KEY]
    steps, s = meta["steps"], meta["stop_step"]
    if not s < until_step < steps:
        raise ValueError(f"until_step {until_step} is not between the stop step {s} and the last step {steps}")
    rows = latent["samples"]
    seeds = meta["seeds"]
    run_id = uuid.uuid4().hex
    guided, sampler, run_sigmas, first_step, replay, recorder, stopped, noise_sampler = _continuation(
        guider, latent, make_sampler, sigmas, until_step, run_id)
    capture_key = until_step - 1 - (s - first_step)       # the capture step in the run's own step numbers
    tap = find_tap(model)
    session = tap.open_session(run_id, (capture_key,)) if tap is not None else None
    x0_holder = {}

    def on_step(step, x0, x, total_steps):
        x0_holder["x0"] = x0
        if session is not None:
            session.step = step + 1
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None and step >= first_step:
            callback(step - first_step + 1, until_step - s)

    try:
        _sample(guided, torch.zeros_like(rows), rows, sampler, run_sigmas, latent, on_step, disable_pbar, seeds[0])
    finally:
        if tap is not None:
            tap.close_session(run_id)
    if replay is not None and replay.replayed != len(meta["calls"]):
        raise RuntimeError(f"the sampler replayed {replay.replayed} of the {len(meta['calls'])} recorded model calls")

    family = model_family(model)
    level = model_noise_level(model, sigmas, until_step)
    x0_latent = _x0_latent(model, x0_holder["x0"], run_id, seeds, level)
    activations = _captured(session, tap, [(until_step, capture_key)], family, steps, seeds, run_id, text_embedding,
                            {until_step: x0_latent["samples"]})
    out = {k: v for k, v in latent.items() if k != PACK_KEY}
    out["samples"] = _latent_from_state(model, sigmas[until_step], stopped["x"])
    new_meta = dict(meta)
    new_meta.update({
        "run_id": run_id, "stop_step": until_step, "state": stopped["x"],
        "noise_states": noise_sampler.states() if noise_sampler is not None else None,
        "noise_level": level.as_dict(), "stops": [*meta.get("stops", [s]), until_step],
    })
    if replay is not None:
        # The whole history from step 0: the replayed calls and this stage's, so the next resume replays all.
        new_meta["calls"] = list(meta["calls"]) + replay.recorded.calls
        new_meta["call_sigmas"] = list(meta["call_sigmas"]) + replay.recorded.sigmas
    else:
        # Continued from a changed latent (or with other guider settings): there is no history from step 0
        # to replay, so later stages continue from their latents too.
        new_meta.update({"calls": None, "call_sigmas": None, "start": None, "guidance": guidance_of(guider)})
    out[PACK_KEY] = new_meta
    return EarlyResult(latent=out, x0=x0_latent, activations=activations, noise_level=level)
