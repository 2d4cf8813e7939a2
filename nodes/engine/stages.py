"""Multi-stage pruning in a graph: the schedule of ProbeSelectSampler, the probe of each stage, and the run.

A schedule (``probes/pruning.py``) starts N candidates; at each stage's checkpoint the candidates still
running are scored and the best K kept; the survivors of the last stage are finished. The engine
runs it with the split sampler: the early phase to the first checkpoint, `split_sampling.advance`
from one checkpoint to the next (the model evaluated only for the steps in between, the recorded
calls replayed), `split_sampling.resume` to the end. A candidate that survives every stage is
therefore exactly the plain run of its seed, and the model is evaluated
``N*s1 + K1*(s2 - s1) + ... + K_last*(T - s_last)`` times per evaluation of a step
(`probes.pruning.denoiser_evaluations`).

A probe is trained at one checkpoint and scores activations within CHECKPOINT_TOLERANCE of it (the
rule of ProbeSelectScore). A schedule therefore needs a probe near each of its checkpoints: the
one-box node takes its ``probe`` and an optional ``later_probe``, and scores each stage with the one
trained nearest the stage's checkpoint; a stage that neither covers is refused before anything runs.
For more probes, the same run is built from nodes: ProbeSelectEarlySampler -> ProbeSelectScore ->
ProbeSelectTopK -> ProbeSelectResume (until_percent) -> ProbeSelectScore -> ... with a probe per
checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ...probes.checkpoints import CHECKPOINT_TOLERANCE
from ...probes.pruning import PruningSchedule, ScheduleError, Stage, parse_schedule
from ...probes.scoring import CandidateScores
from .errors import ProbeSelectError

# "0.2:8, 0.4:2": stages written with ':' instead of '->' (a common first try).
_COLON_STAGES = re.compile(r"^\s*[0-9.]+%?\s*:\s*[0-9]+\s*(,\s*[0-9.]+%?\s*:\s*[0-9]+\s*)*,?\s*$")
NODE_SYNTAX = ("stages as 'checkpoint->K, ...', e.g. '0.2->8, 0.4->2' (keep 8 at 20% of the steps, 2 of those at "
               "40%, then finish them; N is the candidates input), or a whole schedule 'N: 0.2->8, 0.4->2' whose N "
               "equals candidates; leave it empty for one stage from keep and checkpoint_percent")


def node_schedule(node_id: str, text: Optional[str], candidates: int, keep: int, checkpoint: float) -> PruningSchedule:
    """The schedule a node runs: ``text`` (stages, or 'N: stages' with N == candidates), or, when empty,
    the single stage of ``keep`` and ``checkpoint``. Raises ProbeSelectError naming the node and the fix."""
    if text is None or not text.strip():
        try:
            return PruningSchedule(candidates, (Stage(float(checkpoint), int(keep)),))
        except ScheduleError as error:
            raise ProbeSelectError(node_id, f"keep {keep} at checkpoint_percent {checkpoint}: {error.problem}",
                                   "set keep (K) to 1 or more and checkpoint_percent inside (0, 1).") from None
    whole = ":" in text
    try:
        schedule = parse_schedule(text if whole else f"{candidates}: {text}")
    except ScheduleError as error:
        if _COLON_STAGES.match(text):
            raise ProbeSelectError(node_id, f"schedule '{text.strip()}' separates checkpoint and K with ':'.",
                                   f"write {NODE_SYNTAX}.") from None
        raise ProbeSelectError(node_id, f"schedule '{text.strip()}': {error.problem}", f"write {NODE_SYNTAX}.") \
            from None
    if schedule.candidates != candidates:
        raise ProbeSelectError(node_id, f"schedule '{text.strip()}' starts {schedule.candidates} candidates but "
                                        f"candidates is {candidates}.",
                               f"set candidates to {schedule.candidates}, or write the stages alone (drop "
                               f"'{schedule.candidates}:').")
    if not schedule.stages:
        raise ProbeSelectError(node_id, f"schedule '{text.strip()}' has no pruning stage, so every candidate would "
                                        "be finished.", f"write {NODE_SYNTAX}.")
    return schedule


def schedule_steps(node_id: str, schedule: PruningSchedule, steps: int, text: Optional[str]) -> list[int]:
    """The step of each stage with ``steps`` steps (ProbeSelectError when a checkpoint rounds badly)."""
    try:
        return schedule.checkpoint_steps(steps)
    except ScheduleError as error:
        what = f"schedule '{text.strip()}'" if text and text.strip() else "checkpoint_percent"
        raise ProbeSelectError(node_id, f"{what}: {error.problem}", error.fix) from None


def probe_for_stage(node_id: str, probes: Sequence, number: int, step: int, steps: int):
    """The probe (of ``probes``, LoadedProbe) trained nearest the checkpoint ``step / steps`` of stage ``number``.

    Raises ProbeSelectError when none is within CHECKPOINT_TOLERANCE of it (the probe would be scoring
    activations of a noise level it never saw)."""
    t = step / steps
    best = min(probes, key=lambda p: abs(p.metadata.checkpoint_t - t))      # first of equally near: `probe`
    if abs(best.metadata.checkpoint_t - t) > CHECKPOINT_TOLERANCE:
        trained = ", ".join(f"'{p.name}' at t={p.metadata.checkpoint_t:.2f}" for p in probes)
        raise ProbeSelectError(
            node_id, f"stage {number} scores at t={t:.3f} (step {step} of {steps}), but no connected probe was "
                     f"trained within {CHECKPOINT_TOLERANCE} of it ({trained}).",
            f"connect a probe trained at about t={t:.2f} to later_probe, move the stage within "
            f"{CHECKPOINT_TOLERANCE} of a probe's checkpoint, or build the stages from nodes (ProbeSelectResume with "
            "until_percent, then ProbeSelectScore with a probe per checkpoint, then ProbeSelectTopK).")
    return best


def check_probes_share_the_tap(node_id: str, probe, later_probe) -> None:
    """The one-box node taps one block: a later probe must read the same block of the same family."""
    if later_probe is None:
        return
    a, b = probe.metadata, later_probe.metadata
    if (a.backbone_family, a.tap) != (b.backbone_family, b.tap):
        raise ProbeSelectError(node_id, f"later_probe '{later_probe.name}' reads {b.backbone_family} block {b.tap}, "
                                        f"probe '{probe.name}' reads {a.backbone_family} block {a.tap}.",
                               "use probes trained on the same block, or build the stages from nodes with a "
                               "ProbeSelectTap per block.")


@dataclass
class StageRecord:
    """What one stage did: where it scored, what it kept."""

    number: int
    step: int
    steps: int
    noise_level: Optional[dict]
    probe: str
    scores: CandidateScores
    kept: list[int]                    # indices into this stage's candidates, best first
    seeds_in: list[int] = field(default_factory=list)

    @property
    def kept_seeds(self) -> list[int]:
        return [self.scores.seeds[i] for i in self.kept]

    def header(self) -> str:
        level = self.noise_level
        where = f"step {self.step} of {self.steps} (t = {self.step / self.steps:.3f})"
        if level is not None:
            where += f", sigma {level['sigma']:.4g}, log-SNR {level['log_snr']:.3f}"
        return (f"Stage {self.number} at {where}: {len(self.seeds_in)} -> {len(self.kept)} kept, "
                f"scored by probe '{self.probe}'")


def run_stages(node_id: str, schedule: PruningSchedule, stops: Sequence[int], steps: int, early,
               score: Callable[[int, object, object], tuple[CandidateScores, str]],
               top_k: Callable[[dict, CandidateScores, int], tuple[dict, list[int]]],
               advance: Callable[[dict, int], object]) -> tuple[dict, list[StageRecord]]:
    """Score, keep, advance, stage by stage, from the early phase's result ``early`` (an EarlyResult at
    ``stops[0]``). ``score(number, activations, latent)`` gives a stage's scores and the probe's name,
    ``top_k(latent, scores, keep)`` the kept LATENT and indices, ``advance(latent, step)`` the next
    stage's EarlyResult. Returns the last stage's kept LATENT (to finish) and a record per stage."""
    records = []
    current = early
    kept_latent = None
    for number, (stage, step) in enumerate(zip(schedule.stages, stops), start=1):
        scores, probe_name = score(number, current.activations, current.latent)
        kept_latent, kept = top_k(current.latent, scores, stage.keep)
        level = current.noise_level.as_dict() if current.noise_level is not None else None
        records.append(StageRecord(number, step, steps, level, probe_name, scores, kept, list(scores.seeds)))
        if number < len(schedule.stages):
            current = advance(kept_latent, stops[number])
    return kept_latent, records


def stages_text(records: Sequence[StageRecord], describe: Callable[[CandidateScores, list[int]], str]) -> str:
    """The UI text of a multi-stage run: per stage, where it scored and its ranking."""
    return "\n\n".join(f"{record.header()}\n{describe(record.scores, record.kept)}" for record in records)

