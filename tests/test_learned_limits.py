"""What limits the learned scorer (bench/learned_limits.py): how a scorer picks (success AUC, oracle gain) and
the figures' report, on made-up scores; a family without its bulk set is skipped, not measured on nothing."""
import json
import sys

import numpy as np
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def limits(pack):
    sys.path.append(str(ROOT / "bench"))     # after ComfyUI: the pack's nodes/ must not shadow ComfyUI's nodes
    import learned_limits
    return learned_limits


def test_success_auc_counts_successes_above_failures_within_each_prompt(limits):
    finals = np.array([0.9, 0.6, 0.1, 0.2, 0.8, 0.3, 0.7, 0.75])
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    # prompt 0: successes score 5 and 1, failures 2 and 3: 2 of 4 pairs right; prompt 1: 1 of 1; prompt 2 has no
    # failure and does not count
    scores = np.array([5.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0])
    assert limits.success_auc(scores, finals, groups) == pytest.approx((0.5 + 1.0) / 2)
    assert limits.success_auc(np.zeros(8), finals, groups) == pytest.approx(0.5)          # ties count one half
    assert limits.success_auc(finals, finals, groups) == 1.0
    assert np.isnan(limits.success_auc(scores[6:], finals[6:], groups[6:]))


def test_a_scorer_that_orders_the_failures_ranks_well_and_picks_badly(limits):
    rng = np.random.default_rng(0)
    prompts, seeds = 40, 10
    groups = np.repeat(np.arange(prompts), seeds)
    finals = np.where(rng.random(prompts * seeds) < 0.3, 0.5 + 0.5 * rng.random(prompts * seeds),
                      0.45 * rng.random(prompts * seeds))
    failures_in_order = np.where(finals < 0.5, finals, rng.random(prompts * seeds))   # blind among the successes
    top_only = (finals >= 0.5) + 0.01 * rng.random(prompts * seeds)                  # tells successes, nothing else
    ranker, picker = (limits.picking(s, finals, groups) for s in (failures_in_order, top_only))
    assert ranker["within"] > picker["within"]
    assert picker["oracle_gain_10"] > ranker["oracle_gain_10"] and picker["success_auc"] == pytest.approx(1.0)
    assert ranker["success_auc"] < 0.8
    oracle = limits.picking(finals, finals, groups)
    assert oracle["within"] == pytest.approx(1.0) and oracle["oracle_gain_5"] == pytest.approx(1.0)


def made_up_entry(limits) -> dict:
    within = {"x0 preview": 0.377, "x0-latent probe": 0.572}
    picking = {name: {"within": w, "oracle_gain_5": w / 2, "oracle_gain_10": w / 3, "success_auc": 0.7}
               for name, w in within.items()}
    noise_free = [{"scorer": "x0_probe", "train_rows": n, "val_within": 0.2, "best_epoch": 3, "trained_on_final": f,
                   "against_preview": {"within": p, "low": p - 0.1, "high": p + 0.1},
                   "against_final": {"within": q, "low": q - 0.1, "high": q + 0.1}}
                  for n, p, q, f in ((1152, 0.05, 0.11, 0.346), (10152, 0.314, 0.438, 0.572))]
    entry = {"pick": "x0_probe", "pick_label": "x0-latent probe", "noise_free": noise_free, "picking": picking}
    return dict(entry, summary=limits.summary_line("unet", entry))


def test_report_states_both_measurements(limits):
    import proxy_bench

    entry = made_up_entry(limits)
    assert "10152 bulk rows" in entry["summary"] and "reaches 0.314 within-prompt Spearman with it" in entry["summary"]
    assert "(0.050 from 1152 rows) and 0.438 with the final reward, against the preview's own 0.377" in entry["summary"]
    assert "it learns little of the evaluator's judgement" in entry["summary"]
    assert "what it learns ranks the final reward at least as well as the preview itself" in entry["summary"]
    assert "ranks the seeds at 0.572 and picks at least as well as the x0 preview" in entry["summary"]
    assert "top-1 of 10 captures 0.19 of the oracle gain against 0.13" in entry["summary"]
    # the reading follows the figures
    entry["picking"]["x0 preview"]["oracle_gain_10"] = 0.5
    entry["noise_free"][-1]["against_preview"]["within"] = 0.9
    entry["noise_free"][-1]["against_final"]["within"] = -0.02
    other = limits.summary_line("unet", entry)
    assert "picks worse than the x0 preview: top-1 of 10 captures 0.19 of the oracle gain against 0.50" in other
    assert "it learns much of that score, and what it learns of that score says nothing of the final reward" in other
    entry["noise_free"][-1]["against_final"]["within"] = 0.2
    assert "ranks the final reward less well than the preview itself" in limits.summary_line("unet", entry)
    entry = made_up_entry(limits)
    text = limits.markdown({"command": "bench/learned_limits.py", "families": {"unet": entry}})
    assert "| unet | x0-latent probe | 1152 | 0.050 [-0.050, 0.150] | 0.110 [0.010, 0.210] | 0.346 | 0.377 |" in text
    assert "| unet | x0-latent probe | 10152 | 0.314 [0.214, 0.414] | 0.438 [0.338, 0.538] | 0.572 | 0.377 |" in text
    assert "| unet | x0-latent probe | 0.572 | 0.286 | 0.191 | 0.700 |" in text
    assert text.endswith(f"- {entry['summary']}\n")
    assert proxy_bench.LIMITS_FILE == limits.RESULTS_FILE


def test_the_variants_table_and_reading_follow_validation(limits):
    entry = made_up_entry(limits)

    def row(val, within, gain10, first):
        return {"val_within": val, "best_epoch": 3, "within": within, "oracle_gain_5": 0.4, "oracle_gain_10": gain10,
                "success_auc": 0.75, "interval": {"within": within, "low": within - 0.1, "high": within + 0.1},
                "then_preview": first}

    entry["variants"] = {"as in the bulk curve": row(0.682, 0.624, 0.37, "0.59 / 0.54"),
                         "ranking loss weighted toward the best seeds (top_weight 1)": row(0.665, 0.643, 0.40,
                                                                                          "0.61 / 0.53")}
    summary = limits.summary_line("unet", entry)
    assert summary.endswith(" Variants (validation keeps the scorer as trained): as trained 0.624 (top-1 of 10 0.37, "
                            "first stage before the x0 preview 0.59 / 0.54); ranking loss weighted toward the best "
                            "seeds (top_weight 1) 0.643 (top-1 of 10 0.40, first stage 0.61 / 0.53).")
    entry["variants"]["ranking loss weighted toward the best seeds (top_weight 1)"]["val_within"] = 0.7
    assert "(validation favours the ranking loss weighted toward the best seeds (top_weight 1))" in \
        limits.summary_line("unet", entry)
    entry["summary"] = summary
    text = limits.markdown({"command": "bench/learned_limits.py", "families": {"unet": entry}})
    assert "## Does a picking-oriented variant help?" in text
    assert ("| unet | ranking loss weighted toward the best seeds (top_weight 1) | 0.700 | 0.643 [0.543, 0.743] | "
            "0.400 | 0.400 | 0.750 | 0.61 / 0.53 |") in text
    # a family without variants (the DiT) has no rows and no sentence
    assert limits.variants_sentence(made_up_entry(limits)) == ""


def test_a_variant_file_is_reused_only_for_the_same_training(limits, tmp_path):
    import proxy_bench
    from probe_select.probes.io import ProbeMetadata, save_probe
    from probe_select.probes.model import build_probe

    name = "ranking loss weighted toward the best seeds (top_weight 2)"
    path = limits.variant_file(tmp_path, "unet", "x0_text_probe", 846, name)
    assert path.name == "unet_x0_text_probe_846_top_weight2.safetensors"
    assert limits.variant_file(tmp_path, "unet", "x0_probe", 846, "x0 features pooled 2x2 (not 1x1)").name == \
        "unet_x0_probe_846_pooled_size2.safetensors"
    config = proxy_bench.probe_config(64, proxy_bench.MEDIUM, **proxy_bench.LEARNED["x0_probe"])
    assert not limits._finished_variant(path, config, 2.0, 846)              # nothing there yet
    training = {"stopped": "completed", "epochs": proxy_bench.BULK_EPOCHS, "data": {"train_prompts": 846},
                "loss": {"top_weight": 2.0}}
    save_probe(path, build_probe(config), ProbeMetadata(
        backbone_family="sd1", tap="output_blocks.3.0", checkpoint_t=0.2, feature_shape=(64, config.feature_size,
                                                                                       config.feature_size),
        pooling="adaptive_avg", evaluator="proxy_log", training=training, config=config))
    assert limits._finished_variant(path, config, 2.0, 846)
    # training sets text_dim from the dataset: a probe that reads text is still the same variant
    import dataclasses
    text_config = dataclasses.replace(config, text_film=True, text_dim=0)
    text_path = tmp_path / "text.safetensors"
    save_probe(text_path, build_probe(dataclasses.replace(text_config, text_dim=64)), ProbeMetadata(
        backbone_family="sd1", tap="output_blocks.3.0", checkpoint_t=0.2, feature_shape=(64, config.feature_size,
                                                                                       config.feature_size),
        pooling="adaptive_avg", evaluator="proxy_log", training=training,
        config=dataclasses.replace(text_config, text_dim=64)))
    assert limits._finished_variant(text_path, text_config, 2.0, 846)
    assert not limits._finished_variant(path, config, 1.0, 846)              # another loss
    assert not limits._finished_variant(path, config, 2.0, 423)              # other prompts
    other = proxy_bench.probe_config(64, proxy_bench.MEDIUM, **proxy_bench.LEARNED["x0_probe"], pooled_size=2)
    assert not limits._finished_variant(path, other, 2.0, 846)               # another probe


def test_a_family_without_its_bulk_set_is_skipped(limits, tmp_path, monkeypatch):
    import proxy_bench

    monkeypatch.setattr(proxy_bench, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(proxy_bench, "RESULTS", tmp_path / "results")
    assert limits.measure("unet", proxy_bench.MEDIUM, tmp_path / "limits") == {}
    (tmp_path / "results").mkdir()
    with pytest.raises(SystemExit, match="no family has its bulk set"):
        limits.report(["unet"], proxy_bench.MEDIUM, tmp_path / "limits", tmp_path / "results", "test")
    assert list((tmp_path / "results").iterdir()) == []          # nothing half-written


def test_saved_figures_join_the_report_only_for_their_setting(limits, tmp_path):
    import proxy_bench

    setting = proxy_bench.MEDIUM
    saved = {"setting": json.loads(json.dumps(setting.__dict__)), "families": {"unet": made_up_entry(limits)}}
    path = tmp_path / proxy_bench.LIMITS_FILE
    path.write_text(json.dumps(saved))
    assert proxy_bench.saved_families(path, setting)["unet"]["summary"] == saved["families"]["unet"]["summary"]
    saved["setting"]["heldout_seeds"] += 1
    path.write_text(json.dumps(saved))
    assert proxy_bench.saved_families(path, setting) == {}
    assert proxy_bench.saved_families(tmp_path / "missing.json", setting) == {}
