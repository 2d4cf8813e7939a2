"""ProbeSelectBlendScores: one ranking from two scorers of the same candidates (e.g. the x0 preview and a probe).

The x0 preview's evaluator score tells which candidates will satisfy the prompt; a probe trained on finished
images orders the rest. Blended (each standardised within the batch, see probes.training.blending), they rank a
prompt's seeds a little better than either alone in the proxy bench's UNet world, though they prune no cheaper than
the preview at equal compute; on its DiT, whose probes learned nothing, validation gives the probe almost no weight
(bench/results/score_blend.md). The blend pays for both scorers: a decode and an evaluator pass per candidate, and
the probe.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..probes.training.blending import blend_scores
from ..probes.scoring import CandidateScores
from .engine.selection import scores_text
from .errors import ProbeSelectError
from .types import CATEGORY, Scores

# Within the proxy bench's validation fits for the x0 preview + an x0-latent probe on the UNet (0.70 to 0.85 over its
# calibration rounds; bench/results/score_blend.md).
DEFAULT_SECOND_WEIGHT = 0.7


def blended(node_id: str, first: CandidateScores, second: CandidateScores, second_weight: float) -> CandidateScores:
    """The two scores of one run's candidates blended; a clear error when they scored different candidates."""
    if first.run_id != second.run_id or first.seeds != second.seeds:
        raise ProbeSelectError(node_id, f"the two scores are of different candidates (runs {first.run_id!r} and "
                                        f"{second.run_id!r}, seeds {first.seeds} and {second.seeds}).",
                               "score the same early sampler run twice: connect both scorers to the outputs of one "
                               "ProbeSelectEarlySampler.")
    # Short: the nodes that show a ranking (this one, Top-K) grow to its width, and the default layout leaves
    # little room between columns; what was blended is on the graph's links, w is the second_weight widget.
    label = f"blend w={second_weight:.2f}"
    return CandidateScores(blend_scores(first.scores, second.scores, second_weight), label, first.run_id,
                           list(first.seeds))


class ProbeSelectBlendScores(io.ComfyNode):
    NODE_ID = "ProbeSelectBlendScores"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Blend Scores",
            category=CATEGORY,
            description="One ranking from two scorers of the same candidates, e.g. ProbeSelectPreviewScore (first) "
                        "and ProbeSelectScore (second): each is standardised within the batch, then mixed. Feed the "
                        "result to ProbeSelectTopK.",
            inputs=[
                Scores.Input("first_scores", tooltip="E.g. the x0 preview's scores (ProbeSelectPreviewScore)."),
                Scores.Input("second_scores", tooltip="E.g. a probe's scores (ProbeSelectScore) of the same run."),
                io.Float.Input("second_weight", default=DEFAULT_SECOND_WEIGHT, min=0.0, max=1.0, step=0.05,
                               tooltip="0 ranks as the first scores, 1 as the second. Choose it on validation "
                                       "prompts (probes.training.blending.fit_blend_weight); the proxy bench "
                                       "fitted 0.7-0.85 on its UNet."),
            ],
            outputs=[Scores.Output(display_name="scores")],
        )

    @classmethod
    def execute(cls, first_scores, second_scores, second_weight=DEFAULT_SECOND_WEIGHT) -> io.NodeOutput:
        scores = blended(cls.NODE_ID, first_scores, second_scores, float(second_weight))
        return io.NodeOutput(scores, ui=ui.PreviewText(scores_text(scores)))
