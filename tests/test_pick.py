"""Pause-and-pick and the gallery payloads, in-process on tiny models (no server, no browser).

The pick node waits in its own thread here, as it does in ComfyUI's prompt worker; the test
answers through the same registry the HTTP route uses. tests/test_browser.py drives it by clicks.
"""
import json
import threading
import time

import pytest
import torch

from devtools.tiny_models import build_tiny

SEED, N, KEEP = 20, 5, 2


@pytest.fixture(scope="module")
def sd1(pack):
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def early(sd1):
    from probe_select.nodes import nodes_sampling as sampling

    return sampling.ProbeSelectEarlySampler.execute(sd1.patcher, sd1.conditioning(1), sd1.conditioning(2),
                                                    sd1.empty_latent(1, 8), SEED, N, 8, 4.0, "euler", "normal",
                                                    0.25).result


@pytest.fixture
def scores(early):
    from probe_select.probes.scoring import CandidateScores

    meta = early[0]["probe_select"]
    # Distinct scores in an order unlike the candidates' (best: 3, then 0, 4, 1, 2).
    return CandidateScores(torch.tensor([0.8, 0.2, 0.1, 0.9, 0.5]), "clipscore", meta["run_id"], meta["seeds"])


def _pick_node():
    from probe_select.nodes.nodes_pick import ProbeSelectPickCandidates
    from comfy_api.latest import io

    class Bound(ProbeSelectPickCandidates):     # what ComfyUI does: the hidden inputs on a class copy
        hidden = io.HiddenHolder.from_dict({io.Hidden.unique_id: "77"})
    return Bound


def _run_in_thread(node, **inputs):
    outcome = {}

    def run():
        try:
            outcome["out"] = node.execute(**inputs)
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _wait_until_waiting(registry, node_id="77", timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = [w for w in registry.waiting() if w["node_id"] == node_id]
        if waiting:
            return waiting[0]
        time.sleep(0.01)
    raise AssertionError("the pick node never started waiting")


def test_pick_outputs_the_clicked_rows_best_first_like_topk(early, scores):
    from probe_select.nodes.engine import split_sampling
    from probe_select.nodes.engine.pick_server import REGISTRY

    thread, outcome = _run_in_thread(_pick_node(), early_latent=early[0], keep=KEEP, timeout=30, scores=scores)
    waiting = _wait_until_waiting(REGISTRY)
    assert waiting["candidates"] == N and waiting["run_id"] == scores.run_id
    REGISTRY.submit("77", [4, 1], waiting["request_id"])
    thread.join(10)
    assert "error" not in outcome, outcome.get("error")
    kept, pruned, first_seed, kept_seeds, kept_indices = outcome["out"].result
    assert kept_indices == "4,1" and first_seed == SEED + 4 and kept_seeds == f"{SEED + 4},{SEED + 1}"
    expected = split_sampling.select_rows(early[0], [4, 1])
    assert torch.equal(kept["samples"], expected["samples"])
    assert torch.equal(kept["probe_select"]["state"], expected["probe_select"]["state"])
    assert kept["probe_select"]["seeds"] == [SEED + 4, SEED + 1]
    assert pruned["probe_select"]["seeds"] == [SEED + 3, SEED + 0, SEED + 2]
    ui = outcome["out"].ui
    assert ui["probe_select_gallery"][0]["kept"] == [4, 1] and ui["probe_select_gallery"][0]["mode"] == "picked"
    assert "kept" in ui["text"][0] and REGISTRY.waiting() == []


def test_pick_timeout_keeps_top_k_with_scores_and_fails_without(early, scores):
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.nodes.engine.pick_server import REGISTRY

    out = _pick_node().execute(early_latent=early[0], keep=KEEP, timeout=1, scores=scores)
    assert out.result[4] == "3,0" and out.ui["probe_select_gallery"][0]["mode"] == "timeout"
    assert REGISTRY.waiting() == []
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectPickCandidates\] no candidates were picked"):
        _pick_node().execute(early_latent=early[0], keep=KEEP, timeout=1)
    assert REGISTRY.waiting() == []


def test_pick_cancel_ends_the_wait_and_leaves_nothing_waiting(early):
    import comfy.model_management
    from probe_select.nodes.engine.pick_server import REGISTRY

    thread, outcome = _run_in_thread(_pick_node(), early_latent=early[0], keep=1, timeout=60)
    _wait_until_waiting(REGISTRY)
    started = time.monotonic()
    comfy.model_management.interrupt_current_processing(True)
    thread.join(10)
    assert time.monotonic() - started < 2.0
    assert isinstance(outcome.get("error"), comfy.model_management.InterruptProcessingException)
    assert REGISTRY.waiting() == []
    with pytest.raises(Exception, match="no pick is waiting"):
        REGISTRY.submit("77", [0])


def test_pick_rejects_bad_picks_and_latents(early, scores):
    from probe_select.nodes.errors import ProbeSelectError
    from probe_select.nodes.engine.pick_server import PickRegistry, PickRejected

    registry = PickRegistry()
    request = registry.open("5", "run", 3, timeout=5)
    for bad, status in (([], 400), ([3], 400), ([0, 0], 400), (["1"], 400), ([True], 400)):
        with pytest.raises(PickRejected) as info:
            registry.submit("5", bad)
        assert info.value.status == status, bad
    with pytest.raises(PickRejected) as info:
        registry.submit("5", [1], request_id="an-older-pause")
    assert info.value.status == 409
    with pytest.raises(PickRejected) as info:
        registry.submit("6", [1])
    assert info.value.status == 404
    assert registry.submit("5", [2, 0]).picked == [2, 0]
    assert registry.wait(request, lambda: None) == [2, 0]
    registry.close(request)
    assert registry.waiting() == []

    with pytest.raises(ProbeSelectError, match="did not come from ProbeSelectEarlySampler"):
        _pick_node().execute(early_latent={"samples": early[0]["samples"]}, keep=1, timeout=1)


def test_x0_thumbnails_are_comfyuis_latent_preview(sd1, early, tmp_path):
    import latent_preview
    import numpy as np
    from PIL import Image
    from probe_select.nodes.engine import gallery

    x0 = early[1]
    images = gallery.preview_thumbnails(sd1.patcher, x0)
    assert len(images) == N
    fmt = sd1.patcher.model.latent_format
    reference = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    row = sd1.patcher.model.process_latent_in(x0["samples"][2:3].float())
    assert np.array_equal(np.asarray(images[2]), np.asarray(reference.decode_latent_to_preview(row)))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))   # one image per candidate
    records = gallery.save_thumbnails(images, "abcdef0123456789", temp_dir=str(tmp_path))
    assert [r["filename"] for r in records] == [f"x0_abcdef012345_{i:04d}.png" for i in range(N)]
    saved = Image.open(tmp_path / "probe_select" / records[2]["filename"])
    assert saved.size == images[2].size and np.array_equal(np.asarray(saved), np.asarray(images[2]))


def test_staged_gallery_payload_carries_every_stage_and_each_fate():
    """Two stages by hand (5 -> 3 -> 2): the payload lists each stage's seeds, scores (NaN as null) and kept
    indices; the top-level fields are the first stage's candidates with the finished ones kept."""
    from probe_select.nodes.engine import gallery
    from probe_select.nodes.engine.stages import StageRecord
    from probe_select.probes.scoring import CandidateScores

    seeds = [10, 11, 12, 13, 14]
    first = CandidateScores(torch.tensor([0.3, float("nan"), 0.9, 0.5, 0.1]), "clipscore", "run-1", seeds)
    second = CandidateScores(torch.tensor([0.2, 0.7, 0.6]), "clipscore", "run-2", [12, 13, 10])
    records = [StageRecord(1, 2, 10, None, "early.safetensors", first, [2, 3, 0], seeds),
               StageRecord(2, 5, 10, None, "late.safetensors", second, [1, 2], [12, 13, 10])]
    payload = gallery.staged_gallery_payload(records)

    assert payload["run_id"] == "run-1" and payload["seeds"] == seeds and payload["mode"] == "top_k"
    assert payload["scores"] == [first.scores[0].item(), None, first.scores[2].item(), first.scores[3].item(),
                                 first.scores[4].item()]
    assert payload["kept"] == [3, 0]                    # seeds 13 and 10, best first at the last stage
    assert payload["pruned_at"] == [None, 1, 2, None, 1]
    stage_1, stage_2 = payload["stages"]
    assert (stage_1["number"], stage_1["step"], stage_1["steps"], stage_1["t"]) == (1, 2, 10, 0.2)
    assert (stage_2["number"], stage_2["step"], stage_2["steps"], stage_2["t"]) == (2, 5, 10, 0.5)
    assert stage_1["probe"] == "early.safetensors" and stage_2["probe"] == "late.safetensors"
    assert stage_1["seeds"] == seeds and stage_1["scores"] == payload["scores"] and stage_1["kept"] == [2, 3, 0]
    assert stage_2["seeds"] == [12, 13, 10] and stage_2["scores"] == second.scores.tolist()
    assert stage_2["kept"] == [1, 2] and stage_2["evaluator"] == "clipscore"
    json.dumps(payload, allow_nan=False)                # what the websocket sends must parse in the browser

    # One stage: the fields of the single-stage payload, unchanged.
    single = gallery.staged_gallery_payload(records[:1])
    assert {k: single[k] for k in ("run_id", "seeds", "scores", "evaluator", "kept", "mode")} == \
        gallery.gallery_payload("run-1", seeds, [2, 3, 0], "top_k", first)
    assert single["pruned_at"] == [None, 1, None, None, 1] and len(single["stages"]) == 1
