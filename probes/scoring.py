"""Scoring candidates with a probe, and the checks that the probe fits the activations.

Scores are in evaluator units, obtained with the probe's fixed normalisation
(``pred * score_std + score_mean``). Nothing is normalised across the candidates: a candidate's
score is the same whether it is scored alone or among N others, so scores from different runs and
batch sizes can be compared.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .checkpoints import CHECKPOINT_TOLERANCE
from .features import ActivationSet, pool_x0
from .io import ProbeMetadata
from .model import Probe

__all__ = ["ProbeCompatibilityError", "CandidateScores", "check_compatible", "score_candidates"]

logger = logging.getLogger(__name__)


def order_scores(scores: Tensor, descending: bool = True) -> Tensor:
    """Indices from best to worst (or worst to best), ``[N]`` int64. Stable: ties keep their
    original order, so selection is deterministic. NaN scores rank last in either direction."""
    key = scores.float().clone()
    key[torch.isnan(key)] = -math.inf if descending else math.inf
    return torch.sort(key, descending=descending, stable=True).indices


class ProbeCompatibilityError(ValueError):
    """The probe was trained on a different kind of activations than the ones given."""


def check_compatible(meta: ProbeMetadata, acts: ActivationSet, t_tolerance: float = CHECKPOINT_TOLERANCE,
                     x0: Optional[Tensor] = None) -> None:
    """Raise :class:`ProbeCompatibilityError` unless the probe described by ``meta`` can read ``acts``.

    Checked: backbone family, tap path, feature shape ``(C, P, P)`` (for a probe trained on
    channel-reduced data, the shape before its reduction), checkpoint t (within
    ``t_tolerance``; a smaller non-zero difference only logs a warning, since the probe is
    time-conditioned but was trained at one t), for a probe with a text branch, the presence
    and width of the text embedding, and for a probe that reads the x0 latent, its presence
    (``x0``, else ``acts.x0``), one row per candidate and its channels. A probe that reads only
    x0 does not check the tap or the feature shape (it reads neither).
    """
    if acts.family != meta.backbone_family:
        raise ProbeCompatibilityError(
            f"probe was trained on backbone family '{meta.backbone_family}' but the activations come "
            f"from '{acts.family}'; use a probe trained for '{acts.family}' or sample with a "
            f"'{meta.backbone_family}' model."
        )
    if meta.config.reads_x0:
        _check_x0(meta, acts, x0 if x0 is not None else acts.x0)
    if meta.config.reads_activations:
        _check_activations(meta, acts)
    _check_checkpoint_and_text(meta, acts, t_tolerance)


def _check_x0(meta: ProbeMetadata, acts: ActivationSet, x0: Optional[Tensor]) -> None:
    channels, size = meta.config.x0_channels, meta.config.x0_size
    if x0 is None:
        raise ProbeCompatibilityError(
            f"probe ({meta.evaluator}) reads the sampler's x0 prediction latent (inputs "
            f"{'+'.join(meta.inputs)}) but none was given; connect the early sampler's 'x0 preview' output "
            f"(or pass x0=<LATENT samples [N, {channels}, H, W]>)."
        )
    if not isinstance(x0, Tensor) or x0.ndim not in (4, 5) or not x0.is_floating_point():
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ProbeCompatibilityError(
            f"the x0 latent must be a float [N, {channels}, H, W] tensor (LATENT samples), got {shape}; connect "
            f"the early sampler's 'x0 preview' output."
        )
    if x0.shape[0] != len(acts):
        raise ProbeCompatibilityError(
            f"the x0 latent has {x0.shape[0]} rows but there are {len(acts)} candidates; connect the 'x0 preview' "
            f"of the same early sampler run as the activations."
        )
    if x0.shape[1] != channels:
        raise ProbeCompatibilityError(
            f"probe was trained on {channels}-channel x0 latents (pooled to {size}x{size}) but this x0 latent has "
            f"{x0.shape[1]} channels (shape {tuple(x0.shape)}); connect the x0 preview of a "
            f"'{meta.backbone_family}' model, or use a probe trained on {x0.shape[1]}-channel latents."
        )


def _check_activations(meta: ProbeMetadata, acts: ActivationSet) -> None:
    if acts.tap != meta.tap:
        raise ProbeCompatibilityError(
            f"probe reads tap '{meta.tap}' but the activations were captured at tap '{acts.tap}'; "
            f"tap '{meta.tap}' when sampling, or use a probe trained on '{acts.tap}'."
        )
    reduction = meta.reduction
    if reduction.active and tuple(acts.feature_shape) != meta.activation_shape:
        raise ProbeCompatibilityError(
            f"probe was trained on data reduced by {reduction.describe()} (of {meta.activation_shape} activations, "
            f"recorded in its file and its dataset's manifest), but these activations are "
            f"{tuple(acts.feature_shape)} (tap '{acts.tap}'); scoring reduces them by itself, so give it the "
            f"activations as tapped, of the same tap and feature size as the probe's training data, or use a probe "
            f"trained on {acts.feature_shape[0]}-channel activations."
        )
    if not reduction.active and tuple(acts.feature_shape) != tuple(meta.feature_shape):
        raise ProbeCompatibilityError(
            f"probe expects features of shape (C, P, P) = {tuple(meta.feature_shape)} but the "
            f"activations have {tuple(acts.feature_shape)} (tap '{acts.tap}'); pool the activations to "
            f"{meta.feature_shape[1]}x{meta.feature_shape[2]} or use a probe trained on this shape."
        )


def _check_checkpoint_and_text(meta: ProbeMetadata, acts: ActivationSet, t_tolerance: float) -> None:
    t_gap = abs(acts.t - meta.checkpoint_t)
    if t_gap > t_tolerance:
        suggested_step = round(meta.checkpoint_t * acts.steps)
        raise ProbeCompatibilityError(
            f"probe was trained at checkpoint t={meta.checkpoint_t:.3f} but the activations are at "
            f"t={acts.t:.3f} (step {acts.step} of {acts.steps}), more than {t_tolerance} apart; stop "
            f"the early sampler at step {suggested_step} of {acts.steps}, or use a probe trained at "
            f"t={acts.t:.3f}."
        )
    if t_gap > 1e-6:
        logger.warning(
            "probe trained at t=%.3f scores activations at t=%.3f (step %d of %d); rankings may be "
            "less reliable",
            meta.checkpoint_t, acts.t, acts.step, acts.steps,
        )
    text_dim = meta.config.text_dim
    if text_dim:
        if acts.text_embedding is None:
            raise ProbeCompatibilityError(
                f"probe ({meta.evaluator}) has a text branch of width {text_dim} but the activations "
                f"carry no text embedding; connect the positive conditioning or pass a text embedding."
            )
        if acts.text_embedding.shape[-1] != text_dim:
            raise ProbeCompatibilityError(
                f"probe ({meta.evaluator}) expects a text embedding of width {text_dim} but got width "
                f"{acts.text_embedding.shape[-1]}; use the text encoder the probe was trained with."
            )


@dataclass
class CandidateScores:
    """One score per candidate, in evaluator units.

    Attributes:
        scores: ``[N]`` float32 CPU scores (higher is better).
        evaluator: the evaluator whose score the probe predicts.
        run_id: run the candidates belong to (matches the activations and latents).
        seeds: seed of each candidate, aligned with ``scores``.
    """

    scores: Tensor
    evaluator: str
    run_id: str
    seeds: list[int]

    def __post_init__(self) -> None:
        if self.scores.ndim != 1:
            raise ValueError(f"CandidateScores.scores must be [N], got shape {tuple(self.scores.shape)}")
        self.seeds = [int(seed) for seed in self.seeds]
        if len(self.seeds) != len(self):
            raise ValueError(f"CandidateScores: {len(self)} scores but {len(self.seeds)} seeds")

    def __len__(self) -> int:
        return self.scores.shape[0]

    def order(self, descending: bool = True) -> Tensor:
        """Candidate indices from best to worst (or worst to best), ``[N]`` int64.

        The sort is stable: tied candidates keep their original order, so selection is
        deterministic. NaN scores rank last in either direction.
        """
        return order_scores(self.scores, descending)


def score_candidates(
    probe: Probe,
    meta: ProbeMetadata,
    acts: ActivationSet,
    text_embedding: Optional[Tensor] = None,
    batch_size: int = 64,
    t_tolerance: float = CHECKPOINT_TOLERANCE,
    x0: Optional[Tensor] = None,
) -> CandidateScores:
    """Score every candidate of ``acts`` with ``probe``.

    Args:
        probe: the probe; runs on its own device and dtype.
        meta: its metadata (compatibility and score normalisation).
        acts: activations of the N candidates.
        text_embedding: ``[N, D]`` or ``[1, D]`` text embedding that overrides
            ``acts.text_embedding``; a single row is shared by all candidates.
        batch_size: candidates per forward pass (memory bound only; results do not depend on it).
        t_tolerance: largest accepted gap between the probe's and the activations' checkpoint t.
        x0: ``[N, c, H, W]`` the sampler's x0 prediction latent at the checkpoint (LATENT samples),
            overriding ``acts.x0``; read only by probes whose ``config.inputs`` include ``"x0"``,
            which pool it to ``config.x0_size`` as their training rows were.

    Returns:
        :class:`CandidateScores` with ``pred * meta.score_std + meta.score_mean`` per candidate.
        A probe trained on channel-reduced data (``meta.reduction``) scores the activations after
        that reduction, applied here exactly as the dataset writer applied it.

    Raises:
        ProbeCompatibilityError: if the probe cannot read these activations.
    """
    if batch_size < 1:
        raise ValueError(f"score_candidates: batch_size must be >= 1, got {batch_size}")
    if text_embedding is not None:
        acts = dataclasses.replace(acts, text_embedding=text_embedding)  # re-validates the rows
    if probe.config != meta.config:
        raise ProbeCompatibilityError(
            f"the probe's config {probe.config} differs from the one in its metadata {meta.config}; "
            f"pass the metadata returned by load_probe together with its probe."
        )
    check_compatible(meta, acts, t_tolerance=t_tolerance, x0=x0)
    text = acts.text_embedding if probe.config.has_text else None
    # The same reduction, per candidate, that the probe's training rows went through when written.
    features = meta.reduction.apply(acts.features) if probe.config.reads_activations else None
    pooled_x0 = None
    if probe.config.reads_x0:
        # Pooled per candidate, exactly as the dataset writer stored the training rows' x0.
        pooled_x0 = pool_x0(x0 if x0 is not None else acts.x0, probe.config.x0_size)

    predictions = []
    was_training = probe.training
    probe.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(acts), batch_size):
                end = min(start + batch_size, len(acts))
                chunk_text = None
                if text is not None:
                    chunk_text = text if text.shape[0] == 1 else text[start:end]
                pred = probe(None if features is None else features[start:end], acts.t, chunk_text,
                             None if pooled_x0 is None else pooled_x0[start:end])
                predictions.append(pred.float().cpu())
    finally:
        probe.train(was_training)
    pred = torch.cat(predictions) if predictions else torch.zeros(0)
    scores = pred * meta.score_std + meta.score_mean
    if not torch.isfinite(scores).all():
        logger.warning("probe produced non-finite scores for %d of %d candidates", int((~torch.isfinite(scores)).sum()), len(acts))
    return CandidateScores(scores=scores, evaluator=meta.evaluator, run_id=acts.run_id, seeds=list(acts.seeds))
