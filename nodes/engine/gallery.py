"""What the candidate gallery in the browser shows: x0 preview thumbnails and the selection.

The thumbnails are ComfyUI's own cheap latent preview (`latent_preview.Latent2RGBPreviewer` with the
model's `latent_rgb_factors`), one small PNG per candidate in ComfyUI's temp folder, served by
`/view` like PreviewImage's files: no VAE decode. The js (js/probe_select_gallery.js) joins them
with the scores and kept indices of the selection nodes by the run id that the early latent, the
activations and the scores share.

UI payload keys (each a list with one entry, as ComfyUI merges UI outputs by list concatenation):
    probe_select_previews: {"run_id", "seeds", "images": [{"filename", "subfolder", "type"} | None]}
    probe_select_gallery:  {"run_id", "seeds", "scores": [float] | None, "evaluator", "kept": [index],
                            "mode": "top_k" | "picked" | "timeout"}
                           ProbeSelectSampler adds every stage of its schedule (see staged_gallery_payload):
                           "stages": [{"number", "step", "steps", "t", "probe", "seeds", "scores", "evaluator",
                                       "kept"}],
                           "pruned_at": [stage number | None], one per candidate (None: finished).
    text:                  the ranking as text (PreviewText), shown in full on the node.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from typing import Any, Optional, Sequence

import folder_paths
import latent_preview

from ...probes.atomic import atomic_write
from ...probes.scoring import CandidateScores
from .stages import StageRecord

log = logging.getLogger(__name__)

PREVIEWS_KEY = "probe_select_previews"
GALLERY_KEY = "probe_select_gallery"
TEXT_KEY = "text"
THUMBNAIL_MAX_SIDE = 128
TEMP_SUBFOLDER = "probe_select"
RUNS_REMEMBERED = 32

# run id -> previews payload of the latest early runs. The selection nodes send the thumbnails again
# with their own result because ComfyUI does not re-send the UI output of a cached early sampler
# (a re-run with another K, or a pick, would show no pictures). File names only, bounded.
_recent_previews: "OrderedDict[str, dict]" = OrderedDict()
_recent_lock = threading.Lock()


def remember_previews(payload: dict) -> None:
    with _recent_lock:
        _recent_previews[payload["run_id"]] = payload
        _recent_previews.move_to_end(payload["run_id"])
        while len(_recent_previews) > RUNS_REMEMBERED:
            _recent_previews.popitem(last=False)


def previews_for(run_id: str) -> Optional[dict]:
    with _recent_lock:
        return _recent_previews.get(run_id)


def prompt_server() -> Optional[Any]:
    """The running PromptServer, or None in-process (tests, scripts) where none was created."""
    import server   # local: ComfyUI's server module pulls in its whole web stack, needed only here

    return getattr(server.PromptServer, "instance", None)


def _previewer(model):
    """ComfyUI's latent-to-RGB previewer for this model's latent format, or None if it has no factors."""
    latent_format = model.model.latent_format
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is None:
        return None
    return latent_preview.Latent2RGBPreviewer(factors, getattr(latent_format, "latent_rgb_factors_bias", None),
                                              getattr(latent_format, "latent_rgb_factors_reshape", None))


def preview_thumbnails(model, x0_latent: dict) -> list:
    """One PIL image per candidate row of the x0 preview LATENT (empty if the format has no RGB factors)."""
    previewer = _previewer(model)
    if previewer is None:
        return []
    # The previewer reads the model-space latent (what the sampler callback gets); the LATENT holds
    # it after process_latent_out.
    x0 = model.model.process_latent_in(x0_latent["samples"].float().cpu())
    images = []
    for row in range(x0.shape[0]):
        image = previewer.decode_latent_to_preview(x0[row:row + 1])
        image.thumbnail((THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE))
        images.append(image)
    return images


def save_thumbnails(images: Sequence, run_id: str, temp_dir: Optional[str] = None) -> list[dict]:
    """Write the thumbnails to ComfyUI's temp folder; the `/view` records the frontend loads them by."""
    folder = os.path.join(temp_dir or folder_paths.get_temp_directory(), TEMP_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    records = []
    for index, image in enumerate(images):
        name = f"x0_{run_id[:12]}_{index:04d}.png"
        atomic_write(os.path.join(folder, name), lambda path, image=image: image.save(path, format="PNG"))
        records.append({"filename": name, "subfolder": TEMP_SUBFOLDER, "type": "temp"})
    return records


def previews_payload(model, x0_latent: dict, run_id: str, seeds: Sequence[int]) -> dict:
    """The `probe_select_previews` entry for an early run; thumbnails are best effort (never fail a run).

    Without a server (in-process runs) nobody can look at them: none are written.
    """
    try:
        images = save_thumbnails(preview_thumbnails(model, x0_latent), run_id) if prompt_server() else []
    except (OSError, RuntimeError, ValueError) as e:   # a preview must never fail the sampling
        log.warning("Probe-Select: no x0 preview thumbnails for this run: %s", e)
        images = []
    payload = {"run_id": run_id, "seeds": [int(s) for s in seeds], "images": images}
    if images:
        remember_previews(payload)
    return payload


def json_scores(scores: CandidateScores) -> list[Optional[float]]:
    # NaN is not JSON: ComfyUI's websocket messages would not parse in the browser.
    return [v if math.isfinite(v) else None for v in map(float, scores.scores)]


def gallery_payload(run_id: str, seeds: Sequence[int], kept: Sequence[int], mode: str,
                    scores: Optional[CandidateScores] = None) -> dict:
    return {
        "run_id": run_id,
        "seeds": [int(s) for s in seeds],
        "scores": json_scores(scores) if scores is not None else None,
        "evaluator": scores.evaluator if scores is not None else None,
        "kept": [int(i) for i in kept],
        "mode": mode,
    }


def staged_gallery_payload(records: Sequence[StageRecord], mode: str = "top_k") -> dict:
    """The gallery of a run pruned in stages (`stages.run_stages`): the first stage's N candidates (the
    ones with x0 previews), each with its fate, and every stage's scores.

    The fields of `gallery_payload` describe the first stage's candidates and scores, but ``kept`` holds
    the candidates finished after the LAST stage (best first), so a reader of those fields alone marks the
    right ones. ``stages`` has one entry per stage: its checkpoint (step of steps, t = step / steps), its
    probe, the seeds it scored with their scores (and evaluator), and its kept indices into those seeds (best first).
    ``pruned_at`` gives, per candidate, the number of the stage that pruned it, None when it was finished.
    """
    first, last = records[0].scores, records[-1]
    position = {seed: index for index, seed in enumerate(first.seeds)}
    payload = gallery_payload(first.run_id, first.seeds, [position[seed] for seed in last.kept_seeds], mode, first)
    pruned_at: list[Optional[int]] = [None] * len(first.seeds)
    for record in records:
        kept = set(record.kept_seeds)
        for seed in record.scores.seeds:
            if seed not in kept:
                pruned_at[position[seed]] = record.number
    payload["stages"] = [{"number": record.number, "step": record.step, "steps": record.steps,
                          "t": record.step / record.steps, "probe": record.probe,
                          "seeds": list(record.scores.seeds), "scores": json_scores(record.scores),
                          "evaluator": record.scores.evaluator, "kept": [int(i) for i in record.kept]}
                         for record in records]
    payload["pruned_at"] = pruned_at
    return payload


def selection_ui(text: str, gallery: dict, previews: Optional[dict] = None) -> dict:
    """The UI output of a node that selects candidates: full ranking text, gallery, previews if known."""
    ui = {TEXT_KEY: [text], GALLERY_KEY: [gallery]}
    previews = previews or previews_for(gallery["run_id"])
    if previews is not None:
        ui[PREVIEWS_KEY] = [previews]
    return ui
