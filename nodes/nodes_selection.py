"""Probe loading, scoring and top-K selection of candidates."""
from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io, ui

from ..probes.io import ProbeFileError, load_probe
from .engine import gallery
from .engine.selection import LoadedProbe, score_or_fail, scores_text, top_k_or_fail
from .errors import ProbeSelectError
from .folders import PROBES_FOLDER
from .types import CATEGORY, Activations, Probe, Scores

log = logging.getLogger(__name__)


def probe_files() -> list[str]:
    return folder_paths.get_filename_list(PROBES_FOLDER)


class ProbeSelectLoadProbe(io.ComfyNode):
    NODE_ID = "ProbeSelectLoadProbe"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Load Probe",
            category=CATEGORY,
            description="Loads a probe (.safetensors) from models/probes. The file says which model family, "
                        "block, checkpoint and evaluator it was trained for.",
            inputs=[io.Combo.Input("probe_name", options=probe_files())],
            outputs=[Probe.Output(display_name="probe")],
        )

    @classmethod
    def execute(cls, probe_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(PROBES_FOLDER, probe_name)
        if path is None:
            raise ProbeSelectError(cls.NODE_ID, f"probe file '{probe_name}' is not in models/probes.",
                                   "put the .safetensors file in ComfyUI/models/probes and refresh.")
        try:
            model, metadata = load_probe(path)
        except ProbeFileError as e:
            raise ProbeSelectError(cls.NODE_ID, str(e)) from None
        model.eval()
        return io.NodeOutput(LoadedProbe(model, metadata, probe_name))


class ProbeSelectScore(io.ComfyNode):
    NODE_ID = "ProbeSelectScore"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Score",
            category=CATEGORY,
            description="Predicts each candidate's final evaluator score from its early activations and/or its "
                        "x0 prediction latent (what the probe was trained to read). Scores are per candidate, in "
                        "the evaluator's units, and never normalised across the batch.",
            inputs=[
                Probe.Input("probe"),
                Activations.Input("activations"),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="Only for probes that read text: overrides the prompt embedding "
                                              "recorded by the early sampler."),
                io.Latent.Input("x0_preview", optional=True,
                                tooltip="Only for probes that read the x0 latent: the early sampler's 'x0 preview' "
                                        "output (no VAE decode needed). Without it such a probe reads the x0 the "
                                        "sampler recorded with the activations."),
            ],
            outputs=[Scores.Output(display_name="scores")],
        )

    @classmethod
    def execute(cls, probe, activations, positive=None, x0_preview=None) -> io.NodeOutput:
        scores = score_or_fail(cls.NODE_ID, probe, activations, positive, x0_preview)
        return io.NodeOutput(scores, ui=ui.PreviewText(scores_text(scores)))


class ProbeSelectTopK(io.ComfyNode):
    NODE_ID = "ProbeSelectTopK"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
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
        kept, pruned, indices = top_k_or_fail(cls.NODE_ID, early_latent, scores, keep)
        seeds = [scores.seeds[i] for i in indices]
        shown = gallery.selection_ui(scores_text(scores, indices),
                                     gallery.gallery_payload(scores.run_id, scores.seeds, indices, "top_k", scores))
        return io.NodeOutput(kept, pruned, seeds[0], ",".join(map(str, seeds)), ",".join(map(str, indices)), ui=shown)
