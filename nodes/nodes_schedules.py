"""ProbeSelectScheduleInspector: sigma, signal fraction and log-SNR of schedules, with the checkpoint marked."""
from __future__ import annotations

import math

import comfy.model_sampling
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..probes.analysis import schedules
from .engine.analysis import ANALYSIS_CATEGORY, parse_name_list, pil_to_image
from .errors import ProbeSelectError, problem_or_true

NODE_ID = "ProbeSelectScheduleInspector"


def schedule_kind(model) -> str:
    """FLOW for rectified-flow models (SD3, Flux, ...: CONST sampling), VP for eps / v / EDM models."""
    sampling = model.get_model_object("model_sampling")
    return schedules.FLOW if isinstance(sampling, comfy.model_sampling.CONST) else schedules.VP


def shift_text(model) -> str:
    """The model's flow shift as the factor that multiplies t (Flux stores log(shift) as `shift`)."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        return f", shift exp({sampling.shift:.3g}) = {math.exp(sampling.shift):.3g}"
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return f", shift {sampling.shift:.3g}"
    return ""


def check_scheduler_names(node_id: str, scheduler_names: list[str]) -> None:
    for name in scheduler_names:
        if name not in comfy.samplers.SCHEDULER_NAMES:
            raise ProbeSelectError(node_id, f"unknown scheduler '{name}'.",
                                   f"use a comma-separated list of: {', '.join(comfy.samplers.SCHEDULER_NAMES)}.")


def model_schedules(node_id: str, model, label: str, scheduler_names: list[str], steps: int) -> list:
    sampling = model.get_model_object("model_sampling")
    kind = schedule_kind(model)
    curves = []
    check_scheduler_names(node_id, scheduler_names)
    for name in scheduler_names:
        sigmas = comfy.samplers.calculate_sigmas(sampling, name, steps)
        curves.append(schedules.ScheduleCurves(f"{label}{name}", kind, sigmas.cpu()))
    return curves


class ProbeSelectScheduleInspector(io.ComfyNode):
    NODE_ID = "ProbeSelectScheduleInspector"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Schedule Inspector",
            category=ANALYSIS_CATEGORY,
            description="Plots sigma, signal fraction (alpha_cumprod, or its flow analogue) and log-SNR per step for "
                        "several schedulers of a model (and optionally a second model or a SIGMAS input), marks the "
                        "Probe-Select checkpoint with the log-SNR it lands on, and summarises where each schedule "
                        "spends its steps.",
            inputs=[
                io.Model.Input("model", tooltip="Any family: eps, v-prediction or flow (with its shift)."),
                io.String.Input("schedulers", default="normal,karras,exponential",
                                tooltip="Comma-separated scheduler names, overlaid: "
                                        + ", ".join(comfy.samplers.SCHEDULER_NAMES)),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("checkpoint_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps done when Probe-Select scores (0.2 = 20%)."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="A custom schedule to overlay, read with the first model's kind."),
                io.Model.Input("model_2", optional=True, tooltip="A second model whose schedules are overlaid."),
            ],
            outputs=[io.Image.Output(display_name="plot"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def validate_inputs(cls, schedulers: str | None = None) -> bool | str:
        names = None if schedulers is None else parse_name_list(schedulers)     # None: a linked input
        return problem_or_true(check_scheduler_names, NODE_ID, names)

    @classmethod
    def execute(cls, model, schedulers: str, steps: int, checkpoint_percent: float, sigmas=None,
                model_2=None) -> io.NodeOutput:
        names = parse_name_list(schedulers)
        if not names and sigmas is None:
            raise ProbeSelectError(NODE_ID, "no scheduler named and no SIGMAS connected.",
                                   "write e.g. 'normal,karras' or connect a SIGMAS input.")
        if steps < 1:
            raise ProbeSelectError(NODE_ID, f"steps is {steps}.", "use 1 or more steps.")
        label_1 = "model 1: " if model_2 is not None else ""
        curves = model_schedules(NODE_ID, model, label_1, names, steps)
        if model_2 is not None:
            curves += model_schedules(NODE_ID, model_2, "model 2: ", names, steps)
        if sigmas is not None:
            custom = torch.as_tensor(sigmas).flatten().cpu()
            if custom.numel() < 2:
                raise ProbeSelectError(NODE_ID, f"the SIGMAS input has {custom.numel()} value(s).",
                                       "connect a schedule of at least two sigmas (one step).")
            curves.append(schedules.ScheduleCurves("sigmas input", schedule_kind(model), custom))
        header = f"model 1: {schedules.FLOW if schedule_kind(model) == schedules.FLOW else 'eps/v (VP)'}{shift_text(model)}"
        if model_2 is not None:
            header += f"; model 2: {schedule_kind(model_2)}{shift_text(model_2)}"
        summary = header + "\n" + schedules.summary_text(curves, checkpoint_percent)
        image = pil_to_image(schedules.schedule_plot(curves, checkpoint_percent))
        return io.NodeOutput(image, summary, ui=ui.PreviewText(summary))


SCHEDULE_NODES: list[type[io.ComfyNode]] = [ProbeSelectScheduleInspector]
