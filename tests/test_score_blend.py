"""Blending the x0 preview with a probe (bench/score_blend.py): the weight is fitted on validation rows only, a
blend is priced as both scorers, the report's reading follows the figures, and a family without its data is
skipped."""
import types

import numpy as np
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def blend_bench(pack):
    import sys
    sys.path.append(str(ROOT / "bench"))     # after ComfyUI: the pack's nodes/ must not shadow ComfyUI's nodes
    import score_blend
    return score_blend


def _rows(prompts, seeds, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=prompts * seeds), rng.normal(size=prompts * seeds)
    groups = np.repeat(np.arange(prompts), seeds)
    return types.SimpleNamespace(groups=groups, finals=a + 3 * b, preview=a), b


def test_the_blend_weight_comes_from_the_validation_rows(blend_bench):
    from probe_select.probes.training.blending import blend_scores

    val, val_probe = _rows(50, 8, 0)                     # on validation the probe carries 3/4 of the target
    held, held_probe = _rows(20, 8, 1)
    held.finals = held.preview - 3 * held_probe          # held-out targets the fit must not see
    fit, scores = blend_bench.blended(val.preview, val_probe, val, held.preview, held_probe, held)
    assert fit["weight"] == pytest.approx(0.75) and fit["val_within"] > 0.9
    assert np.allclose(scores, blend_scores(held.preview, held_probe, 0.75, held.groups).double().numpy())


def test_a_blend_is_priced_as_the_preview_and_the_probe(blend_bench):
    import proxy_bench

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 10)
    finals = rng.random(40)
    scores = {t: rng.random(40) for t in (0.2, 0.4)}
    eq = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"preview": scores, "blend": scores, "probe": scores},
                                   finals, groups, "probe", previews=("preview",), blends=("blend",))
    prices = eq["prices"]

    def compute(name):
        return next(p["compute"] for p in eq["curves"][f"one stage at 0.2 / {name}"] if p["schedule"] == "8: 0.2->1")

    unit = eq["unit_steps"]
    assert compute("blend") - compute("preview") == pytest.approx(8 * prices["probe"] / unit)
    assert compute("blend") - compute("probe") == pytest.approx(8 * prices["x0_preview"] / unit)


def test_a_mix_pays_for_each_stage_as_its_own_scorer(blend_bench):
    import proxy_bench

    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(4), 10)
    finals = rng.random(40)
    probe, preview = ({t: rng.random(40) for t in (0.2, 0.4)} for _ in range(2))
    eq = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"preview": preview, "probe": probe}, finals, groups,
                                   "probe", previews=("preview",), mixes=(("probe", "preview"),))
    prices, unit = eq["prices"], eq["unit_steps"]
    mixed = {p["schedule"]: p for p in eq["curves"]["two stages (0.2, 0.4) / probe -> preview"]}
    alone = {p["schedule"]: p for p in eq["curves"]["two stages (0.2, 0.4) / probe"]}
    # "8: 0.2->4, 0.4->1": 8 scored at 0.2 by the probe, 4 at 0.4 by the preview in place of the probe
    assert (mixed["8: 0.2->4, 0.4->1"]["compute"] - alone["8: 0.2->4, 0.4->1"]["compute"]) * unit == pytest.approx(
        4 * (prices["x0_preview"] - prices["probe"]))
    # it ranks with the probe at 0.2 and the preview at 0.4: with the preview's scores at 0.4 made the final reward,
    # keeping 2 at 0.2 and the best of them at 0.4 is the best of the probe's two, as "8: 0.2->2" finished both
    exact = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, {"preview": {0.2: preview[0.2], 0.4: finals},
                                                                   "probe": probe}, finals, groups, "probe",
                                      previews=("preview",), mixes=(("probe", "preview"),))
    two = {p["schedule"]: p["reward"] for p in exact["curves"]["two stages (0.2, 0.4) / probe -> preview"]}
    once = {p["schedule"]: p["reward"] for p in exact["curves"]["one stage at 0.2 / probe"]}
    assert two["8: 0.2->2, 0.4->1"] == pytest.approx(once["8: 0.2->2"])
    assert "one stage at 0.2 / probe -> preview" not in eq["curves"]


def made_up_entry(blend_bench, blend_within=0.63, gain=(0.058, 0.01, 0.11)) -> dict:
    def row(within, **fit):
        return dict(fit, within=within, oracle_gain_5=within / 2, oracle_gain_10=within / 3, success_auc=0.7,
                    interval={"within": within, "low": within - 0.1, "high": within + 0.1})

    pick = "x0-latent probe"
    scorers = {"x0 preview": row(0.377), pick: row(0.572),
               f"x0 preview + {pick}": row(blend_within, weight=0.7, val_within=0.699,
                                           gain=dict(zip(("within", "low", "high"), gain))),
               "noise-aware preview": row(0.725),
               f"noise-aware preview + {pick}": row(0.765, weight=0.4, val_within=0.79,
                                                    gain={"within": 0.04, "low": -0.01, "high": 0.09})}
    names = ("x0 preview", f"x0 preview + {pick}", "noise-aware preview", f"noise-aware preview + {pick}")
    matches = dict(zip(names, ("0.52 / 0.47", "0.51 / 0.47", "0.51 / 0.42", "never")))
    equal = {f"{method} / {name}": {"match": matches[name], "at_half": 0.66}
             for method in blend_bench.EQUAL_COMPUTE_METHODS for name in names}
    for second, match in (("x0 preview", "0.55 / 0.60"), ("noise-aware preview", "0.49 / 0.53")):
        equal[f"two stages (0.2, 0.4) / {pick} -> {second}"] = {"match": match, "at_half": 0.67}
    entry = {"pick": "x0_probe", "pick_label": pick, "train_rows": 10152, "scorers": scorers, "best_of_8": 0.6738,
             "weights_by_t": {"0.4": {f"x0 preview + {pick}": {"weight": 0.15}, f"noise-aware preview + {pick}":
                                      {"weight": 0.1}}},
             "equal_compute": equal}
    return dict(entry, summary=blend_bench.summary_line("unet", entry))


def test_the_report_reads_the_figures(blend_bench):
    import proxy_bench

    entry = made_up_entry(blend_bench)
    summary = entry["summary"]
    assert "with the x0-latent probe (validation's pick, weight 0.70 on the probe) the blend ranks the seeds better " \
           "than either alone (by +0.058 [+0.010, +0.110], paired over prompts): 0.630 within-prompt Spearman " \
           "against 0.377 (preview) and 0.572 (probe)" in summary
    assert "top-1 of 10 captures 0.21 of the oracle gain (the preview 0.13, the probe 0.19)" in summary
    assert "noise-aware preview in place of the plain one: 0.765 (0.725 alone; +0.040 [-0.010, +0.090] over the " \
           "better alone)" in summary
    assert "match best-of-8 at 0.51 / 0.47 and never of its compute (the x0 preview alone 0.52 / 0.47); the probe " \
           "alone at 0.2 then the x0 preview at 0.4 at 0.55 / 0.60, then the noise-aware preview at 0.49 / 0.53." in summary
    # the reading follows the paired interval, not the point figures
    same = made_up_entry(blend_bench, blend_within=0.60, gain=(0.01, -0.03, 0.05))["summary"]
    assert "ranks the seeds about as well as the better of the two alone (by +0.010 [-0.030, +0.050]" in same
    worse = made_up_entry(blend_bench, blend_within=0.55, gain=(-0.02, -0.04, -0.001))["summary"]
    assert "ranks the seeds worse than the better of the two alone (by -0.020" in worse
    text = blend_bench.markdown({"command": "bench/score_blend.py", "families": {"unet": entry}})
    assert ("| x0 preview + x0-latent probe | 0.70 (0.699) | 0.630 [0.530, 0.730] | +0.058 [+0.010, +0.110] | 0.315 | "
            "0.210 | 0.700 |") in text
    assert "| x0 preview | - | 0.377 [0.277, 0.477] | - |" in text
    assert "| two stages (0.2, 0.4) / noise-aware preview | 0.51 / 0.42 | 0.6600 |" in text
    assert "weights x0 preview + x0-latent probe 0.15, noise-aware preview + x0-latent probe 0.10" in text
    assert text.endswith(f"- {summary}\n")
    assert proxy_bench.BLEND_FILE == blend_bench.RESULTS_FILE


def test_a_family_without_its_bulk_set_is_skipped(blend_bench, tmp_path, monkeypatch):
    import proxy_bench

    monkeypatch.setattr(proxy_bench, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(proxy_bench, "RESULTS", tmp_path / "results")
    assert blend_bench.measure("unet", proxy_bench.MEDIUM) == {}
    (tmp_path / "results").mkdir()
    with pytest.raises(SystemExit, match="no family has its bulk set"):
        blend_bench.report(["unet"], proxy_bench.MEDIUM, tmp_path / "results", "test")
    assert list((tmp_path / "results").iterdir()) == []          # nothing half-written


def test_paired_gain_is_the_mean_per_prompt_difference(blend_bench):
    rows, probe = _rows(30, 8, 2)
    rows.finals = rows.preview + probe
    gain = blend_bench.paired_gain(rows.finals, rows.preview, rows, 200)
    ours = blend_bench.scorers_within(rows.finals, rows)
    assert ours == pytest.approx(1.0)
    assert gain["within"] == pytest.approx(ours - blend_bench.scorers_within(rows.preview, rows))
    assert 0 < gain["low"] < gain["within"] < gain["high"]
    same = blend_bench.paired_gain(rows.preview, rows.preview, rows, 200)
    assert same == {"within": 0.0, "low": 0.0, "high": 0.0}
