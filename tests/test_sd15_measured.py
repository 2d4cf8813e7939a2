"""The step model behind bench/results/sd15_measured.md (bench/step_model.py) and the benchmark's own
arithmetic (bench/bench_sd15_measured.analyse), on made-up timings, by hand."""
import json

import pytest

from bench import flops_model, step_model
from bench.bench_sd15_measured import Profile, analyse, main, measured_runs, merge_runs, run_order
from bench.step_model import CallCosts

# Made-up per-call seconds: a denoiser call on 10 rows (N=5 under CFG) 4 s, on 2 rows (K=1) 1 s, so a
# candidate-step costs 0.8 s at N=5 and 1.0 s at K=1; a decode of 5 latents 10 s, of 1 latent 2.5 s.
COSTS = CallCosts(step={10: 4.0, 2: 1.0}, decode={5: 10.0, 1: 2.5})


def test_predict_n5_k1_by_hand():
    # T = 20, t = 0.2 -> c = 4: generate-all 20 calls on 10 rows + a decode of 5; Probe-Select 4 calls on 10
    # rows, 16 on 2 rows, a decode of 1.
    p = step_model.predict(COSTS, 5, 1, 20, 0.2)
    assert p.generate_all == pytest.approx(20 * 4.0 + 10.0)                  # 90
    assert p.early == pytest.approx(4 * 4.0) and p.finish == pytest.approx(16 * 1.0)
    assert p.probe_select == pytest.approx(16.0 + 16.0 + 2.5)               # 34.5
    assert p.ratio == pytest.approx(34.5 / 90)
    assert (p.decode_generate_all, p.decode_probe_select) == (10.0, 2.5)


def test_predict_without_cfg_uses_one_row_per_candidate():
    costs = CallCosts(step={5: 2.0, 1: 0.5}, decode={5: 10.0, 1: 2.5})
    p = step_model.predict(costs, 5, 1, 20, 0.2, rows_per_candidate=1)
    assert p.probe_select == pytest.approx(4 * 2.0 + 16 * 0.5 + 2.5)
    assert p.generate_all == pytest.approx(20 * 2.0 + 10.0)


def test_checkpoint_rounds_like_the_sampler():
    # T = 10, t = 0.25 -> round(2.5) = 2 (half to even), not 3.
    p = step_model.predict(COSTS, 5, 1, 10, 0.25)
    assert p.early == pytest.approx(2 * 4.0) and p.finish == pytest.approx(8 * 1.0)


def test_batch_independent_costs_give_the_flop_models_ratio():
    # Scaled linearly from the batch of N, the step model is the FLOP model with step = 0.8 s per candidate
    # and decode = 2 s per image (no probe, no evaluator).
    linear = step_model.linear_costs(COSTS, 5, 1)
    assert linear.step == {10: pytest.approx(4.0), 2: pytest.approx(0.8)}
    assert linear.decode == {5: pytest.approx(10.0), 1: pytest.approx(2.0)}
    flops = flops_model.method_ratios(flops_model.Components(step=0.8, decode=2.0, preview_decode=0.0, probe=0.0,
                                                             evaluator=0.0), 5, 1, 20, 0.2)
    assert step_model.predict(linear, 5, 1, 20, 0.2).ratio == pytest.approx(flops["probe_select"])
    # The batch-2 call's extra cost per candidate (1.0 vs 0.8 s) is what the measured model adds on top.
    assert step_model.predict(COSTS, 5, 1, 20, 0.2).ratio > flops["probe_select"]


def test_per_candidate_step_and_relative_error():
    assert step_model.per_candidate_step(COSTS, 5) == pytest.approx(0.8)
    assert step_model.per_candidate_step(COSTS, 1) == pytest.approx(1.0)
    assert step_model.relative_error(0.40, 0.38) == pytest.approx(0.02 / 0.38)
    assert step_model.relative_error(0.36, 0.38) == pytest.approx(0.02 / 0.38)


def test_missing_costs_and_bad_k_are_refused():
    with pytest.raises(KeyError, match="batch of 4 rows"):
        step_model.predict(COSTS, 5, 2, 20, 0.2)
    with pytest.raises(KeyError, match="3 images"):
        CallCosts(step={6: 1.0}, decode={}).decode_seconds(3)
    with pytest.raises(ValueError, match="keep"):
        step_model.predict(COSTS, 1, 5, 20, 0.2)


def test_analyse_splits_the_run_into_calls_decodes_and_the_rest():
    # generate-all: 20 calls of 4 s, a decode of 10 s, 1 s else; Probe-Select: 4 calls of 4 s, 16 of 1 s (one
    # of them 3 s: a load spike), a decode of 2.5 s and 0.5 s of the pack's own work.
    ga = Profile("generate-all", wall_s=91.0, calls=[(10, 4.0)] * 20, decodes=[(5, 10.0)])
    ps_calls = [(10, 4.0)] * 4 + [(2, 1.0)] * 15 + [(2, 3.0)]
    ps = Profile("Probe-Select", wall_s=16.0 + 18.0 + 2.5 + 0.5, calls=ps_calls, decodes=[(1, 2.5)])
    flops = {"step_cfg_batch2": 100.0, "decode_1_image": 150.0, "probe_1_candidate": 0.01}
    a = analyse(ga, ps, {10: [4.2, 3.8], 2: [1.1, 0.9]}, flops, tap_pool_s=0.001, candidates=5, keep=1, steps=20)

    assert a["measured"]["ratio"] == pytest.approx(37.0 / 91.0)
    assert a["step_costs_in_run"]["step_median_s"] == {10: 4.0, 2: 1.0}
    assert a["step_costs_in_run"]["step_calls"] == {10: 24, 2: 16}
    # The headline prices calls at their means (the 3 s call counts, as it does in the wall time); the
    # medians drop it.
    assert a["step_model"]["ratio"] == pytest.approx((16 + 18 + 2.5) / 90.0)
    assert a["step_costs_in_run"]["step_mean_s"] == {10: 4.0, 2: pytest.approx(18 / 16)}
    assert a["step_model_median"]["ratio"] == pytest.approx(34.5 / 90.0)
    assert a["step_model"]["relative_error"] == pytest.approx(abs(37 / 91 - 36.5 / 90) / (36.5 / 90))
    assert a["standalone_step_model"]["ratio"] == pytest.approx(34.5 / 90.0)
    # Each run priced with its own calls' medians: the same here (no drift between the made-up runs).
    each = a["each_run_own_costs"]
    assert each["step_median_s"] == {"generate-all": {10: 4.0}, "Probe-Select": {10: 4.0, 2: 1.0}}
    assert (each["generate_all_s"], each["probe_select_s"]) == (pytest.approx(90.0), pytest.approx(34.5))
    assert a["per_candidate_step_s"] == {"N=5": pytest.approx(0.8), "K=1": pytest.approx(18 / 16)}
    # One decoded image (2 s at batch 5) in candidate-steps at batch N (0.8 s): 2.5; by FLOPs 150 / 100.
    assert a["measured_decode_in_steps"] == pytest.approx(2.5)
    assert a["flop_model"]["decode_in_steps"] == pytest.approx(1.5)
    assert a["flop_model"]["ratio"] == pytest.approx((5 * 4 + 5 * 1e-4 + 16 + 1.5) / (100 + 5 * 1.5))
    own = a["own_work"]
    assert own["remainder_s"] == pytest.approx(0.5) and own["own_s"] == pytest.approx(0.501)
    assert own["own_pct"] == pytest.approx(100 * 0.501 / 37.0)
    assert own["generate_all_remainder_s"] == pytest.approx(1.0)


def test_runs_alternate_in_abba_blocks():
    assert run_order(1) == ["generate_all", "probe_select"]
    assert run_order(2) == ["generate_all", "probe_select", "probe_select", "generate_all"]
    assert run_order(3)[4:] == ["generate_all", "probe_select"]


def test_repeats_add_up_into_one_run():
    first = Profile("Probe-Select", wall_s=10.0, calls=[(10, 4.0), (2, 1.0)], decodes=[(1, 2.0)],
                    nodes=[{"node": "ProbeSelectResume", "wall_s": 1.5, "denoiser_s": 1.0, "calls": 1, "rows": [2],
                            "decode_s": 0.0}], load_before=(1.0,), load_after=(1.5,))
    second = Profile("Probe-Select", wall_s=12.0, calls=[(10, 5.0), (2, 1.5)], decodes=[(1, 3.0)],
                     nodes=[{"node": "ProbeSelectResume", "wall_s": 2.0, "denoiser_s": 1.5, "calls": 1, "rows": [2],
                             "decode_s": 0.0}], load_before=(2.0,), load_after=(2.5,))
    merged = merge_runs([first, second])
    assert merged.wall_s == 22.0 and merged.calls == [(10, 4.0), (2, 1.0), (10, 5.0), (2, 1.5)]
    assert merged.decodes == [(1, 2.0), (1, 3.0)]
    assert merged.nodes == [{"node": "ProbeSelectResume", "wall_s": 3.5, "denoiser_s": 2.5, "calls": 2, "rows": [2],
                             "decode_s": 0.0}]
    assert (merged.load_before, merged.load_after) == ((1.0,), (2.5,))
    assert merged.remainder_s == pytest.approx(22.0 - 11.5 - 5.0)
    # the first run is not changed by the merge
    assert first.calls == [(10, 4.0), (2, 1.0)] and first.nodes[0]["wall_s"] == 1.5


def test_decodes_are_priced_at_their_mean():
    ga = Profile("generate-all", wall_s=100.0, calls=[(10, 4.0)] * 20, decodes=[(5, 10.0), (5, 12.0)])
    ps = Profile("Probe-Select", wall_s=40.0, calls=[(10, 4.0)] * 4 + [(2, 1.0)] * 16, decodes=[(1, 2.0), (1, 4.0)])
    flops = {"step_cfg_batch2": 100.0, "decode_1_image": 150.0, "probe_1_candidate": 0.01}
    a = analyse(ga, ps, {}, flops, tap_pool_s=0.0, candidates=5, keep=1, steps=20)
    assert a["step_costs_in_run"]["decode_s"] == {5: 11.0, 1: 3.0}
    assert a["step_model"]["ratio"] == pytest.approx((16 + 16 + 3) / (80 + 11))


def test_the_benchmark_runs_the_nodes_end_to_end_on_tiny_models(tmp_path):
    """bench/bench_sd15_measured.py on tiny models (N=2, K=1, 5 steps: checkpoint step 1): every denoiser
    call is where the step model puts it, and the report is written from the figures."""
    data = main(["--tiny", "--candidates", "2", "--keep", "1", "--steps", "5", "--standalone-repeats", "1",
                 "--repeats", "1", "--output-stem", str(tmp_path / "tiny")])
    runs = data["runs"]
    assert [rows for rows, _ in runs["generate_all"]["calls"]] == [4] * 5
    # The early phase evaluates step 0 only (it stops at the first call of step 1); the resume replays that
    # call and evaluates steps 1..4 for the kept candidate alone.
    assert [rows for rows, _ in runs["probe_select"]["calls"]] == [4] + [2] * 4
    assert [n for n, _ in runs["generate_all"]["decodes"]] == [2]
    assert [n for n, _ in runs["probe_select"]["decodes"]] == [1]
    nodes = [node["node"] for node in runs["probe_select"]["nodes"]]
    assert nodes == ["EmptyLatentImage", "ProbeSelectTap", "ProbeSelectLoadProbe", "ProbeSelectEarlySampler",
                     "ProbeSelectScore", "ProbeSelectTopK", "ProbeSelectResume", "VAEDecode"]
    a = data["analysis"]
    ps = runs["probe_select"]
    assert a["own_work"]["remainder_s"] == pytest.approx(
        ps["wall_s"] - sum(s for _, s in ps["calls"]) - sum(s for _, s in ps["decodes"]))
    # the measured ratio is the two runs' wall times (on tiny models it may even exceed 1: their calls cost
    # about what the nodes' own work does, and a loaded machine can slow either run)
    assert a["measured"]["ratio"] == pytest.approx(ps["wall_s"] / runs["generate_all"]["wall_s"])
    assert a["measured"]["ratio"] > 0 and a["flop_model"]["steps_only"] == pytest.approx((2 * 1 + 4) / 10)
    assert set(a["standalone_step_model"]["step_s"]) == {4, 2}
    written = json.loads((tmp_path / "tiny.json").read_text())
    assert written["analysis"]["measured"]["ratio"] == pytest.approx(a["measured"]["ratio"])
    text = (tmp_path / "tiny.md").read_text()
    assert f"**{a['measured']['ratio']:.3f}**" in text and "## Reading" in text
    # Re-rendering from the JSON recomputes the same analysis.
    again = main(["--from-json", str(tmp_path / "tiny.json"), "--output-stem", str(tmp_path / "again")])
    assert again["analysis"]["step_model"]["ratio"] == pytest.approx(a["step_model"]["ratio"])
    assert (tmp_path / "again.md").read_text() == text


def test_the_benchmark_repeats_the_runs_in_abba_order(tmp_path):
    data = main(["--tiny", "--candidates", "2", "--keep", "1", "--steps", "5", "--standalone-repeats", "0",
                 "--repeats", "2", "--output-stem", str(tmp_path / "tiny")])
    order = [run["name"] for run in measured_runs(data)]
    assert order == ["generate-all", "Probe-Select", "Probe-Select", "generate-all"]
    repeats, runs = data["repeats"], data["runs"]
    assert [len(repeats["generate_all"]), len(repeats["probe_select"])] == [2, 2]
    # the figures add the repeats up: twice the calls, the summed wall time
    assert [rows for rows, _ in runs["probe_select"]["calls"]] == ([4] + [2] * 4) * 2
    assert runs["generate_all"]["wall_s"] == pytest.approx(sum(r["wall_s"] for r in repeats["generate_all"]))
    a = data["analysis"]
    assert a["measured"]["ratio"] == pytest.approx(runs["probe_select"]["wall_s"] / runs["generate_all"]["wall_s"])
    assert a["step_costs_in_run"]["step_calls"] == {4: 12, 2: 8}
    text = (tmp_path / "tiny.md").read_text()
    pairs = [p["wall_s"] / g["wall_s"] for p, g in zip(repeats["probe_select"], repeats["generate_all"])]
    assert f"{pairs[0]:.3f}, {pairs[1]:.3f}" in text
    assert text.count("| generate-all |") == 2 and text.count("| Probe-Select |") == 2


def test_repeats_below_one_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--tiny", "--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
