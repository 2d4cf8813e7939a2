"""`make demo` on what a fresh clone has: the committed proxy models and demo probes.

The demo runs in its own process (it loads custom nodes and sets ComfyUI's output directory, which
must not leak into the other tests), on a reduced setting: 4 candidates, 5 steps.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
        # each learned scorer's lead over the x0 preview on its own validation rows: this run's best, the distilled probe
        leads = [row[res["best_learned"]]["val_within"] - row["x0_preview"]["val_within"]]
        distilled = (res.get("distilled_probe") or {}).get("validation", {}).get("0.2")
        if distilled:
            leads.append(distilled["distilled_probe"] - distilled["x0_preview"])
        assert demo.demo_scorer(family) == ("probe" if max(leads) > 0 else "x0_preview")
    assert demo.demo_scorer("no such family") == "probe"
    # the probe's graph taps the model and scores the activations; the x0 preview's decodes and evaluates, untapped
    probe = demo.workflow("dit", "dit_t0.2.safetensors", 4, 1, 0, 10, demo.PROMPT, 4.0, "euler", "probe")
    assert probe["6"]["inputs"]["model"] == ["5", 0] and probe["5"]["class_type"] == "ProbeSelectTap"
    assert probe["8"]["class_type"] == "ProbeSelectScore" and probe["8"]["inputs"]["activations"] == ["6", 2]
    preview = demo.workflow("dit", "", 4, 1, 0, 10, demo.PROMPT, 4.0, "euler", "x0_preview")
    assert "5" not in preview and preview["6"]["inputs"]["model"] == ["1", 0]
    assert preview["8"]["class_type"] == "ProbeSelectPreviewScore" and preview["8"]["inputs"]["x0_preview"] == ["6", 1]
    assert preview["8"]["inputs"]["prompt"] == demo.PROMPT and preview["9"]["inputs"]["scores"] == ["8", 0]


def prompt_reading_probe(path: Path) -> Path:
    """The committed UNet demo probe's kind (x0 latent), made to read the prompt too: the proxy UNet's pooled output,
    its 8 x 64 token features, which the pack's early sampler takes from the conditioning (random weights)."""
    from probe_select.probes.io import load_probe, save_probe
    from probe_select.probes.model import build_probe
    _, meta = load_probe(WEIGHTS / "unet_t0.2.safetensors")
    meta = dataclasses.replace(meta, config=dataclasses.replace(meta.config, text_dim=8 * 64, text_film=True))
    torch.manual_seed(0)
    return save_probe(path, build_probe(meta.config), meta)


@pytest.mark.parametrize("family,scorer", [("unet", "auto"), ("dit", "auto"), ("dit", "probe"), ("unet", "file")])
def test_demo_runs_the_selection_workflow_and_writes_its_outputs(family, scorer, tmp_path):
    assert (WEIGHTS / f"{family}_t0.2.safetensors").exists(), "the demo probe must be committed"
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --probe: another probe file (here one that reads the prompt as well as the x0 latent)
    chosen = ["--scorer", scorer] if scorer != "file" else [
        "--scorer", "probe", "--probe", str(prompt_reading_probe(tmp_path / "reads_the_prompt.safetensors"))]
    # run from elsewhere with a relative --out, as a user may (ComfyUI's SaveImage needs it made absolute)
    proc = subprocess.run([default_python(), str(ROOT / "bench" / "demo.py"), "--family", family, "--out", "demo",
                           "--candidates", "4", "--steps", "5", "--more-prompts", "2", *chosen],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    used = "probe" if scorer in ("probe", "file") else json.loads(
        (ROOT / "bench" / "results" / "proxy_bench.json").read_text())["families"][family]["demo_scorer"]
    label = "the learned probe" if used != "x0_preview" else "the x0 preview"
    assert f"scorer: {label}" in (out / "summary.txt").read_text()
    if scorer == "file":
        assert "scorer: the learned probe (reads_the_prompt.safetensors)" in (out / "summary.txt").read_text()
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
