"""ProbeSelectPlanSchedule: pick ProbeSelectSampler's pruning schedule from a dataset's held-out prompts.

The probe(s) score every held-out candidate of a collected dataset at each checkpoint they cover
(`probes.training.planning`); the planner (`probes.pruning.plan_schedule`) simulates every schedule of
its grid within the budget on those scores and the candidates' final evaluator scores, and keeps
the one with the best mean kept reward. The schedule text goes to ProbeSelectSampler's `schedule`
input (a STRING widget, which takes a link), N to its `candidates`.
"""
from __future__ import annotations

import logging
import math
import sys

from comfy_api.latest import io, ui

from ..probes.pruning import (
    Plan,
    PlannerGrid,
    PruningSchedule,
    ScheduleError,
    full_generation_cost,
    mean_kept_reward,
    plan_schedule,
)
from ..probes.training.dataset import DatasetError, list_shards
from ..probes.training.planning import PLANNING_SPLITS, PlannerData, probe_score_tables
from .engine.stages import check_probes_share_the_tap
from .errors import ProbeSelectError
from .nodes_dataset import dataset_path, list_datasets
from .nodes_sampling import MAX_STEPS, MIN_STEPS
from .nodes_training import open_dataset
from .types import CATEGORY, Probe

log = logging.getLogger(__name__)

NODE_ID = "ProbeSelectPlanSchedule"
MAX_BUDGET = 64.0                 # the planner grid's largest N
DEFAULT_MAX_STAGES, MAX_STAGES = 2, 3
SHOWN_ALTERNATIVES = 5
EVERY_SCHEDULE = sys.maxsize      # plan_schedule's `top`: keep the whole ranking (the runnable best is looked up in it)
# Each schedule is judged on this many random N-subsets of each prompt's candidates: a dataset records a handful
# of candidates a prompt, and one disjoint run of N near that handful would judge a schedule on the luck of which
# candidates it happened to read.
PLANNER_DRAWS = 100


def check_plan_numbers(node_id: str, budget_generations: float | None, steps: int | None,
                       max_stages: int | None) -> None:
    """The checks that need no dataset (also ``validate_inputs``); None (a linked input) is not checked."""
    if budget_generations is not None and not (math.isfinite(budget_generations)
                                               and 1.0 <= budget_generations <= MAX_BUDGET):
        raise ProbeSelectError(node_id, f"budget_generations is {budget_generations:g}; it is the compute of that "
                                        f"many full generations and must be between 1 and {MAX_BUDGET:g}.",
                               "set it to 2 or more (1 only allows a single plain generation; pruning costs more "
                               "than one generation).")
    if steps is not None and not MIN_STEPS <= steps <= MAX_STEPS:
        raise ProbeSelectError(node_id, f"steps is {steps}.",
                               f"set steps ({MIN_STEPS} to {MAX_STEPS}) to the steps of the ProbeSelectSampler run.")
    if max_stages is not None and not 1 <= max_stages <= MAX_STAGES:
        raise ProbeSelectError(node_id, f"max_stages is {max_stages}.", f"use 1 to {MAX_STAGES} pruning stages.")


def _generations(cost: float, steps: int) -> str:
    return f"{cost / full_generation_cost(steps):.2f}"


def _probe_names(probe, later_probe) -> list[str]:
    names = [f"probe '{probe.name}'"]
    if later_probe is not None:
        names.append(f"later_probe '{later_probe.name}'")
    return names


def plan_summary(data: PlannerData, plan: Plan, chosen: tuple[PruningSchedule, float, float],
                 budget_generations: float, steps: int, max_stages: int, dataset_name: str,
                 probe_names: list[str]) -> str:
    """The node's text: the choice against best-of-N at the same budget, the alternatives, and the data behind it."""
    schedule, reward, cost = chosen
    evaluator = data.evaluator
    best_of = min(int(math.floor(budget_generations + 1e-9)), data.smallest)
    best_of_reward = mean_kept_reward(data.tables, PruningSchedule(best_of), steps, draws=PLANNER_DRAWS)
    single = mean_kept_reward(data.tables, PruningSchedule(1), steps, draws=PLANNER_DRAWS)
    lines = []
    if not plan.schedule.stages:
        lines.append(f"Best-of-{plan.schedule.candidates} ({plan.mean_reward:.4f}) matches or beats every pruning "
                     f"schedule within the budget: on these prompts the probe does not pay at this budget. Below is "
                     f"the best schedule ProbeSelectSampler can run (it needs a pruning stage).")
    lines += [
        f"schedule: {schedule}   (ProbeSelectSampler: candidates {schedule.candidates}, steps {steps})",
        f"mean kept {evaluator}: {reward:.4f} vs {best_of_reward:.4f} for best-of-{best_of} at the same budget "
        f"({reward - best_of_reward:+.4f}); one candidate alone: {single:.4f}",
        f"cost: {_generations(cost, steps)} of {budget_generations:g} full generations ({cost:g} of "
        f"{plan.budget:g} denoiser steps per prompt)",
    ]
    if best_of < math.floor(budget_generations + 1e-9):
        lines.append(f"  (best-of-N is capped at {best_of}: the smallest prompt has {data.smallest} candidates)")
    others = [entry for entry in plan.ranking if entry[0] != schedule][:SHOWN_ALTERNATIVES]
    if others:
        lines.append(f"alternatives (mean kept {evaluator}, cost in generations):")
        lines += [f"  {str(s):<28} {r:.4f}  {_generations(c, steps)}" for s, r, c in others]
    lines.append(f"{plan.evaluated} schedules of up to {max_stages} stages fit the budget and were simulated "
                 f"(N up to {data.smallest}; each on {PLANNER_DRAWS} random N-subsets of every prompt's candidates).")
    counts = data.candidate_counts
    each = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    left_out = (f"; {data.dropped_prompts} prompts left out with fewer than 2 candidates" if data.dropped_prompts
                else "")
    lines.append(f"data: {len(data.tables)} prompts of dataset '{dataset_name}' (split {data.split}, split seed "
                 f"{data.split_seed}{left_out}), {each} candidates each, {data.rows} rows")
    stages_at = ", ".join(f"{fraction:g} ({probe_names[index]})"
                          for fraction, index in zip(data.checkpoints, data.probe_index))
    lines.append(f"stages possible at: {stages_at}")
    if data.uncovered:
        lines.append("not covered by a probe (no stage there): t = " + ", ".join(f"{t:.4g}" for t in data.uncovered))
    if data.off_grid:
        lines.append(f"the dataset was recorded at t = {', '.join(f'{t:.4g}' for t in data.off_grid)}, which "
                     f"{steps} steps do not land on exactly; collect with {steps} steps for exact figures.")
    lines.append(f"training prompts: {data.split_note}")
    lines.append("Cost counts denoiser steps only; with several finished candidates the reward is the best of them "
                 "(pick them by the evaluator).")
    return "\n".join(lines)


class ProbeSelectPlanSchedule(io.ComfyNode):
    """Plans ProbeSelectSampler's schedule on the probe's held-out prompts of a collected dataset."""

    NODE_ID = NODE_ID

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Plan Schedule",
            category=CATEGORY,
            description="Chooses ProbeSelectSampler's pruning schedule (N, checkpoints, Ks) for a compute budget: "
                        "scores a dataset's held-out candidates with the probe(s) at every checkpoint they cover, "
                        "simulates every schedule within the budget, and keeps the best mean final score. Connect "
                        "schedule and candidates to ProbeSelectSampler (same probes, same steps).",
            inputs=[
                Probe.Input("probe", tooltip="The probe ProbeSelectSampler scores with."),
                io.Combo.Input("dataset", options=list_datasets(),
                               tooltip="A dataset collected with the probe's model and tap (the one it was trained "
                                       "on is fine: its held-out prompts are used)."),
                io.Float.Input("budget_generations", default=4.0, min=1.0, max=MAX_BUDGET, step=0.5,
                               tooltip="Compute per image in full generations: 4 = what best-of-4 costs."),
                io.Int.Input("steps", default=20, min=MIN_STEPS, max=MAX_STEPS,
                             tooltip="The steps of the ProbeSelectSampler run (stages land on whole steps)."),
                Probe.Input("later_probe", optional=True,
                            tooltip="ProbeSelectSampler's later_probe, if connected there: scores later stages."),
                io.Int.Input("max_stages", default=DEFAULT_MAX_STAGES, min=1, max=MAX_STAGES, optional=True,
                             tooltip="At most this many pruning stages."),
                io.Combo.Input("split", options=list(PLANNING_SPLITS), default=PLANNING_SPLITS[0], optional=True,
                               tooltip="Prompts to plan on: those ProbeSelectTrain held out with split_seed "
                                       "(val+test), one of them (val chose the best epoch; test is untouched), or "
                                       "all (optimistic: includes training prompts)."),
                io.Int.Input("split_seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="The split seed of the probe's training: ProbeSelectTrain's seed, or "
                                     "'tools.cli train --split-seed'."),
            ],
            outputs=[
                io.String.Output(display_name="schedule", tooltip="Connect to ProbeSelectSampler's schedule."),
                io.Int.Output(display_name="candidates", tooltip="N: connect to ProbeSelectSampler's candidates."),
                io.String.Output(display_name="summary"),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset: str = "", **_inputs) -> str:
        # A dataset grows under the same name (collection appends shards and never edits one): plan again when
        # its shards change, not only when an input does.
        try:
            return "|".join(path.name for path in list_shards(dataset_path(cls.NODE_ID, dataset)))
        except ProbeSelectError:
            return dataset

    @classmethod
    def validate_inputs(cls, budget_generations: float | None = None, steps: int | None = None,
                        max_stages: int | None = DEFAULT_MAX_STAGES) -> bool | str:
        try:
            check_plan_numbers(cls.NODE_ID, budget_generations, steps, max_stages)
        except ProbeSelectError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, probe, dataset: str, budget_generations: float, steps: int, later_probe=None,
                max_stages: int = DEFAULT_MAX_STAGES, split: str = PLANNING_SPLITS[0],
                split_seed: int = 0) -> io.NodeOutput:
        node_id = cls.NODE_ID
        check_plan_numbers(node_id, budget_generations, steps, max_stages)
        if split not in PLANNING_SPLITS:
            raise ProbeSelectError(node_id, f"split '{split}' is unknown.", f"pick one of {list(PLANNING_SPLITS)}.")
        check_probes_share_the_tap(node_id, probe, later_probe)
        data_set = open_dataset(node_id, dataset)
        probes = [(probe.model, probe.metadata)] + ([(later_probe.model, later_probe.metadata)] if later_probe is not None else [])
        try:
            data = probe_score_tables(data_set, probes, steps, split=split, split_seed=split_seed)
        except (DatasetError, ValueError) as error:
            raise ProbeSelectError(node_id, f"{' and '.join(_probe_names(probe, later_probe))} on dataset "
                                            f"'{dataset}': {error}") from None
        try:
            plan = plan_schedule(data.tables, budget_generations, steps, grid=PlannerGrid(max_stages=max_stages),
                                 top=EVERY_SCHEDULE, draws=PLANNER_DRAWS)
        except ScheduleError as error:
            raise ProbeSelectError(node_id, error.problem, error.fix) from None
        chosen = next((entry for entry in plan.ranking if entry[0].stages), None)
        if chosen is None:
            cheapest = 1.0 + data.checkpoints[0]
            raise ProbeSelectError(
                node_id, f"no pruning schedule fits a budget of {budget_generations:g} full generations: the "
                         f"cheapest (2 candidates to t={data.checkpoints[0]:g}, then 1 finished) costs {cheapest:.2f}.",
                f"raise budget_generations to {math.ceil(cheapest * 2) / 2:g} or more (ProbeSelectSampler needs a "
                "pruning stage).")
        summary = plan_summary(data, plan, chosen, budget_generations, steps, max_stages, dataset,
                               _probe_names(probe, later_probe))
        log.info("%s: %s on %d prompts of %s", node_id, chosen[0], len(data.tables), dataset)
        return io.NodeOutput(str(chosen[0]), chosen[0].candidates, summary, ui=ui.PreviewText(summary))
