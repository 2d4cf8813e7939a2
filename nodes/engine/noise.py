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
