"""Every selection and analysis template runs as shipped: its API twin, queued on a real ComfyUI server through
POST /prompt, finishes with success and the values it should produce.

One server for the file. Its model folders hold stand-ins under the public file names the templates
name (a random-weight checkpoint per family, random open_clip weights for CLIPScore), linked from a
cache, so nothing but those files is needed, the way a user who downloaded them runs the templates.
Per family the templates run in the order a user runs them, which also reuses the loaded models:
collect (a few prompts chosen so every train/val/test split has one) -> train (writes the probe the
selection templates load) -> evaluate -> probe selection, modular and one-box -> pick by hand (the
test posts the pick as the gallery's Finish button does) -> CLIPScore on the x0 previews.

What the test changes on the API copy (never on the shipped template): image size 64x64, steps 5
(collect: 10, as it records at 0.1 of the steps), 3 candidates (collect: 2), training epochs 2. Everything else (checkpoint,
probe, dataset and evaluator names, samplers, schedulers, cfg, guidance, tap) runs as shipped.
Flux: the stand-in checkpoint carries no text encoder (T5-XXL alone is 4.7 B parameters), so its
CLIP input comes from the test node ProbeSelectTestFluxTextEncoder instead of the checkpoint's (its
T5 prompt padded to 16 tokens, not 256: see the node's docstring).
The analysis templates (scripts/templates_analysis.py) run after them, each once: sizes and what the
image-set metrics template drops are in the comment above ANALYSIS. The server's input folder holds
seeded random reference images for the OOD and image-set metrics templates.
Stand-ins are cached in PROBE_SELECT_TEST_CACHE (default bench/cache), written on first use.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from devtools import stand_ins
from server_utils import ComfyServer, output_images

pytestmark = pytest.mark.server

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "example_workflows" / "api"
CACHE_DIR = Path(os.environ.get("PROBE_SELECT_TEST_CACHE", ROOT / "bench" / "cache"))
TEST_NODES = Path(__file__).resolve().parent / "custom_nodes" / "probe_select_test_nodes"
SIZE, STEPS, CANDIDATES, EPOCHS = 64, 5, 3, 2
COLLECT_STEPS, COLLECT_CANDIDATES = 10, 2        # the collector records at 0.1 of the steps
PICKED = [0, 2]
FLUX_TEXT_ENCODER = "ProbeSelectTestFluxTextEncoder"


def _templates_module():
    """scripts/templates_selection.py (the families, public names, probe and dataset names)."""
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["templates_selection"]


templates = _templates_module()

# Every family; PROBE_SELECT_TEMPLATE_FAMILIES=sd15,sd35 runs some of them.
FAMILY_KEYS = list(templates.FAMILIES)
if os.environ.get("PROBE_SELECT_TEMPLATE_FAMILIES"):
    FAMILY_KEYS = [k for k in os.environ["PROBE_SELECT_TEMPLATE_FAMILIES"].split(",") if k in FAMILY_KEYS]


def checkpoint_file(family: str) -> Path:
    return stand_ins.cached_checkpoint_stand_in(family, CACHE_DIR)


def open_clip_file() -> Path:
    """The templates' CLIPScore weights: devtools/stand_ins.py's open_clip stand-in (towers aligned, so
    the scores vary and the collected targets are not constant), cached."""
    return stand_ins.cached_open_clip_stand_in(templates.CLIP_ARCH, CACHE_DIR)


def split_prompts() -> list[str]:
    """Prompts such that each split (by prompt hash, seed 0) gets one: train and validation for the
    trainer, test for the evaluation."""
    from probe_select.probes.training.dataset.rows import prompt_id
    from probe_select.probes.training.dataset.splits import split_by_prompt

    wanted = {"train": 1, "val": 1, "test": 1}
    chosen: list[str] = []
    for i in range(1000):
        prompt = f"a photo of a red fox, variation {i}"
        split = next(name for name, rows in split_by_prompt([prompt_id(prompt)], seed=0).items() if len(rows))
        if wanted[split] > 0:
            wanted[split] -= 1
            chosen.append(prompt)
        if not any(wanted.values()):
            return chosen
    raise AssertionError("no prompts for every split")


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, pack):
    base = tmp_path_factory.mktemp("comfy_templates")
    custom_nodes = {"probe-select": ROOT}
    if "flux" in FAMILY_KEYS:
        custom_nodes["probe_select_test_nodes"] = TEST_NODES
    srv = ComfyServer(base, custom_nodes=custom_nodes)
    for key in FAMILY_KEYS:
        srv.add_model("checkpoints", checkpoint_file(key), templates.FAMILIES[key].checkpoint)
    srv.model_dir("evaluators").mkdir(parents=True, exist_ok=True)
    srv.add_model("evaluators", open_clip_file(), templates.CLIP_WEIGHTS)
    write_reference_images(srv.input_dir)
    t0 = time.monotonic()
    with srv:
        log.info("ComfyUI started in %.1f s; log at %s", time.monotonic() - t0, srv.log_path)
        yield srv


@pytest.fixture(scope="module", params=FAMILY_KEYS)
def family(request):
    return templates.FAMILIES[request.param]


def write_reference_images(input_dir: Path) -> None:
    """REFERENCE_IMAGES seeded random PNGs in input/ood_reference and input/metrics_reference, the
    folders the OOD and image-set metrics templates read."""
    import numpy as np

    rng = np.random.default_rng(0)
    for folder in ("ood_reference", "metrics_reference"):
        (input_dir / folder).mkdir(parents=True, exist_ok=True)
        for i in range(REFERENCE_IMAGES):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(input_dir / folder / f"reference_{i}.png")


def api_copy(family, what: str) -> dict:
    """The shipped API twin with the test's sizes (module docstring); nothing else changed."""
    workflow = json.loads((API_DIR / f"{family.label}_{what}.json").read_text())
    for node_id, node in list(workflow.items()):
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=SIZE, height=SIZE)
        if kind in ("ProbeSelectEarlySampler", "ProbeSelectSampler", "BasicScheduler"):
            inputs["steps"] = STEPS
        if kind in ("ProbeSelectEarlySampler", "ProbeSelectSampler", "ProbeSelectEarlySamplerCustom"):
            inputs["candidates"] = CANDIDATES
        if kind == "ProbeSelectCollectSampler":
            inputs.update(steps=COLLECT_STEPS, candidates=COLLECT_CANDIDATES)
        if kind == "ProbeSelectTrain":
            inputs["epochs"] = EPOCHS
        if kind == "SaveImage":
            inputs["filename_prefix"] = f"{inputs['filename_prefix']}_{uuid.uuid4().hex[:8]}"
    if family.key == "flux" and nodes_of(workflow, "CheckpointLoaderSimple"):
        (loader,) = nodes_of(workflow, "CheckpointLoaderSimple")
        encoder = str(max(int(i) for i in workflow) + 1)
        workflow[encoder] = {"class_type": FLUX_TEXT_ENCODER, "inputs": {"seed": 0}, "_meta": {"title": "test CLIP"}}
        for node in workflow.values():
            for name, value in node["inputs"].items():
                if value == [loader, 1]:
                    node["inputs"][name] = [encoder, 0]
    return workflow


def nodes_of(workflow: dict, class_type: str) -> list[str]:
    return [i for i, node in workflow.items() if node["class_type"] == class_type]


def run(server: ComfyServer, workflow: dict, timeout: float = 300.0) -> dict:
    t0 = time.monotonic()
    entry = server.wait(server.queue(workflow), timeout=timeout)
    assert entry["status"]["status_str"] == "success", (
        f"prompt failed: {json.dumps(entry['status']['messages'])[:4000]}\n{server.log_tail()}")
    log.info("ran in %.1f s", time.monotonic() - t0)
    return entry


def saved(server: ComfyServer, workflow: dict, entry: dict, count: int) -> list[Path]:
    """The SaveImage files: `count` PNGs of SIZE x SIZE, each carrying this workflow."""
    (save,) = nodes_of(workflow, "SaveImage")
    records = output_images(entry, save)
    assert len(records) == count, records
    paths = [server.output_dir / r["subfolder"] / r["filename"] for r in records]
    for path in paths:
        with Image.open(path) as im:
            embedded = json.loads(im.info["prompt"])       # ComfyUI adds keys of its own (is_changed)
            assert im.size == (SIZE, SIZE), (path, im.size)
            assert {i: (n["class_type"], n["inputs"]) for i, n in embedded.items()} == {
                i: (n["class_type"], n["inputs"]) for i, n in workflow.items()}, path
    return paths


def text_of(entry: dict, node_id: str) -> str:
    texts = entry["outputs"].get(node_id, {}).get("text")
    assert texts and len(texts) == 1, f"no text from node {node_id}: {entry['outputs']}"
    return texts[0]


def score_rows(text: str) -> list[dict]:
    """The candidate rows of a Score / Top-K text (`#rank  candidate i  seed s  score [kept]`)."""
    rows = []
    for line in text.strip().splitlines()[1:]:
        parts = line.split()
        if not parts or not parts[0].startswith("#"):
            continue
        rows.append({"candidate": int(parts[2]), "seed": int(parts[4]), "score": float(parts[5]),
                     "kept": parts[-1] == "kept"})
    return rows


def check_scores(text: str, kept: int) -> None:
    rows = score_rows(text)
    assert sorted(r["candidate"] for r in rows) == list(range(CANDIDATES)), text
    scores = [r["score"] for r in rows]
    assert all(math.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True), text
    assert sum(r["kept"] for r in rows) in (0, kept), text


@pytest.fixture(scope="module")
def collected(server, family):
    """The collect template run once per prompt (split_prompts): the entries and the prompts."""
    entries, prompts = [], split_prompts()
    for prompt in prompts:
        workflow = api_copy(family, "collect_probe_dataset")
        (text,) = nodes_of(workflow, "PrimitiveStringMultiline")
        workflow[text]["inputs"]["value"] = prompt
        entries.append((workflow, run(server, workflow)))
    return entries, prompts


@pytest.fixture(scope="module")
def trained(server, family, collected):
    workflow = api_copy(family, "train_probe")
    return workflow, run(server, workflow)


# ---- tests --------------------------------------------------------------------------------------

def test_collect_writes_a_shard_per_prompt(server, family, collected):
    from probe_select.probes.training.dataset import ProbeDataset

    entries, prompts = collected
    for i, (workflow, entry) in enumerate(entries):
        (writer,) = nodes_of(workflow, "ProbeSelectDatasetWriter")
        assert text_of(entry, writer) == (f"{family.dataset}: {(i + 1) * COLLECT_CANDIDATES} rows "
                                          f"({COLLECT_CANDIDATES} added)")
    dataset = ProbeDataset(server.output_dir / "probe_select_datasets" / family.dataset)
    assert len(dataset) == len(prompts) * COLLECT_CANDIDATES
    assert sorted(set(dataset.prompts)) == sorted(prompts)


def test_train_writes_the_probe_the_selection_templates_load(server, family, trained):
    from probe_select.probes.io import read_probe_metadata

    workflow, entry = trained
    (train,) = nodes_of(workflow, "ProbeSelectTrain")
    report = text_of(entry, train)
    assert report.startswith(f"probe {family.probe}:") and "epochs run: 2" in report, report
    probe = server.model_dir("probes") / family.probe
    metadata = read_probe_metadata(probe)
    assert abs(metadata.checkpoint_t - templates.CHECKPOINT_PERCENT) <= 0.1 and "clip" in metadata.evaluator.lower()
    assert len(output_images(entry)) == 2          # the loss curves and the test-prompt scatter


def test_evaluate_reports_on_held_out_prompts(server, family, trained):
    workflow = api_copy(family, "evaluate_probe")
    entry = run(server, workflow)
    (evaluate,) = nodes_of(workflow, "ProbeSelectEvaluateProbe")
    report = text_of(entry, evaluate)
    assert "spearman" in report.lower() and family.dataset in report, report
    assert len(output_images(entry)) == 1


def test_probe_selection_finishes_the_best(server, family, trained):
    workflow = api_copy(family, "probe_selection")
    entry = run(server, workflow)
    saved(server, workflow, entry, count=templates.KEEP)
    (score,) = nodes_of(workflow, "ProbeSelectScore")
    (top_k,) = nodes_of(workflow, "ProbeSelectTopK")
    check_scores(text_of(entry, score), templates.KEEP)
    assert sum(r["kept"] for r in score_rows(text_of(entry, top_k))) == templates.KEEP
    assert len(output_images(entry, nodes_of(workflow, "PreviewImage")[0])) == CANDIDATES


def test_probe_one_box_finishes_the_best(server, family, trained):
    workflow = api_copy(family, "probe_selection_one_box")
    entry = run(server, workflow)
    saved(server, workflow, entry, count=templates.KEEP)
    (sampler,) = nodes_of(workflow, "ProbeSelectSampler")
    check_scores(text_of(entry, sampler), templates.KEEP)


def test_probe_plus_x0_preview_blend_selection(server, family, trained):
    workflow = api_copy(family, "probe_plus_x0_preview_blend_selection")
    entry = run(server, workflow)
    saved(server, workflow, entry, count=templates.KEEP)
    (probe,), (preview,), (blend,), (top_k,) = (nodes_of(workflow, node) for node in (
        "ProbeSelectScore", "ProbeSelectPreviewScore", "ProbeSelectBlendScores", "ProbeSelectTopK"))
    for node in (probe, preview, blend):
        check_scores(text_of(entry, node), templates.KEEP)
    weight = templates.BLEND_PROBE_WEIGHT
    assert text_of(entry, blend).startswith(f"blend w={weight:.2f} "), text_of(entry, blend)
    assert workflow[blend]["inputs"]["first_scores"] == [preview, 0]
    assert workflow[blend]["inputs"]["second_scores"] == [probe, 0]
    # Top-K keeps the blend's best, whatever either scorer alone would keep
    kept = [r["candidate"] for r in score_rows(text_of(entry, top_k)) if r["kept"]]
    assert kept == [r["candidate"] for r in score_rows(text_of(entry, blend))][:templates.KEEP]


def test_probe_then_x0_preview_two_stages(server, family, trained):
    workflow = api_copy(family, "probe_then_x0_preview_two_stages")
    # more candidates than the first stage keeps (the test's usual 3 would all survive it)
    started = templates.FIRST_KEEP + 2
    (early,) = nodes_of(workflow, "ProbeSelectEarlySampler") + nodes_of(workflow, "ProbeSelectEarlySamplerCustom")
    workflow[early]["inputs"]["candidates"] = started
    entry = run(server, workflow)
    saved(server, workflow, entry, count=templates.KEEP)
    (probe,), (preview,) = (nodes_of(workflow, node) for node in ("ProbeSelectScore", "ProbeSelectPreviewScore"))
    first, second = sorted(nodes_of(workflow, "ProbeSelectTopK"), key=lambda i: workflow[i]["inputs"]["keep"],
                           reverse=True)
    ranked = score_rows(text_of(entry, probe))
    assert sorted(r["candidate"] for r in ranked) == list(range(started))
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    # the probe's stage keeps its best FIRST_KEEP; the preview scores only those (by seed: the survivors are a new
    # batch), at the later checkpoint
    kept_first = [r["seed"] for r in score_rows(text_of(entry, first)) if r["kept"]]
    assert kept_first == [r["seed"] for r in ranked][:templates.FIRST_KEEP]
    later = score_rows(text_of(entry, preview))
    assert sorted(r["seed"] for r in later) == sorted(kept_first), text_of(entry, preview)
    (resumed,) = [i for i in nodes_of(workflow, "ProbeSelectResume") + nodes_of(workflow, "ProbeSelectResumeCustom")
                  if workflow[i]["inputs"].get("until_percent") == templates.LATER_PERCENT]
    assert workflow[preview]["inputs"]["x0_preview"] == [resumed, 1]
    # the second Top-K keeps the preview's best of the survivors
    kept = [r["seed"] for r in score_rows(text_of(entry, second)) if r["kept"]]
    assert kept == [r["seed"] for r in later][:templates.KEEP]


def _waiting(server: ComfyServer) -> list:
    with urllib.request.urlopen(f"{server.url}/probe_select/pick", timeout=10) as answer:
        return json.loads(answer.read())["waiting"]


def test_pick_by_hand_needs_only_the_checkpoint(server, family):
    workflow = api_copy(family, "pick_by_hand_x0_previews")
    (pick,) = nodes_of(workflow, "ProbeSelectPickCandidates")
    prompt_id = server.queue(workflow)
    deadline = time.monotonic() + 300
    while not (waiting := _waiting(server)):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)
    assert [(w["node_id"], w["candidates"]) for w in waiting] == [(pick, CANDIDATES)]
    answer = server.request("POST", "/probe_select/pick", {"node_id": pick, "indices": PICKED})
    assert answer["picked"] == PICKED
    entry = server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"])[:4000]
    saved(server, workflow, entry, count=len(PICKED))
    assert _waiting(server) == []


def test_x0_clipscore_selection(server, family):
    workflow = api_copy(family, "x0_preview_CLIPScore_selection")
    entry = run(server, workflow)
    saved(server, workflow, entry, count=templates.KEEP)
    (score,) = nodes_of(workflow, "ProbeSelectPreviewScore")
    check_scores(text_of(entry, score), templates.KEEP)


# ---- analysis templates -------------------------------------------------------------------------
# Each runs once (after the selection templates), with the test's sizes: 64x64 images, 5 steps (the
# activation PCA collector: 10, as its first checkpoint 0.1 at 5 steps rounds to step 0, which it
# refuses), batches of at most ANALYSIS_BATCH images, 2 collector candidates, 3 slerp points. The
# image-set metrics template loses its ProbeSelectLoadInception node and the metrics that need it
# (FID, KID, precision/recall, density/coverage): its Inception file's SHA-256 is checked and no
# stand-in can match it; CMMD and CLIPScore (on the open_clip stand-in) still run.
ANALYSIS_BATCH, ANALYSIS_COLLECT_STEPS, SLERP_COUNT, REFERENCE_IMAGES = 2, 10, 3, 4
INCEPTION_METRICS = ("fid", "kid", "precision_recall", "density_coverage")
ANALYSIS = {        # template -> its family (the file-name label)
    "SD1.5_analysis_schedule_inspector": "sd15", "SD1.5_analysis_attention_maps": "sd15",
    "SD1.5_analysis_activation_PCA": "sd15", "SD1.5_analysis_latent_slerp": "sd15",
    "SD1.5_analysis_conditioning_direction": "sd15", "SD1.5_analysis_OOD_scores": "sd15",
    "SD1.5_analysis_image_set_metrics": "sd15", "SD3.5_analysis_attention_maps": "sd35",
}
ANALYSIS_RUN = [name for name, key in ANALYSIS.items() if key in FAMILY_KEYS]


def analysis_copy(name: str) -> dict:
    """The shipped analysis API twin with the test's sizes (comment above); nothing else changed."""
    workflow = json.loads((API_DIR / f"{name}.json").read_text())
    for node_id, node in list(workflow.items()):
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=SIZE, height=SIZE, batch_size=min(inputs["batch_size"], ANALYSIS_BATCH))
        if kind in ("KSampler", "BasicScheduler", "ProbeSelectAttentionMaps"):
            inputs["steps"] = STEPS
        if kind == "ProbeSelectCollectSampler":
            inputs.update(steps=ANALYSIS_COLLECT_STEPS, candidates=COLLECT_CANDIDATES)
        if kind == "ProbeSelectLatentSlerp":
            inputs["count"] = SLERP_COUNT
        if kind == "ProbeSelectLoadInception":
            del workflow[node_id]
        if kind == "ProbeSelectImageMetrics":
            inputs.pop("inception")
            inputs.update({metric: False for metric in INCEPTION_METRICS})
        if kind == "SaveImage":
            inputs["filename_prefix"] = f"{inputs['filename_prefix']}_{uuid.uuid4().hex[:8]}"
    return workflow


def _only(workflow: dict, class_type: str) -> str:
    (node_id,) = nodes_of(workflow, class_type)
    return node_id


def preview_counts(workflow: dict, entry: dict) -> list[int]:
    """Images shown by each PreviewImage node, in node-id order."""
    return [len(output_images(entry, i)) for i in sorted(nodes_of(workflow, "PreviewImage"), key=int)]


def test_every_analysis_template_is_run():
    shipped = {p.stem for p in API_DIR.glob("*_analysis_*.json")}
    assert shipped == set(ANALYSIS), "a new analysis template needs its checks in test_analysis_template"


@pytest.mark.parametrize("name", ANALYSIS_RUN)
def test_analysis_template(server, name):
    workflow = analysis_copy(name)
    entry = run(server, workflow)
    what = name.split("_analysis_")[1]
    if what == "schedule_inspector":
        text = text_of(entry, _only(workflow, "ProbeSelectScheduleInspector"))
        steps = workflow[_only(workflow, "ProbeSelectScheduleInspector")]["inputs"]["steps"]
        for scheduler in ("normal", "karras", "exponential"):
            assert f"\n{scheduler} [vp, {steps} steps]: logSNR" in text, text
        assert text.count("checkpoint 20% = step 4/20") == 3, text
        assert preview_counts(workflow, entry) == [1]
    elif what == "attention_maps":
        text = text_of(entry, _only(workflow, "ProbeSelectAttentionMaps"))
        assert f"attention calls recorded over {STEPS} steps" in text, text
        for word in ("red fox", "blue mailbox", "left of"):
            assert f"\n{word}: tokens [" in text and f"-> step {STEPS}:" in text, text
        assert preview_counts(workflow, entry) == [1, 1]          # the maps, the sharpness
        saved(server, workflow, entry, count=1)
    elif what == "activation_PCA":
        text = text_of(entry, _only(workflow, "ProbeSelectActivationPCA"))
        assert f"{COLLECT_CANDIDATES} candidates x 4 checkpoints (0.10, 0.20, 0.40, 0.80)" in text, text
        assert "variance explained: PC1" in text, text
        assert preview_counts(workflow, entry) == [1, COLLECT_CANDIDATES]   # the PCA grid, the candidates
    elif what == "latent_slerp":
        saved(server, workflow, entry, count=SLERP_COUNT)
    elif what == "conditioning_direction":
        strengths = workflow[_only(workflow, "ProbeSelectConditioningDirection")]["inputs"]["strengths"]
        saved(server, workflow, entry, count=len(strengths.split(",")))
        text = text_of(entry, _only(workflow, "ProbeSelectConditioningDirection"))
        assert text == "5 rows, strengths [0.0, 0.5, 1.0, 1.5, 2.0], mode per_token", text
    elif what == "OOD_scores":
        text_of(entry, _only(workflow, "ProbeSelectOODFit"))
        text = text_of(entry, _only(workflow, "ProbeSelectOODScore"))
        assert text.startswith(f"OOD scores against {REFERENCE_IMAGES} reference samples"), text
        rows = [line for line in text.splitlines() if line.startswith("sample ")]
        assert [r.split(":")[0] for r in rows] == [f"sample {i}" for i in range(ANALYSIS_BATCH)], text
        assert preview_counts(workflow, entry) == [ANALYSIS_BATCH]
    elif what == "image_set_metrics":
        text = text_of(entry, _only(workflow, "ProbeSelectImageMetrics"))
        metrics = {line.split(":")[0]: line for line in text.splitlines()[1:] if not line.startswith(" ")}
        assert {"cmmd", "clip_score"} <= set(metrics) and not set(metrics) & {"fid", "kid", "precision", "density"}, text
        assert f"({ANALYSIS_BATCH} generated vs {REFERENCE_IMAGES} reference" in metrics["cmmd"], text
        assert f"({ANALYSIS_BATCH} generated)" in metrics["clip_score"], text
        assert math.isfinite(float(metrics["cmmd"].split()[1])), text
        assert f"folder metrics_reference ({REFERENCE_IMAGES} images)" in text, text
    else:
        raise AssertionError(f"no checks for {name}")
