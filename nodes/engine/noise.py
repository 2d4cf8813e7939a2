"""Per-candidate noise, so that candidate i of a batch is exactly what seed i alone gives.

ComfyUI draws a batch's noise from one generator, so row i of a batch is not what a batch-1 run
with seed i draws. Here every row has its own source, built the way a batch-1 KSampler builds it:
- initial noise: `comfy.sample.prepare_noise(row, seed_i)`;
- ancestral / stochastic samplers that default to `default_noise_sampler`: ComfyUI's own
  `default_noise_sampler(row, seed_i)` per row, so however it seeds its generator (0.33 adds 1 to the
  seed on the CPU, 0.3.75 does not) the candidate follows. How many draws the early phase took goes
  into the LATENT metadata; the resumed run rebuilds the same source and skips that many draws, so it
  continues the very same stream;
- SDE samplers that default to a Brownian tree: one tree per row over the FULL schedule's sigma
  range, queried in both phases (the tree is a pure function of seed and interval).
Samplers that draw no noise need nothing; `dpm_fast` and `dpm_adaptive` choose their own steps
and can't be split.
"""
from __future__ import annotations

import copy
import inspect
from typing import Optional

import comfy.k_diffusion.sampling as kds
import comfy.sample
import comfy.samplers
import torch

BROWNIAN_SAMPLERS = {
    "dpmpp_sde": True, "dpmpp_2m_sde": True, "dpmpp_2m_sde_heun": True, "dpmpp_3m_sde": True,
    "dpmpp_sde_gpu": False, "dpmpp_2m_sde_gpu": False, "dpmpp_2m_sde_heun_gpu": False, "dpmpp_3m_sde_gpu": False,
}   # name -> whether the tree lives on the CPU (as in comfy.k_diffusion.sampling)
UNSPLITTABLE_SAMPLERS = ("dpm_fast", "dpm_adaptive")


def splittable_samplers() -> list[str]:
    return [name for name in comfy.samplers.SAMPLER_NAMES if name not in UNSPLITTABLE_SAMPLERS]


def initial_noise_from(noise_source, rows: torch.Tensor, seeds: list[int], latent: dict) -> torch.Tensor:
    """Initial noise from a SamplerCustomAdvanced NOISE (RandomNoise-style: a `seed` and `generate_noise`):
    row i is what a copy of the source with seed i draws for a batch-1 latent, so any NOISE that seeds
    itself from `seed` is followed, however it draws."""
    batch = latent["samples"].shape[0]
    out = []
    for i, seed in enumerate(seeds):
        source = copy.copy(noise_source)
        source.seed = seed
        row_latent = {"samples": rows[i:i + 1]}
        batch_index = latent.get("batch_index")
        if isinstance(batch_index, list) and len(batch_index) == batch:
            row_latent["batch_index"] = batch_index[:1] if batch == 1 else batch_index[i:i + 1]
        out.append(source.generate_noise(row_latent).to(rows.dtype))
    return torch.cat(out)


def initial_noise(rows: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    return torch.cat([comfy.sample.prepare_noise(rows[i:i + 1], seed) for i, seed in enumerate(seeds)])


class PerRowGaussianNoise:
    """`default_noise_sampler`, one per candidate; resumable from the number of draws already taken.

    The sources are ComfyUI's own function rather than a copy of its seeding, so a change upstream
    (such as 0.33's seed + 1 on the CPU) is followed. Its generator is private to a closure, so a
    resume replays the early phase's draws (one latent-sized `randn` each) instead of restoring a state.
    """

    kind = "gaussian"

    def __init__(self, x: torch.Tensor, seeds: list[int], states: Optional[list[int]] = None):
        self.sources = [kds.default_noise_sampler(x[i:i + 1], seed=seed) for i, seed in enumerate(seeds)]
        self.draws = 0
        taken = {int(n) for n in states or ()}
        if len(taken) > 1:
            raise ValueError(f"candidates of one batch took different numbers of noise draws: {sorted(taken)}")
        for _ in range(taken.pop() if taken else 0):
            self(None, None)

    def __call__(self, sigma, sigma_next):
        self.draws += 1
        return torch.cat([source(sigma, sigma_next) for source in self.sources])

    def states(self) -> list[int]:
        """Per candidate: how many draws its stream has given so far."""
        return [self.draws] * len(self.sources)


class PerRowBrownianNoise:
    """`BrownianTreeNoiseSampler`, one tree per candidate over the full schedule's sigma range."""

    kind = "brownian"

    def __init__(self, x: torch.Tensor, seeds: list[int], sigma_min: torch.Tensor, sigma_max: torch.Tensor, cpu: bool):
        self.trees = [
            kds.BrownianTreeNoiseSampler(x[i:i + 1], sigma_min, sigma_max, seed=seed, cpu=cpu)
            for i, seed in enumerate(seeds)
        ]

    def __call__(self, sigma, sigma_next):
        return torch.cat([tree(sigma, sigma_next) for tree in self.trees])

    def states(self) -> None:
        return None


def _accepts_noise_sampler(sampler_name: str) -> bool:
    function = getattr(kds, f"sample_{sampler_name}", None)
    return function is not None and "noise_sampler" in inspect.signature(function).parameters


def build_noise_sampler(sampler_name: str, x: torch.Tensor, seeds: list[int], full_sigmas: torch.Tensor,
                        states: Optional[list[torch.Tensor]] = None):
    """The per-row noise source for `sampler_name`, or None when the sampler draws no noise."""
    if sampler_name in ("ddim", "uni_pc", "uni_pc_bh2") or not _accepts_noise_sampler(sampler_name):
        return None
    if sampler_name in BROWNIAN_SAMPLERS:
        positive = full_sigmas[full_sigmas > 0]
        # The same interval a batch-1 run builds its tree on (sigmas are float32 there too).
        return PerRowBrownianNoise(x, seeds, positive.min().to(x.device), full_sigmas.max().to(x.device),
                                   cpu=BROWNIAN_SAMPLERS[sampler_name])
    return PerRowGaussianNoise(x, seeds, states)


def sampler_object(sampler_name: str, noise_sampler=None):
    """`comfy.samplers.sampler_object(name)` with our noise source passed to the sampler function."""
    if noise_sampler is None:
        return comfy.samplers.sampler_object(sampler_name)
    return comfy.samplers.ksampler(sampler_name, {"noise_sampler": noise_sampler})


# The functions ComfyUI's `ksampler()` wraps around the samplers that choose their own steps.
_OWN_STEP_FUNCTIONS = {"dpm_fast_function": "dpm_fast", "dpm_adaptive_function": "dpm_adaptive"}


def sampler_name_of(sampler) -> str:
    """The ComfyUI sampler name of a SAMPLER object (`KSAMPLER` over `sample_<name>`), for its noise source."""
    function = getattr(sampler, "sampler_function", None)
    if function is None:
        raise TypeError(f"{type(sampler).__name__} is not a KSAMPLER")
    name = getattr(function, "__name__", "")
    if name in _OWN_STEP_FUNCTIONS:
        return _OWN_STEP_FUNCTIONS[name]
    return name[len("sample_"):] if name.startswith("sample_") else name


def with_noise_source(sampler, noise_sampler=None):
    """A copy of a user's SAMPLER (its options kept) that draws from our per-row noise source."""
    out = copy.copy(sampler)
    if noise_sampler is not None:
        out.extra_options = {**sampler.extra_options, "noise_sampler": noise_sampler}
    return out
