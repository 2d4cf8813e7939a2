"""Smoke run of the proxy-world benchmark pipeline on a reduced setting, with the committed proxy models.

It checks the mechanics (collection through the pack's sampler, datasets, probe training, metrics,
cost, report), not the figures: those come from `make bench-proxy` on the full setting. The trained
models, not untrained ones: an untrained UNet draws blank images on ComfyUI 0.33, and a learning-curve
point whose training targets are all equal has nothing to rank (training refuses it).
"""
import dataclasses
import json
import math
import re

import pytest
import torch
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_proxy_bench_quick_writes_a_report(pack, tmp_path, monkeypatch):
    sys.path.append(str(ROOT / "bench"))     # after ComfyUI: the pack's nodes/ must not shadow ComfyUI's nodes
    import proxy_bench

    # a bulk training set of 10 prompts x 2 seeds (6 in its train split) for the learning curve on more data
    monkeypatch.setattr(proxy_bench, "BULK_PROMPTS", 10)
    monkeypatch.setattr(proxy_bench, "BULK_SEEDS", 2)
    monkeypatch.setattr(proxy_bench, "BULK_CURVE_PROMPTS", (3, 6))
    monkeypatch.setattr(proxy_bench, "BULK_EPOCHS", 1)
    # --quick with half its prompts and steps: sampling is most of the run's time, and what is checked is the
    # pipeline's mechanics (files, keys, orders, costs), which do not depend on how many prompts or steps there are
    monkeypatch.setattr(proxy_bench, "QUICK", dataclasses.replace(proxy_bench.QUICK, train_prompts=8,
                                                                  heldout_prompts=4, steps=5))
    common = ["--quick", "--families", "unet", "--out", str(tmp_path / "results"),
              "--cache", str(tmp_path / "cache")]
    # two lanes fill one set: every other prompt each, in shards of their own
    proxy_bench.main([*common, "--collect-only", "bulk", "--lane", "2/2"])
    proxy_bench.main([*common, "--collect-only", "bulk", "--lane", "1/2"])
    shards = sorted((tmp_path / "cache" / "unet_bulk" / "shards").iterdir())
    assert [p.name.split("-")[2] for p in shards] == ["lane1"] * 5 + ["lane2"] * 5
    proxy_bench.main([*common, "--collect-only", "bulk"])          # resumes: nothing left to collect
    assert sorted((tmp_path / "cache" / "unet_bulk" / "shards").iterdir()) == shards and len(shards) == 10
    from probe_select.probes.training.dataset import ProbeDataset
    bulk_ds = ProbeDataset(tmp_path / "cache" / "unet_bulk")
    # a prompt's seeds do not depend on the lane that collected it (prompt i: seeds 1000 i, 1000 i + 1)
    assert sorted(bulk_ds.seeds.tolist()) == sorted(1000 * i + s for i in range(10) for s in range(2))
    assert list(bulk_ds.manifest.checkpoints) == [0.2, 0.4]       # the curve's t and the second pruning stage's
    results = proxy_bench.main(common)
    unet = results["families"]["unet"]
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert set(unet["by_t"]) == {0.2, 0.4}
    for row in unet["by_t"].values():
        for scorer in ("probe", "x0_probe", "both_probe", "x0_text_probe", "x0_preview", "random"):
            within = row[scorer]["within"]
            assert -1.0 <= within <= 1.0 and row[scorer]["low"] <= row[scorer]["high"], (scorer, row[scorer])
            assert set(row[scorer]["oracle_gain"]) == {2, 5, 10, 20}
    # the learned scorers were trained on what they read
    from probe_select.probes.io import read_probe_metadata
    assert read_probe_metadata(tmp_path / "cache" / "unet_x0_probe_t0.2.safetensors").inputs == ("x0",)
    assert read_probe_metadata(tmp_path / "cache" / "unet_t0.2.safetensors").inputs == ("activations",)
    text_probe = read_probe_metadata(tmp_path / "cache" / "unet_x0_text_probe_t0.2.safetensors").config
    assert text_probe.text_film and text_probe.text_dim > 0 and text_probe.inputs == ("x0",)
    assert unet["best_learned"] in ("probe", "x0_probe", "both_probe", "x0_text_probe")
    bulk = unet["bulk_learning_curve"]
    assert (bulk["rows"], bulk["prompts"], bulk["epochs"]) == (20, 10, 1)
    assert set(bulk["curves"]) == set(proxy_bench.LEARNED)
    for points in bulk["curves"].values():
        assert [p["train_prompts"] for p in points] == [3, 6]
        assert [p["train_rows"] for p in points] == [6, 12]
        assert all(-1.0 <= p["within"] <= 1.0 for p in points)
    assert "Learning curve on more data" in report and "| prompt-conditioned x0-latent probe |" in report
    # the summary's rows fill every column of its header (no distilled probe here: '-')
    header = next(line for line in report.splitlines() if line.startswith("| model | log-SNR at t = 0.2 |"))
    row = next(line for line in report.splitlines() if line.startswith("| unet | "))
    assert row.count("|") == header.count("|") and "| - | - |" in row
    # the prompt embedding the text probe read: the UNet's pooled output, its token features in order
    assert unet["prompt_embedding"] == bulk["prompt_embedding"] == "tokens" and text_probe.text_dim == 8 * 64
    assert "read it): unet: its token features in order." in report
    # the largest point's scorer (by validation) at equal compute, beside the main run's scorers
    bulk_eq = bulk["equal_compute"]
    largest = {scorer: points[-1]["val_within"] for scorer, points in bulk["curves"].items()}
    chosen = max(largest, key=lambda scorer: -math.inf if math.isnan(largest[scorer]) else largest[scorer])
    assert bulk_eq["scorer"] == f"{chosen} on 12 bulk rows"
    assert bulk_eq["best_of_8"] == unet["equal_compute"]["best_of_8"]      # the same held-out prompts and seeds
    once, twice = (f"{method} / {bulk_eq['scorer']}" for method in ("one stage at 0.2", "two stages (0.2, 0.4)"))
    # priced like every learned scorer: the same schedules cost what the main run's x0-latent probe's cost
    for key, main_key in ((once, "one stage at 0.2 / x0_probe"), (twice, "two stages (0.2, 0.4) / x0_probe")):
        assert [(p["schedule"], p["compute"]) for p in bulk_eq["curves"][key]] == [
            (p["schedule"], p["compute"]) for p in unet["equal_compute"]["curves"][main_key]]
        assert f"| {key} |" in report
    assert f"one stage at 0.4 / {bulk_eq['scorer']}" not in bulk_eq["curves"]      # it would not read that probe
    # the second stage reads the same kind of scorer trained on the bulk set's t = 0.4 rows, not the main run's
    assert bulk_eq["second_stage"] == "bulk"
    second = read_probe_metadata(tmp_path / "cache" / "bulk_curve" / f"unet_{chosen}_6_t0.4.safetensors")
    wanted = proxy_bench.probe_config(bulk_ds.manifest.feature_shape[0], proxy_bench.QUICK,
                                      **proxy_bench.LEARNED[chosen])
    assert (second.checkpoint_t, second.training["data"]["train_prompts"]) == (0.4, 6)
    assert (second.config.inputs, second.config.text_film) == (wanted.inputs, wanted.text_film)
    assert "trained on the bulk set's t=0.4 rows" in report
    # the bulk curve can also be added to a saved run afterwards (the bulk set takes an hour to collect)
    again = proxy_bench.main([*common, "--bulk-curve-only"])
    saved_curve = json.loads((tmp_path / "results" / "proxy_bulk_curve.json").read_text())["families"]["unet"]
    assert saved_curve == json.loads(json.dumps(again["families"]["unet"]))
    assert saved_curve["rows"] == 20 and set(saved_curve["curves"]) == set(proxy_bench.LEARNED)
    # every point's training had finished, so it was scored again, not retrained: the same figures
    for scorer, points in saved_curve["curves"].items():
        assert json.dumps([(p["train_rows"], p["within"], p["val_within"]) for p in points]) == json.dumps([
            (p["train_rows"], p["within"], p["val_within"]) for p in bulk["curves"][scorer]])   # NaN-safe
        assert all(p["train_seconds"] is None for p in points)
    # ... and the report rewritten from the saved figures alone is the same report
    written = (tmp_path / "results" / "REPORT.md").read_text()
    assert "; then bench/proxy_bench.py --quick --bulk-curve-only --families unet`" in written    # rewritten by it
    proxy_bench.main([*common, "--report-only"])
    rewritten = (tmp_path / "results" / "REPORT.md").read_text()
    assert re.sub(r"Generated [^.]*\.", "", rewritten) == re.sub(r"Generated [^.]*\.", "", written)
    # a bulk set that lacks prompts (an unfinished collection) gives no curve: the saved one stays as it was
    monkeypatch.setattr(proxy_bench, "BULK_PROMPTS", 11)
    curve_file = (tmp_path / "results" / "proxy_bulk_curve.json").read_text()
    assert proxy_bench.bulk_learning_curve("unet", proxy_bench.QUICK, None, "proxy_log") == {}
    assert proxy_bench.main([*common, "--bulk-curve-only"])["families"]["unet"] == saved_curve
    assert (tmp_path / "results" / "proxy_bulk_curve.json").read_text() == curve_file
    curve = unet["learning_curve"]
    assert len(curve) == 4 and [p["train_rows"] for p in curve] == sorted(p["train_rows"] for p in curve)
    assert curve[0]["train_rows"] < curve[-1]["train_rows"]
    eq = unet["equal_compute"]
    # best-of-N costs N generations (best-of-1 a little less: a single image needs no evaluator to pick it)
    compute = [p["compute"] for p in eq["curves"]["best-of-N"]]
    assert compute[1:3] == pytest.approx([2.0, 3.0]) and 0.9 < compute[0] < 1.0
    oracle = {p["schedule"]: p["reward"] for p in eq["curves"]["one stage at 0.2 / oracle"]}
    best_of = {p["schedule"]: p["reward"] for p in eq["curves"]["best-of-N"]}
    assert oracle["4: 0.2->1"] == best_of["4"]          # the oracle keeps the best of the 4 at t = 0.2
    assert eq["draws"] == proxy_bench.EQUAL_COMPUTE_DRAWS and [p["schedule"] for p in eq["curves"]["best-of-N"]] == [
        str(n) for n in range(1, eq["seeds"] + 1)]
    # the learned pick prunes at 0.2, the x0 preview at 0.4, each stage priced as its own scorer: for "4: 0.2->2,
    # 0.4->1" (5 steps: 0.2 is step 1, 0.4 step 2) 4 candidates pay the probe, 2 the preview, 1 is decoded
    mix = f"two stages (0.2, 0.4) / {unet['best_learned']} -> x0_preview"
    assert f"one stage at 0.2 / {unet['best_learned']} -> x0_preview" not in eq["curves"]
    prices, unit = eq["prices"], eq["unit_steps"]
    mixed = {p["schedule"]: p["compute"] for p in eq["curves"][mix]}
    assert mixed["4: 0.2->2, 0.4->1"] * unit == pytest.approx(4 * 1 + 2 * 1 + 1 * 3 + 4 * prices["probe"]
                                                              + 2 * prices["x0_preview"] + prices["decode"])
    assert f"| {mix} |" in report
    assert f"two stages (0.2, 0.4) / {bulk_eq['scorer']} -> x0_preview" in bulk_eq["curves"]
    # measured again from the cached probes (after a change to how it is measured): the same figures
    proxy_bench.main([*common, "--equal-compute-only"])
    again = json.loads((tmp_path / "results" / "proxy_bench.json").read_text())["families"]["unet"]["equal_compute"]
    assert json.dumps(again["curves"][mix]) == json.dumps(eq["curves"][mix])
    assert json.dumps(again["match_best_of_8"]) == json.dumps(eq["match_best_of_8"])
    assert "## Reward at equal compute" in report
    cost = unet["cost"][0]
    assert cost["denoiser_evals"] == {"generate_all": 25, "probe_select": 9, "x0_preview": 9}     # 5 x 5; 5 x 1 + 4
    assert cost["seconds"]["generate_all"] > 0
    over = unet["overheads"]
    # auto tap of the SD1 proxy UNet: output_blocks.3.0 (64 channels at 16x16), pooled to 4x4, fp16
    assert over["activation_shape"] == [64, 4, 4] and over["activation_bytes_per_candidate"] == 64 * 4 * 4 * 2
    assert over["probe_ms_per_candidate"] > 0 and over["early_plain_s"] > 0
    assert set(unet["ablation"]) == set(proxy_bench.ABLATIONS)
    assert "demo_probe" not in unet            # only the full run writes the committed demo probe
    assert "within-prompt" in report and "proxy_unet.png" in report
    # every checkpoint with the noise level it lands on (5 steps of SD1.5's schedule: t = 0.2 is step 1)
    levels = unet["noise_levels"]
    assert set(levels) == {0.2, 0.4} and levels[0.2]["step"] == 1 and levels[0.4]["step"] == 2
    assert levels[0.2]["log_snr"] < levels[0.4]["log_snr"] < 0
    assert f"| 0.2 | {levels[0.2]['sigma']:.4f} | {levels[0.2]['log_snr']:.2f} |" in report
    assert "SD1.5 -3.16" in report and "FLUX.1-dev -5.07" in report
    assert "tap overhead" in report and "| raw score as the target (not log) |" in report
    assert (tmp_path / "results" / "proxy_unet.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results" / "proxy_bench.json").read_text())
    assert saved["setting"]["train_prompts"] == proxy_bench.QUICK.train_prompts

    # the demo's scorer is chosen by validation figures, the x0 preview's measured on the learned scorers' rows
    t02 = unet["by_t"][0.2]
    from probe_select.probes.training.dataset import ProbeDataset
    assert json.dumps(t02["x0_preview"]["val_within"]) == json.dumps(proxy_bench.preview_validation(
        ProbeDataset(tmp_path / "cache" / "unet_train"), 0.2))      # NaN-safe (constant scores, see above)
    learned_val = t02[unet["best_learned"]]["val_within"]
    preview_val = -math.inf if math.isnan(t02["x0_preview"]["val_within"]) else t02["x0_preview"]["val_within"]
    assert unet["demo_scorer"] == ("x0_preview" if math.isnan(learned_val) or preview_val >= learned_val
                                   else unet["best_learned"])
    assert proxy_bench.demo_scorer({"x0_preview": {"val_within": 0.5}, "probe": {"val_within": 0.4}}, "probe") == "x0_preview"
    assert proxy_bench.demo_scorer({"x0_preview": {"val_within": 0.3}, "probe": {"val_within": 0.4}}, "probe") == "probe"
    assert proxy_bench.demo_scorer({"x0_preview": {}, "probe": {"val_within": -0.4}}, "probe") == "probe"
    # the distilled probe is set beside the preview on its own validation rows: the larger lead wins
    row = {"x0_preview": {"val_within": 0.3}, "probe": {"val_within": 0.4}}
    distilled = {"validation": {"0.2": {"distilled_probe": 0.7, "x0_preview": 0.45}, "0.4": {}}}
    assert proxy_bench.validation_leads(row, "probe", distilled) == pytest.approx({"probe": 0.1, "distilled_probe": 0.25})
    assert proxy_bench.demo_scorer(row, "probe", distilled) == "distilled_probe"
    assert proxy_bench.demo_scorer(row, "probe", distilled, t=0.3) == "probe"         # not measured there
    behind = {"validation": {"0.2": {"distilled_probe": 0.4, "x0_preview": 0.45}}}
    assert proxy_bench.demo_scorer({**row, "x0_preview": {"val_within": 0.5}}, "probe", behind) == "x0_preview"
    assert proxy_bench.demo_scorer({"x0_preview": {"val_within": float("nan")}, "probe": {"val_within": float("nan")}},
                                   "probe") == "x0_preview"
    # steps added to a saved run afterwards: the demo's choice and the ablations, each named in the report's command
    first = list(proxy_bench.ABLATIONS)[0]
    monkeypatch.setattr(proxy_bench, "ABLATIONS", {first: proxy_bench.ABLATIONS[first]})
    proxy_bench.main([*common, "--choose-demo-scorer"])
    proxy_bench.main([*common, "--ablation-only"])
    later = json.loads((tmp_path / "results" / "proxy_bench.json").read_text())
    assert later["families"]["unet"]["demo_scorer"] == unet["demo_scorer"]
    assert list(later["families"]["unet"]["ablation"]) == [first]
    assert later["command"].endswith("; then bench/proxy_bench.py --choose-demo-scorer --families unet; "
                                     "then bench/proxy_bench.py --ablation-only --families unet")
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "--ablation-only --families unet`" in report and f"| {first} |" in report
    assert "`make demo` scores with the scorer that leads the x0 preview most on validation" in report
    # a distilled probe that leads the preview on its own validation rows becomes the demo's scorer and demo probe
    distilled_file = tmp_path / "cache" / "unet_x0_text_probe_t0.2.safetensors"       # stands in for its file
    later["families"]["unet"]["distilled_probe"] = {
        "validation": {"0.2": {"distilled_probe": 2.0, "x0_preview": 0.0}}, "probe_files": {"0.2": str(distilled_file)},
        "heldout": {}, "train_rows": 10, "sets": ["main"]}
    (tmp_path / "results" / "proxy_bench.json").write_text(json.dumps(later))
    monkeypatch.setattr(proxy_bench, "DEFAULT_CACHE", tmp_path / "cache")
    monkeypatch.setattr(proxy_bench, "DEMO_PROBES", tmp_path / "demo")
    (tmp_path / "demo").mkdir()
    proxy_bench.main([*common, "--choose-demo-scorer"])
    chosen = json.loads((tmp_path / "results" / "proxy_bench.json").read_text())["families"]["unet"]
    assert chosen["demo_scorer"] == "distilled_probe"
    assert chosen["demo_probe"] == str(tmp_path / "demo" / "unet_t0.2.safetensors")
    assert read_probe_metadata(tmp_path / "demo" / "unet_t0.2.safetensors").config == text_probe
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert "on the distilled probe's own validation rows, the distilled probe 2.000, the x0 preview 0.000" in report
    assert "scores with the scorer that leads the x0 preview most on validation: the distilled probe." in report
    # the ceiling of early selection (bench/proxy_ceiling.py), measured in the same setting, joins the report
    import proxy_ceiling
    from helpers import ceiling_arrays
    setting = proxy_bench.QUICK
    arrays = ceiling_arrays(setting.heldout_prompts, setting.heldout_seeds, late_noise=0.1)
    entry = json.loads(json.dumps(proxy_ceiling.summarize("unet", arrays, setting), default=float))
    ceiling_file = {"setting": json.loads(json.dumps(setting.__dict__)), "families": {"unet": entry}}
    (tmp_path / "results" / proxy_bench.CEILING_FILE).write_text(json.dumps(ceiling_file))
    proxy_bench.main([*common, "--report-only"])
    report = (tmp_path / "results" / "REPORT.md").read_text()
    assert f"ranks the seeds at unet {entry['by_t']['0.2']['expected_final']['within']:.3f} [" in report
    assert f"test-retest of two finishes of one state {entry['by_t']['0.2']['test_retest']:.3f}" in report
    # ... and only a ceiling of the same setting (other prompts and seeds would be another experiment)
    ceiling_file["setting"]["heldout_seeds"] += 1
    (tmp_path / "results" / proxy_bench.CEILING_FILE).write_text(json.dumps(ceiling_file))
    proxy_bench.main([*common, "--report-only"])
    assert "test-retest" not in (tmp_path / "results" / "REPORT.md").read_text()
    # what limits the learned scorer (bench/learned_limits.py) joins it the same way
    limits_file = {"setting": json.loads(json.dumps(setting.__dict__)),
                   "families": {"unet": {"summary": "What limits the learned scorer (unet, made up)."}}}
    (tmp_path / "results" / proxy_bench.LIMITS_FILE).write_text(json.dumps(limits_file))
    proxy_bench.main([*common, "--report-only"])
    assert "\nWhat limits the learned scorer (unet, made up).\n" in (tmp_path / "results" / "REPORT.md").read_text()
    # ... and so does the blend of the x0 preview with a probe (bench/score_blend.py), after it
    blend_file = {"setting": limits_file["setting"], "families": {"unet": {"summary": "Blending (unet, made up)."}}}
    (tmp_path / "results" / proxy_bench.BLEND_FILE).write_text(json.dumps(blend_file))
    proxy_bench.main([*common, "--report-only"])
    assert ("\nWhat limits the learned scorer (unet, made up).\n\nBlending (unet, made up).\n"
            in (tmp_path / "results" / "REPORT.md").read_text())


def test_a_run_of_one_family_keeps_the_other_family_of_a_saved_run_with_the_same_setting(pack, tmp_path):
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench

    setting = dict(proxy_bench.MEDIUM.__dict__)
    row = {scorer: {"oracle_gain": {"2": 0.5}} for scorer in proxy_bench.SCORERS}
    saved = {"setting": json.loads(json.dumps(setting)), "command": "bench/proxy_bench.py --families dit",
             "families": {"dit": {"by_t": {"0.2": row}, "noise_levels": {"0.2": {"step": 4}}, "sampler": "s"}}}
    path = tmp_path / "proxy_bench.json"
    path.write_text(json.dumps(saved))
    results = {"setting": setting, "families": {"unet": {"by_t": {0.2: {"x": 2}}}}}
    # the command behind the kept figures, for the report's list of commands
    assert proxy_bench.merge_saved_families(results, path) == "bench/proxy_bench.py --families dit (the dit figures, kept)"
    assert list(results["families"]) == ["unet", "dit"]                 # report order, whatever ran last
    dit = results["families"]["dit"]
    assert list(dit["by_t"]) == [0.2] and dit["noise_levels"] == {0.2: {"step": 4}}
    assert dit["by_t"][0.2]["probe"]["oracle_gain"] == {2: 0.5}         # N is a number again
    assert results["families"]["unet"]["by_t"] == {0.2: {"x": 2}}       # this run's figures win
    other = {"setting": dict(setting, epochs=1), "families": {"unet": {"by_t": {}}}}
    assert proxy_bench.merge_saved_families(other, path) is None        # another setting: nothing is merged
    assert list(other["families"]) == ["unet"]
    del saved["families"]["dit"]["by_t"]["0.2"]["x0_text_probe"]        # figures from before a scorer existed
    path.write_text(json.dumps(saved))
    stale = {"setting": setting, "families": {"unet": {"by_t": {}}}}
    assert proxy_bench.merge_saved_families(stale, path) is None
    assert list(stale["families"]) == ["unet"]


def test_bulk_curves_saved_apart_go_to_the_families_without_one(pack, tmp_path):
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench

    setting = json.loads(json.dumps(proxy_bench.MEDIUM.__dict__))
    (tmp_path / proxy_bench.BULK_CURVE_FILE).write_text(json.dumps(
        {"setting": setting, "families": {"dit": {"rows": 7}, "unet": {"rows": 9}}}))
    results = {"setting": proxy_bench.MEDIUM.__dict__,
               "families": {"dit": {"bulk_learning_curve": {}}, "unet": {"bulk_learning_curve": {"rows": 1}}}}
    proxy_bench.attach_bulk_curves(results, tmp_path)
    assert results["families"]["dit"]["bulk_learning_curve"] == {"rows": 7}
    assert results["families"]["unet"]["bulk_learning_curve"] == {"rows": 1}      # its own curve stays


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """make's lanes are stopped with SIGTERM: the handler raises SystemExit, so `finally` blocks (the dataset
    writer's removal of its temporary shard) run and the exit status says the signal."""
    import subprocess

    marker = tmp_path / "unwound"
    script = (f"import os, signal, sys, time; sys.path.insert(0, {str(ROOT)!r}); "
              "from bench.proxy_bench import stop_on_sigterm; signal.signal(signal.SIGTERM, stop_on_sigterm)\n"
              "try:\n    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)\n"
              f"finally:\n    open({str(marker)!r}, 'w').write('yes')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120)
    assert done.returncode == 128 + 15
    assert marker.read_text() == "yes"


def test_schedules_cut_at_every_checkpoint_and_pair_they_are_given(pack):
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench
    from probe_select.probes.pruning import parse_schedule

    assert list(proxy_bench.compute_schedules(10)) == ["best-of-N", "one stage at 0.2", "one stage at 0.4",
                                                       "two stages (0.2, 0.4)"]
    methods = proxy_bench.compute_schedules(10, (0.1, 0.2, 0.3))
    assert list(methods) == ["best-of-N", "one stage at 0.1", "one stage at 0.2", "one stage at 0.3",
                             "two stages (0.1, 0.2)", "two stages (0.1, 0.3)", "two stages (0.2, 0.3)"]
    for method, texts in methods.items():
        for text in texts:
            stages = parse_schedule(text).stages
            assert [s.checkpoint for s in stages] == sorted(s.checkpoint for s in stages)
            if method.startswith("two stages (0.1, 0.3)"):
                assert [s.checkpoint for s in stages] == [0.1, 0.3]
    assert "8: 0.1->6, 0.3->1" in methods["two stages (0.1, 0.3)"]


def test_equal_compute_at_other_checkpoints_prices_the_earlier_cut_lower(pack):
    sys.path.append(str(ROOT / "bench"))
    import numpy as np
    import proxy_bench

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 10)
    finals = rng.random(60)
    # exact at 0.1, noise at 0.4: cutting early to one keeps each subset's best
    preview = {0.1: finals, 0.2: rng.random(60), 0.4: rng.random(60)}
    eq = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"x0_preview": preview}, finals, groups,
                                   "x0_preview", checkpoints=(0.1, 0.4))
    assert {"one stage at 0.1 / x0_preview", "two stages (0.1, 0.4) / x0_preview"} <= set(eq["curves"])
    assert not any("0.2" in key for key in eq["curves"])

    def point(key, schedule):
        return next(p for p in eq["curves"][key] if p["schedule"] == schedule)

    early, late = point("one stage at 0.1 / x0_preview", "8: 0.1->1"), point("one stage at 0.4 / x0_preview",
                                                                             "8: 0.4->1")
    assert early["compute"] < late["compute"]
    assert late["compute"] - early["compute"] == pytest.approx(7 * 6 / eq["unit_steps"])    # 7 pruned x 6 steps
    assert early["reward"] == pytest.approx(point("one stage at 0.1 / oracle", "8: 0.1->1")["reward"])
    with pytest.raises(ValueError, match="not all among the recorded"):
        proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"x0_preview": preview}, finals, groups,
                                  "x0_preview", checkpoints=(0.15, 0.4))


def test_a_mix_scores_each_pair_of_cuts_earlier_with_the_first_later_with_the_second(pack):
    sys.path.append(str(ROOT / "bench"))
    import numpy as np
    import proxy_bench

    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(6), 10)
    finals = rng.random(60)
    probe = {t: rng.random(60) for t in (0.1, 0.2, 0.4)}
    preview = {t: rng.random(60) for t in (0.1, 0.2, 0.4)}
    eq = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"probe": probe, "x0_preview": preview}, finals, groups,
                                   "probe", mixes=(("probe", "x0_preview"),), checkpoints=(0.1, 0.2, 0.4))
    mix = proxy_bench.mix_name("probe", "x0_preview")
    assert [key for key in eq["curves"] if mix in key] == [
        f"two stages ({a}, {b}) / {mix}" for a, b in (("0.1", "0.2"), ("0.1", "0.4"), ("0.2", "0.4"))]
    prices = eq["prices"]
    for a, b in ((0.1, 0.2), (0.1, 0.4), (0.2, 0.4)):
        # the same as a scorer that is the probe at a and the preview at b, each stage at its own scorer's price
        by_hand = {a: probe[a], b: preview[b]}
        alone = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"by hand": by_hand}, finals, groups, "by hand",
                                          previews=(), checkpoints=(a, b))
        key = f"two stages ({a:g}, {b:g})"
        mixed, hand = eq["curves"][f"{key} / {mix}"], alone["curves"][f"{key} / by hand"]
        assert [(p["schedule"], p["reward"], p["halves"]) for p in mixed] == [
            (p["schedule"], p["reward"], p["halves"]) for p in hand]
        point = next(p for p in mixed if p["schedule"] == f"8: {a:g}->4, {b:g}->1")
        probe_only = next(p for p in hand if p["schedule"] == f"8: {a:g}->4, {b:g}->1")
        # the preview's stage costs its price for the 4 it scores at b, where the by-hand scorer paid a probe's
        extra = 4 * (prices["x0_preview"] - prices["probe"]) / eq["unit_steps"]
        assert point["compute"] - probe_only["compute"] == pytest.approx(extra)


def test_early_collection_keeps_the_full_runs_latents_up_to_its_stop_and_no_finished_score(pack, tmp_path):
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench
    from probe_select.probes.training.dataset import ProbeDataset

    prompts = ["a red circle left of a blue square", "two green triangles"]
    setting = dataclasses.replace(proxy_bench.QUICK, steps=5, checkpoints=(0.2, 0.4))
    proxy_bench.collect("unet", prompts, 2, setting, tmp_path / "full", proxy_bench.EARLY_SEED_BASE)
    proxy_bench.collect("unet", prompts, 2, setting, tmp_path / "early", proxy_bench.EARLY_SEED_BASE, stop_at=0.4)
    full, early = ProbeDataset(tmp_path / "full"), ProbeDataset(tmp_path / "early")
    assert early.manifest.evaluators == ["x0@0.2", "x0@0.4"] and proxy_bench.EVALUATOR in full.manifest.evaluators
    assert early.seeds.tolist() == full.seeds.tolist() == [20_000_000, 20_000_001, 20_001_000, 20_001_001]
    for t in (0.2, 0.4):     # stopping at 0.4 changes nothing before it: the same latents, the same previews
        assert torch_equal(early.x0(t), full.x0(t))
        assert torch_equal(early.scores(f"x0@{t:g}"), full.scores(f"x0@{t:g}"))
    with pytest.raises(ValueError, match=r"go past stop_at=0.2"):
        proxy_bench.collect("unet", prompts, 2, setting, tmp_path / "bad", proxy_bench.EARLY_SEED_BASE, stop_at=0.2)
    assert not (tmp_path / "bad").exists()


def torch_equal(a, b) -> bool:
    import torch
    return a.shape == b.shape and bool(torch.equal(a, b))


def test_three_stage_schedules_cut_at_each_triple_and_a_mix_reads_the_second_scorer_at_the_last_cut_only(pack):
    sys.path.append(str(ROOT / "bench"))
    import numpy as np
    import proxy_bench
    from probe_select.probes.pruning import parse_schedule

    methods = proxy_bench.compute_schedules(12, (0.1, 0.2, 0.4), stages=3)
    assert list(methods)[-1] == "three stages (0.1, 0.2, 0.4)" and "three stages" not in " ".join(list(methods)[:-1])
    for text in methods["three stages (0.1, 0.2, 0.4)"]:
        keeps = [s.keep for s in parse_schedule(text).stages]
        assert [s.checkpoint for s in parse_schedule(text).stages] == [0.1, 0.2, 0.4]
        assert keeps == sorted(keeps, reverse=True) and len(set(keeps)) == 3 and keeps[0] < int(text.split(":")[0])
    assert "12: 0.1->8, 0.2->3, 0.4->1" in methods["three stages (0.1, 0.2, 0.4)"]
    assert "three stages" not in " ".join(proxy_bench.compute_schedules(12, (0.1, 0.2, 0.4)))   # two by default

    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(6), 12)
    finals = rng.random(72)
    probe = {t: rng.random(72) for t in (0.1, 0.2, 0.4)}
    preview = {t: rng.random(72) for t in (0.1, 0.2, 0.4)}
    mix = proxy_bench.mix_name("probe", "x0_preview")
    eq = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"probe": probe, "x0_preview": preview}, finals, groups,
                                   "probe", mixes=(("probe", "x0_preview"),), checkpoints=(0.1, 0.2, 0.4), stages=3)
    by_hand = {0.1: probe[0.1], 0.2: probe[0.2], 0.4: preview[0.4]}
    alone = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"by hand": by_hand}, finals, groups, "by hand",
                                      previews=(), checkpoints=(0.1, 0.2, 0.4), stages=3)
    key = "three stages (0.1, 0.2, 0.4)"
    mixed, hand = eq["curves"][f"{key} / {mix}"], alone["curves"][f"{key} / by hand"]
    assert [(p["schedule"], p["reward"]) for p in mixed] == [(p["schedule"], p["reward"]) for p in hand]
    point = next(p for p in mixed if p["schedule"] == "12: 0.1->8, 0.2->3, 0.4->1")
    probe_only = next(p for p in hand if p["schedule"] == "12: 0.1->8, 0.2->3, 0.4->1")
    # only the last stage (3 candidates scored at 0.4) pays the preview's price
    assert point["compute"] - probe_only["compute"] == pytest.approx(
        3 * (eq["prices"]["x0_preview"] - eq["prices"]["probe"]) / eq["unit_steps"])


def test_the_confirmation_prompts_follow_the_held_out_ones_and_train_on_nothing(pack):
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench
    from bench.proxy_world import grammar

    train, held = grammar.split_prompts(grammar.all_prompts(seed=0), seed=0)
    confirm = proxy_bench.confirmation_prompts(proxy_bench.MEDIUM)
    assert len(confirm) == proxy_bench.CONFIRM_PROMPTS
    assert proxy_bench.heldout_prompts(proxy_bench.MEDIUM) + confirm == held[:32 + proxy_bench.CONFIRM_PROMPTS]
    assert not set(confirm) & set(train)
    # no candidate of any set repeats another's: the seed bases lie further apart than any set's prompts x 1000
    bases = sorted([0, proxy_bench.HELDOUT_SEED_BASE, proxy_bench.EARLY_SEED_BASE, proxy_bench.CONFIRM_SEED_BASE])
    assert all(b - a > 1000 * len(train) for a, b in zip(bases, bases[1:]))


def test_the_report_says_which_prompt_embedding_a_saved_bulk_curve_read():
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench
    note = proxy_bench.prompt_embedding_note({"families": {
        "unet": {"prompt_embedding": "tokens", "bulk_learning_curve": {"rows": 10}},     # saved before the setting
        "dit": {"prompt_embedding": "mean", "bulk_learning_curve": {}}}})
    assert note.endswith("read it): unet: its token features in order (its bulk curve, collected before: a projection "
                         "of the mean over its tokens (nearly blind to word order); only its prompt-conditioned scorer "
                         "reads it); dit: a projection of the mean over its tokens (nearly blind to word order).")
    same = {"prompt_embedding": "tokens", "bulk_learning_curve": {"prompt_embedding": "tokens"}}
    assert "collected before" not in proxy_bench.prompt_embedding_note({"families": {"unet": same}})


def test_the_summary_gives_the_distilled_probes_figure_and_lead_at_the_checkpoint():
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench
    figures = {"distilled_probe": {"within": 0.701, "low": 0.6, "high": 0.79}, "x0_preview": {"within": 0.321}}
    res = {"distilled_probe": {"heldout": {"0.1": {}, "0.2": figures}}}
    assert proxy_bench.distilled_cells(res, 0.2) == "0.701 [0.600, 0.790] | +0.380"
    assert proxy_bench.distilled_cells(res, 0.3) == "- | -" == proxy_bench.distilled_cells({}, 0.2)


def test_the_demo_probe_can_be_another_probe_file_kept_in_fp16(tmp_path, monkeypatch):
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench
    from probe_select.probes.io import load_probe, save_probe
    from probe_select.probes.model import build_probe
    _, meta = load_probe(ROOT / "bench" / "proxy_world" / "weights" / "unet_t0.2.safetensors")
    source = save_probe(tmp_path / "distilled_t0.2.safetensors", build_probe(meta.config), meta)
    monkeypatch.setattr(proxy_bench, "DEMO_PROBES", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    written = proxy_bench.write_demo_probe("unet", source=source)
    assert written == tmp_path / "weights" / "unet_t0.2.safetensors"
    (probe, kept), (original, _) = load_probe(written), load_probe(source)
    assert kept.config == meta.config and kept.feature_shape == meta.feature_shape
    for (name, a), (_, b) in zip(probe.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a.float(), b.half().float()), name       # the source's weights, rounded to fp16
