"""Engine side of probe selection: the loaded probe (PS_PROBE), scoring candidates and keeping the
best K rows of an early LATENT, with errors that name the calling node."""
from __future__ import annotations

from dataclasses import dataclass

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


def score_or_fail(node_id: str, probe: LoadedProbe, activations, positive=None) -> CandidateScores:
    if activations is None:
        raise ProbeSelectError(node_id, "the model given to the early sampler has no activation tap, so there are "
                                        "no activations to score.",
                               "insert ProbeSelectTap between the model loader and ProbeSelectEarlySampler.")
    if isinstance(activations, ActivationSeries):       # from the collect sampler: use the probe's checkpoint
        activations = activations.at(probe.metadata.checkpoint_t)
    text = split_sampling.text_embedding_from_conditioning(positive) if positive is not None else None
    try:
        return score_candidates(probe.model, probe.metadata, activations, text_embedding=text)
    except ProbeCompatibilityError as e:
        raise ProbeSelectError(node_id, f"probe '{probe.name}' does not fit these activations: {e}") from None


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
