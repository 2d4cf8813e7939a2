"""Image-set metric nodes: load the FID Inception, compute FID / KID / IS / precision-recall /
density-coverage / CMMD / CLIPScore of generated images against a reference, save reference stats.

The math and the feature handling live in `probe_select.probes.analysis`; these nodes resolve files and folders,
drive the progress bar and Cancel, and turn every bad input into a `ProbeSelectError` naming the
node. CLIP features come from a Probe-Select CLIPScore evaluator (PS_EVALUATOR), so open_clip
weights are loaded in one place. Nothing is downloaded.

Folders: the FID Inception weights are read from `models/inception` (registered here); reference
statistics are written to and listed from `output/probe_select_reference`.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..probes.analysis import features as feat
from ..probes.analysis.image_metrics import MetricValue
from ..probes.analysis.inception import (
    INCEPTION_ALT_FILENAME,
    INCEPTION_FILENAME,
    InceptionWeightsError,
    load_fid_inception,
    missing_weights_fix,
)
from ..probes.analysis.report import (
    METRIC_NEEDS,
    METRICS,
    MetricInputError,
    MetricSettings,
    compute_metrics,
    format_report,
)
from ..probes.evaluators import CLIPScoreEvaluator
from .errors import ProbeSelectError
from .nodes_evaluators import resolve_device
from .engine.analysis import ANALYSIS_CATEGORY
from .folders import INCEPTION_FOLDER, model_files
from .types import EvaluatorModel

log = logging.getLogger(__name__)

REFERENCE_DIR = "probe_select_reference"
NO_FILE = "none"

FeatureExtractorType = io.Custom("PS_FEATURE_EXTRACTOR")     # probe_select.probes.analysis.features.FeatureExtractor

METRIC_LABELS = {
    "fid": "FID (Inception; needs a reference)",
    "kid": "KID (Inception; needs a reference)",
    "inception_score": "Inception Score (Inception)",
    "precision_recall": "precision / recall, k=3 (Inception; needs a reference)",
    "density_coverage": "density / coverage, k=5 (Inception; needs a reference)",
    "cmmd": "CMMD (CLIP; needs a reference)",
    "clip_score": "CLIPScore vs the prompts (CLIP)",
}
FLOAT_OUTPUTS = ("fid", "kid", "inception_score", "precision", "recall", "density", "coverage", "cmmd", "clip_score")


def inception_files() -> list[str]:
    names = model_files(INCEPTION_FOLDER)
    preferred = [n for n in names if os.path.basename(n) in (INCEPTION_FILENAME, INCEPTION_ALT_FILENAME)]
    others = [n for n in names if n not in preferred]
    return preferred + others + [NO_FILE] if names else [NO_FILE]


def reference_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), REFERENCE_DIR)


def reference_files() -> list[str]:
    folder = reference_dir()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")) if os.path.isdir(folder) else []
    return [NO_FILE] + names


def plain_name(node_id: str, name: str, example: str) -> str:
    """A file name without folders (``.safetensors`` added)."""
    name = (name or "").strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ProbeSelectError(node_id, f"name '{name}' is not a plain file name.", f"e.g. {example}.")
    return name if name.endswith(".safetensors") else name + ".safetensors"


def resolve_image_folder(node_id: str, folder: str, what: str) -> list:
    """Image files of a folder (absolute, or relative to ComfyUI's input folder)."""
    folder = (folder or "").strip()
    path = folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)
    try:
        files = feat.list_image_files(path)
    except FileNotFoundError:
        raise ProbeSelectError(node_id, f"the {what} folder '{path}' does not exist.",
                               "give an absolute folder, or one relative to ComfyUI/input.") from None
    if not files:
        raise ProbeSelectError(node_id, f"the {what} folder '{path}' holds no images "
                                        f"({', '.join(feat.IMAGE_EXTENSIONS)}).", "point it at a folder of images.")
    return files


class ImageSource:
    """Generated or reference images: an IMAGE batch or a folder's files, streamed in batches."""

    def __init__(self, images: Optional[torch.Tensor] = None, files: Optional[list] = None):
        self.images = images
        self.files = files or []

    def __len__(self) -> int:
        return int(self.images.shape[0]) if self.images is not None else len(self.files)

    def batches(self, batch_size: int):
        if self.images is not None:
            return [self.images]
        return feat.iter_image_folder(self.files, batch_size)


def generated_source(node_id: str, images, image_folder: str) -> ImageSource:
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ProbeSelectError(node_id, f"images must be an IMAGE batch [B, H, W, 3], got {shape}.",
                                   "connect the IMAGE output of VAE Decode or Load Image.")
        return ImageSource(images=images)
    if (image_folder or "").strip():
        return ImageSource(files=resolve_image_folder(node_id, image_folder, "generated images"))
    raise ProbeSelectError(node_id, "no generated images: connect images or give an image_folder.",
                           "connect an IMAGE batch, or type the folder of the generated images.")


class ImageProgress:
    """A ProgressBar over all images of a run (generated, then reference) that also raises when the
    user presses Cancel. Call it as ``progress(done, total)`` within one image set; ``advance(n)``
    after a set of n images."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self.offset = 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def __call__(self, done: int, _total: int) -> None:
        self.bar.update_absolute(self.offset + done, self.total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def advance(self, count: int) -> None:
        self.offset += int(count)


def clip_extractor(node_id: str, clip) -> Optional[feat.ClipExtractor]:
    if clip is None:
        return None
    if not isinstance(clip, CLIPScoreEvaluator):
        raise ProbeSelectError(node_id, f"the clip input is a {type(clip).__name__}, not a CLIPScore evaluator.",
                               "connect Probe-Select CLIPScore Evaluator (an open_clip model).")
    return feat.ClipExtractor.from_evaluator(clip)


def check_inception(node_id: str, inception) -> Optional[feat.FeatureExtractor]:
    if inception is None:
        return None
    if not isinstance(inception, feat.FeatureExtractor) or inception.kind != "inception":
        raise ProbeSelectError(node_id, f"the inception input is a {type(inception).__name__}, not an Inception "
                                        "feature extractor.", "connect Probe-Select Load FID Inception.")
    return inception


def extract(node_id: str, source: ImageSource, extractors: list, resize_mode: str, batch_size: int,
            progress, clip_evaluator=None) -> dict:
    """Features of one image set; the CLIP model is moved to its compute device only meanwhile."""
    try:
        if clip_evaluator is not None:
            # The evaluator keeps its model on the offload device between uses; borrow its device switch.
            with clip_evaluator._on_device():
                return feat.extract_features(source.batches(batch_size), extractors, resize_mode, len(source),
                                             batch_size, progress)
        return feat.extract_features(source.batches(batch_size), extractors, resize_mode, len(source), batch_size,
                                     progress)
    except (ValueError, OSError) as e:
        raise ProbeSelectError(node_id, f"could not read the images: {e}",
                               "use RGB images (PNG, JPEG, WebP, BMP); any sizes are resized as documented.") from None


def expand_prompts(node_id: str, prompts: str, count: int) -> list[str]:
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if not lines:
        raise ProbeSelectError(node_id, "clip_score needs the prompts of the images, but prompts is empty.",
                               "type the prompt (one for all images, or one line per image).")
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ProbeSelectError(node_id, f"{len(lines)} prompt lines for {count} images.",
                               "give one prompt for all images, or exactly one line per image.")
    return lines


# ---- nodes ----------------------------------------------------------------------------------


class ProbeSelectLoadInception(io.ComfyNode):
    NODE_ID = "ProbeSelectLoadInception"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Load FID Inception",
            category=ANALYSIS_CATEGORY,
            description=f"Loads the standard FID InceptionV3 ({INCEPTION_FILENAME}) from models/inception, checked "
                        "by its SHA-256 so that FID/KID/IS are comparable with published values. Never downloads.",
            inputs=[
                io.Combo.Input("weights", options=inception_files(),
                               tooltip=f"{INCEPTION_FILENAME} in ComfyUI/models/inception."),
                io.Combo.Input("device", options=["auto", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's device (the GPU when there is one)."),
            ],
            outputs=[FeatureExtractorType.Output(display_name="inception")],
        )

    @classmethod
    def execute(cls, weights, device) -> io.NodeOutput:
        node_id = "ProbeSelectLoadInception"
        path = None
        if weights and weights != NO_FILE:
            path = folder_paths.get_full_path(INCEPTION_FOLDER, weights)
            if path is None:
                raise ProbeSelectError(node_id, f"weights file '{weights}' is not in models/inception.",
                                       missing_weights_fix())
        compute, _offload = resolve_device(device)
        try:
            model = load_fid_inception(path, device=compute)
        except InceptionWeightsError as e:
            raise ProbeSelectError(node_id, e.problem, e.fix) from None
        return io.NodeOutput(feat.InceptionExtractor(model, "standard-6726825d", device=compute))


def _metric_inputs() -> list:
    defaults = {"fid": True, "kid": True, "inception_score": False, "precision_recall": False,
                "density_coverage": False, "cmmd": False, "clip_score": False}
    return [io.Boolean.Input(name, default=defaults[name], tooltip=METRIC_LABELS[name]) for name in METRICS]


def _source_inputs() -> list:
    return [
        io.Image.Input("images", optional=True, tooltip="The images to measure (or leave empty and give a folder)."),
        io.String.Input("image_folder", default="", optional=True,
                        tooltip="A folder of images instead of the images input (absolute, or relative to "
                                "ComfyUI/input); read in batches, so 10,000 images fit in memory as features only."),
        FeatureExtractorType.Input("inception", optional=True,
                                   tooltip="From Probe-Select Load FID Inception: FID, KID, IS, P/R, D/C."),
        EvaluatorModel.Input("clip", optional=True,
                             tooltip="From Probe-Select CLIPScore Evaluator (open_clip): CMMD and CLIPScore."),
    ]


def _resize_input():
    return io.Combo.Input("resize_mode", options=list(feat.RESIZE_MODES), default="clean",
                          tooltip="clean: PIL bicubic on float pixels (as clean-fid). legacy: uint8 then torch "
                                  "bilinear (as pytorch-fid). FID values differ between the two; compare like "
                                  "with like.")


class ProbeSelectImageMetrics(io.ComfyNode):
    NODE_ID = "ProbeSelectImageMetrics"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Image Metrics",
            category=ANALYSIS_CATEGORY,
            description="FID, KID, Inception Score, precision/recall, density/coverage, CMMD and CLIPScore of the "
                        "images against a reference folder or saved reference statistics. Each number comes with its "
                        "sample counts and a warning below the counts where it is unreliable. Unselected or "
                        "uncomputed outputs are NaN.",
            inputs=[
                *_source_inputs(),
                io.String.Input("reference_folder", default="", optional=True,
                                tooltip="A folder of reference images (absolute, or relative to ComfyUI/input)."),
                io.Combo.Input("reference_stats", options=reference_files(), default=NO_FILE, optional=True,
                               tooltip="Reference statistics saved by Probe-Select Save Reference Stats "
                                       "(output/probe_select_reference); used instead of reference_folder."),
                io.String.Input("prompts", multiline=True, default="", optional=True,
                                tooltip="For CLIPScore: one prompt for all images, or one line per image."),
                *_metric_inputs(),
                _resize_input(),
                io.Int.Input("batch_size", default=16, min=1, max=512, tooltip="Images per forward pass."),
                io.Int.Input("kid_subset_size", default=1000, min=2, max=100000,
                             tooltip="KID subset size (lowered to the smaller set's size when that is smaller)."),
                io.Int.Input("is_splits", default=10, min=1, max=100, tooltip="Inception Score splits."),
            ],
            outputs=[io.String.Output(display_name="report")]
                    + [io.Float.Output(display_name=name) for name in FLOAT_OUTPUTS],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, fid=True, kid=True, inception_score=False, precision_recall=False,
                        density_coverage=False, cmmd=False, clip_score=False, resize_mode="clean") -> bool | str:
        if not any((fid, kid, inception_score, precision_recall, density_coverage, cmmd, clip_score)):
            return "[ProbeSelectImageMetrics] no metric is selected. Fix: switch on at least one metric."
        if resize_mode not in feat.RESIZE_MODES:
            return f"[ProbeSelectImageMetrics] resize_mode must be one of {', '.join(feat.RESIZE_MODES)}."
        return True

    @classmethod
    def execute(cls, images=None, image_folder="", inception=None, clip=None, reference_folder="",
                reference_stats=NO_FILE, prompts="", fid=True, kid=True, inception_score=False,
                precision_recall=False, density_coverage=False, cmmd=False, clip_score=False, resize_mode="clean",
                batch_size=16, kid_subset_size=1000, is_splits=10) -> io.NodeOutput:
        node_id = "ProbeSelectImageMetrics"
        selected = [name for name, on in zip(METRICS, (fid, kid, inception_score, precision_recall, density_coverage,
                                                       cmmd, clip_score)) if on]
        if not selected:
            raise ProbeSelectError(node_id, "no metric is selected.", "switch on at least one metric.")
        inception = check_inception(node_id, inception)
        clip_features = clip_extractor(node_id, clip)
        kinds = {METRIC_NEEDS[m][0] for m in selected}
        extractors = []
        for kind, extractor, loader in (("inception", inception, "Probe-Select Load FID Inception"),
                                        ("clip", clip_features, "Probe-Select CLIPScore Evaluator")):
            if kind in kinds:
                if extractor is None:
                    needing = ", ".join(m for m in selected if METRIC_NEEDS[m][0] == kind)
                    raise ProbeSelectError(node_id, f"{needing} need(s) {kind} features, but the {kind} input is not "
                                                    "connected.",
                                           f"connect {loader} to '{kind}', or unselect {needing}.")
                extractors.append(extractor)
        generated = generated_source(node_id, images, image_folder)
        needs_reference = any(METRIC_NEEDS[m][2] for m in selected)
        stats, reference = None, None
        if needs_reference:
            stats, reference = cls._reference(node_id, reference_stats, reference_folder)
        prompt_list = expand_prompts(node_id, prompts, len(generated)) if "clip_score" in selected else None

        total = len(generated) + (len(reference) if reference is not None else 0)
        progress = ImageProgress(total)
        clip_owner = clip if clip_features is not None and clip_features in extractors else None
        gen = extract(node_id, generated, extractors, resize_mode, batch_size, progress, clip_owner)
        progress.advance(len(generated))
        ref_features, fid_stats, reference_label = None, None, ""
        if stats is not None:
            ref_features = {}
            for extractor in extractors:
                if any(METRIC_NEEDS[m][2] and METRIC_NEEDS[m][0] == extractor.kind for m in selected):
                    try:
                        ref_features[extractor.kind] = stats.require(extractor, resize_mode)
                    except feat.ReferenceStatsError as e:
                        raise ProbeSelectError(node_id, e.problem, e.fix) from None
            fid_stats = stats.fid_statistics
            reference_label = f"{reference_stats} ({', '.join(f'{k}: {n}' for k, n in stats.counts.items())} images"\
                              f"{'; ' + stats.source if stats.source else ''})"
        elif reference is not None:
            ref_extractors = [e for e in extractors
                              if any(METRIC_NEEDS[m][2] and METRIC_NEEDS[m][0] == e.kind for m in selected)]
            ref_acc = extract(node_id, reference, ref_extractors, resize_mode, batch_size, progress,
                              clip_owner if clip_features in ref_extractors else None)
            ref_features = {kind: acc.as_dict() for kind, acc in ref_acc.items()}
            reference_label = f"folder {reference_folder} ({len(reference)} images)"

        text_embeddings = None
        if prompt_list is not None:
            with clip._on_device():
                text_embeddings = clip_features.encode_text(prompt_list)
        settings = MetricSettings(kid_subset_size=kid_subset_size, is_splits=is_splits)
        try:
            values = compute_metrics(selected, {k: a.as_dict() for k, a in gen.items()}, ref_features,
                                     text_embeddings, settings, fid_stats)
        except MetricInputError as e:
            raise ProbeSelectError(node_id, e.problem, e.fix) from None
        except ValueError as e:
            raise ProbeSelectError(node_id, str(e)) from None
        report = format_report(values, feat.RESIZE_DESCRIPTIONS[resize_mode],
                               {e.kind: e.extractor_id for e in extractors}, reference_label)
        for value in values:
            if value.warning:
                log.warning("%s: %s", node_id, value.warning)
        return io.NodeOutput(report, *float_outputs(values), ui=ui.PreviewText(report))

    @staticmethod
    def _reference(node_id: str, reference_stats: str, reference_folder: str):
        if reference_stats and reference_stats != NO_FILE:
            path = os.path.join(reference_dir(), reference_stats)
            try:
                return feat.load_reference_stats(path), None
            except feat.ReferenceStatsError as e:
                raise ProbeSelectError(node_id, e.problem, e.fix) from None
        if (reference_folder or "").strip():
            return None, ImageSource(files=resolve_image_folder(node_id, reference_folder, "reference"))
        raise ProbeSelectError(node_id, "the selected metrics compare with a reference, but neither reference_stats "
                                        "nor reference_folder is given.",
                               "select saved reference statistics or type a reference image folder, or select "
                               "only Inception Score / CLIPScore.")


def float_outputs(values: list[MetricValue]) -> list[float]:
    by_name = {v.name: v.value for v in values}
    return [float(by_name.get(name, math.nan)) for name in FLOAT_OUTPUTS]


class ProbeSelectSaveReferenceStats(io.ComfyNode):
    NODE_ID = "ProbeSelectSaveReferenceStats"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Save Reference Stats",
            category=ANALYSIS_CATEGORY,
            description="Extracts the reference set's features once (Inception and/or CLIP) and saves them with the "
                        "FID mean/covariance to output/probe_select_reference/<name>.safetensors, named with the "
                        "extractor and resize mode, for Probe-Select Image Metrics.",
            inputs=[
                *_source_inputs(),
                io.String.Input("name", default="reference", tooltip="File name (without folders)."),
                _resize_input(),
                io.Int.Input("batch_size", default=16, min=1, max=512),
            ],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, name, resize_mode, batch_size, images=None, image_folder="", inception=None,
                clip=None) -> io.NodeOutput:
        node_id = "ProbeSelectSaveReferenceStats"
        file_name = plain_name(node_id, name, "coco_val_5k")
        extractors = [e for e in (check_inception(node_id, inception), clip_extractor(node_id, clip)) if e is not None]
        if not extractors:
            raise ProbeSelectError(node_id, "no feature extractor is connected.",
                                   "connect Probe-Select Load FID Inception and/or a CLIPScore evaluator.")
        source = generated_source(node_id, images, image_folder)
        progress = ImageProgress(len(source))
        clip_owner = clip if clip is not None else None
        accumulators = extract(node_id, source, extractors, resize_mode, batch_size, progress, clip_owner)
        folder = reference_dir()
        os.makedirs(folder, exist_ok=True)
        label = image_folder if images is None else f"IMAGE batch of {len(source)}"
        path = feat.save_reference_stats(os.path.join(folder, file_name), accumulators, resize_mode, source=label)
        lines = [f"saved {path}", f"images: {len(source)}", f"resize: {feat.RESIZE_DESCRIPTIONS[resize_mode]}"]
        lines += [f"{kind} extractor: {acc.extractor_id}" for kind, acc in accumulators.items()]
        if len(source) < 2048:
            lines.append(f"warning: {len(source)} reference images; FID needs at least 2,048 (precision/recall 5,000).")
        report = "\n".join(lines)
        return io.NodeOutput(report, ui=ui.PreviewText(report))


IMAGE_METRICS_NODES: list[type[io.ComfyNode]] = [
    ProbeSelectLoadInception,
    ProbeSelectImageMetrics,
    ProbeSelectSaveReferenceStats,
]
