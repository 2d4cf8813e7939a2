"""`make demo` on what a fresh clone has: the committed proxy models and demo probes.

The demo runs in its own process (it loads custom nodes and sets ComfyUI's output directory, which
must not leak into the other tests), on a reduced setting: 4 candidates, 5 steps.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from server_utils import default_python

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "bench" / "proxy_world" / "weights"


def test_the_demo_scores_with_the_scorer_validation_favoured():
    """`--scorer auto` reads the committed run's choice, which proxy_bench made by validation figures only."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "bench"))
    saved = json.loads((ROOT / "bench" / "results" / "proxy_bench.json").read_text())
    for family, res in saved["families"].items():
        row = res["by_t"][min(res["by_t"], key=lambda c: abs(float(c) - 0.2))]
        validation = {"x0_preview": row["x0_preview"]["val_within"], "probe": row[res["best_learned"]]["val_within"]}
        assert demo.demo_scorer(family) == max(validation, key=validation.get)
    assert demo.demo_scorer("no such family") == "probe"
    # the probe's graph taps the model and scores the activations; the x0 preview's decodes and evaluates, untapped
    probe = demo.workflow("dit", "dit_t0.2.safetensors", 4, 1, 0, 10, demo.PROMPT, 4.0, "euler", "probe")
    assert probe["6"]["inputs"]["model"] == ["5", 0] and probe["5"]["class_type"] == "ProbeSelectTap"
    assert probe["8"]["class_type"] == "ProbeSelectScore" and probe["8"]["inputs"]["activations"] == ["6", 2]
    preview = demo.workflow("dit", "", 4, 1, 0, 10, demo.PROMPT, 4.0, "euler", "x0_preview")
    assert "5" not in preview and preview["6"]["inputs"]["model"] == ["1", 0]
    assert preview["8"]["class_type"] == "ProbeSelectPreviewScore" and preview["8"]["inputs"]["x0_preview"] == ["6", 1]
    assert preview["8"]["inputs"]["prompt"] == demo.PROMPT and preview["9"]["inputs"]["scores"] == ["8", 0]


@pytest.mark.parametrize("family,scorer", [("unet", "auto"), ("dit", "auto"), ("dit", "probe")])
def test_demo_runs_the_selection_workflow_and_writes_its_outputs(family, scorer, tmp_path):
    assert (WEIGHTS / f"{family}_t0.2.safetensors").exists(), "the demo probe must be committed"
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # run from elsewhere with a relative --out, as a user may (ComfyUI's SaveImage needs it made absolute)
    proc = subprocess.run([default_python(), str(ROOT / "bench" / "demo.py"), "--family", family, "--out", "demo",
                           "--candidates", "4", "--steps", "5", "--more-prompts", "2", "--scorer", scorer],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    used = "probe" if scorer == "probe" else json.loads((ROOT / "bench" / "results" / "proxy_bench.json").read_text())[
        "families"][family]["demo_scorer"]
    label = "the learned probe" if used != "x0_preview" else "the x0 preview"
    assert f"scorer: {label}" in (out / "summary.txt").read_text()
    # it says what it is doing, in order
    steps = ["loading ComfyUI", "running the Probe-Select workflow", "the same workflow on 2 more held-out prompts"]
    positions = [log.find("[demo] " + s) for s in steps]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), log[-2000:]

    summary = (out / "summary.txt").read_text()
    kept = float(re.search(r"kept image\(s\): ([0-9.e+-]+)", summary).group(1))
    mean, best = map(float, re.search(r"candidates: ([0-9.e+-]+); best: ([0-9.e+-]+)", summary).groups())
    assert 0.0 <= kept <= best <= 1.0 and mean <= best
    over = re.search(r"over 3 prompts: kept ([0-9.e+-]+) vs mean candidate ([0-9.e+-]+) \(best ([0-9.e+-]+)\); "
                     r"kept beat the mean candidate on (\d) of 3", summary)
    assert over, summary
    kept3, mean3, best3 = map(float, over.groups()[:3])
    assert 0.0 <= kept3 <= best3 and mean3 <= best3 and int(over.group(4)) <= 3
    # N=4, K=1, 5 steps, checkpoint 0.2 -> stop at step 1: 4*1 + 1*4 = 8 of 20
    assert "denoiser evaluations: 8 instead of 20 (60% saved)" in summary

    grid = Image.open(out / "candidates.png")
    assert grid.width == (4 + 1 + 1) * (128 + 8) + 8 and grid.height > 2 * 128
    saved = sorted(p.name for p in out.glob("*.png"))
    # one kept image and N candidate previews per prompt (SaveImage numbers its files)
    assert len([n for n in saved if n.startswith("demo_kept")]) == 3
    assert len([n for n in saved if n.startswith("demo_candidates")]) == 3 * 4
    kept_png = next(p for p in out.glob("demo_kept*.png"))
    assert Image.open(kept_png).size == (32, 32)
