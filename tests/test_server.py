"""End to end against a real ComfyUI server process with the pack installed as a custom node.

One server for the whole file (session scope): a base directory under pytest's tmp dir holds the
tiny SD1.x checkpoint (tests/make_checkpoint.py, cached in bench/cache/) and a small random probe
written for the tap that ProbeSelectTap "auto" picks on that checkpoint's UNet. The workflow under
test is the API-format file workflows/api/probe_select_basic.json.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from make_checkpoint import cached_tiny_sd15_checkpoint
from server_utils import ComfyServer, history_messages, output_images

pytestmark = pytest.mark.server

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "api" / "probe_select_basic.json"
CACHE_DIR = Path(os.environ.get("PROBE_SELECT_TEST_CACHE", ROOT / "bench" / "cache"))

PUBLIC_NODES = ("ProbeSelectTap", "ProbeSelectEarlySampler", "ProbeSelectLoadProbe", "ProbeSelectScore",
                "ProbeSelectTopK", "ProbeSelectResume", "ProbeSelectSampler")
PACK_MODULE = "custom_nodes.probe-select"
PROBE_NAME = "tiny_sd1_auto.safetensors"
PROBE_EVALUATOR = "clipscore"
FEATURE_SIZE = 4

# Node ids in workflows/api/probe_select_basic.json.
CKPT, TAP, EARLY, LOAD_PROBE, SCORE, TOPK, SAVE = "1", "5", "6", "7", "8", "9", "12"
SEED, CANDIDATES, KEEP, SIZE = 42, 4, 2, 64

SCORE_LINE = re.compile(r"^#(\d+)\s+candidate (\d+)\s+seed (\d+)\s+(\S+)(\s+kept)?$")


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The ~284 MB random SD1.x checkpoint, written once and reused (bench/cache is git-ignored)."""
    return cached_tiny_sd15_checkpoint(CACHE_DIR)


@pytest.fixture(scope="session")
def auto_tap(pack, tiny_checkpoint):
    """(family, module path, channels) that ProbeSelectTap "auto" taps on the checkpoint's UNet.

    Loaded in-process the way CheckpointLoaderSimple loads it (UNet only), so the probe written for
    the server is computed from the real model rather than hard-coded.
    """
    import comfy.sd
    from probe_select.nodes.capture import find_tap
    from probe_select.nodes.tap import ProbeSelectTap

    model = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint), output_vae=False, output_clip=False)[0]
    tapped = ProbeSelectTap.execute(model, "auto", FEATURE_SIZE).result[0]
    tap = find_tap(tapped)
    channels = tapped.model.diffusion_model.get_submodule(tap.path).out_channels
    log.info("auto tap on the tiny checkpoint: %s %s (%d channels)", tap.family, tap.path, channels)
    return tap.family, tap.path, channels


def _write_probe(path: Path, family: str, tap_path: str, channels: int) -> None:
    from probe_select.probes.io import ProbeMetadata, save_probe
    from probe_select.probes.model import ProbeConfig, build_probe

    config = ProbeConfig(in_channels=channels, feature_size=FEATURE_SIZE, stem_width=16, widths=(16, 32),
                         embed_dim=32, time_embed_dim=16, head_hidden=(32,), mlp_hidden=32)
    meta = ProbeMetadata(backbone_family=family, tap=tap_path, checkpoint_t=0.2,
                         feature_shape=(channels, FEATURE_SIZE, FEATURE_SIZE), pooling="adaptive_avg",
                         evaluator=PROBE_EVALUATOR, config=config)
    save_probe(path, build_probe(config, seed=7), meta)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_checkpoint, auto_tap):
    base = tmp_path_factory.mktemp("comfy_server")
    srv = ComfyServer(base)
    srv.add_model("checkpoints", tiny_checkpoint)
    _write_probe(srv.model_dir("probes") / PROBE_NAME, *auto_tap)
    t0 = time.monotonic()
    with srv:
        log.info("ComfyUI started in %.1f s; log at %s", time.monotonic() - t0, srv.log_path)
        yield srv


def basic_workflow(tiny_checkpoint: Path, prefix: str, **early_inputs) -> dict:
    workflow = json.loads(WORKFLOW.read_text())
    workflow[CKPT]["inputs"]["ckpt_name"] = tiny_checkpoint.name
    workflow[LOAD_PROBE]["inputs"]["probe_name"] = PROBE_NAME
    workflow[SAVE]["inputs"]["filename_prefix"] = prefix
    workflow[EARLY]["inputs"].update(early_inputs)
    return workflow


def unique_prefix(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def run_to_end(server: ComfyServer, workflow: dict, timeout: float = 120.0) -> dict:
    prompt_id = server.queue(workflow)
    entry = server.wait(prompt_id, timeout=timeout)
    assert entry["status"]["status_str"] == "success", (
        f"prompt failed: {json.dumps(entry['status']['messages'])[:4000]}\n{server.log_tail()}")
    return entry


def parse_scores_text(text: str) -> tuple[str, list[dict]]:
    """The header and the candidate rows of a Score/TopK node's text: rank, candidate, seed, score, kept."""
    header, *lines = text.strip().splitlines()
    rows = []
    for line in lines:
        match = SCORE_LINE.match(line.strip())
        assert match, f"unexpected line in the scores text: {line!r}"
        rank, candidate, seed, score, kept = match.groups()
        rows.append({"rank": int(rank), "candidate": int(candidate), "seed": int(seed), "score": float(score),
                     "kept": kept is not None})
    return header, rows


def saved_images(server: ComfyServer, entry: dict, prefix: str) -> list[Path]:
    """Paths of the images SaveImage reported, checked against what is on disk for that prefix."""
    records = output_images(entry, SAVE)
    assert all(r["type"] == "output" and r["subfolder"] == "" for r in records), records
    paths = [server.output_dir / r["filename"] for r in records]
    on_disk = sorted(server.output_dir.glob(f"{prefix}_*.png"))
    assert sorted(paths) == on_disk, f"history lists {paths}, output dir has {on_disk}"
    return paths


@pytest.fixture(scope="session")
def basic_run(server, tiny_checkpoint):
    """The basic workflow run once: (history entry, saved image paths)."""
    prefix = unique_prefix("basic")
    t0 = time.monotonic()
    entry = run_to_end(server, basic_workflow(tiny_checkpoint, prefix))
    log.info("basic workflow ran in %.1f s", time.monotonic() - t0)
    return entry, saved_images(server, entry, prefix)


def check_scores_and_selection(entry: dict) -> tuple[list[dict], list[dict]]:
    """Assert the Score and TopK texts list the 4 candidates, best first, and TopK keeps the top 2."""
    outputs = entry["outputs"]
    texts = {}
    for node in (SCORE, TOPK):
        assert node in outputs and len(outputs[node]["text"]) == 1, f"no ui text from node {node}: {outputs}"
        texts[node] = outputs[node]["text"][0]
    header, scored = parse_scores_text(texts[SCORE])
    topk_header, selected = parse_scores_text(texts[TOPK])
    assert header == topk_header == f"{PROBE_EVALUATOR} (predicted), best first:"
    assert [r["rank"] for r in scored] == list(range(1, CANDIDATES + 1))
    assert sorted(r["candidate"] for r in scored) == list(range(CANDIDATES))
    assert all(r["seed"] == SEED + r["candidate"] for r in scored)     # candidate i uses seed + i
    scores = [r["score"] for r in scored]
    assert all(math.isfinite(s) for s in scores), scores
    assert scores == sorted(scores, reverse=True), "not best first"
    assert not any(r["kept"] for r in scored)
    # TopK shows the same ranking and marks exactly the best K as kept.
    strip = lambda rows: [{k: v for k, v in r.items() if k != "kept"} for r in rows]
    assert strip(selected) == strip(scored)
    assert [r["kept"] for r in selected] == [True] * KEEP + [False] * (CANDIDATES - KEEP)
    return scored, selected


def combo_options(spec: list) -> list:
    """Options of a combo input in /object_info: V3 ["COMBO", {"options": [...]}] or V1 [[...], {...}]."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def image_arrays(paths: list[Path]) -> list[np.ndarray]:
    arrays = []
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (SIZE, SIZE), (path, im.format, im.size)
            # SaveImage embeds the API prompt: the file comes from this workflow.
            prompt = json.loads(im.info["prompt"])
            assert prompt[EARLY]["class_type"] == "ProbeSelectEarlySampler"
            assert prompt[EARLY]["inputs"]["seed"] == SEED
            arrays.append(np.asarray(im.convert("RGB")))
    return arrays


# ---- tests --------------------------------------------------------------------------------------

def test_pack_imports_and_lists_every_node(server, auto_tap):
    log_text = server.log_text()
    startup = log_text.split("To see the GUI go to", 1)[0]
    assert "IMPORT FAILED" not in log_text, server.log_tail()
    assert "Traceback" not in startup, startup[-6000:]
    import_lines = [line for line in startup.splitlines() if line.rstrip().endswith("custom_nodes/probe-select")]
    assert len(import_lines) == 1 and "seconds:" in import_lines[0], startup[-6000:]
    suspicious = [line for line in startup.splitlines()
                  if re.search(r"probe[-_]select", line, re.I)
                  and re.search(r"fail|error|exception|cannot|could not|warning", line, re.I)]
    assert suspicious == [], suspicious

    info = server.object_info()
    missing = [node for node in PUBLIC_NODES if node not in info]
    assert missing == [], f"not in /object_info: {missing}"
    for node in PUBLIC_NODES:
        assert info[node]["python_module"] == PACK_MODULE, (node, info[node]["python_module"])
        assert info[node]["category"] == "sampling/probe_select", (node, info[node]["category"])
    # Every node the pack registers is one of ours, named like ours.
    ours = sorted(name for name, node in info.items() if node.get("python_module") == PACK_MODULE)
    assert set(PUBLIC_NODES) <= set(ours) and all(name.startswith("ProbeSelect") for name in ours)

    load_probe = server.object_info("ProbeSelectLoadProbe")["ProbeSelectLoadProbe"]
    assert combo_options(load_probe["input"]["required"]["probe_name"]) == [PROBE_NAME]
    assert load_probe["output"] == ["PS_PROBE"]
    # The probe the server lists was written for the tap "auto" picks on this checkpoint.
    from probe_select.probes.io import read_probe_metadata

    family, tap_path, channels = auto_tap
    assert family == "sd1" and tap_path.startswith("output_blocks.")
    meta = read_probe_metadata(server.model_dir("probes") / PROBE_NAME)
    assert (meta.backbone_family, meta.tap, meta.feature_shape) == (family, tap_path, (channels, FEATURE_SIZE, FEATURE_SIZE))


def test_workflow_json_matches_the_node_schemas(server, tiny_checkpoint):
    info = server.object_info()
    workflow = basic_workflow(tiny_checkpoint, "schema")
    for node_id, node in workflow.items():
        schema = info[node["class_type"]]["input"]
        declared = {**schema.get("required", {}), **schema.get("optional", {})}
        unknown = set(node["inputs"]) - set(declared)
        assert not unknown, f"node {node_id} ({node['class_type']}) has undeclared inputs {unknown}"
        absent = set(schema.get("required", {})) - set(node["inputs"])
        assert not absent, f"node {node_id} ({node['class_type']}) lacks required inputs {absent}"
    assert combo_options(info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]) == [tiny_checkpoint.name]


def test_probe_select_workflow_runs(server, basic_run):
    entry, paths = basic_run
    status = entry["status"]
    assert status["completed"] is True
    events = [m[0] for m in history_messages(entry)]
    assert events[0] == "execution_start" and events[-1] == "execution_success", events
    assert "execution_error" not in events and "execution_interrupted" not in events

    assert len(paths) == KEEP and all(p.is_file() and p.stat().st_size > 0 for p in paths)
    first, second = image_arrays(paths)
    assert first.shape == (SIZE, SIZE, 3)
    assert not np.array_equal(first, second), "the two kept candidates (different seeds) gave the same image"

    check_scores_and_selection(entry)


def test_cancel_during_early_sampling_then_next_run_works(server, tiny_checkpoint, basic_run):
    # 360 early steps for 4 candidates take ~50 s on 2 CPU cores; the interrupt lands within one step.
    long_steps, long_checkpoint = 400, 0.9
    early_steps = round(long_steps * long_checkpoint)
    cancelled_prefix = unique_prefix("cancelled")
    workflow = basic_workflow(tiny_checkpoint, cancelled_prefix, steps=long_steps, checkpoint=long_checkpoint)

    with server.events() as events:
        prompt_id = server.queue(workflow)
        server.wait_running(prompt_id, timeout=60)
        # Interrupt only once the early sampler itself is stepping (not while models load).
        events.wait_for(lambda m: m["type"] == "progress" and m["data"].get("prompt_id") == prompt_id
                        and m["data"].get("node") == EARLY and m["data"]["value"] >= 2, timeout=60)
        interrupted_at = time.monotonic()
        server.interrupt(prompt_id)
        entry = server.wait(prompt_id, timeout=60)
        stopped_after = time.monotonic() - interrupted_at
        progress = [d for d in events.of_type("progress", prompt_id) if d["node"] == EARLY]

    status = entry["status"]
    assert status["status_str"] == "error" and status["completed"] is False, status
    events_seen = [m[0] for m in history_messages(entry)]
    assert "execution_interrupted" in events_seen, events_seen
    assert "execution_success" not in events_seen and "execution_error" not in events_seen, events_seen
    (interrupted,) = [m[1] for m in history_messages(entry, "execution_interrupted")]
    assert interrupted["prompt_id"] == prompt_id
    assert interrupted["node_id"] == EARLY and interrupted["node_type"] == "ProbeSelectEarlySampler", interrupted
    assert not set(interrupted["executed"]) & {SCORE, TOPK, SAVE}, interrupted
    # It stopped in the early phase, promptly: far fewer steps than asked, nothing saved.
    assert all(d["max"] == early_steps for d in progress), progress[:3]
    assert max(d["value"] for d in progress) < early_steps // 2, progress[-3:]
    assert stopped_after < 15, f"took {stopped_after:.1f} s to stop"
    assert entry["outputs"] == {}
    assert list(server.output_dir.glob(f"{cancelled_prefix}_*")) == []
    queue = server.queue_state()
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    log_text = server.log_text()
    assert "Processing interrupted" in log_text
    assert "!!! Exception during processing" not in log_text, server.log_tail()

    # The next run works and reproduces the run from before the cancel exactly.
    prefix = unique_prefix("after_cancel")
    again = run_to_end(server, basic_workflow(tiny_checkpoint, prefix))
    (cached,) = [m[1]["nodes"] for m in history_messages(again, "execution_cached")]
    assert EARLY not in cached, f"the early sampler came from ComfyUI's cache ({cached}): nothing was re-run"
    paths = saved_images(server, again, prefix)
    assert len(paths) == KEEP
    scored, selected = check_scores_and_selection(again)
    before_entry, before_paths = basic_run
    assert again["outputs"][SCORE]["text"] == before_entry["outputs"][SCORE]["text"]
    assert again["outputs"][TOPK]["text"] == before_entry["outputs"][TOPK]["text"]
    for now, before in zip(image_arrays(paths), image_arrays(before_paths)):
        assert np.array_equal(now, before), "the run after the cancel differs from the one before it"
