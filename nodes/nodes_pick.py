"""ProbeSelectPickCandidates: pause at the checkpoint and let the user pick the candidates to finish.

Placed where ProbeSelectTopK would be. While it runs, the candidate gallery on the node (js/
probe_select_pick.js) shows every early candidate's x0 preview and score; the user clicks the ones
to finish and presses "Finish". Its outputs are those of Top-K (the kept rows sliced by the same
`split_sampling.select_rows`), so ProbeSelectResume finishes exactly the picked candidates.

Timeout: with scores connected, the top `keep` by score are kept (logged, and marked "timeout" in
the gallery); without scores the node fails with a message. Cancel (ComfyUI's interrupt) ends the
wait at once. Either way no waiting state is left on the server (nodes/pick_server.py).
"""
from __future__ import annotations

import logging
from typing import Optional

import comfy.model_management
from comfy_api.latest import io

from ..probes.scoring import CandidateScores
from .engine import gallery, pick_server, split_sampling
from .errors import ProbeSelectError
from .engine.selection import scores_text, top_k_or_fail
from .types import CATEGORY, Scores

log = logging.getLogger(__name__)

NODE_ID = "ProbeSelectPickCandidates"


def picked_text(seeds: list[int], kept: list[int], scores: Optional[CandidateScores], mode: str) -> str:
    if scores is not None:
        text = scores_text(scores, kept)
    else:
        lines = ["candidates (no scores), in order:"]
        lines += [f"candidate {i}  seed {seed}{'  kept' if i in kept else ''}" for i, seed in enumerate(seeds)]
        text = "\n".join(lines)
    if mode == "timeout":
        text = "timed out: kept the top-K by score\n" + text
    return text


def validate_early_latent(latent: dict) -> split_sampling.EarlyRun:
    run = split_sampling.early_run(latent)
    if run is None:
        raise ProbeSelectError(NODE_ID, "this LATENT did not come from ProbeSelectEarlySampler.",
                               "connect the early latent output of ProbeSelectEarlySampler.")
    return run


def await_pick(node_id: str, meta: split_sampling.EarlyRun, scores: Optional[CandidateScores], preselected: list[int],
               keep: int, timeout: float) -> Optional[list[int]]:
    """Announce the pick to the browser and wait for it; None on timeout. Raises if interrupted."""
    request = pick_server.REGISTRY.open(node_id, meta.run_id, len(meta.seeds), timeout)
    reason = "cancelled"
    try:
        pick_server.send_to_client(pick_server.PICK_EVENT, {
            "node_id": node_id, "request_id": request.request_id,
            "gallery": gallery.gallery_payload(meta.run_id, meta.seeds, preselected, "picking", scores),
            "keep": keep, "timeout": timeout, "previews": gallery.previews_for(meta.run_id),
        })
        picked = pick_server.REGISTRY.wait(request, comfy.model_management.throw_exception_if_processing_interrupted)
        reason = "timeout" if picked is None else "picked"
        return picked
    finally:
        pick_server.REGISTRY.close(request)
        pick_server.send_to_client(pick_server.PICK_CLOSED_EVENT,
                                   {"node_id": node_id, "request_id": request.request_id, "reason": reason})


class ProbeSelectPickCandidates(io.ComfyNode):
    NODE_ID = NODE_ID

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Pick Candidates (pause)",
            category=CATEGORY,
            description="Pauses the run at the checkpoint: click the candidates to finish in the gallery on this "
                        "node, then Finish. Outputs like Top-K. On timeout the top 'keep' by score are kept "
                        "(fails without scores); Cancel stops the run.",
            inputs=[
                io.Latent.Input("early_latent"),
                io.Int.Input("keep", default=1, min=1, max=4096,
                             tooltip="How many of the best-scored candidates are preselected, and kept on timeout."),
                io.Int.Input("timeout", default=600, min=1, max=86400,
                             tooltip="Seconds to wait for a pick. Then the top 'keep' by score are kept, or the "
                                     "run fails if no scores are connected."),
                Scores.Input("scores", optional=True, tooltip="Shown on each candidate; orders the picked ones."),
            ],
            outputs=[
                io.Latent.Output(display_name="kept"),
                io.Latent.Output(display_name="pruned"),
                io.Int.Output(display_name="first seed"),
                io.String.Output(display_name="kept seeds"),
                io.String.Output(display_name="kept indices"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        # A pick is a person's choice, not a function of the inputs: never reuse a cached one.
        return float("nan")

    @classmethod
    def execute(cls, early_latent, keep, timeout, scores=None) -> io.NodeOutput:
        meta = validate_early_latent(early_latent)
        seeds = [int(s) for s in meta.seeds]
        if scores is not None:
            _kept, _pruned, top_k = top_k_or_fail(NODE_ID, early_latent, scores, keep)   # also checks the run
            order = scores.order().tolist()
        else:
            top_k, order = [], list(range(len(seeds)))
        node_id = str(cls.hidden.unique_id)
        picked = await_pick(node_id, meta, scores, top_k, keep, timeout)
        if picked is None:
            if scores is None:
                raise ProbeSelectError(NODE_ID, f"no candidates were picked within {timeout} s, and without scores "
                                                "there is no top-K to fall back on.",
                                       "pick in the gallery and press Finish in time, raise timeout, or connect "
                                       "scores so that the top 'keep' are kept on timeout.")
            log.warning("Probe-Select: no pick within %s s on node %s; keeping the top %d by score",
                        timeout, node_id, len(top_k))
            kept, mode = top_k, "timeout"
        else:
            chosen = set(picked)
            kept, mode = [i for i in order if i in chosen], "picked"    # best first when scored
        pruned = [i for i in order if i not in set(kept)]
        kept_seeds = [seeds[i] for i in kept]
        ui = gallery.selection_ui(picked_text(seeds, kept, scores, mode),
                                  gallery.gallery_payload(meta.run_id, seeds, kept, mode, scores))
        return io.NodeOutput(split_sampling.select_rows(early_latent, kept),
                             split_sampling.select_rows(early_latent, pruned),
                             kept_seeds[0], ",".join(map(str, kept_seeds)), ",".join(map(str, kept)), ui=ui)
