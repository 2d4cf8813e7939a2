"""OOD nodes: fit a reference (mean + Ledoit-Wolf covariance) on images' features or on latents,
and score new samples by Mahalanobis distance with their percentile within the reference.

The math lives in `probe_select.probes.analysis.ood`. Fits are written to `output/probe_select_ood/<name>.safetensors`
and also passed on as PS_OOD_REFERENCE, so a graph can fit and score in one run.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..probes.analysis import ood
from ..probes.analysis.features import FeatureExtractor
from .errors import ProbeSelectError
from .nodes_image_metrics import (
    ANALYSIS_CATEGORY,
    NO_FILE,
    FeatureExtractorType,
    ImageProgress,
    check_inception,
    clip_extractor,
    extract,
    generated_source,
    plain_name,
)
from .types import EvaluatorModel

log = logging.getLogger(__name__)

OOD_DIR = "probe_select_ood"
OODReferenceType = io.Custom("PS_OOD_REFERENCE")     # probe_select.probes.analysis.ood.OODReference
FEATURE_OF_KIND = {"inception": "pool", "clip": "embedding"}


def ood_dir() -> str:
    return os.path.join(folder_paths.get_output_directory(), OOD_DIR)


def ood_files() -> list[str]:
    folder = ood_dir()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")) if os.path.isdir(folder) else []
    return [NO_FILE] + names


def _inputs() -> list:
    return [
        io.Image.Input("images", optional=True, tooltip="Images, through the connected extractor."),
        io.String.Input("image_folder", default="", optional=True,
                        tooltip="A folder of images instead of the images input (absolute, or relative to "
                                "ComfyUI/input)."),
        FeatureExtractorType.Input("inception", optional=True,
                                   tooltip="Image features: the FID Inception pool (2048)."),
        EvaluatorModel.Input("clip", optional=True, tooltip="Image features: a CLIPScore evaluator's image embedding."),
        io.Latent.Input("latent", optional=True,
                        tooltip=f"Latents instead of images, average-pooled to {ood.LATENT_POOL}x{ood.LATENT_POOL} per "
                                "channel."),
    ]


def sample_features(node_id: str, images, image_folder: str, inception, clip, latent,
                    resize_mode: str = "clean", batch_size: int = 16) -> tuple[np.ndarray, str, int]:
    """(rows [N, D], what the rows are, N) from latents or from images through one extractor."""
    if latent is not None:
        if images is not None or (image_folder or "").strip():
            raise ProbeSelectError(node_id, "both a latent and images were given.", "connect one of them.")
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor):
            raise ProbeSelectError(node_id, "the latent input holds no 'samples' tensor.", "connect a LATENT.")
        try:
            rows = ood.latent_features(samples)
        except ValueError as e:
            raise ProbeSelectError(node_id, str(e), "connect an image or video LATENT.") from None
        return rows.double().numpy(), f"latent:pool{ood.LATENT_POOL}:channels{samples.shape[1]}", rows.shape[0]
    extractors: list[FeatureExtractor] = [e for e in (check_inception(node_id, inception),
                                                      clip_extractor(node_id, clip)) if e is not None]
    if len(extractors) != 1:
        raise ProbeSelectError(node_id, f"{len(extractors)} feature extractors are connected; images need exactly one.",
                               "connect either inception or clip (or give a latent instead of images).")
    extractor = extractors[0]
    source = generated_source(node_id, images, image_folder)
    progress = ImageProgress(len(source))
    accumulators = extract(node_id, source, extractors, resize_mode, batch_size, progress,
                           clip if extractor.kind == "clip" else None)
    rows = accumulators[extractor.kind].get(FEATURE_OF_KIND[extractor.kind])
    what = f"{extractor.extractor_id}:{FEATURE_OF_KIND[extractor.kind]}:{resize_mode}"
    return rows.double().numpy(), what, len(source)


def _resize_input():
    return io.Combo.Input("resize_mode", options=["clean", "legacy"], default="clean",
                          tooltip="How images are resized for the extractor (must match between fit and score).")


class ProbeSelectOODFit(io.ComfyNode):
    NODE_ID = "ProbeSelectOODFit"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select OOD Fit",
            category=ANALYSIS_CATEGORY,
            description="Fits a reference for out-of-distribution scores: mean and Ledoit-Wolf shrinkage covariance "
                        "of image features (Inception or CLIP) or pooled latents; saves it to "
                        f"output/{OOD_DIR}/<name>.safetensors. Warns below {ood.MIN_REFERENCE_SAMPLES} samples.",
            inputs=[
                *_inputs(),
                io.String.Input("name", default="ood_reference", tooltip="File name (without folders)."),
                _resize_input(),
            ],
            outputs=[OODReferenceType.Output(display_name="reference"), io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, name, resize_mode, images=None, image_folder="", inception=None, clip=None,
                latent=None) -> io.NodeOutput:
        node_id = "ProbeSelectOODFit"
        file_name = plain_name(node_id, name, "my_style_ood")
        rows, what, count = sample_features(node_id, images, image_folder, inception, clip, latent, resize_mode)
        if count < 2:
            raise ProbeSelectError(node_id, f"an OOD reference needs at least 2 samples, got {count}.",
                                   f"give at least {ood.MIN_REFERENCE_SAMPLES} reference images or latents.")
        reference = ood.fit_reference(rows, what)
        os.makedirs(ood_dir(), exist_ok=True)
        path = ood.save_reference(os.path.join(ood_dir(), file_name), reference)
        lines = [f"saved {path}", f"features: {what} ({reference.dim} dimensions)", f"reference samples: {count}",
                 f"Ledoit-Wolf shrinkage: {reference.shrinkage:.4f}",
                 f"reference scores (cross-fitted): median {np.median(reference.reference_scores):.4g}, "
                 f"99th percentile {np.percentile(reference.reference_scores, 99):.4g}"]
        if reference.warning:
            lines.append(f"warning: {reference.warning}")
        report = "\n".join(lines)
        return io.NodeOutput(reference, report, ui=ui.PreviewText(report))


class ProbeSelectOODScore(io.ComfyNode):
    NODE_ID = "ProbeSelectOODScore"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select OOD Score",
            category=ANALYSIS_CATEGORY,
            description="Mahalanobis distance of each sample to a fitted reference and its percentile within the "
                        "reference (99 = more unusual than 99% of the reference). Features must be the reference's "
                        "(same extractor and resize mode, or latents of the same channels).",
            inputs=[
                *_inputs(),
                OODReferenceType.Input("reference", optional=True, tooltip="From Probe-Select OOD Fit."),
                io.Combo.Input("reference_file", options=ood_files(), default=NO_FILE, optional=True,
                               tooltip=f"A saved fit in output/{OOD_DIR} (used when reference is not connected)."),
                _resize_input(),
            ],
            outputs=[io.String.Output(display_name="report"),
                     io.Float.Output(display_name="scores", is_output_list=True),
                     io.Float.Output(display_name="percentiles", is_output_list=True),
                     io.Float.Output(display_name="max_percentile")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, resize_mode="clean", images=None, image_folder="", inception=None, clip=None, latent=None,
                reference=None, reference_file=NO_FILE) -> io.NodeOutput:
        node_id = "ProbeSelectOODScore"
        rows, what, count = sample_features(node_id, images, image_folder, inception, clip, latent, resize_mode)
        reference = cls._reference(node_id, reference, reference_file, what)
        if reference.features != what:
            raise ProbeSelectError(node_id, f"the reference was fitted on {reference.features!r} features, these are "
                                            f"{what!r}; distances between different features mean nothing.",
                                   "score with the extractor, resize mode (or latent type) the reference was fitted "
                                   "on, or fit a new reference.")
        scores, percentiles = ood.mahalanobis(reference, rows)
        lines = [f"OOD scores against {reference.count} reference samples ({what})"]
        lines += [f"sample {i}: distance {s:.4g}, percentile {p:.1f}" + ("  unusual" if p >= 99 else "")
                  for i, (s, p) in enumerate(zip(scores, percentiles))]
        if reference.warning:
            lines.append(f"warning: {reference.warning}")
        report = "\n".join(lines)
        return io.NodeOutput(report, [float(s) for s in scores], [float(p) for p in percentiles],
                             float(percentiles.max()), ui=ui.PreviewText(report))

    @staticmethod
    def _reference(node_id: str, reference: Optional[ood.OODReference], reference_file: str, what: str):
        if reference is not None:
            if not isinstance(reference, ood.OODReference):
                raise ProbeSelectError(node_id, f"the reference input is a {type(reference).__name__}.",
                                       "connect Probe-Select OOD Fit.")
            return reference
        if reference_file and reference_file != NO_FILE:
            try:
                return ood.load_reference(os.path.join(ood_dir(), reference_file), expected_features=what)
            except ood.OODFileError as e:
                raise ProbeSelectError(node_id, e.problem, e.fix) from None
        raise ProbeSelectError(node_id, "no reference: connect one or select a saved reference_file.",
                               "fit one with Probe-Select OOD Fit first.")


OOD_NODES: list[type[io.ComfyNode]] = [ProbeSelectOODFit, ProbeSelectOODScore]
