"""The distilled probe's bench (bench/distilled_probe.py): its teacher reads every flip of a latent afresh, and its
figures reach the proxy bench's report."""
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module")
def distilled(pack):
    sys.path.append(str(ROOT / "bench"))     # after ComfyUI: the pack's nodes/ must not shadow ComfyUI's nodes
    import distilled_probe
    return distilled_probe


def test_the_teacher_reads_each_flip_of_a_preview_afresh_so_a_relation_follows_the_flip(distilled):
    from bench.proxy_world import grammar, models
    from bench.proxy_world.render import render_batch

    prompts = ["a red circle left of a blue square", "two green triangles"]
    latent = models.image_to_latent(render_batch([grammar.parse_prompt(p) for p in prompts], rng=[0, 1]), "unet")
    readings = distilled.teacher_readings(latent, prompts, "unet")
    assert readings.shape == (2, distilled.VIEWS, 9 * distilled.TEACHER_SCALES)
    stored, _ = distilled.preview_reward.latent_features(latent, prompts, "unet")
    coarser, _ = distilled.preview_reward.latent_features(latent, prompts, "unet", coarser=1)
    np.testing.assert_allclose(readings[:, 0].numpy(), np.concatenate([stored, coarser], 1), rtol=1e-5, atol=1e-5)
    relation = distilled.preview_reward.FEATURES.index("relation")
    # the rendered "left of" holds as stored and upside down, and fails once mirrored left-right
    assert readings[0, 0, relation] > np.log(0.9) and readings[0, 2, relation] > np.log(0.9)
    assert readings[0, 1, relation] < readings[0, 0, relation] - 0.5
    # a count prompt has no relation: its factor stays 1 (log 0) in every view
    assert torch.all(readings[1, :, relation] == 0)


def test_the_distilled_rows_and_sentence_reach_the_equal_compute_section_of_the_report(pack):
    sys.path.append(str(ROOT / "bench"))
    import proxy_bench

    point = {"schedule": "10: 0.2->8, 0.4->2", "compute": 3.6, "reward": 0.7, "halves": [0.71, 0.69]}
    eq = {"prices": {"priced_as": "SD1.5", "decode": 1.5, "evaluator": 0.2, "x0_preview": 0.3, "probe": 0.0002},
          "unit_steps": 21.8, "best_of_8": {"reward": 0.69, "compute": 8.0}, "prompts": 2, "seeds": 20,
          "curves": {"best-of-N": [dict(point, schedule="8", compute=8.0)]},
          "match_best_of_8": {"best-of-N": []}}
    key = "two stages (0.2, 0.4) / distilled_probe -> x0_preview"
    distilled = {"train_rows": 1234, "sets": ["main", "bulk"], "heldout": {"0.2": {"distilled_probe": {"within": 0.61, "low": 0.55, "high": 0.66},
                                                         "x0_preview": {"within": 0.32, "low": 0.2, "high": 0.4}}},
                 "equal_compute": {"curves": {key: [point]},
                                   "match_best_of_8": {key: [{"schedule": point["schedule"], "compute": 3.6,
                                                              "reward": 0.7, "best_of_8": 0.69}]}}}
    lines = proxy_bench.equal_compute_summary({"families": {"unet": {"equal_compute": eq,
                                                                     "distilled_probe": distilled}}})
    row = next(line for line in lines if line.startswith(f"| {key} |"))
    assert "3.60 (0.45)" in row and "10: 0.2->8, 0.4->2" in row and "0.7000 (0.6900)" in row
    sentence = next(line for line in lines if line.startswith("'distilled_probe'"))
    assert "1234 rows of the main and bulk sets" in sentence and "t = 0.2: 0.610 [0.550, 0.660] against the x0 preview's 0.320" in sentence


def test_the_saved_figures_keep_every_methods_match_but_only_the_distilled_probes_curves(distilled):
    def points(reward):
        return [{"schedule": "8", "compute": 8.0, "reward": reward, "halves": [reward, reward]},
                {"schedule": "10: 0.2->2", "compute": 3.0, "reward": reward + 0.1, "halves": [reward, reward]}]

    keys = ("best-of-N", "one stage at 0.2 / x0_preview", "one stage at 0.2 / distilled_probe",
            "one stage at 0.2 / oracle")
    eq = {"best_of_8": {"compute": 8.0, "reward": 0.6}, "prices": {}, "curves": {k: points(0.5) for k in keys},
          "match_best_of_8": {k: [] for k in keys}}
    eq["match_best_of_8"]["one stage at 0.2 / distilled_probe"] = [
        {"schedule": "10: 0.2->2", "compute": 3.0, "reward": 0.61, "best_of_8": 0.6}]
    saved = distilled.compact(eq)
    assert list(saved["curves"]) == ["one stage at 0.2 / distilled_probe"]
    assert saved["best_at_half"] == {k: pytest.approx(0.6) for k in keys}     # the 3.0 point: <= 0.5 of 8.0
    rows = distilled.scorer_rows(saved)
    assert [row[0] for row in rows] == list(keys[:3])                          # no oracle row
    assert rows[2][1] == [(3.0 / 8.0, "10: 0.2->2", 0.61, 0.6)]
    assert "0.38 (10: 0.2->2: 0.610 vs 0.600)" in distilled.fraction_text(rows[2][1])


def test_validation_prompts_have_finished_scores_and_none_of_their_rows_is_fit(distilled):
    prompts = [f"p{i}" for i in range(20) for _ in range(3)] + [f"p{i}" for i in range(40) for _ in range(2)]
    final = np.concatenate([np.arange(60.0), np.full(80, np.nan)])     # p20..p39 only in the early set
    fit, val, chosen = distilled.validation_split(prompts, final)
    assert len(chosen) == int(20 * distilled.VALIDATION_SHARE) and chosen <= {f"p{i}" for i in range(20)}
    without_early = distilled.validation_split(prompts[:60], final[:60])
    assert without_early[2] == chosen                   # the early set does not move the validation prompts
    for row, prompt in enumerate(prompts):
        assert fit[row] == (prompt not in chosen)
        assert val[row] == (prompt in chosen and np.isfinite(final[row]))
    assert val.sum() == 3 * len(chosen) and not (fit & val).any()


def test_each_combination_of_training_sets_is_kept_and_the_same_one_replaced(distilled):
    def result(sets, within, unfinished=0):
        match = [{"compute": 4.0, "schedule": "s", "reward": 0.7, "best_of_8": 0.69}]
        mix = "two stages (0.2, 0.4) / distilled_probe -> x0_preview"
        anywhere = {"two stages (0.1, 0.4) / distilled_probe -> x0_preview": [dict(match[0], compute=3.0)] * 2,
                    "one stage at 0.1 / distilled_probe": [dict(match[0], compute=2.0)],        # one half only
                    # chosen on each half, but the second choice falls short of best-of-8 on the other half
                    "one stage at 0.2 / distilled_probe": [dict(match[0], compute=2.5),
                                                           dict(match[0], compute=2.5, reward=0.6)],
                    "one stage at 0.1 / x0_preview": [dict(match[0], compute=1.0)] * 2}         # not the probe
        return {"training": {"sets": sets, "train_rows": 10, "unfinished_rows": unfinished, "chosen_epoch": 1,
                             "epochs": 2, "history": [{"validation": 0.4}, {"validation": 0.5}]},
                "heldout": {"0.2": {"distilled_probe": {"within": within}, "x0_preview": {"within": 0.3}}},
                "equal_compute": {"best_of_8": {"compute": 8.0}, "match_best_of_8": {mix: match * 2}},
                "equal_compute_anywhere": {"best_of_8": {"compute": 8.0}, "match_best_of_8": anywhere}}

    old = result(["main", "bulk"], 0.6)
    new = result(["main", "bulk", "early"], 0.7, unfinished=5)
    record = distilled.by_sets(old, new)          # a run from before the record: its own figures first
    assert list(record) == ["main+bulk", "main+bulk+early"]
    assert record["main+bulk"]["heldout"]["0.2"]["within"] == 0.6 and record["main+bulk+early"]["unfinished_rows"] == 5
    assert record["main+bulk+early"]["mix_match"] == [[0.5, True], [0.5, True]] and record["main+bulk"]["validation"] == 0.5
    assert record["main+bulk+early"]["cheapest_anywhere"] == {
        "method": "two stages (0.1, 0.4) / distilled_probe -> x0_preview", "fractions": [0.375, 0.375]}
    short = result(["main"], 0.5)
    short["equal_compute"]["match_best_of_8"]["two stages (0.2, 0.4) / distilled_probe -> x0_preview"][1] = dict(
        reward=0.6, best_of_8=0.69, compute=2.0)
    del short["equal_compute_anywhere"]["match_best_of_8"]["two stages (0.1, 0.4) / distilled_probe -> x0_preview"]
    assert distilled.set_figures(short)["mix_match"] == [[0.5, True], [0.25, False]]
    assert distilled.set_figures(short)["cheapest_anywhere"] == {}
    again = distilled.by_sets(dict(new, by_sets=record), result(["main", "bulk"], 0.65))
    assert list(again) == ["main+bulk+early", "main+bulk"] and again["main+bulk"]["heldout"]["0.2"]["within"] == 0.65


def test_the_confirmation_judges_each_methods_cheapest_match_and_on_the_same_prompts_repeats_its_figures(distilled):
    import proxy_bench

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(8), 20)
    finals = rng.random(160)
    noisy = {t: finals + rng.normal(0, 0.02 / t, 160) for t in (0.1, 0.2, 0.4)}      # better later
    preview = {t: finals + rng.normal(0, 0.1, 160) for t in (0.1, 0.2, 0.4)}
    scorers = {"x0_preview": preview, distilled.NAME: noisy}
    anywhere = proxy_bench.equal_compute("unet", proxy_bench.MEDIUM, scorers, finals, groups, distilled.NAME,
                                         mixes=((distilled.NAME, "x0_preview"),), checkpoints=(0.1, 0.2, 0.4),
                                         stages=3)
    bo8 = anywhere["best_of_8"]
    verdict = distilled.confirmation(anywhere, scorers, finals, groups)
    assert verdict["prompts"] == 8 and verdict["best_of_8"] == {"heldout": bo8["reward"], "confirmation": bo8["reward"]}
    methods = verdict["methods"]
    assert methods and not any("oracle" in key or "random" in key for key in methods)
    assert any(" -> " in key and key.startswith("three stages") for key in methods)
    fractions = [m["fraction"] for m in methods.values()]
    assert fractions == sorted(fractions)
    for key, m in methods.items():
        points = anywhere["curves"][key]
        reaching = [p for p in points if p["reward"] >= bo8["reward"]]
        assert m["schedule"] == min(reaching, key=lambda p: p["compute"])["schedule"]
        # judged on the same prompts, the same subsets: the curve's own figure, mixes included
        assert m["confirmation"] == pytest.approx(m["heldout"], abs=1e-12)
    # a schedule judged on other prompts reads each stage's own scorer there
    other = {name: {t: -v for t, v in by_t.items()} for name, by_t in scorers.items()}
    key = next(k for k in methods if " -> " in k)
    worse = distilled.kept_reward(key, methods[key]["schedule"], other, finals, groups)
    assert worse < methods[key]["heldout"]


class _EarlySet:
    """A stand-in for a ProbeDataset run to t = 0.4 only: two candidates, x0 latents by checkpoint, no finished score."""

    def __init__(self, checkpoints=(0.1, 0.2, 0.4)):
        self.manifest = type("Manifest", (), {"checkpoints": list(checkpoints), "evaluators": []})()
        self.prompts = ["a red circle", "two blue squares"]
        self.text_embedding = torch.zeros(2, 3)

    def __len__(self):
        return 2

    def x0(self, at):
        return torch.full((2, 4, 2, 2), at) + torch.tensor([0.0, 10.0])[:, None, None, None]


def test_the_later_teacher_adds_the_same_candidates_reading_at_0_4_and_a_set_without_it_is_refused(distilled, monkeypatch):
    calls = []

    def readings(latent, prompts, family):       # a reading that names its latent: [rows, views, 2]
        calls.append(float(latent[0, 0, 0, 0]))
        return latent.mean((1, 2, 3))[:, None, None].expand(-1, distilled.VIEWS, 2).clone()

    monkeypatch.setattr(distilled, "teacher_readings", readings)
    now = distilled.Rows.part(_EarlySet(), "early", (0.1, 0.2, 0.4), "unet")
    assert now[3].shape == (6, distilled.VIEWS, 2) and torch.isnan(now[4]).all()
    calls.clear()
    later = distilled.Rows.part(_EarlySet(), "early", (0.1, 0.2, 0.4), "unet", "later")
    assert calls == pytest.approx([0.1, 0.4, 0.2])       # each checkpoint's previews read once
    assert later[3].shape == (6, distilled.VIEWS, 4)
    assert torch.equal(later[3][..., :2], now[3])         # the row's own reading first
    # then the same candidate's at 0.4: candidate 0 reads 0.4, candidate 1 reads 10.4, at every checkpoint
    np.testing.assert_allclose(later[3][:, 0, 2].numpy(), [0.4, 10.4] * 3, rtol=1e-6)
    assert later[6] == now[6] and [k.split("|")[-1] for k in later[6]] == ["0.1"] * 2 + ["0.2"] * 2 + ["0.4"] * 2
    with pytest.raises(ValueError, match="later teacher reads t = 0.4"):
        distilled.Rows.part(_EarlySet((0.1, 0.2)), "early", (0.1, 0.2), "unet", "later")
    with pytest.raises(ValueError, match="teacher must be one of"):
        distilled.Rows.part(_EarlySet(), "early", (0.1,), "unet", "future")


def test_a_variant_is_recorded_under_its_teacher_beside_the_saved_runs_own_entry(distilled):
    def result(sets, within, teacher=None, confirmed=True):
        training = {"sets": sets, "train_rows": 10, "validation_rows": 4, "chosen_epoch": 0, "epochs": 1,
                    "history": [{"epoch": 0, "validation": within, "loss": 0.5}]}
        if teacher is not None:
            training["teacher"] = teacher
        methods = {"one stage at 0.2 / x0_preview": {"fraction": 0.3, "confirmation": 0.9},
                   "one stage at 0.1 / distilled_probe": {"fraction": 0.4, "confirmation": 0.6 if confirmed else 0.4},
                   "one stage at 0.2 / distilled_probe": {"fraction": 0.6, "confirmation": 0.7}}
        methods = {key: dict(m, schedule="8: 0.2->1", heldout=0.6) for key, m in methods.items()}
        empty = {"best_of_8": {"compute": 8.0, "reward": 0.5}, "match_best_of_8": {}, "best_at_half": {}}
        return {"training": training, "heldout": {"0.2": {"distilled_probe": {"within": within}}},
                "equal_compute": empty, "equal_compute_anywhere": empty,
                "confirmation": {"prompts": 2, "best_of_8": {"confirmation": 0.5, "heldout": 0.55}, "methods": methods}}

    # the saved run from before the teacher was recorded: its 'teacher' holds the readings' names
    saved = result(["main", "bulk"], 0.6, teacher=["shape", "count"])
    assert distilled.set_key(saved["training"]) == "main+bulk"
    record = distilled.by_sets(saved, result(["main", "early"], 0.7, teacher="later", confirmed=False))
    assert list(record) == ["main+bulk", "main+early (later teacher)"]
    assert record["main+bulk"]["teacher"] == "now" and record["main+early (later teacher)"]["teacher"] == "later"
    # the cheapest probe schedule that reaches best-of-8 on the confirmation prompts (the x0 preview's is not one)
    assert record["main+bulk"]["confirmed"] == {"method": "one stage at 0.1 / distilled_probe", "fraction": 0.4}
    assert record["main+early (later teacher)"]["confirmed"] == {"method": "one stage at 0.2 / distilled_probe",
                                                                  "fraction": 0.6}
    lines = distilled.markdown({"unet": {**saved, "by_sets": record, "seconds": 1, "heldout": {}}}, "cmd")
    row = next(line for line in lines.splitlines() if line.startswith("| unet | main+early (later teacher) |"))
    assert row.endswith("| 0.60 (one stage at 0.2 / distilled_probe) |")
    unconfirmed = result(["main"], 0.5)
    del unconfirmed["confirmation"]
    assert "confirmed" not in distilled.set_figures(unconfirmed)


def test_the_report_states_each_scorers_cheapest_schedule_confirmed_on_new_prompts(distilled):
    methods = {"two stages (0.1, 0.3) / distilled_probe -> x0_preview": (0.45, 0.58),   # short of best-of-8 there
               "one stage at 0.1 / distilled_probe -> x0_preview": (0.47, 0.64),
               "one stage at 0.2 / distilled_probe": (0.55, 0.70),
               "one stage at 0.4 / x0_preview": (0.66, 0.63),
               "best-of-N": (1.0, 0.62)}
    result = {"training": {"sets": ["main", "early"], "train_rows": 10, "chosen_epoch": 1},
              "heldout": {"0.2": {"distilled_probe": {"within": 0.7, "low": 0.6, "high": 0.8},
                                  "x0_preview": {"within": 0.3}}},
              "equal_compute": {"curves": {"one stage at 0.2 / x0_preview": [], "one stage at 0.2 / distilled_probe": []},
                                "match_best_of_8": {"one stage at 0.2 / distilled_probe": []}},
              "confirmation": {"prompts": 32, "best_of_8": {"confirmation": 0.62, "heldout": 0.69},
                               "methods": {key: {"schedule": "10: 0.1->3", "fraction": f, "heldout": 0.7,
                                                 "confirmation": c} for key, (f, c) in methods.items()}}}
    entry = distilled.report_entry(result)
    assert list(entry["equal_compute"]["curves"]) == ["one stage at 0.2 / distilled_probe"]
    cheapest = entry["confirmation"]["cheapest"]
    assert cheapest["distilled_probe"]["method"] == "one stage at 0.1 / distilled_probe -> x0_preview"
    assert cheapest["x0_preview"]["method"] == "one stage at 0.4 / x0_preview"     # a mix is not the preview's
    sentence = distilled.proxy_bench.confirmation_sentence(entry["confirmation"])
    assert "best-of-8 there 0.6200" in sentence
    assert ("distilled_probe: 0.47 of best-of-8's compute (one stage at 0.1 / distilled_probe -> x0_preview, "
            "10: 0.1->3; 0.6400); x0_preview: 0.66 of") in sentence
    line = distilled.proxy_bench.distilled_line({**entry, "unfinished_rows": 0})
    assert line.endswith(sentence) and "t = 0.2: 0.700 [0.600, 0.800] against the x0 preview's 0.300" in line
    del result["confirmation"]
    assert "confirmation" not in distilled.report_entry(result)
    assert distilled.proxy_bench.confirmation_sentence(None) == ""
    none_confirmed = {**entry["confirmation"], "cheapest": {"distilled_probe": None}}
    assert distilled.proxy_bench.confirmation_sentence(none_confirmed).endswith("by scorer: distilled_probe: none.")


def test_each_probe_shape_builds_and_each_variant_is_recorded_under_its_own_key(distilled):
    from probe_select.probes.model import ProbeConfig, build_probe
    x0, t, text = torch.randn(3, 4, 16, 16), torch.full((3,), 0.2), torch.randn(3, 32)
    grids, sizes = {}, {}
    for shape, settings in distilled.PROBES.items():
        config = ProbeConfig(in_channels=4, feature_size=8, x0_channels=4, text_dim=32, **settings)
        probe = build_probe(config).eval()
        with torch.no_grad():
            assert probe(None, t, text, x0=x0).shape == (3,)
        grids[shape] = 16 // 2 ** len(config.x0_widths)          # each down block halves the grid
        sizes[shape] = sum(p.numel() for p in probe.parameters())
    assert set(distilled.PROBES) == set(distilled.PROBE_SHAPES) and distilled.PROBES["default"] is distilled.PROBE
    assert grids == {"default": 4, "fine": 8, "wide": 4, "keypoints": 4} and distilled.PROBES["fine"]["pooled_size"] == 8
    assert distilled.PROBES["keypoints"]["x0_keypoints"] == 8
    assert sizes["wide"] > 1.5 * sizes["default"]

    training = {"sets": ["main", "early"], "teacher": "later", "probe": "fine"}
    assert distilled.set_key(training) == "main+early (later teacher, fine probe)"
    assert distilled.set_key(dict(training, teacher="now")) == "main+early (fine probe)"
    assert distilled.set_key(dict(training, teacher="now", probe="default")) == "main+early"
    assert distilled.set_key(dict(training, centred=True)) == "main+early (later teacher, fine probe, centred readings)"
    assert distilled.set_key(dict(training, teacher="now", probe="default", seed=1)) == "main+early (seed 1)"
    # a run's record names its variant; older records (the readings' names under "teacher") are the defaults
    assert distilled.Variant.of(dict(training, centred=True, seed=2)) == distilled.Variant("later", "fine", True, 2)
    assert distilled.Variant.of({"teacher": ["shape", "count"]}) == distilled.Variant()
    assert distilled.Variant().words() == [] and distilled.Variant(seed=3).words() == ["seed 3"]
    with pytest.raises(ValueError, match="probe must be one of"):
        distilled.Variant(probe="huge")
    with pytest.raises(SystemExit):
        distilled.main(["--probe", "huge"])


class _ReadingsProbe(torch.nn.Module):
    """A stand-in distilled probe: its 'x0' carries the readings it predicts."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("reading_mean", torch.zeros(width))
        self.register_buffer("reading_std", torch.ones(width))

    def forward(self, features, t, text, x0):
        return x0.flatten(1)


def test_the_diagnosis_finds_the_factor_the_probe_cannot_read_and_what_reading_it_would_give(distilled):
    names = list(distilled.preview_reward.feature_names(distilled.TEACHER_SCALES))
    relation = [names.index(n) for n in ("relation", "relation@2x")]
    rng = np.random.default_rng(0)

    def rows(prompts, offset):
        count, seeds = len(prompts) * 8 * 2, 8
        teacher = torch.as_tensor(rng.normal(size=(count, 1, len(names))))
        predicted = teacher[:, 0].clone()
        predicted[:, relation] = torch.as_tensor(rng.normal(size=(count, 2)))     # the probe reads no relation
        final = teacher[:, 0, relation].sum(1) + 0.1 * torch.as_tensor(rng.normal(size=count))
        return {"x0": predicted.float().view(count, 1, 1, -1), "t": torch.tensor([0.1, 0.2]).repeat_interleave(
                    count // 2), "text": torch.zeros(count, 1), "readings": teacher.float(), "final": final,
                "groups": np.arange(count) // seeds + offset}

    fit, judge = rows(range(20), 0), rows(range(6), 1000)
    d = distilled.reading_diagnosis(_ReadingsProbe(len(names)), fit, judge, judge)
    assert d["r2"]["presence"] == pytest.approx(1.0) and d["r2"]["relation@2x"] < 0.0
    assert set(d["swapped"]) == {"0.1", "0.2"}            # no rows at 0.4: not diagnosed there
    for row in d["swapped"].values():
        assert row["none"] < 0.3 and row["relation"] > 0.9 and row["all"] > 0.9 and row["count"] < 0.3
    lines = distilled.diagnosis_lines({"unet": {"by_sets": {"main": {"diagnosis": d}, "main+early": {}}}})
    assert lines[lines.index("## What the probe reads of its teacher") + 6].startswith("| unet | main | 1.00 / 1.00 |")
    assert any(line.startswith("| unet | main | 0.2 |") for line in lines)
    assert distilled.diagnosis_lines({"unet": {"by_sets": {"main": {}}}}) == []


class _PromptRows:
    prompts = ["a red cross below a yellow cross", "a yellow cross below a red cross", "a red cross below a yellow cross"]
    text_embedding = torch.arange(3 * 64, dtype=torch.float16).view(3, 64)


def test_the_token_text_keeps_the_word_order_and_is_what_a_unet_set_stores(distilled):
    from bench.proxy_world import models
    rows = _PromptRows()
    assert torch.equal(distilled.prompt_text(rows, "unet", "pooled"), rows.text_embedding.float())
    tokens = distilled.prompt_text(rows, "unet", "tokens")
    _, encoder = models.load("unet")
    with torch.no_grad():
        context, pooled = encoder.encode(rows.prompts[:2])
    assert tokens.shape == (3, context.shape[1] * context.shape[2]) and torch.equal(tokens[0], tokens[2])
    assert torch.allclose(tokens[1], context[1].flatten(), atol=1e-5)    # the conditioning's context, in order
    # the UNet's conditioning carries the same features as its pooled output, which a collected set stores
    assert torch.allclose(pooled, tokens[:2], atol=1e-5)
    # the same words in another order: a mean over the positions barely moves, the tokens do
    mean_gap, token_gap = float((context[0].mean(0) - context[1].mean(0)).norm()), float((tokens[0] - tokens[1]).norm())
    assert token_gap > 20 * mean_gap, (token_gap, mean_gap)
    with pytest.raises(ValueError, match="text must be one of"):
        distilled.prompt_text(rows, "unet", "words")
    # a run reading the UNet's stored pooled output reads its token features: named so, apart from mean-pooled runs
    assert distilled.named_variant(distilled.Variant(), "unet") == distilled.Variant(text="tokens")
    assert distilled.named_variant(distilled.Variant(), "dit") == distilled.Variant()
    assert distilled.named_variant(distilled.Variant(text="tokens"), "dit").text == "tokens"
    training = {"sets": ["main", "early"], "text": "tokens", "seed": 1}
    assert distilled.Variant.of(training).text == "tokens"
    assert distilled.set_key(training) == "main+early (tokens text, seed 1)"
