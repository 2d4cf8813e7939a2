"""Checkpoints by noise level: the sigma and log-SNR a checkpoint fraction lands on.

A checkpoint "t = 0.2" means 20% of the steps, which lands on very different noise levels for
different schedules (a flow model with SD3's shift 3 is far noisier at 20% than SD1.5 is). Every
node that takes a checkpoint fraction reports the level it lands on with :class:`NoiseLevel`.

The step of a fraction is :func:`probes.checkpoints.checkpoint_step` (``round(t * T)``), and the level
is that of ``sigmas[step]``: the noise level of the latent the sampler holds after ``step`` steps.
Log-SNR per family (see :mod:`.schedules`):

* eps / v-prediction (k-diffusion sigma): ``logSNR = -2 log sigma``;
* rectified flow (SD3, Flux; sigma = t): ``logSNR = 2 log((1 - t) / t) = log((1 - t)^2 / t^2)``.

Also the table of the log-SNR that real SD1.5, SDXL, SD3-medium and FLUX.1-dev schedules reach after
20% of their default steps. It is computed from ComfyUI's own ``comfy.model_sampling`` objects by
``bench/noise_levels.py`` (which needs ComfyUI; this module does not) and stored in
``bench/results/noise_levels.json``; :func:`load_family_levels` reads it back for the report.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from ..checkpoints import checkpoint_step
from .schedules import FLOW, PREDICTION_KINDS, VP, log_snr

__all__ = ["NoiseLevel", "noise_level_at_step", "noise_level_at_fraction", "FamilySchedule", "REAL_FAMILIES",
           "FamilyLevel", "family_level", "load_family_levels", "FAMILY_LEVELS_PATH"]

FAMILY_LEVELS_PATH = Path(__file__).resolve().parents[2] / "bench" / "results" / "noise_levels.json"


@dataclass(frozen=True)
class NoiseLevel:
    """Where a checkpoint lands: ``step`` of ``steps``, its ``sigma`` and ``log_snr``, for schedule ``kind``."""

    step: int
    steps: int
    sigma: float
    log_snr: float
    kind: str

    @property
    def t(self) -> float:
        """The fraction of the steps done (what probes and datasets store)."""
        return self.step / self.steps

    def describe(self) -> str:
        """One line for a node's UI text, e.g. ``step 4 of 20 (t = 0.200): sigma 3.53, log-SNR -2.52 (eps/v)``."""
        kind = "flow" if self.kind == FLOW else "eps/v"
        return (f"step {self.step} of {self.steps} (t = {self.t:.3f}): sigma {self.sigma:.4g}, "
                f"log-SNR {self.log_snr:.3f} ({kind})")

    def as_dict(self) -> dict:
        """Plain values (what the early sampler attaches to its LATENTs)."""
        return {"step": self.step, "steps": self.steps, "t": self.t, "sigma": self.sigma, "log_snr": self.log_snr,
                "kind": self.kind}


def noise_level_at_step(sigmas: Union[torch.Tensor, Sequence[float]], kind: str, step: int) -> NoiseLevel:
    """The noise level after ``step`` steps of the schedule ``sigmas`` (``T + 1`` values, the last one 0)."""
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {PREDICTION_KINDS}")
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    steps = values.shape[0] - 1
    if steps < 1:
        raise ValueError(f"a schedule needs at least two sigmas, got {values.shape[0]}")
    if not 0 <= step <= steps:
        raise ValueError(f"step {step} is outside 0..{steps}")
    sigma = float(values[step])
    return NoiseLevel(step=step, steps=steps, sigma=sigma, log_snr=float(log_snr(values[step:step + 1], kind)[0]),
                      kind=kind)


def noise_level_at_fraction(sigmas: Union[torch.Tensor, Sequence[float]], kind: str, fraction: float) -> NoiseLevel:
    """The noise level a checkpoint fraction lands on: step ``round(fraction * T)`` (the split sampler's rule)."""
    steps = torch.as_tensor(sigmas).flatten().shape[0] - 1
    return noise_level_at_step(sigmas, kind, checkpoint_step(steps, fraction))


@dataclass(frozen=True)
class FamilySchedule:
    """A real model family's default sampling schedule, as ComfyUI samples it.

    Attributes:
        family: short name ("sd15", "sdxl", "sd3", "flux-dev").
        label: what the report prints.
        kind: VP (eps/v) or FLOW.
        steps: default number of steps.
        scheduler: default ComfyUI scheduler.
        source: where the defaults come from.
    """

    family: str
    label: str
    kind: str
    steps: int
    scheduler: str
    source: str


# Defaults: ComfyUI's KSampler defaults (20 steps, "normal") for the UNet families, which is also what
# the TTSnap reward tables quoted in issue 13 sampled SDXL with; ComfyUI's SD3 example workflow
# (28 steps, sgm_uniform) for SD3-medium; its Flux example (20 steps, "simple") for FLUX.1-dev. The
# shifts are the models' own (comfy.supported_models: SD3 shift 3.0; Flux mu 1.15, i.e. 1024x1024).
REAL_FAMILIES: tuple[FamilySchedule, ...] = (
    FamilySchedule("sd15", "SD1.5", VP, 20, "normal", "ComfyUI KSampler defaults"),
    FamilySchedule("sdxl", "SDXL", VP, 20, "normal", "ComfyUI KSampler defaults"),
    FamilySchedule("sd3", "SD3-medium", FLOW, 28, "sgm_uniform", "ComfyUI SD3 example workflow"),
    FamilySchedule("flux-dev", "FLUX.1-dev", FLOW, 20, "simple", "ComfyUI Flux example workflow"),
)


@dataclass(frozen=True)
class FamilyLevel:
    """A real family's noise level at a checkpoint fraction: the schedule and where the fraction lands."""

    family: str
    label: str
    kind: str
    steps: int
    scheduler: str
    fraction: float
    step: int
    t: float
    sigma: float
    log_snr: float
    shift: str


def family_level(schedule: FamilySchedule, sigmas: Union[torch.Tensor, Sequence[float]], fraction: float,
                 shift: str = "") -> FamilyLevel:
    """The row of the table for one family: ``sigmas`` is its full default schedule (computed by ComfyUI)."""
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if values.shape[0] != schedule.steps + 1:
        raise ValueError(f"{schedule.label}: {values.shape[0]} sigmas for {schedule.steps} steps")
    level = noise_level_at_fraction(values, schedule.kind, fraction)
    return FamilyLevel(schedule.family, schedule.label, schedule.kind, schedule.steps, schedule.scheduler,
                       float(fraction), level.step, level.t, level.sigma, level.log_snr, shift)


def family_levels_json(levels: Sequence[FamilyLevel]) -> str:
    return json.dumps({"levels": [asdict(level) for level in levels]}, indent=2) + "\n"


def load_family_levels(path: Union[str, os.PathLike] = FAMILY_LEVELS_PATH) -> list[FamilyLevel]:
    """The committed table (``bench/results/noise_levels.json``), for the report to mark the real families'
    log-SNR at 20% of their steps."""
    rows = json.loads(Path(path).read_text())["levels"]
    levels = [FamilyLevel(**row) for row in rows]
    for level in levels:
        if not math.isfinite(level.log_snr):
            raise ValueError(f"{path}: {level.label} has a non-finite log-SNR")
    return levels
