"""Split sampling in the SamplerCustomAdvanced form: ProbeSelectEarlySamplerCustom and ProbeSelectResumeCustom.

Flux and SD3.5 graphs sample with NOISE, GUIDER, SAMPLER and SIGMAS instead of KSampler's widgets.
These nodes take the same four inputs and run the same engine as ProbeSelectEarlySampler and
ProbeSelectResume (`engine/split_sampling.py`), so a kept candidate equals a plain
SamplerCustomAdvanced run with RandomNoise(seed + i) and the same guider, sampler and sigmas.
"""
from __future__ import annotations

from typing import Optional

import torch
from comfy_api.latest import io

from ..probes.checkpoints import checkpoint_step
from .engine import split_sampling
from .engine.noise import UNSPLITTABLE_SAMPLERS, sampler_name_of
from .errors import ProbeSelectError
from .nodes_sampling import (UNTIL_TOOLTIP, _progress, early_output, resume_outputs, until_percent_problem,
                             until_step_or_fail, validate_early, validate_resumable)
from .types import CATEGORY, Activations


def validate_guider(node_id: str, guider) -> None:
    if getattr(guider, "model_patcher", None) is None or not callable(getattr(guider, "sample", None)):
        raise ProbeSelectError(node_id, f"the GUIDER input ({type(guider).__name__}) is not a ComfyUI guider.",
                               "connect CFGGuider, DualCFGGuider or BasicGuider.")


def validate_sampler(node_id: str, sampler) -> str:
    """The sampler's ComfyUI name; fails for a SAMPLER that can't stop at a step."""
    try:
        name = sampler_name_of(sampler)
    except TypeError:
        raise ProbeSelectError(node_id, f"the SAMPLER input ({type(sampler).__name__}) is not a KSAMPLER, so it "
                                        "can't be stopped at a step.",
                               "connect KSamplerSelect or one of ComfyUI's Sampler... nodes.") from None
    if name in UNSPLITTABLE_SAMPLERS:
        raise ProbeSelectError(node_id, f"sampler {name} chooses its own steps and can't stop at a checkpoint.",
                               "select another sampler (euler, dpmpp_2m, ...) in KSamplerSelect.")
    return name


def validate_noise(node_id: str, noise, latent: dict) -> int:
    """The NOISE's seed; fails for a NOISE without one or one that draws nothing (DisableNoise)."""
    seed = getattr(noise, "seed", None)
    if not isinstance(seed, int) or isinstance(seed, bool) or not callable(getattr(noise, "generate_noise", None)):
        raise ProbeSelectError(node_id, f"the NOISE input ({type(noise).__name__}) has no seed, so the candidates "
                                        "can't be given seed, seed + 1, ...",
                               "connect RandomNoise.")
    drawn = noise.generate_noise({"samples": latent["samples"][:1]})
    if not torch.is_tensor(drawn) or not bool(drawn.abs().max() > 0):
        raise ProbeSelectError(node_id, "the NOISE input draws no noise (DisableNoise?), so every candidate would "
                                        "be the same image.",
                               "connect RandomNoise.")
    return seed


def validate_sigmas(node_id: str, sigmas) -> int:
    """The number of steps the SIGMAS describe (at least 2)."""
    if not torch.is_tensor(sigmas) or sigmas.ndim != 1 or sigmas.shape[0] < 3:
        count = sigmas.shape[0] - 1 if torch.is_tensor(sigmas) and sigmas.ndim == 1 else "no"
        raise ProbeSelectError(node_id, f"the SIGMAS describe {count} steps; a split run needs at least 2.",
                               "give a scheduler node (BasicScheduler, ...) more steps, or a higher denoise.")
    return sigmas.shape[0] - 1


class ProbeSelectEarlySamplerCustom(io.ComfyNode):
    NODE_ID = "ProbeSelectEarlySamplerCustom"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Early Sampler (Custom)",
            category=CATEGORY,
            description="ProbeSelectEarlySampler for SamplerCustomAdvanced graphs: runs N candidates (RandomNoise seed "
                        "+ i each) with the given guider, sampler and sigmas to the checkpoint step in one batch.",
            inputs=[
                io.Noise.Input("noise", tooltip="RandomNoise: candidate i uses its seed + i, drawn as "
                                                "RandomNoise(seed + i) draws it for one image."),
                io.Guider.Input("guider", tooltip="CFGGuider, DualCFGGuider, BasicGuider (with FluxGuidance), ... "
                                                  "Put ProbeSelectTap on its model to capture activations."),
                io.Sampler.Input("sampler"),
                io.Sigmas.Input("sigmas", tooltip="The full schedule; the candidates stop part-way along it."),
                io.Latent.Input("latent_image", tooltip="Batch 1 (repeated for every candidate) or one row per "
                                                        "candidate."),
                io.Int.Input("candidates", default=5, min=1, max=4096, tooltip="N, the number of seeds started."),
                io.Float.Input("checkpoint_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps run for every candidate before scoring."),
            ],
            outputs=[
                io.Latent.Output(display_name="early latent"),
                io.Latent.Output(display_name="x0 preview"),
                Activations.Output(display_name="activations"),
            ],
        )

    @classmethod
    def execute(cls, noise, guider, sampler, sigmas, latent_image, candidates, checkpoint_percent) -> io.NodeOutput:
        node_id = cls.NODE_ID
        if candidates < 1:
            raise ProbeSelectError(node_id, f"candidates is {candidates}.", "set candidates (N) to 1 or more.")
        if not 0.0 < checkpoint_percent < 1.0:
            raise ProbeSelectError(node_id, f"checkpoint_percent {checkpoint_percent} is outside (0, 1).",
                                   "use a ratio such as 0.2 (20% of the steps).")
        validate_guider(node_id, guider)
        name = validate_sampler(node_id, sampler)
        steps = validate_sigmas(node_id, sigmas)
        seed = validate_noise(node_id, noise, latent_image)
        validate_early(node_id, latent_image, candidates, steps, checkpoint_percent, name, seed)
        s = checkpoint_step(steps, checkpoint_percent)
        result = split_sampling.run_custom(guider, noise, sampler, sigmas, latent_image, candidates, s,
                                           callback=_progress(s))
        return early_output(guider.model_patcher, result)


class ProbeSelectResumeCustom(io.ComfyNode):
    NODE_ID = "ProbeSelectResumeCustom"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Resume (Custom)",
            category=CATEGORY,
            description="ProbeSelectResume for SamplerCustomAdvanced graphs: finishes the kept candidates with the "
                        "given guider and sampler. Seeds, noise state and sigmas come from the latent.",
            inputs=[
                io.Guider.Input("guider", tooltip="The guider of the early sampler (same model and settings)."),
                io.Sampler.Input("sampler", tooltip="The sampler of the early sampler."),
                io.Latent.Input("latent", tooltip="The kept output of ProbeSelectTopK."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional: the early sampler's sigmas, checked against the latent's."),
                io.Float.Input("until_percent", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip=UNTIL_TOOLTIP),
            ],
            outputs=resume_outputs(),
        )

    @classmethod
    def validate_inputs(cls, until_percent: float | None = None) -> bool | str:
        return until_percent_problem(cls.NODE_ID, until_percent)

    @classmethod
    def execute(cls, guider, sampler, latent, sigmas: Optional[torch.Tensor] = None,
                until_percent: float = 1.0) -> io.NodeOutput:
        node_id = cls.NODE_ID
        run = validate_resumable(node_id, latent)
        validate_guider(node_id, guider)
        validate_sampler(node_id, sampler)
        until = until_step_or_fail(node_id, run, until_percent)
        try:
            if until < run.steps:
                result = split_sampling.advance_custom(guider, sampler, latent, until, sigmas,
                                                       callback=_progress(until - run.stop_step))
                return early_output(guider.model_patcher, result)
            finished = split_sampling.resume_custom(guider, sampler, latent, sigmas,
                                                    callback=_progress(run.steps - run.stop_step))
        except split_sampling.ScheduleMismatchError:
            raise ProbeSelectError(node_id, "the sigmas given differ from those the candidates were started with.",
                                   "connect the early sampler's SIGMAS, or leave the input empty.") from None
        except split_sampling.SamplerMismatchError as error:
            raise ProbeSelectError(node_id, f"{error}.", "connect the early sampler's SAMPLER.") from None
        return io.NodeOutput(finished, finished, None)
