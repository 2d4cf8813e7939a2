"""Evaluator nodes: load an image evaluator once, score finished images, or wrap another pack's scores.

The work lives in `probes.evaluators`; these nodes resolve files in ComfyUI's model folders, pick
the device, and turn `EvaluatorUnavailable` into a `ProbeSelectError` that names the node. Loader
nodes output the evaluator object (PS_EVALUATOR): ComfyUI caches node outputs, so the model is
loaded once and reused until its inputs change.

Weights are looked up in `models/evaluators` (registered by `folders.register_model_folders()`) and,
for CLIPScore, also in `models/clip`. Nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..probes.evaluators import (
    CLIPScoreEvaluator,
    EvaluatorUnavailable,
    HPSv2Evaluator,
    ImageEvaluator,
    ImageRewardEvaluator,
    ImageScores,
    PickScoreEvaluator,
    scores_from_floats,
)
from .errors import ProbeSelectError
from .folders import EVALUATOR_EXTENSIONS, EVALUATORS_FOLDER, model_files
from .types import CATEGORY, EvaluatorModel, ImageScoresType

log = logging.getLogger(__name__)

EVAL_CATEGORY = f"{CATEGORY}/evaluate"
NO_FILE = "none"
CLIP_MODELS = ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-H-14",
               "ViT-bigG-14"]
DEVICES = ["auto", "cpu"]


def weight_files(folders: tuple[str, ...] = (EVALUATORS_FOLDER,)) -> list[str]:
    names: list[str] = []
    for folder in folders:
        names.extend(n for n in model_files(folder) if os.path.splitext(n)[1].lower() in EVALUATOR_EXTENSIONS)
    return [NO_FILE] + sorted(dict.fromkeys(names))


def resolve_weights(node_id: str, name: str, folders: tuple[str, ...], what: str) -> Optional[str]:
    """Full path of a file picked in a weights combo; None for 'none'."""
    if not name or name == NO_FILE:
        return None
    for folder in folders:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path:
            return path
    shown = " or ".join(f"models/{f}" for f in folders)
    raise ProbeSelectError(node_id, f"weights file '{name}' is not in {shown}.",
                           f"put {what} in ComfyUI/{shown.split(' or ')[0]} and refresh the page.")


def resolve_device(device: str):
    """(compute device, offload device): 'auto' computes on ComfyUI's device and keeps the model on
    the CPU between runs, so it does not hold GPU memory while the diffusion model samples."""

    if device == "cpu":
        return torch.device("cpu"), None

    compute = comfy.model_management.get_torch_device()
    return compute, (torch.device("cpu") if compute.type != "cpu" else None)


def build_or_fail(node_id: str, factory: Callable[[], ImageEvaluator]) -> ImageEvaluator:
    try:
        return factory()
    except EvaluatorUnavailable as e:
        raise ProbeSelectError(node_id, e.problem, e.fix) from None


def _device_input():
    return io.Combo.Input("device", options=DEVICES, default="auto",
                          tooltip="auto: compute on ComfyUI's device and keep the model in CPU memory between runs.")


class ProbeSelectCLIPScore(io.ComfyNode):
    NODE_ID = "ProbeSelectCLIPScore"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select CLIPScore Evaluator",
            category=EVAL_CATEGORY,
            description="Loads an open_clip model for CLIPScore = 100 * max(cos(image, text), 0), per image. "
                        "Weights come from models/evaluators or models/clip, or from your open_clip / Hugging Face "
                        "cache by pretrained tag; nothing is downloaded.",
            inputs=[
                io.Combo.Input("model_name", options=CLIP_MODELS, default="ViT-B-32",
                               tooltip="open_clip architecture of the weights. -quickgelu: OpenAI's original weights."),
                io.Combo.Input("weights", options=weight_files((EVALUATORS_FOLDER, "clip")),
                               tooltip="A full open_clip checkpoint (image and text towers, .safetensors preferred) "
                                       "in models/evaluators or models/clip. Text-encoder-only files (clip_l, ...) "
                                       "do not work."),
                _device_input(),
                io.String.Input("pretrained_tag", default="", optional=True,
                                tooltip="Used when weights is 'none': an open_clip pretrained tag (e.g. "
                                        "laion2b_s34b_b79k) whose weights are already in your cache."),
            ],
            outputs=[EvaluatorModel.Output(display_name="evaluator")],
        )

    @classmethod
    def execute(cls, model_name, weights, device, pretrained_tag="") -> io.NodeOutput:
        node_id = cls.NODE_ID
        path = resolve_weights(node_id, weights, (EVALUATORS_FOLDER, "clip"), f"the {model_name} checkpoint")
        source = path or (pretrained_tag or "").strip() or None
        compute, offload = resolve_device(device)
        evaluator = build_or_fail(node_id, lambda: CLIPScoreEvaluator(model_name, weights=source, device=compute,
                                                                      offload_device=offload))
        return io.NodeOutput(evaluator)


class ProbeSelectImageReward(io.ComfyNode):
    NODE_ID = "ProbeSelectImageReward"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select ImageReward Evaluator",
            category=EVAL_CATEGORY,
            description="Loads ImageReward v1.0 (needs `pip install image-reward`). Put ImageReward.safetensors and "
                        "med_config.json in models/evaluators. Prompts are read up to 35 tokens.",
            inputs=[
                io.Combo.Input("weights", options=weight_files(),
                               tooltip="ImageReward.safetensors (ImageReward.pt of THUDM/ImageReward, converted); "
                                       "med_config.json must sit next to it."),
                _device_input(),
            ],
            outputs=[EvaluatorModel.Output(display_name="evaluator")],
        )

    @classmethod
    def execute(cls, weights, device) -> io.NodeOutput:
        node_id = cls.NODE_ID
        path = resolve_weights(node_id, weights, (EVALUATORS_FOLDER,), "ImageReward.safetensors")
        compute, offload = resolve_device(device)
        evaluator = build_or_fail(node_id, lambda: ImageRewardEvaluator(path, device=compute, offload_device=offload))
        return io.NodeOutput(evaluator)


class ProbeSelectHPSv2(io.ComfyNode):
    NODE_ID = "ProbeSelectHPSv2"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select HPSv2 Evaluator",
            category=EVAL_CATEGORY,
            description="Loads Human Preference Score v2.0 or v2.1 (needs `pip install hpsv2`); score = 100 * cosine. "
                        "v2.0 and v2.1 scores are not comparable.",
            inputs=[
                io.Combo.Input("weights", options=weight_files(),
                               tooltip="HPS_v2.1_compressed.safetensors or HPS_v2_compressed.safetensors "
                                       "(xswu/HPSv2, converted) in models/evaluators."),
                io.Combo.Input("version", options=["v2.1", "v2.0"], default="v2.1",
                               tooltip="The version of the weights file."),
                _device_input(),
            ],
            outputs=[EvaluatorModel.Output(display_name="evaluator")],
        )

    @classmethod
    def execute(cls, weights, version, device) -> io.NodeOutput:
        node_id = cls.NODE_ID
        path = resolve_weights(node_id, weights, (EVALUATORS_FOLDER,), f"the HPS {version} weights")
        compute, offload = resolve_device(device)
        evaluator = build_or_fail(node_id, lambda: HPSv2Evaluator(path, version=version, device=compute,
                                                                  offload_device=offload))
        return io.NodeOutput(evaluator)


def _local_or_cached(name: str) -> str:
    """A folder under models/evaluators, an absolute folder, or a Hugging Face repo id (cache only)."""
    name = (name or "").strip()
    if not name or os.path.isabs(name):
        return name
    try:
        roots = folder_paths.get_folder_paths(EVALUATORS_FOLDER)
    except KeyError:
        roots = []
    for root in roots:
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    return name


class ProbeSelectPickScore(io.ComfyNode):
    NODE_ID = "ProbeSelectPickScore"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select PickScore Evaluator",
            category=EVAL_CATEGORY,
            description="Loads PickScore v1 with transformers; score = logit_scale * cosine per image (never the "
                        "softmax over the batch). Local folders or the Hugging Face cache only.",
            inputs=[
                io.String.Input("model", default="yuvalkirstain/PickScore_v1",
                                tooltip="A folder under models/evaluators, an absolute folder, or a Hugging Face repo "
                                        "id already in your cache."),
                io.String.Input("processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                                tooltip="Where the CLIP processor (preprocessor_config.json, tokenizer files) is: "
                                        "same forms as model; empty = the model folder."),
                _device_input(),
            ],
            outputs=[EvaluatorModel.Output(display_name="evaluator")],
        )

    @classmethod
    def execute(cls, model, processor, device) -> io.NodeOutput:
        node_id = cls.NODE_ID
        model_dir = _local_or_cached(model)
        processor_dir = _local_or_cached(processor) or None
        compute, offload = resolve_device(device)
        evaluator = build_or_fail(node_id, lambda: PickScoreEvaluator(model_dir, processor_dir, device=compute,
                                                                      offload_device=offload))
        return io.NodeOutput(evaluator)


def image_scores_text(scores: ImageScores) -> str:
    lines = [f"{scores.evaluator}, per image (higher is better):"]
    best = int(scores.order()[0]) if len(scores) else -1
    for i, value in enumerate(scores.tolist()):
        lines.append(f"image {i}: {value:.4f}" + ("  best" if i == best else ""))
    return "\n".join(lines)


def _make_room(evaluator: ImageEvaluator) -> None:
    """Ask ComfyUI to free GPU memory for the evaluator (it does not manage our model)."""
    device = getattr(evaluator, "device", None)
    if device is None or getattr(device, "type", "cpu") == "cpu" or not hasattr(evaluator, "parameter_bytes"):
        return

    comfy.model_management.free_memory(int(evaluator.parameter_bytes() * 1.5) + (512 << 20), device)


class ProbeSelectEvaluateImages(io.ComfyNode):
    NODE_ID = "ProbeSelectEvaluateImages"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Evaluate Images",
            category=EVAL_CATEGORY,
            description="Scores each image of the batch against the prompt with an evaluator. One score per image, "
                        "never normalised across the batch.",
            inputs=[
                io.Image.Input("images"),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt the images were generated from (shared by the batch)."),
                EvaluatorModel.Input("evaluator", tooltip="From a Probe-Select evaluator loader."),
            ],
            outputs=[ImageScoresType.Output(display_name="image scores")],
        )

    @classmethod
    def execute(cls, images, prompt, evaluator) -> io.NodeOutput:
        node_id = cls.NODE_ID
        if not callable(getattr(evaluator, "score", None)):
            raise ProbeSelectError(node_id, f"the evaluator input is a {type(evaluator).__name__}, not an evaluator.",
                                   "connect a Probe-Select evaluator loader (CLIPScore, ImageReward, HPSv2, PickScore).")

        total = int(images.shape[0])
        bar = comfy.utils.ProgressBar(total)

        def progress(done: int, n: int) -> None:
            bar.update_absolute(done, n)
            comfy.model_management.throw_exception_if_processing_interrupted()

        _make_room(evaluator)
        try:
            scores = evaluator.score(images, prompt, progress=progress)
        except ValueError as e:
            raise ProbeSelectError(node_id, str(e)) from None
        return io.NodeOutput(scores, ui=ui.PreviewText(image_scores_text(scores)))


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class ProbeSelectScoresFromFloats(io.ComfyNode):
    NODE_ID = "ProbeSelectScoresFromFloats"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Scores From Floats",
            category=EVAL_CATEGORY,
            description="Turns the FLOAT scores of any other pack's scorer (one per image, a list or single values) "
                        "into Probe-Select image scores.",
            inputs=[
                io.Float.Input("scores", force_input=True,
                               tooltip="One float per image, in batch order; higher is better."),
                io.String.Input("evaluator_name", default="external",
                                tooltip="What produced the scores, e.g. aesthetic-v2.5. Kept with the scores."),
                io.String.Input("prompt", multiline=True, default=""),
            ],
            outputs=[ImageScoresType.Output(display_name="image scores")],
            is_input_list=True,
        )

    @classmethod
    def execute(cls, scores, evaluator_name, prompt) -> io.NodeOutput:
        node_id = cls.NODE_ID
        names = _as_list(evaluator_name)
        prompts = [str(p) for p in _as_list(prompt)]
        try:
            result = scores_from_floats(_as_list(scores), names[0] if names else "", prompts)
        except (ValueError, TypeError) as e:
            raise ProbeSelectError(node_id, str(e), "connect one finite FLOAT per image, a named evaluator, and one "
                                                    "prompt (or one per image).") from None
        return io.NodeOutput(result, ui=ui.PreviewText(image_scores_text(result)))


EVALUATOR_NODES: list[type[io.ComfyNode]] = [
    ProbeSelectCLIPScore,
    ProbeSelectImageReward,
    ProbeSelectHPSv2,
    ProbeSelectPickScore,
    ProbeSelectEvaluateImages,
    ProbeSelectScoresFromFloats,
]
