"""Probe loading, scoring and top-K selection of candidates."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io, ui

from ..probes.features import ActivationSeries
from ..probes.io import ProbeFileError, ProbeMetadata, load_probe
from ..probes.scoring import CandidateScores, ProbeCompatibilityError, score_candidates
from . import gallery, split_sampling
from .errors import ProbeSelectError
from .types import CATEGORY, Activations, Probe, Scores

log = logging.getLogger(__name__)

PROBES_FOLDER = "probes"


@dataclass
class LoadedProbe:
    """PS_PROBE: a probe model with the metadata of its file."""

    model: torch.nn.Module
    metadata: ProbeMetadata
    name: str


def probe_files() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list(PROBES_FOLDER)


class ProbeSelectLoadProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ProbeSelectLoadProbe",
            display_name="Probe-Select Load Probe",
            category=CATEGORY,
            description="Loads a probe (.safetensors) from models/probes. The file says which model family, "
                        "block, checkpoint and evaluator it was trained for.",
            inputs=[io.Combo.Input("probe_name", options=probe_files())],
            outputs=[Probe.Output(display_name="probe")],
        )

    @classmethod
    def execute(cls, probe_name) -> io.NodeOutput:
        import folder_paths

        path = folder_paths.get_full_path(PROBES_FOLDER, probe_name)
        if path is None:
            raise ProbeSelectError(cls.__name__, f"probe file '{probe_name}' is not in models/probes.",
                                   "put the .safetensors file in ComfyUI/models/probes and refresh.")
        try:
            model, metadata = load_probe(path)
        except ProbeFileError as e:
            raise ProbeSelectError(cls.__name__, str(e)) from None
        model.eval()
        return io.NodeOutput(LoadedProbe(model, metadata, probe_name))


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


class ProbeSelectScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ProbeSelectScore",
            display_name="Probe-Select Score",
            category=CATEGORY,
            description="Predicts each candidate's final evaluator score from its early activations. Scores are "
                        "per candidate, in the evaluator's units, and never normalised across the batch.",
            inputs=[
                Probe.Input("probe"),
                Activations.Input("activations"),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Only for probes that read text: overrides the prompt embedding "
                                              "recorded by the early sampler."),
            ],
            outputs=[Scores.Output(display_name="scores")],
        )

    @classmethod
    def execute(cls, probe, activations, positive=None) -> io.NodeOutput:
        scores = score_or_fail(cls.__name__, probe, activations, positive)
        return io.NodeOutput(scores, ui=ui.PreviewText(scores_text(scores)))


def top_k_or_fail(node_id: str, latent: dict, scores: CandidateScores, keep: int):
    """(kept LATENT best first, pruned LATENT, kept indices) for the K best-scored rows."""
    if keep < 1:
        raise ProbeSelectError(node_id, f"keep is {keep}.", "keep (K) must be 1 or more.")
    meta = latent.get(split_sampling.PACK_KEY)
    if meta is None:
        raise ProbeSelectError(node_id, "this LATENT did not come from ProbeSelectEarlySampler.",
                               "connect the early latent output of ProbeSelectEarlySampler.")
    if meta["run_id"] != scores.run_id:
        raise ProbeSelectError(node_id, "the scores were computed from activations of a different run than this "
                                        "latent (different early sampler or a re-run).",
                               "feed the latent and the activations from the same ProbeSelectEarlySampler.")
    n = latent["samples"].shape[0]
    if len(scores) != n or list(meta["seeds"]) != list(scores.seeds):
        raise ProbeSelectError(node_id, f"{len(scores)} scores for {n} latent rows.",
                               "do not filter the early latent before ProbeSelectTopK.")
    order = scores.order().tolist()
    kept, pruned = order[:keep], order[keep:]
    return split_sampling.select_rows(latent, kept), split_sampling.select_rows(latent, pruned), kept


class ProbeSelectTopK(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ProbeSelectTopK",
            display_name="Probe-Select Top-K",
            category=CATEGORY,
            description="Keeps the K best-scored candidates (best first; ties keep candidate order). "
                        "Masks, batch indices and resume metadata stay aligned with the rows.",
            inputs=[
                io.Latent.Input("early_latent"),
                Scores.Input("scores"),
                io.Int.Input("keep", default=1, min=1, max=4096, tooltip="K. K >= N keeps every candidate."),
            ],
            outputs=[
                io.Latent.Output(display_name="kept"),
                io.Latent.Output(display_name="pruned"),
                io.Int.Output(display_name="best seed"),
                io.String.Output(display_name="kept seeds"),
                io.String.Output(display_name="kept indices"),
            ],
        )

    @classmethod
    def execute(cls, early_latent, scores, keep) -> io.NodeOutput:
        kept, pruned, indices = top_k_or_fail(cls.__name__, early_latent, scores, keep)
        seeds = [scores.seeds[i] for i in indices]
        shown = gallery.selection_ui(scores_text(scores, indices),
                                     gallery.gallery_payload(scores.run_id, scores.seeds, indices, "top_k", scores))
        return io.NodeOutput(kept, pruned, seeds[0], ",".join(map(str, seeds)), ",".join(map(str, indices)), ui=shown)
