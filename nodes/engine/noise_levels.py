"""Noise levels of checkpoints, read from the model's own ComfyUI ``model_sampling``.

The pure arithmetic is `probes/noise_levels.py`; here the schedule kind comes from the model (flow
for CONST sampling: SD3, Flux, ...; eps/v otherwise), and the real families' schedules are built from
`comfy.supported_models` configs the way ComfyUI builds them for a loaded checkpoint (no weights).
"""
from __future__ import annotations

import inspect
import math

import comfy.model_base
import comfy.model_sampling
import comfy.samplers
import comfy.supported_models
import torch

from ...probes.analysis.schedules import FLOW, VP
from ...probes.analysis.noise_levels import REAL_FAMILIES, FamilyLevel, FamilySchedule, NoiseLevel, family_level, \
    noise_level_at_step

# The config class ComfyUI detects for each real family, and the model_base class it builds (whose
# default model_type sets the sampling: EPS for the UNets, FLOW for SD3, FLUX for Flux).
_FAMILY_CLASSES = {
    "sd15": (comfy.supported_models.SD15, comfy.model_base.BaseModel),
    "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL),
    "sd3": (comfy.supported_models.SD3, comfy.model_base.SD3),
    "flux-dev": (comfy.supported_models.Flux, comfy.model_base.Flux),
}


def sampling_kind(model_sampling) -> str:
    """FLOW for rectified-flow sampling (CONST: SD3, Flux, ...), VP for eps / v / EDM."""
    return FLOW if isinstance(model_sampling, comfy.model_sampling.CONST) else VP


def model_kind(model) -> str:
    """`sampling_kind` of a ModelPatcher's (possibly patched, e.g. ModelSamplingSD3) model_sampling."""
    return sampling_kind(model.get_model_object("model_sampling"))


def model_noise_level(model, sigmas: torch.Tensor, step: int) -> NoiseLevel:
    """The noise level after ``step`` steps of ``sigmas``, read as ``model`` samples them."""
    return noise_level_at_step(torch.as_tensor(sigmas).detach().to("cpu", torch.float64), model_kind(model), step)


def family_sampling(family: str):
    """The model_sampling object ComfyUI gives a loaded checkpoint of a real family (built without weights)."""
    config_class, model_class = _FAMILY_CLASSES[family]
    model_type = inspect.signature(model_class.__init__).parameters["model_type"].default
    if model_type is inspect.Parameter.empty:       # BaseModel: the config decides (EPS for SD1.5 and SDXL)
        model_type = config_class({}).model_type({})
    return comfy.model_base.model_sampling(config_class({}), model_type)


def shift_of(model_sampling) -> str:
    """The flow shift as the factor that multiplies t (Flux stores log(shift), its mu)."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux):
        return f"mu {model_sampling.shift:.3g} (x{math.exp(model_sampling.shift):.3g})"
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return f"{model_sampling.shift:.3g}"
    return ""


def family_schedule_sigmas(schedule: FamilySchedule) -> torch.Tensor:
    """The family's full default schedule, as ComfyUI's scheduler computes it."""
    return comfy.samplers.calculate_sigmas(family_sampling(schedule.family), schedule.scheduler, schedule.steps).cpu()


def real_family_levels(fraction: float = 0.2) -> list[FamilyLevel]:
    """Where ``fraction`` of each real family's default steps lands (sigma, log-SNR)."""
    rows = []
    for schedule in REAL_FAMILIES:
        sampling = family_sampling(schedule.family)
        if sampling_kind(sampling) != schedule.kind:
            raise RuntimeError(f"{schedule.label}: ComfyUI samples it as {sampling_kind(sampling)}, "
                               f"the table says {schedule.kind}")
        rows.append(family_level(schedule, family_schedule_sigmas(schedule), fraction, shift_of(sampling)))
    return rows
