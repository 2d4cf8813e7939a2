"""Choose, compute and report image-set metrics from accumulated features.

:func:`compute_metrics` takes the generated set's features and the reference set's (per feature
kind: ``"inception"`` pool / logits, ``"clip"`` embedding), checks that every selected metric has
the features and the images it needs, and returns :class:`~.image_metrics.MetricValue` s;
:func:`format_report` writes them as text with the sample counts, the resize mode, the
extractors and a warning under every number computed from fewer images than it needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

from . import image_metrics as im

__all__ = ["METRICS", "METRIC_NEEDS", "MetricSettings", "MetricInputError", "compute_metrics", "format_report"]

METRICS = ("fid", "kid", "inception_score", "precision_recall", "density_coverage", "cmmd", "clip_score")
# metric -> (feature kind, feature name, needs a reference set)
METRIC_NEEDS: dict[str, tuple[str, str, bool]] = {
    "fid": ("inception", "pool", True),
    "kid": ("inception", "pool", True),
    "inception_score": ("inception", "logits", False),
    "precision_recall": ("inception", "pool", True),
    "density_coverage": ("inception", "pool", True),
    "cmmd": ("clip", "embedding", True),
    "clip_score": ("clip", "embedding", False),
}


class MetricInputError(ValueError):
    """A selected metric can't be computed from what was given (too few images, no reference, no
    extractor of the kind it needs). ``problem`` / ``fix`` as the pack's other errors."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}")


@dataclass
class MetricSettings:
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    pr_k: int = 3
    dc_k: int = 5
    seed: int = 2020


def _minimum(metric: str, settings: MetricSettings) -> int:
    return {"fid": 2, "kid": 2, "inception_score": settings.is_splits, "precision_recall": settings.pr_k + 1,
            "density_coverage": settings.dc_k + 1, "cmmd": 2, "clip_score": 1}[metric]


def compute_metrics(metrics: Sequence[str], generated: dict[str, dict[str, Tensor]],
                    reference: Optional[dict[str, dict[str, Tensor]]] = None,
                    text_embeddings: Optional[Tensor] = None, settings: Optional[MetricSettings] = None,
                    reference_fid_statistics: Optional[tuple[np.ndarray, np.ndarray]] = None) -> list[im.MetricValue]:
    """Compute the selected metrics (in :data:`METRICS` order).

    Args:
        metrics: names from :data:`METRICS`.
        generated / reference: ``{kind: {name: [N, D]}}`` features.
        text_embeddings: ``[N, D]`` one prompt embedding per generated image (CLIPScore).
        reference_fid_statistics: the reference's saved float64 mean and covariance (used for FID
            instead of recomputing them from the features; identical up to round-off).
    """
    settings = settings or MetricSettings()
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise MetricInputError(f"unknown metric(s) {unknown}.", f"choose from {', '.join(METRICS)}.")
    values: list[im.MetricValue] = []
    for metric in [m for m in METRICS if m in metrics]:
        kind, name, needs_reference = METRIC_NEEDS[metric]
        if kind not in generated or name not in generated[kind]:
            raise MetricInputError(f"{metric} needs {kind} features of the generated images, but no {kind} extractor "
                                   "was connected.", f"connect a {kind} extractor or unselect {metric}.")
        x = generated[kind][name]
        need = _minimum(metric, settings)
        if x.shape[0] < need:
            raise MetricInputError(f"{metric} needs at least {need} generated images, got {x.shape[0]}.",
                                   f"give at least {need} images (reliable from {im.RELIABLE_COUNTS[metric]:,}) or "
                                   f"unselect {metric}.")
        y = None
        if needs_reference:
            if reference is None or kind not in reference or name not in reference[kind]:
                raise MetricInputError(f"{metric} compares with a reference set, but no reference {kind} features were "
                                       "given.", "connect a reference folder or reference statistics made with the "
                                                 f"same {kind} extractor, or unselect {metric}.")
            y = reference[kind][name]
            if y.shape[0] < need:
                raise MetricInputError(f"{metric} needs at least {need} reference images, got {y.shape[0]}.",
                                       f"use a reference set of at least {im.RELIABLE_COUNTS[metric]:,} images.")
        if metric == "fid":
            mu1, s1 = im.gaussian_statistics(x)
            mu2, s2 = reference_fid_statistics or im.gaussian_statistics(y)
            values.append(im.MetricValue("fid", im.frechet_distance(mu1, s1, mu2, s2), None, x.shape[0], y.shape[0],
                                         {}, im.reliability_warning("fid", x.shape[0], y.shape[0])))
        elif metric == "kid":
            values.append(im.kid(x, y, settings.kid_subsets, settings.kid_subset_size, seed=settings.seed))
        elif metric == "inception_score":
            values.append(im.inception_score(x, settings.is_splits))
        elif metric == "precision_recall":
            values.extend(im.precision_recall(x, y, settings.pr_k))
        elif metric == "density_coverage":
            values.extend(im.density_coverage(x, y, settings.dc_k))
        elif metric == "cmmd":
            values.append(im.cmmd(x, y))
        elif metric == "clip_score":
            if text_embeddings is None:
                raise MetricInputError("clip_score needs the prompts of the generated images.",
                                       "give one prompt for all images or one per line per image.")
            values.append(im.clip_score(x, text_embeddings)[0])
    return values


def _number(value: float) -> str:
    return f"{value:.6g}"


def format_report(values: Sequence[im.MetricValue], resize_description: str, extractor_ids: dict[str, str],
                  reference_label: str = "") -> str:
    """A text report: one line per number with its counts, warnings under it, then the settings."""
    lines = ["Image-set metrics"]
    for v in values:
        spread = f" ± {_number(v.std)}" if v.std is not None else ""
        counts = f"{v.n_generated} generated" + (f" vs {v.n_reference} reference" if v.n_reference else "")
        extra = ", ".join(f"{k}={val}" for k, val in v.details.items())
        lines.append(f"{v.name}: {_number(v.value)}{spread}  ({counts}{'; ' + extra if extra else ''})")
        if v.warning:
            lines.append(f"  warning: {v.warning}")
    lines.append(f"resize: {resize_description}")
    for kind, extractor_id in extractor_ids.items():
        lines.append(f"{kind} extractor: {extractor_id}")
    if reference_label:
        lines.append(f"reference: {reference_label}")
    return "\n".join(lines)
