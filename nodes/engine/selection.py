"""Engine side of probe selection: the loaded probe (PS_PROBE), scoring candidates and keeping the
best K rows of an early LATENT, with errors that name the calling node."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...probes.features import ActivationSeries
from ...probes.io import ProbeMetadata
from ...probes.scoring import CandidateScores, ProbeCompatibilityError, score_candidates
from . import split_sampling
from .errors import ProbeSelectError


@dataclass
class LoadedProbe:
    """PS_PROBE: a probe model with the metadata of its file."""

    model: torch.nn.Module
    metadata: ProbeMetadata
    name: str


def score_or_fail(node_id: str, probe: LoadedProbe, activations, positive=None,
                  x0_preview: Optional[dict] = None) -> CandidateScores:
    """Scores of the candidates. A probe that reads the x0 latent reads ``x0_preview`` (the early sampler's
    'x0 preview' LATENT) when given, else the x0 the sampler recorded with the activations."""
    if activations is None:
        raise ProbeSelectError(node_id, "the model given to the early sampler has no activation tap, so there are "
                                        "no activations to score.",
                               "insert ProbeSelectTap between the model loader and ProbeSelectEarlySampler.")
    if isinstance(activations, ActivationSeries):       # from the collect sampler: use the probe's checkpoint
        activations = activations.at(probe.metadata.checkpoint_t)
    x0 = None
    if probe.metadata.config.reads_x0:
        x0 = x0_or_fail(node_id, probe, activations, x0_preview)
    text = split_sampling.text_embedding_from_conditioning(positive) if positive is not None else None
    try:
        return score_candidates(probe.model, probe.metadata, activations, text_embedding=text, x0=x0)
    except ProbeCompatibilityError as e:
        raise ProbeSelectError(node_id, f"probe '{probe.name}' does not fit these activations: {e}") from None


def x0_or_fail(node_id: str, probe: LoadedProbe, activations, x0_preview: Optional[dict]) -> torch.Tensor:
    """The x0 latent ``[N, c, H, W]`` for a probe that reads it: from ``x0_preview`` (checked to be the early
    sampler's x0 preview of the same run), else the one recorded with the activations."""
    if x0_preview is None:
        if activations.x0 is None:
            raise ProbeSelectError(
                node_id, f"probe '{probe.name}' reads the x0 prediction latent (inputs "
                         f"{'+'.join(probe.metadata.inputs)}), but no x0 preview is connected and these activations "
                         "carry none.",
                "connect the early sampler's 'x0 preview' output to this node's x0_preview input.")
        return activations.x0
    run = split_sampling.preview_run(x0_preview)
    if run is None:
        raise ProbeSelectError(node_id, "the x0_preview LATENT is not the x0 preview of ProbeSelectEarlySampler.",
                               "connect the early sampler's 'x0 preview' output to x0_preview.")
    if run.run_id != activations.run_id:
        raise ProbeSelectError(node_id, "the x0 preview comes from a different run than the activations (another "
                                        "early sampler, or a re-run).",
                               "connect the 'x0 preview' and the activations of the same ProbeSelectEarlySampler.")
    return x0_preview["samples"]


def scores_text(scores: CandidateScores, kept: list[int] | None = None) -> str:
    kept = set(kept or [])
    lines = [f"{scores.evaluator} (predicted), best first:"]
    for rank, i in enumerate(scores.order().tolist()):
        mark = "  kept" if i in kept else ""
        lines.append(f"#{rank + 1}  candidate {i}  seed {scores.seeds[i]}  {float(scores.scores[i]):.4f}{mark}")
    return "\n".join(lines)


def top_k_or_fail(node_id: str, latent: dict, scores: CandidateScores, keep: int) -> tuple[dict, dict, list[int]]:
    """(kept LATENT best first, pruned LATENT, kept indices) for the K best-scored rows."""
    if keep < 1:
        raise ProbeSelectError(node_id, f"keep is {keep}.", "keep (K) must be 1 or more.")
    run = split_sampling.early_run(latent)
    if run is None:
        raise ProbeSelectError(node_id, "this LATENT did not come from ProbeSelectEarlySampler.",
                               "connect the early latent output of ProbeSelectEarlySampler.")
    if run.run_id != scores.run_id:
        raise ProbeSelectError(node_id, "the scores were computed from activations of a different run than this "
                                        "latent (different early sampler or a re-run).",
                               "feed the latent and the activations from the same ProbeSelectEarlySampler.")
    n = latent["samples"].shape[0]
    if len(scores) != n or run.seeds != list(scores.seeds):
        raise ProbeSelectError(node_id, f"{len(scores)} scores for {n} latent rows.",
                               "do not filter the early latent before ProbeSelectTopK.")
    order = scores.order().tolist()
    kept, pruned = order[:keep], order[keep:]
    return split_sampling.select_rows(latent, kept), split_sampling.select_rows(latent, pruned), kept
