"""The ceiling of early selection (bench/proxy_ceiling.py): redraws continue the same state with other noise,
the reliability model behind the extrapolated ceiling, and a reduced run that writes its figures and resumes
from its cache."""
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from helpers import ceiling_arrays


@pytest.fixture(scope="module")
def ceiling(pack):
    sys.path.append(str(ROOT / "bench"))     # after ComfyUI: the pack's nodes/ must not shadow ComfyUI's nodes
    import proxy_ceiling
    return proxy_ceiling


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_redraw_continues_the_state_with_other_noise(ceiling, family):
    from bench.proxy_world import models
    from probe_select.nodes.engine import split_sampling

    patcher, text = models.load(family)
    positive, negative = text.conditioning("a red circle left of a blue square"), text.conditioning("")
    seeds = [50, 51, 52]
    early = split_sampling.run_candidates(patcher, positive, negative, models.empty_latent(family, 1), seeds[0],
                                          len(seeds), 10, 4.0, "euler_ancestral", "normal", stop_step=2,
                                          capture_at=(2,))
    before = early.latent["samples"].clone()

    def finish(latent):
        return split_sampling.resume(patcher, positive, negative, latent, 4.0)["samples"]

    finished = finish(early.latent)
    # the candidates' own seeds: the plain finish (the check the bench runs on its first prompt passes) ...
    own = finish(ceiling.redraw(early.latent, seeds))
    ceiling.check_redraw(finished, own, family)
    assert (own - finished).abs().max() <= 1e-4 * finished.abs().max()      # float rounding of LATENT <-> x
    # ... other seeds: every candidate ends elsewhere, the same way every time; the early LATENT is not touched
    other = finish(ceiling.redraw(early.latent, ceiling.redraw_seeds(seeds, 0)))
    assert ((other - finished).flatten(1).abs().amax(1) > 1e-2 * finished.abs().max()).all()
    torch.testing.assert_close(finish(ceiling.redraw(early.latent, ceiling.redraw_seeds(seeds, 0))), other,
                               rtol=0, atol=0)
    assert not torch.equal(finish(ceiling.redraw(early.latent, ceiling.redraw_seeds(seeds, 1))), other)
    assert torch.equal(early.latent["samples"], before)
    with pytest.raises(RuntimeError, match="would not continue the same state"):
        ceiling.check_redraw(finished, other, family)
    with pytest.raises(ValueError, match="2 seeds for 3 candidates"):
        ceiling.redraw(early.latent, seeds[:2])


def test_redraw_seeds_stay_clear_of_every_candidate_seed(ceiling):
    import proxy_bench

    setting = proxy_bench.MEDIUM
    candidates = {proxy_bench.first_seed(proxy_bench.HELDOUT_SEED_BASE, p) + i
                  for p in range(setting.heldout_prompts) for i in range(setting.heldout_seeds)}
    redraws = [ceiling.redraw_seeds(sorted(candidates), m) for m in range(3)]
    assert all(len(set(r)) == len(candidates) and not set(r) & candidates for r in redraws)
    assert not set(redraws[0]) & set(redraws[1]) and not set(redraws[1]) & set(redraws[2])


def test_reliability_model_predicts_the_mean_of_redraws(ceiling):
    rng = np.random.default_rng(0)
    rows, r = 200_000, 0.5
    state = rng.normal(size=rows)                         # f(state), variance 1
    noise_sd = np.sqrt((1 - r) / r)                       # two finishes correlate 1 / (1 + noise variance) = r
    finishes = state[:, None] + noise_sd * rng.normal(size=(rows, 4))
    assert np.corrcoef(finishes[:, 0], finishes[:, 1])[0, 1] == pytest.approx(r, abs=0.01)
    mean_of_3 = finishes[:, 1:].mean(1)
    assert np.corrcoef(mean_of_3, finishes[:, 0])[0, 1] == pytest.approx(ceiling.reliability_ceiling(r, 3), abs=0.01)
    assert ceiling.reliability_ceiling(r, 3) == pytest.approx(0.5 / np.sqrt(0.5 + 0.5 / 3))
    # with infinitely many redraws the mean is f(state) itself
    assert np.corrcoef(state, finishes[:, 0])[0, 1] == pytest.approx(ceiling.reliability_ceiling(r), abs=0.01)
    assert ceiling.reliability_ceiling(1.0, 2) == 1.0 and ceiling.reliability_ceiling(-0.1) == 0.0


def test_summary_of_states_that_decide_everything_and_of_pure_noise(ceiling):
    import proxy_bench

    setting = dataclasses.replace(proxy_bench.QUICK, bootstrap=50)
    decided = ceiling.summarize("unet", ceiling_arrays(6, 8, late_noise=0.0), setting)
    for t in (0.2, 0.4):
        row = decided["by_t"][t]
        assert row["test_retest"] == pytest.approx(1.0) and row["ceiling"] == pytest.approx(1.0)
        assert row["expected_final"]["within"] == pytest.approx(1.0)
    assert decided["by_t"][0.4]["x0_preview"]["within"] == pytest.approx(1.0)     # the preview is the state here
    assert decided["by_t"][0.2]["redraws"] == 3 and decided["by_t"][0.4]["redraws"] == 2
    # the expected reward keeps the best seed: it matches best-of-8 at the oracle's compute
    eq = decided["equal_compute"]
    assert eq["match_best_of_8"]["one stage at 0.2 / expected"] == eq["match_best_of_8"]["one stage at 0.2 / oracle"]
    assert set(eq["curves"]) == {"best-of-N"} | {f"{m} / {s}" for m in ("one stage at 0.2", "one stage at 0.4",
                                                                       "two stages (0.2, 0.4)")
                                                  for s in ("x0_preview", "expected", "oracle")}
    noise = ceiling.summarize("unet", ceiling_arrays(30, 8, late_noise=1e6, seed=1), setting)
    for t in (0.2, 0.4):
        assert abs(noise["by_t"][t]["test_retest"]) < 0.1 and noise["by_t"][t]["ceiling"] < 0.35


def test_quick_run_writes_its_figures_and_resumes_from_its_cache(ceiling, tmp_path, monkeypatch):
    import proxy_bench

    monkeypatch.setattr(proxy_bench, "QUICK", dataclasses.replace(proxy_bench.QUICK, heldout_prompts=2,
                                                                  heldout_seeds=3, bootstrap=50))
    common = ["--quick", "--families", "unet", "--out", str(tmp_path / "results"), "--cache", str(tmp_path / "cache")]
    (tmp_path / "results").mkdir()
    ceiling.main([*common, "--collect-only", "--lane", "2/2"])
    cached = tmp_path / "cache" / "ceiling" / "unet_10steps_3seeds"
    assert sorted(p.name for p in cached.iterdir()) == ["prompt_001.npz"]       # the second lane: every other prompt
    with pytest.raises(FileNotFoundError, match="1 of 2 held-out prompts have no redraws yet"):
        ceiling.report(["unet"], proxy_bench.QUICK, tmp_path / "cache", tmp_path / "results", "test")
    results = ceiling.main(common)
    assert sorted(p.name for p in cached.iterdir()) == ["prompt_000.npz", "prompt_001.npz"]   # no temporary litter
    stored = np.load(cached / "prompt_000.npz")
    assert stored["final"].shape == (3,) and stored["redraws_0.2"].shape == (3, 3)
    assert stored["redraws_0.4"].shape == (3, 2) and stored["preview_0.2"].shape == (3,)
    # the recorded finish is the proxy bench's held-out candidate: same prompt, seeds, sampler and schedule
    assert np.all((stored["final"] >= 0) & (stored["final"] <= 1))
    unet = results["families"]["unet"]
    assert unet["prompts"] == 2 and unet["seeds"] == 3 and set(unet["by_t"]) == {"0.2", "0.4"}
    saved = json.loads((tmp_path / "results" / "proxy_ceiling.json").read_text())
    assert saved["families"] == results["families"]
    markdown = (tmp_path / "results" / "proxy_ceiling.md").read_text()
    assert "| unet | 0.2 |" in markdown and "one stage at 0.2 / expected" in markdown

    # a second run samples nothing: every prompt is cached
    monkeypatch.setattr(ceiling, "collect_prompt", lambda *a, **k: pytest.fail("sampled a cached prompt"))
    again = ceiling.main(common)
    assert again["families"] == results["families"]


def test_report_sets_the_scorers_against_the_ceiling(ceiling):
    import proxy_bench

    setting = dataclasses.replace(proxy_bench.QUICK, bootstrap=50)
    entry = json.loads(json.dumps(ceiling.summarize("unet", ceiling_arrays(6, 8, late_noise=0.5), setting), default=float))
    row = entry["by_t"]["0.2"]
    summary = proxy_bench.ceiling_summary({"unet": entry})
    assert f"unet {row['expected_final']['within']:.3f} [" in summary and f"extrapolated {row['ceiling']:.3f}" in summary
    t02 = {"x0_preview": {"within": 0.377}, "x0_probe": {"within": 0.304}}
    bulk = {"curves": {"x0_probe": [{"train_rows": 10152, "within": 0.572, "val_within": 0.639}],
                       "x0_text_probe": [{"train_rows": 10152, "within": 0.610, "val_within": 0.629}]}}
    (line,) = proxy_bench.ceiling_lines(entry, t02, "x0_probe", bulk)
    assert f"test-retest of two finishes of one state {row['test_retest']:.3f}" in line
    # validation picks the bulk scorer, not the better held-out figure
    assert "on 10152 bulk rows the x0-latent probe (validation's pick) 0.572" in line and "0.610" not in line
    one_stage = entry["equal_compute"]["match_best_of_8"]["one stage at 0.2 / expected"]
    unit = entry["equal_compute"]["best_of_8"]["compute"]
    assert ("never" if not one_stage else f"{one_stage[0]['compute'] / unit:.2f}") in line
