"""ProbeSelectPreviewScore: score candidates by decoding their x0 prediction at the checkpoint.

Training-free: the early sampler's x0 preview (the model's own estimate of the finished image at
the checkpoint) is decoded and scored by any evaluator. It is the baseline a probe must beat, and a
useful mode for users who have no probe yet. It costs one decode and one evaluator pass per
candidate, which a probe avoids.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..probes.scoring import CandidateScores
from .engine import split_sampling
from .errors import ProbeSelectError
from .engine.selection import scores_text
from .types import CATEGORY, EvaluatorModel, Scores


def preview_scores(node_id: str, x0_preview: dict, vae, evaluator, prompt: str) -> CandidateScores:
    run = split_sampling.preview_run(x0_preview)
    if run is None:
        raise ProbeSelectError(node_id, "this LATENT is not the x0 preview of ProbeSelectEarlySampler.",
                               "connect the early sampler's 'x0 preview' output.")
    images = vae.decode(x0_preview["samples"])
    if images.ndim == 5:                      # video VAEs: [B, T, H, W, C]; score the first frame
        images = images[:, 0]
    image_scores = evaluator.score(images, prompt)
    return CandidateScores(image_scores.scores, f"{image_scores.evaluator} (x0 preview)", run.run_id, run.seeds)


class ProbeSelectPreviewScore(io.ComfyNode):
    NODE_ID = "ProbeSelectPreviewScore"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Preview Score",
            category=CATEGORY,
            description="Scores each candidate without a probe: decodes its x0 prediction at the checkpoint and "
                        "runs an evaluator on it. Feed the scores to ProbeSelectTopK like probe scores.",
            inputs=[
                io.Latent.Input("x0_preview", tooltip="The 'x0 preview' output of ProbeSelectEarlySampler."),
                io.Vae.Input("vae"),
                EvaluatorModel.Input("evaluator"),
                io.String.Input("prompt", multiline=True),
            ],
            outputs=[Scores.Output(display_name="scores")],
        )

    @classmethod
    def execute(cls, x0_preview, vae, evaluator, prompt) -> io.NodeOutput:
        scores = preview_scores(cls.NODE_ID, x0_preview, vae, evaluator, prompt)
        return io.NodeOutput(scores, ui=ui.PreviewText(scores_text(scores)))
