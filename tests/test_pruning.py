"""Multi-stage pruning schedules (probes/pruning.py): parsing, cost, application to score tables, planner."""
import math

import pytest
import torch

from probe_select.probes.pruning import (PlannerGrid, PruningSchedule, ScheduleError, ScoreTable, Stage, StageCosts, _rank,
                            apply_schedule, checkpoint_step, denoiser_evaluations, full_generation_cost,
                            mean_kept_reward, parse_schedule, plan_schedule, schedule_cost)
from probe_select.probes.scoring import CandidateScores


# --- parsing ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("32: 0.2->8, 0.4->2", PruningSchedule(32, (Stage(0.2, 8), Stage(0.4, 2)))),
    ("32:20%->8,40%->2", PruningSchedule(32, (Stage(0.2, 8), Stage(0.4, 2)))),
    ("  5 : 0.25 -> 1 ", PruningSchedule(5, (Stage(0.25, 1),))),
    ("8", PruningSchedule(8)),
    ("8:", PruningSchedule(8)),
])
def test_parse_schedule(text, expected):
    schedule = parse_schedule(text)
    assert schedule == expected
    assert parse_schedule(str(schedule)) == schedule


def test_schedule_text_round_trip():
    assert str(parse_schedule("32: 20%->8, 40%->2")) == "32: 0.2->8, 0.4->2"
    assert str(parse_schedule("8:")) == "8"


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("   ", "empty"),
    ("x: 0.2->1", "'x' before the ':'"),
    ("0: 0.2->1", "'0' before the ':'"),
    ("-3: 0.2->1", "'-3' before the ':'"),
    ("0.2->8, 0.4->2", "does not start with the number of candidates N and a ':'"),
    ("8: 0.2-1", "stage 1 '0.2-1' has no '->'"),
    ("8: abc->2", "checkpoint 'abc' is not a number"),
    ("8: 0.2->1.5", "keep '1.5' is not a whole number"),
    ("8: 0.2->0", "keep K is 0"),
    ("8: 1.2->1", "checkpoint 1.2 is outside (0, 1)"),
    ("8: 0->1", "checkpoint 0.0 is outside (0, 1)"),
    ("8: 120%->1", "checkpoint 1.2 is outside (0, 1)"),
    ("8: 0.4->2, 0.2->1", "checkpoint 0.2 does not come after the previous one (0.4)"),
    ("8: 0.2->2, 0.2->1", "checkpoint 0.2 does not come after the previous one (0.2)"),
    ("8: 0.2->2, 0.4->4", "keeps 4, more than the 2 kept before it"),
    ("8: 0.2->2,,0.4->1", "stage 2 is empty"),
    ("8: 0.2->2,", "stage 2 is empty"),
    ("8: nan->2", "is not a number"),
])
def test_bad_schedule_strings_say_what_is_wrong_and_how_to_write_it(text, says):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text)
    message = str(caught.value)
    assert says in caught.value.problem, message
    assert caught.value.fix and "Fix:" in message
    assert message.startswith(caught.value.problem)


def test_schedule_errors_name_the_node_through_the_pack_error(pack):
    with pytest.raises(ScheduleError) as caught:
        parse_schedule("8: 0.2->2, 0.4->4")
    wrapped = pack.nodes.errors.ProbeSelectError("ProbeSelectSampler", caught.value.problem, caught.value.fix)
    assert str(wrapped).startswith("[ProbeSelectSampler] stage 2: keeps 4, more than the 2 kept before it.")
    assert "e.g. '32: 0.2->8, 0.4->2'" in str(wrapped)


@pytest.mark.parametrize("candidates, stages, says", [
    (0, (), "N is 0"),
    (True, (), "N is True"),
    (4, (Stage(0.2, 0),), "keep K is 0"),
    (4, (Stage(0.5, 2), Stage(0.5, 1)), "does not come after"),
])
def test_direct_construction_validates(candidates, stages, says):
    with pytest.raises(ScheduleError, match=says.replace("(", r"\(")):
        PruningSchedule(candidates, stages)


def test_checkpoints_must_land_on_distinct_steps_inside_the_run():
    with pytest.raises(ScheduleError, match=r"checkpoint 0.01 of 20 steps lands on step 0, outside 1..19"):
        parse_schedule("8: 0.01->2").checkpoint_steps(20)
    with pytest.raises(ScheduleError, match=r"0.2 and 0.22 both land on step 4 of 20"):
        parse_schedule("8: 0.2->4, 0.22->2").checkpoint_steps(20)
    assert parse_schedule("8: 0.2->4, 0.22->2").checkpoint_steps(100) == [20, 22]


def test_checkpoint_step_is_the_split_samplers_rounding(pack):
    # The pack's split sampler stops its early phase at this step; the cost model must agree with it.
    assert pack.nodes.engine.split_sampling.checkpoint_step is pack.probes.pruning.checkpoint_step
    for steps in (1, 2, 7, 10, 20, 25, 30, 50):
        for ratio in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.45, 0.5, 0.65, 0.75, 0.9):
            assert checkpoint_step(steps, ratio) == pack.nodes.engine.split_sampling.checkpoint_step(steps, ratio)
    assert checkpoint_step(10, 0.25) == 2 and checkpoint_step(10, 0.35) == 4    # round half to even


# --- cost ------------------------------------------------------------------------------------------------------

def test_cost_formula_by_hand():
    schedule = parse_schedule("32: 0.2->8, 0.4->2")
    # N*s1 + K1*(s2 - s1) + K2*(T - s2) with s1 = 4, s2 = 8 of T = 20.
    assert denoiser_evaluations(schedule, 20) == 32 * 4 + 8 * (8 - 4) + 2 * (20 - 8) == 184
    costs = StageCosts(score=0.5, decode=1.5, final_score=0.1)
    # + scoring the 32 running at stage 1 and the 8 at stage 2, + 2 decodes, + 2 evaluations for the final pick.
    assert schedule_cost(schedule, 20, costs) == pytest.approx(184 + (32 + 8) * 0.5 + 2 * 1.5 + 2 * 0.1)


def test_cost_prices_each_checkpoint_on_its_own():
    # A probe at 0.2 (0.01 a candidate), the x0 preview at 0.4 (0.5 a candidate): the 32 scored at 0.2 pay the
    # probe's price, the 8 scored at 0.4 the preview's.
    costs = StageCosts(score={0.2: 0.01, 0.4: 0.5}, decode=1.5, final_score=0.1)
    schedule = parse_schedule("32: 0.2->8, 0.4->2")
    assert schedule_cost(schedule, 20, costs) == pytest.approx(184 + 32 * 0.01 + 8 * 0.5 + 2 * 1.5 + 2 * 0.1)
    # A one-stage schedule at 0.4 pays 0.4's price, and a single price still prices every checkpoint alike.
    assert schedule_cost(parse_schedule("8: 0.4->1"), 20, costs) == pytest.approx(8 * 8 + 12 + 8 * 0.5 + 1.5)
    assert StageCosts(score={0.2: 0.3, 0.4: 0.3}) == StageCosts(score={0.4: 0.3, 0.2: 0.3})
    with pytest.raises(ScheduleError, match="no scoring price for checkpoint 0.6; StageCosts prices 0.2, 0.4"):
        schedule_cost(parse_schedule("8: 0.6->1"), 20, costs)


def test_cost_uses_the_rounded_steps():
    # T = 10: 0.25 -> step 2 (round half to even), 0.35 -> step 4.
    assert denoiser_evaluations(parse_schedule("6: 0.25->3, 0.35->1"), 10) == 6 * 2 + 3 * 2 + 1 * 6


def test_one_finished_candidate_needs_no_final_evaluation():
    costs = StageCosts(score=0.25, decode=2.0, final_score=10.0)
    assert schedule_cost(parse_schedule("5: 0.2->1"), 20, costs) == pytest.approx(5 * 4 + 16 + 5 * 0.25 + 2.0)
    assert schedule_cost(parse_schedule("1"), 20, costs) == pytest.approx(20 + 2.0)


def test_k_at_least_n_keeps_everyone_and_skips_that_stage():
    schedule = parse_schedule("4: 0.2->6, 0.4->1")
    assert schedule.running() == [4, 4, 1]
    assert denoiser_evaluations(schedule, 20) == 4 * 8 + 1 * 12
    costs = StageCosts(score=1.0)
    assert schedule_cost(schedule, 20, costs) == pytest.approx(4 * 8 + 1 * 12 + 4 * 1.0)   # scored once, at 0.4


def test_a_schedule_that_keeps_everyone_costs_best_of_n():
    costs = StageCosts(score=0.3, decode=1.6, final_score=0.1)
    best_of_8 = schedule_cost(parse_schedule("8"), 20, costs)
    assert best_of_8 == pytest.approx(8 * 20 + 8 * 1.6 + 8 * 0.1) == pytest.approx(8 * full_generation_cost(20, costs))
    assert schedule_cost(parse_schedule("8: 0.2->10, 0.5->8"), 20, costs) == pytest.approx(best_of_8)
    assert denoiser_evaluations(parse_schedule("8: 0.2->10, 0.5->8"), 20) == 160


# --- applying a schedule to recorded scores -----------------------------------------------------------------------

def _table(columns, final, checkpoints=(0.2, 0.4)):
    return ScoreTable(checkpoints, torch.tensor(columns, dtype=torch.float64).T, torch.tensor(final))


def test_apply_schedule_keeps_the_best_at_each_stage():
    table = _table([[5, 1, 4, 2, 3, 0], [0, 9, 7, 8, 6, 0]], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    outcome = apply_schedule(table, parse_schedule("6: 0.2->3, 0.4->2"), 20, StageCosts(decode=1.0))
    assert outcome.kept == [2, 4]          # stage 1 keeps 0, 2, 4; stage 2 ranks them 2 (7), 4 (6), 0 (0)
    assert outcome.pick == 4 and outcome.reward == 5.0
    assert outcome.denoiser_evaluations == 6 * 4 + 3 * 4 + 2 * 12
    assert outcome.cost == pytest.approx(outcome.denoiser_evaluations + 2.0)


def test_ties_keep_row_order_first_candidate_order_then_previous_rank():
    # Stage 1: candidates 1, 2, 3 tie; K = 2 keeps the first two in candidate order.
    table = _table([[0, 3, 3, 3, 0], [0, 0, 0, 0, 0]], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert apply_schedule(table, parse_schedule("5: 0.2->2"), 20).kept == [1, 2]
    # Stage 2 ranks the rows in the order stage 1 kept them (best first, as ProbeSelectTopK outputs them):
    # stage 1 keeps [2, 1]; they tie at stage 2, so 2 stays ahead of 1.
    table = _table([[0, 2, 5, 0], [0, 4, 4, 0]], [0.0, 1.0, 0.5, 0.0])
    outcome = apply_schedule(table, parse_schedule("4: 0.2->2, 0.4->1"), 20)
    assert outcome.kept == [2] and outcome.reward == 0.5


def test_final_pick_ties_go_to_the_better_ranked_row():
    table = _table([[1, 3, 2, 0], [0, 0, 0, 0]], [7.0, 7.0, 7.0, 9.0])
    outcome = apply_schedule(table, parse_schedule("4: 0.2->3"), 20)
    assert outcome.kept == [1, 2, 0] and outcome.pick == 1


def test_nan_scores_rank_last():
    table = _table([[float("nan"), 1, float("nan"), 0], [0, 0, 0, 0]], [1.0, 2.0, 3.0, 4.0])
    assert apply_schedule(table, parse_schedule("4: 0.2->3"), 20).kept == [1, 3, 0]


def test_ranking_matches_the_packs_top_k_order():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 4, (9,), generator=generator).float()
        scores[torch.rand(9, generator=generator) < 0.2] = float("nan")
        expected = CandidateScores(scores, "test", "run", list(range(9))).order().tolist()
        assert _rank(scores.double()[None])[0].tolist() == expected


def test_k_at_least_n_keeps_everyone_in_candidate_order():
    table = _table([[3, 1, 2], [0, 0, 0]], [1.0, 5.0, 2.0])
    outcome = apply_schedule(table, parse_schedule("3: 0.2->7, 0.4->3"), 20)
    assert outcome.kept == [0, 1, 2] and outcome.pick == 1 and outcome.reward == 5.0


def test_missing_checkpoint_and_small_table_are_clear_errors():
    table = _table([[1, 2], [2, 1]], [0.0, 1.0])
    with pytest.raises(ScheduleError, match=r"no scores were recorded at checkpoint 0.3 \(step 6 of 20\); "
                                            r"recorded: 0.2 \(step 4\), 0.4 \(step 8\)"):
        apply_schedule(table, parse_schedule("2: 0.3->1"), 20)
    with pytest.raises(ScheduleError, match="starts 3 candidates but the table has only 2"):
        apply_schedule(table, parse_schedule("3: 0.2->1"), 20)


def test_a_checkpoint_matches_a_recorded_one_on_the_same_step():
    table = _table([[1, 2], [2, 1]], [0.0, 1.0])
    assert apply_schedule(table, parse_schedule("2: 0.21->1"), 20).kept == [1]    # 0.21 and 0.2 are both step 4


def test_mean_kept_reward_averages_disjoint_runs_then_prompts():
    first = _table([[1, 2, 3, 4], [0, 0, 0, 0]], [10.0, 20.0, 30.0, 40.0])
    second = _table([[2, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    schedule = parse_schedule("2: 0.2->1")
    # first: runs (0, 1) -> keeps 1 (20), (2, 3) -> keeps 3 (40): 30. second: 3 runs -> 1, 3, 5: 3.
    assert mean_kept_reward([first, second], schedule, 20) == pytest.approx((30.0 + 3.0) / 2)
    assert mean_kept_reward([first], parse_schedule("4"), 20) == pytest.approx(40.0)


def test_mean_kept_reward_over_random_subsets_is_the_expected_pick():
    # Six candidates with finals 1..6 and a perfect scorer at 0.2: "3: 0.2->1" keeps the best of a random three,
    # whose expectation over all C(6, 3) = 20 subsets is (3*1 + 4*3 + 5*6 + 6*10) / 20 = 5.25. The disjoint runs
    # see only (1, 2, 3) and (4, 5, 6): (3 + 6) / 2 = 4.5.
    final = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    table = _table([final, final], final)
    schedule = parse_schedule("3: 0.2->1")
    assert mean_kept_reward([table], schedule, 20) == pytest.approx(4.5)
    drawn = mean_kept_reward([table], schedule, 20, draws=4000)
    assert drawn == pytest.approx(5.25, abs=0.05)
    # Seeded: the same draws again give the same figure; another seed other subsets.
    assert mean_kept_reward([table], schedule, 20, draws=4000) == drawn
    assert mean_kept_reward([table], schedule, 20, draws=4000, seed=1) != drawn
    # N = M: every draw is the whole table, so the figure is exact.
    assert mean_kept_reward([table], parse_schedule("6: 0.2->1"), 20, draws=7) == 6.0
    with pytest.raises(ValueError, match="draws must be >= 0"):
        mean_kept_reward([table], schedule, 20, draws=-1)


def test_random_subsets_are_shared_by_every_scorer():
    # Two scorers of the same tables are judged on the same subsets: a scorer that is the final reward itself
    # never loses to another on any draw, so its figure is at least the other's, draw for draw.
    generator = torch.Generator().manual_seed(3)
    final = torch.randn(10, generator=generator, dtype=torch.float64)
    noisy = final + torch.randn(10, generator=generator, dtype=torch.float64)
    perfect = ScoreTable((0.2,), final[:, None], final)
    other = ScoreTable((0.2,), noisy[:, None], final)
    schedule = parse_schedule("5: 0.2->1")
    assert mean_kept_reward([perfect], schedule, 20, draws=50) >= mean_kept_reward([other], schedule, 20, draws=50)
    # best-of-N ignores the scores: the same figure from either table.
    assert mean_kept_reward([perfect], parse_schedule("5"), 20, draws=50) == \
        mean_kept_reward([other], parse_schedule("5"), 20, draws=50)


# --- planner ---------------------------------------------------------------------------------------------------

def _synthetic(prompts=2000, size=16, early_is_perfect=False, seed=0):
    """Scores at 0.5 equal the final reward (a perfect scorer); at 0.2 they are noise, or perfect too."""
    generator = torch.Generator().manual_seed(seed)
    tables = []
    for _ in range(prompts):
        final = torch.randn(size, generator=generator, dtype=torch.float64)
        early = final.clone() if early_is_perfect else torch.randn(size, generator=generator, dtype=torch.float64)
        tables.append(ScoreTable((0.2, 0.5), torch.stack([early, final], dim=1), final))
    return tables


GRID = PlannerGrid(candidates=(1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16), keeps=(1, 2, 3, 4, 6, 8), max_stages=2)


def test_planner_finds_the_known_best_schedule():
    # T = 10, budget 4 full generations = 40 steps. With a perfect scorer at 0.5 (step 5) and noise at 0.2,
    # the best use of 40 steps is as many candidates as fit to step 5 and one finished: N*5 + 1*5 <= 40 -> N = 7.
    tables = _synthetic()
    plan = plan_schedule(tables, 4, 10, grid=GRID)
    assert str(plan.schedule) == "7: 0.5->1"
    assert plan.cost == 40 and plan.budget == 40
    assert plan.mean_reward == pytest.approx(mean_kept_reward(tables, plan.schedule, 10))
    assert plan.mean_reward > plan.ranking[1][1]
    assert all(cost <= 40 for _, _, cost in plan.ranking)
    # Deterministic: the same tables give the same plan.
    again = plan_schedule(tables, 4, 10, grid=GRID)
    assert again.schedule == plan.schedule and again.mean_reward == plan.mean_reward


def test_planner_prunes_early_when_the_early_score_is_perfect():
    # A perfect score at 0.2 (step 2): N*2 + 1*8 <= 40 -> N = 16, the largest the tables allow.
    plan = plan_schedule(_synthetic(prompts=200, early_is_perfect=True), 4, 10, grid=GRID)
    assert str(plan.schedule) == "16: 0.2->1" and plan.cost == 40


def test_planner_budget_includes_scoring_decode_and_evaluator():
    # Scoring 1, decode 5 and evaluator 5 step-equivalents: a full generation costs 10 + 5 + 5 = 20, the budget 80.
    # "N: 0.5->1" costs N*5 + N*1 + 5 + 5 (one decode, no final evaluation) <= 80 -> N <= 11, so N = 10 of the
    # grid; the two-stage schedules that fit keep at most 8 at 0.2 (noise), i.e. a random best-of-8 at most.
    costs = StageCosts(score=1.0, decode=5.0, final_score=5.0)
    plan = plan_schedule(_synthetic(), 4, 10, costs=costs, grid=GRID)
    assert plan.budget == 80
    assert str(plan.schedule) == "10: 0.5->1"
    assert plan.cost == pytest.approx(10 * 5 + 10 * 1 + 5 + 5)


def test_planner_can_judge_on_random_subsets():
    tables = _synthetic(prompts=50, size=8)
    plan = plan_schedule(tables, 4, 10, grid=GRID, draws=20)
    assert plan.mean_reward == pytest.approx(mean_kept_reward(tables, plan.schedule, 10, draws=20))
    assert str(plan.schedule) == "7: 0.5->1"


def test_planner_rejects_a_budget_nothing_fits():
    with pytest.raises(ScheduleError, match="no schedule fits a budget of 0.5 full generations"):
        plan_schedule(_synthetic(prompts=5), 0.5, 10, grid=GRID)


def test_planner_needs_tables_at_the_same_checkpoints():
    tables = _synthetic(prompts=2)
    other = ScoreTable((0.3, 0.5), tables[0].scores, tables[0].final)
    with pytest.raises(ValueError, match="same checkpoints"):
        plan_schedule([tables[0], other], 4, 10, grid=GRID)


def test_expected_best_of_n_is_reached_on_random_tables():
    # Sanity of the simulation: best-of-4 of standard normals has mean about 1.029.
    tables = _synthetic(prompts=2000, size=16)
    assert mean_kept_reward(tables, parse_schedule("4"), 10) == pytest.approx(1.029, abs=0.03)
    assert not math.isnan(mean_kept_reward(tables, parse_schedule("16: 0.2->4, 0.5->1"), 10))
