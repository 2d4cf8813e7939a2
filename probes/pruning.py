"""Multi-stage pruning schedules: parse, apply to recorded scores, price, and plan.

A schedule starts N candidates, and at each stage's checkpoint (a fraction t of the sampling steps)
scores the candidates still running and keeps the K best; the survivors of the last stage are
finished. Written as a string::

    "N: t1->K1, t2->K2, ..."      e.g.  "32: 0.2->8, 0.4->2"

start 32 candidates, keep the best 8 at 20% of the steps, the best 2 of those at 40%, finish those 2.
Checkpoints may also be written as percents ("32: 20%->8, 40%->2"). Spaces are ignored. "8" (or
"8:") alone is best-of-8: no stage, everyone finished. Rules: N >= 1; every K >= 1; checkpoints
strictly increasing inside (0, 1); K non-increasing from stage to stage. A stage whose K is at
least the number of candidates still running keeps everyone and is skipped (no scoring, no cost).

A checkpoint t lands on step ``checkpoint_step(T, t) = round(t * T)`` of T (the rounding the split
sampler uses), so cost in denoiser evaluations (candidate-steps; one per step for one candidate,
CFG included) is ``N*s1 + K1*(s2 - s1) + ... + K_last*(T - s_last)`` with K taken as
min(K, running) (one evaluation per step, as first-order samplers do; a second-order sampler
doubles every schedule's count alike). :class:`StageCosts` adds what scoring and decoding cost, in
the same step-equivalents.

When more than one candidate is finished, the one with the best final reward is kept (the
evaluator decides); that reward is what the planner maximises.

Everything here is pure Python/PyTorch, so schedules can be evaluated on recorded score tables
(:func:`apply_schedule`) and chosen by simulation (:func:`plan_schedule`).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .checkpoints import checkpoint_step

SYNTAX = "'N: t1->K1, t2->K2, ...', e.g. '32: 0.2->8, 0.4->2' (start 32, keep 8 at 20% of the steps, " \
         "keep 2 of those at 40%, finish them); '8' alone is best-of-8"


class ScheduleError(ValueError):
    """A schedule that can't be used: what is wrong (``problem``) and how to write it (``fix``).

    Nodes re-raise it with their id: ``ProbeSelectError(node_id, err.problem, err.fix)``.
    """

    def __init__(self, problem: str, fix: str = f"write the schedule as {SYNTAX}."):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


@dataclass(frozen=True)
class Stage:
    """Keep the ``keep`` best candidates at ``checkpoint`` (a fraction of the steps, in (0, 1))."""

    checkpoint: float
    keep: int


@dataclass(frozen=True)
class PruningSchedule:
    """N candidates, then pruning stages in order, then the survivors are finished.

    Construct directly or with :func:`parse_schedule`; both validate (raising :class:`ScheduleError`).
    """

    candidates: int
    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ScheduleError(f"the number of candidates N is {self.candidates!r}; it must be a whole number >= 1.")
        previous_t, previous_k = 0.0, None
        for number, stage in enumerate(self.stages, start=1):
            t, k = stage.checkpoint, stage.keep
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 < t < 1.0:
                raise ScheduleError(f"stage {number}: checkpoint {t!r} is outside (0, 1).",
                                    f"write checkpoints as fractions such as 0.2 or percents such as 20%; {SYNTAX}.")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ScheduleError(f"stage {number}: keep K is {k!r}; it must be a whole number >= 1.")
            if t <= previous_t:
                raise ScheduleError(f"stage {number}: checkpoint {t:g} does not come after the previous one "
                                    f"({previous_t:g}).", f"list the stages in increasing checkpoint order; {SYNTAX}.")
            if previous_k is not None and k > previous_k:
                raise ScheduleError(f"stage {number}: keeps {k}, more than the {previous_k} kept before it.",
                                    f"K can't grow from stage to stage (pruned candidates are gone); {SYNTAX}.")
            previous_t, previous_k = t, k

    def __str__(self) -> str:
        if not self.stages:
            return str(self.candidates)
        return f"{self.candidates}: " + ", ".join(f"{s.checkpoint:g}->{s.keep}" for s in self.stages)

    def running(self) -> list[int]:
        """Candidates running into each stage, then into the finish: ``[N, min(N, K1), ...]``."""
        counts = [self.candidates]
        for stage in self.stages:
            counts.append(min(counts[-1], stage.keep))
        return counts

    @property
    def finished(self) -> int:
        """How many candidates are finished (and decoded)."""
        return self.running()[-1]

    def checkpoint_steps(self, steps: int) -> list[int]:
        """The step of each stage's checkpoint with ``steps`` steps; each strictly inside (0, steps), increasing."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ScheduleError(f"steps is {steps!r}; it must be a whole number >= 1.", "use 1 or more steps.")
        result = []
        for number, stage in enumerate(self.stages, start=1):
            s = checkpoint_step(steps, stage.checkpoint)
            if not 0 < s < steps:
                raise ScheduleError(f"stage {number}: checkpoint {stage.checkpoint:g} of {steps} steps lands on "
                                    f"step {s}, outside 1..{steps - 1}.",
                                    "use a checkpoint further from 0 and 1, or more steps.")
            if result and s <= result[-1]:
                raise ScheduleError(f"stages {number - 1} and {number}: checkpoints "
                                    f"{self.stages[number - 2].checkpoint:g} and {stage.checkpoint:g} both land on "
                                    f"step {s} of {steps}.", "use checkpoints further apart, or more steps.")
            result.append(s)
        return result


_STAGE = re.compile(r"^(?P<t>[^>]*?)(?P<percent>%?)->(?P<k>.*)$")


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _whole(text: str) -> Optional[int]:
    return int(text) if re.fullmatch(r"[0-9]+", text) else None


def parse_schedule(text: str) -> PruningSchedule:
    """Parse ``"N: t1->K1, t2->K2, ..."`` (see the module docstring); raises :class:`ScheduleError`."""
    if not isinstance(text, str):
        raise ScheduleError(f"the schedule is a {type(text).__name__}, not text.")
    compact = re.sub(r"\s+", "", text)
    if not compact:
        raise ScheduleError("the schedule is empty.")
    head, colon, tail = compact.partition(":")
    if not colon and "->" in head:
        raise ScheduleError(f"'{text.strip()}' does not start with the number of candidates N and a ':'.")
    n = _whole(head)
    if n is None or n < 1:
        raise ScheduleError(f"'{head}' before the ':' is not a number of candidates N (a whole number >= 1).")
    if not colon and tail == "":
        return PruningSchedule(n)
    stages = []
    parts = tail.split(",") if tail else []
    for number, part in enumerate(parts, start=1):
        match = _STAGE.match(part)
        if not part:
            raise ScheduleError(f"stage {number} is empty (two commas in a row, or a trailing comma).")
        if match is None:
            raise ScheduleError(f"stage {number} '{part}' has no '->' between its checkpoint and its K.")
        t = _number(match["t"])
        k = _whole(match["k"])
        if t is None:
            raise ScheduleError(f"stage {number}: checkpoint '{match['t']}{match['percent']}' is not a number.")
        if k is None:
            raise ScheduleError(f"stage {number}: keep '{match['k']}' is not a whole number K >= 1.")
        stages.append(Stage(t / 100.0 if match["percent"] else t, k))
    return PruningSchedule(n, tuple(stages))


@dataclass(frozen=True)
class StageCosts:
    """Per-candidate costs beyond the denoiser, in step-equivalents (1 = one denoiser step of one candidate).

    Attributes:
        score: scoring one running candidate at a checkpoint (probe: probe/step; x0 preview: (preview
            decode + evaluator)/step). Paid only at stages that prune. A mapping {checkpoint t: price}
            prices each checkpoint on its own, for score tables whose columns come from different scorers
            (a probe at 0.2, the x0 preview at 0.4); a single number prices every checkpoint alike.
        decode: decoding one finished candidate.
        final_score: the evaluator on one finished candidate, paid only when more than one is
            finished (the final pick needs it; a single finished candidate is the pick).
    """

    score: Union[float, Mapping[float, float]] = 0.0
    decode: float = 0.0
    final_score: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.score, Mapping):      # stored as sorted (t, price) pairs: frozen and comparable
            object.__setattr__(self, "score", tuple(sorted((float(t), float(p)) for t, p in self.score.items())))

    def score_at(self, checkpoint: float) -> float:
        """The price of scoring one candidate at ``checkpoint``."""
        if not isinstance(self.score, tuple):
            return float(self.score)
        for t, price in self.score:
            if math.isclose(t, checkpoint, abs_tol=1e-9):
                return price
        priced = ", ".join(f"{t:g}" for t, _ in self.score)
        raise ScheduleError(f"no scoring price for checkpoint {checkpoint:g}; StageCosts prices {priced}.",
                            "give StageCosts.score a price for every checkpoint the schedule prunes at.")


def denoiser_evaluations(schedule: PruningSchedule, steps: int) -> int:
    """Candidate-steps the schedule runs: ``N*s1 + K1*(s2 - s1) + ... + K_last*(T - s_last)``."""
    bounds = [0, *schedule.checkpoint_steps(steps), steps]
    running = schedule.running()
    return sum(count * (end - start) for count, start, end in zip(running, bounds[:-1], bounds[1:]))


def schedule_cost(schedule: PruningSchedule, steps: int, costs: StageCosts = StageCosts()) -> float:
    """Total cost in step-equivalents: denoiser evaluations, scoring at pruning stages, decode, final pick."""
    running = schedule.running()
    scoring = sum(before * costs.score_at(stage.checkpoint)
                  for stage, before, after in zip(schedule.stages, running[:-1], running[1:]) if after < before)
    finished = running[-1]
    return (denoiser_evaluations(schedule, steps) + scoring + finished * costs.decode
            + (finished * costs.final_score if finished > 1 else 0.0))


def full_generation_cost(steps: int, costs: StageCosts = StageCosts()) -> float:
    """What one candidate costs under best-of-N: all steps, its decode and its evaluation.

    Budgets "in full generations" are multiples of this, so best-of-B fits a budget of B exactly.
    """
    return steps + costs.decode + costs.final_score


@dataclass(frozen=True)
class ScoreTable:
    """Recorded scores of one prompt's candidates.

    Attributes:
        checkpoints: the fractions t at which scores were recorded, ``[C]``.
        scores: ``[M, C]`` the scorer's score of each candidate at each checkpoint (higher is better).
        final: ``[M]`` the final reward of each candidate once finished.
    """

    checkpoints: tuple[float, ...]
    scores: Tensor
    final: Tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoints", tuple(float(t) for t in self.checkpoints))
        object.__setattr__(self, "scores", torch.as_tensor(self.scores, dtype=torch.float64))
        object.__setattr__(self, "final", torch.as_tensor(self.final, dtype=torch.float64))
        if self.final.ndim != 1:
            raise ValueError(f"ScoreTable.final must be [M], got shape {tuple(self.final.shape)}")
        if tuple(self.scores.shape) != (self.final.shape[0], len(self.checkpoints)):
            raise ValueError(f"ScoreTable.scores must be [M, C] = [{self.final.shape[0]}, {len(self.checkpoints)}], "
                             f"got {tuple(self.scores.shape)}")

    def __len__(self) -> int:
        return self.final.shape[0]

    def columns(self, schedule: PruningSchedule, steps: int) -> list[int]:
        """The recorded column of each stage: the one whose checkpoint lands on the same step."""
        recorded = {checkpoint_step(steps, t): j for j, t in enumerate(self.checkpoints)}
        result = []
        for number, (stage, s) in enumerate(zip(schedule.stages, schedule.checkpoint_steps(steps)), start=1):
            if s not in recorded:
                have = ", ".join(f"{t:g} (step {checkpoint_step(steps, t)})" for t in self.checkpoints) or "none"
                raise ScheduleError(f"stage {number}: no scores were recorded at checkpoint {stage.checkpoint:g} "
                                    f"(step {s} of {steps}); recorded: {have}.",
                                    "use checkpoints at which the scores were recorded.")
            result.append(recorded[s])
        return result


@dataclass(frozen=True)
class PruningOutcome:
    """What a schedule does on one score table.

    Attributes:
        kept: the finished candidates (table rows), best first by the last pruning stage's score
            (candidate order when no stage pruned).
        pick: the finished candidate with the best final reward: what the user keeps.
        reward: the pick's final reward.
        denoiser_evaluations: candidate-steps run.
        cost: total cost in step-equivalents (see :func:`schedule_cost`).
    """

    kept: list[int]
    pick: int
    reward: float
    denoiser_evaluations: int
    cost: float


def _rank(key: Tensor) -> Tensor:
    """Indices along the last dim from best to worst; stable (ties keep row order), NaN last.

    The same order as ``probe_select.probes.scoring.CandidateScores.order``, batched.
    """
    key = torch.where(torch.isnan(key), torch.full_like(key, -math.inf), key)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def _simulate(scores: Tensor, final: Tensor, keeps: Sequence[int], columns: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Batched schedule on ``scores [B, N, C]`` and ``final [B, N]``: (kept rows [B, K], pick rows [B]).

    Each pruning stage ranks the running rows in the order they come (candidate order at the first
    stage, the previous stage's ranking after that, as ProbeSelectTopK hands its kept rows on); a
    stage that keeps everyone changes nothing.
    """
    batch, n = final.shape
    running = torch.arange(n).expand(batch, n)
    for keep, column in zip(keeps, columns):
        if keep >= running.shape[1]:
            continue
        stage_scores = torch.gather(scores[:, :, column], 1, running)
        running = torch.gather(running, 1, _rank(stage_scores)[:, :keep])
    best = _rank(torch.gather(final, 1, running))[:, 0]
    return running, torch.gather(running, 1, best[:, None])[:, 0]


def apply_schedule(table: ScoreTable, schedule: PruningSchedule, steps: int,
                   costs: StageCosts = StageCosts()) -> PruningOutcome:
    """Run ``schedule`` on the first N candidates of one prompt's recorded scores.

    Raises:
        ScheduleError: the table has fewer than N candidates, or no scores at a stage's checkpoint,
            or a checkpoint does not land inside the steps.
    """
    if len(table) < schedule.candidates:
        raise ScheduleError(f"the schedule starts {schedule.candidates} candidates but the table has only "
                            f"{len(table)}.", "use a smaller N or a table with more candidates.")
    columns = table.columns(schedule, steps)
    n = schedule.candidates
    kept, pick = _simulate(table.scores[None, :n], table.final[None, :n], [s.keep for s in schedule.stages], columns)
    return PruningOutcome(kept=kept[0].tolist(), pick=int(pick[0]), reward=float(table.final[pick[0]]),
                          denoiser_evaluations=denoiser_evaluations(schedule, steps),
                          cost=schedule_cost(schedule, steps, costs))


def _stack(tables: Sequence[ScoreTable]) -> dict[int, tuple[Tensor, Tensor]]:
    """Tables grouped by size: size -> (scores [P, M, C], final [P, M]), so a schedule runs on all at once."""
    if not tables:
        raise ValueError("need at least one score table")
    recorded = tables[0].checkpoints
    if any(table.checkpoints != recorded for table in tables):
        raise ValueError("every score table must be recorded at the same checkpoints")
    groups: dict[int, list[ScoreTable]] = {}
    for table in tables:
        groups.setdefault(len(table), []).append(table)
    return {size: (torch.stack([t.scores for t in group]), torch.stack([t.final for t in group]))
            for size, group in sorted(groups.items())}


def _mean_reward(groups: dict[int, tuple[Tensor, Tensor]], columns: list[int], schedule: PruningSchedule,
                 draws: int = 0, seed: int = 0) -> float:
    n = schedule.candidates
    keeps = [s.keep for s in schedule.stages]
    per_prompt = []
    for size, (scores, final) in groups.items():
        runs = size // n
        if runs == 0:
            raise ScheduleError(f"the schedule starts {n} candidates but a table has only {size}.",
                                "use a smaller N or tables with more candidates.")
        prompts = final.shape[0]
        if draws:
            # The first N of a random permutation of each prompt's candidates, drawn afresh for every draw; the
            # permutations depend on the seed and the tables' sizes only, so every scorer and every schedule
            # is judged on the same subsets.
            generator = torch.Generator().manual_seed(seed + size)
            subsets = torch.argsort(torch.rand(prompts, draws, size, generator=generator), dim=-1)[..., :n]
            runs = draws
            run_scores = torch.gather(scores[:, None].expand(-1, draws, -1, -1), 2,
                                      subsets[..., None].expand(-1, -1, -1, scores.shape[-1]))
            run_scores = run_scores.reshape(prompts * draws, n, scores.shape[-1])
            run_final = torch.gather(final[:, None].expand(-1, draws, -1), 2, subsets).reshape(prompts * draws, n)
        else:
            run_scores = scores[:, :runs * n].reshape(prompts * runs, n, scores.shape[-1])
            run_final = final[:, :runs * n].reshape(prompts * runs, n)
        _, pick = _simulate(run_scores, run_final, keeps, columns)
        per_prompt.append(torch.gather(run_final, 1, pick[:, None]).reshape(prompts, runs).mean(dim=1))
    return float(torch.cat(per_prompt).mean())


def mean_kept_reward(tables: Sequence[ScoreTable], schedule: PruningSchedule, steps: int, draws: int = 0,
                     seed: int = 0) -> float:
    """Mean final reward of the pick over prompts.

    ``draws = 0``: each table with M candidates gives floor(M / N) disjoint runs of N consecutive
    candidates. ``draws > 0``: each table gives ``draws`` runs, each on N of its M candidates drawn at
    random without replacement (seeded by ``seed``): every candidate takes part, which makes the figure
    far less noisy when N is a large part of M (with N = 11 of 20, one disjoint run would use 11 of them
    and leave the other 9 unused). A prompt's figure is the mean over its runs, and prompts weigh
    equally. Every table must be recorded at the same checkpoints.
    """
    if draws < 0:
        raise ValueError(f"mean_kept_reward: draws must be >= 0, got {draws}")
    groups = _stack(tables)
    return _mean_reward(groups, tables[0].columns(schedule, steps), schedule, draws, seed)


@dataclass(frozen=True)
class PlannerGrid:
    """The schedules the planner tries.

    Attributes:
        candidates: values of N (those above the smallest table's size are dropped).
        keeps: values of K; a stage's K is below N and below the previous stage's K.
        max_stages: at most this many pruning stages (0 = best-of-N only).
        checkpoints: the checkpoints to try; None = every checkpoint the tables recorded.
    """

    candidates: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    keeps: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    max_stages: int = 2
    checkpoints: Optional[tuple[float, ...]] = None


@dataclass(frozen=True)
class Plan:
    """The planner's choice.

    Attributes:
        schedule: the schedule with the best mean kept reward within the budget.
        mean_reward: its mean kept final reward on the tables.
        cost: its cost in step-equivalents.
        budget: the budget in step-equivalents.
        evaluated: how many schedules fit the budget and were simulated.
        ranking: the best few (schedule, mean reward, cost), best first.
    """

    schedule: PruningSchedule
    mean_reward: float
    cost: float
    budget: float
    evaluated: int
    ranking: list[tuple[PruningSchedule, float, float]] = field(default_factory=list)


def candidate_schedules(grid: PlannerGrid, checkpoints: Sequence[float], steps: int,
                        max_candidates: int) -> list[PruningSchedule]:
    """Every schedule of the grid: N, then 0..max_stages stages at increasing, distinct-step checkpoints
    with strictly decreasing K below N. Deterministic order."""
    usable: dict[int, float] = {}
    for t in sorted(checkpoints):
        s = checkpoint_step(steps, t)
        if 0 < s < steps and s not in usable:
            usable[s] = t
    points = [usable[s] for s in sorted(usable)]
    schedules = []
    for n in sorted({n for n in grid.candidates if 1 <= n <= max_candidates}):
        keeps = sorted({k for k in grid.keeps if 1 <= k < n}, reverse=True)
        schedules.append(PruningSchedule(n))
        for count in range(1, grid.max_stages + 1):
            for ts in itertools.combinations(points, count):
                for ks in itertools.combinations(keeps, count):     # combinations of a descending list descend
                    schedules.append(PruningSchedule(n, tuple(Stage(t, k) for t, k in zip(ts, ks))))
    return schedules


def plan_schedule(tables: Sequence[ScoreTable], budget_generations: float, steps: int,
                  costs: StageCosts = StageCosts(), grid: PlannerGrid = PlannerGrid(), top: int = 5,
                  draws: int = 0) -> Plan:
    """Pick N, the checkpoints and the Ks that maximise the mean kept reward on ``tables`` within a budget.

    The budget is in full generations: ``budget_generations * full_generation_cost(steps, costs)``
    step-equivalents. Every schedule of the grid within it is simulated (:func:`mean_kept_reward`, with
    ``draws`` random subsets per table when > 0);
    the best mean reward wins, ties going to the lower cost, then fewer stages, then smaller N, then
    the schedule's text. Deterministic.

    Raises:
        ScheduleError: no schedule of the grid fits the budget.
        ValueError: no tables, or tables recorded at different checkpoints.
    """
    groups = _stack(tables)
    recorded = tables[0].checkpoints
    budget = budget_generations * full_generation_cost(steps, costs)
    checkpoints = recorded if grid.checkpoints is None else grid.checkpoints
    results = []
    for schedule in candidate_schedules(grid, checkpoints, steps, min(groups)):
        cost = schedule_cost(schedule, steps, costs)
        if cost > budget * (1 + 1e-9):
            continue
        results.append((schedule, _mean_reward(groups, tables[0].columns(schedule, steps), schedule, draws), cost))
    if not results:
        raise ScheduleError(f"no schedule fits a budget of {budget_generations:g} full generations "
                            f"({budget:g} step-equivalents).", "raise the budget (1 full generation at least).")
    results.sort(key=lambda r: (-r[1], r[2], len(r[0].stages), r[0].candidates, str(r[0])))
    best = results[0]
    return Plan(best[0], best[1], best[2], budget, len(results), results[:top])
