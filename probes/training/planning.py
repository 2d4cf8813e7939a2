"""A collected dataset and the probe(s) of a run -> the score tables the pruning planner simulates.

:func:`~probe_select.probes.pruning.plan_schedule` picks a schedule from :class:`ScoreTable` s (one
per prompt: a scorer's score of each candidate at each checkpoint, and its final reward).
:func:`probe_score_tables` builds them from a dataset (``dataset/``: pooled activations, optionally
x0 latents, at K checkpoints, and the evaluator's final scores) and the probes ProbeSelectSampler
would score the stages with (its ``probe`` and optional ``later_probe``).

Which checkpoints a table holds (the rule of ProbeSelectSampler, so that every schedule the planner
proposes is one the sampler runs with the same probes and steps):

- a dataset checkpoint t is where a run of ``steps`` steps stops at step ``s = round(t * steps)``
  (:func:`~probe_select.probes.checkpoints.checkpoint_step`); the table's column is labelled with the
  fraction ``s / steps`` (what the sampler's stage runs at, and what the schedule text then says);
  checkpoints that land on step 0 or on the last step are not stages; of two that land on the same
  step, the one nearer ``s / steps`` is used;
- the column is scored by the probe trained nearest ``s / steps`` (the first probe on a tie), if
  that probe is within :data:`~probe_select.probes.checkpoints.CHECKPOINT_TOLERANCE` of it, as
  ``stages.probe_for_stage`` chooses at run time; checkpoints no probe covers are left out (the
  planner can't put a stage there) and listed in :attr:`PlannerData.uncovered`;
- the probe reads the rows recorded at the dataset's own t (activations, x0 or both, and text, as
  its config says), time-conditioned on that t. When the dataset was collected with ``steps``
  steps, t equals ``s / steps`` and the table is exactly what the sampler would score; otherwise
  the stage runs up to half a step away from the recorded t (:attr:`PlannerData.off_grid` lists
  those checkpoints).

The final reward is the dataset's score of the probe's evaluator (every probe must predict the
same evaluator).

Prompts: the tables hold one split by prompt (:func:`~.dataset.split_by_prompt`, the split
ProbeSelectTrain and ``tools.cli train`` use with the same split seed), by default every prompt
the probe was not trained on ("val+test"; the val prompts chose the best epoch, a mild optimism that
"test" alone avoids, on fewer prompts). A probe file does not record which prompts it was trained
on, only how many (its ``training`` summary); :attr:`PlannerData.split_note` says whether those
counts agree with this dataset's split (consistent, not proof) or not, or that nothing is
recorded. Prompts with fewer than ``min_candidates`` rows in the split are left out.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..checkpoints import CHECKPOINT_TOLERANCE, checkpoint_step
from ..io import ProbeMetadata
from ..model import Probe
from ..pruning import ScoreTable
from .dataset import DatasetError, ProbeDataset, check_probe_matches, split_by_prompt
from .evaluation import probe_predictions
from .pipeline import SPLIT_FRACTIONS

logger = logging.getLogger(__name__)

__all__ = ["PLANNING_SPLITS", "PlannerData", "probe_score_tables", "split_rows"]

# The prompt sets a plan can be made on: the splits a probe is never trained on, alone or together,
# or every prompt (optimistic when the probe was trained on some of them).
PLANNING_SPLITS = ("val+test", "test", "val", "all")


@dataclass(frozen=True)
class PlannerData:
    """Score tables of a dataset's prompts, and what they were built from.

    Attributes:
        tables: one :class:`ScoreTable` per prompt (in dataset order), all at ``checkpoints``.
        prompt_ids: the prompt of each table.
        checkpoints: the columns: stage fractions ``s / steps`` the probes cover, increasing.
        recorded: the dataset checkpoint t of each column.
        probe_index: which probe (position in the ``probes`` given) scores each column.
        uncovered: dataset checkpoints (t) that land inside the steps but no probe covers.
        off_grid: dataset checkpoints (t) of the columns whose step fraction differs from t
            (the dataset was collected with another number of steps).
        evaluator: the evaluator whose scores are the final rewards.
        split: the prompt split used (one of :data:`PLANNING_SPLITS`), ``split_seed`` its seed.
        held_out: True when the probe's recorded training counts agree with this split's train
            part, False when they disagree, None when the probe records none or ``split`` is "all".
        split_note: one sentence on what is known about the probe's training prompts.
        dropped_prompts: prompts of the split left out for having fewer than ``min_candidates`` rows.
        rows: candidate rows in the tables.
    """

    tables: list[ScoreTable]
    prompt_ids: list[str]
    checkpoints: tuple[float, ...]
    recorded: tuple[float, ...]
    probe_index: tuple[int, ...]
    uncovered: tuple[float, ...]
    off_grid: tuple[float, ...]
    evaluator: str
    split: str
    split_seed: int
    held_out: Optional[bool]
    split_note: str
    dropped_prompts: int = 0
    rows: int = 0
    candidate_counts: tuple[int, ...] = field(default=())

    @property
    def smallest(self) -> int:
        """Candidates of the smallest prompt: the largest N the planner can simulate."""
        return min(len(table) for table in self.tables)


def split_rows(prompt_ids: Sequence[str], split: str, split_seed: int) -> torch.Tensor:
    """Row indices (sorted) of ``split`` (:data:`PLANNING_SPLITS`) with the training split's fractions."""
    if split not in PLANNING_SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(PLANNING_SPLITS)}")
    if split == "all":
        return torch.arange(len(prompt_ids), dtype=torch.long)
    parts = split_by_prompt(prompt_ids, SPLIT_FRACTIONS, seed=split_seed)
    chosen = [parts[name] for name in split.split("+")]
    return torch.sort(torch.cat(chosen)).values


def _whole(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _training_counts(metadata: ProbeMetadata) -> tuple[Optional[int], Optional[int]]:
    """(train prompts, val prompts) of the probe's training summary (``training["data"]``), None where absent."""
    data = metadata.training.get("data")
    if not isinstance(data, dict):
        return None, None
    return _whole(data.get("train_prompts")), _whole(data.get("val_prompts"))


def _split_provenance(metadata: Sequence[ProbeMetadata], prompt_ids: Sequence[str], split: str,
                      split_seed: int) -> tuple[Optional[bool], str]:
    """(held_out, note): whether each probe's recorded training prompt counts fit this dataset's split."""
    if split == "all":
        return None, ("every prompt of the dataset is used, including any the probe was trained on: the figures "
                      "are optimistic for those prompts.")
    parts = split_by_prompt(prompt_ids, SPLIT_FRACTIONS, seed=split_seed)
    prompts = {name: len({prompt_ids[i] for i in rows.tolist()}) for name, rows in parts.items()}
    verdicts = []
    for meta in metadata:
        train, val = _training_counts(meta)
        if train is None or val is None:
            verdicts.append(None)
        else:
            # A learning-curve probe trains on the first n prompts of the train split, so fewer is consistent.
            verdicts.append(val == prompts["val"] and 1 <= train <= prompts["train"])
    if False in verdicts:
        train, val = _training_counts(metadata[verdicts.index(False)])
        return False, (f"the probe file says it trained on {train} prompts and validated on {val}, but this dataset's "
                       f"split (seed {split_seed}) has {prompts['train']} train and {prompts['val']} val prompts: it "
                       f"was trained on another dataset or split seed, so the {split} prompts may include its "
                       f"training prompts (figures may be optimistic).")
    if any(v is None for v in verdicts):
        return None, (f"the probe file does not record its training prompts, so it is unknown whether the {split} "
                      f"prompts (split seed {split_seed}) were held out from its training.")
    return True, (f"the probe's recorded training counts match this dataset's split with seed {split_seed} "
                  f"({prompts['train']} train / {prompts['val']} val prompts), so the {split} prompts were held out "
                  f"(consistent counts; the file does not list the prompts themselves).")


def _columns(dataset_checkpoints: Sequence[float], probes_t: Sequence[float],
             steps: int) -> tuple[list[tuple[float, float, int]], list[float]]:
    """[(stage fraction s/steps, dataset t, probe index)] increasing, and the uncovered dataset t."""
    by_step: dict[int, float] = {}
    for t in dataset_checkpoints:
        s = checkpoint_step(steps, t)
        if not 0 < s < steps:
            continue
        if s not in by_step or abs(t - s / steps) < abs(by_step[s] - s / steps):
            by_step[s] = t
    columns, uncovered = [], []
    for s in sorted(by_step):
        fraction = s / steps
        nearest = min(range(len(probes_t)), key=lambda i: abs(probes_t[i] - fraction))
        if abs(probes_t[nearest] - fraction) > CHECKPOINT_TOLERANCE:
            uncovered.append(by_step[s])
        else:
            columns.append((fraction, by_step[s], nearest))
    return columns, uncovered


def probe_score_tables(dataset: ProbeDataset, probes: Sequence[tuple[Probe, ProbeMetadata]], steps: int, *,
                       split: str = "val+test", split_seed: int = 0, min_candidates: int = 2,
                       batch_size: int = 256) -> PlannerData:
    """One :class:`ScoreTable` per prompt of ``split``: each candidate's probe score at every checkpoint
    the probes cover (see the module docstring for the rule) and its final evaluator score.

    Args:
        dataset: the collected dataset.
        probes: ``(probe, metadata)`` pairs in ProbeSelectSampler's order: ``probe``, then ``later_probe``.
        steps: the sampler's steps (stages land on whole steps).
        split: which prompts (:data:`PLANNING_SPLITS`); ``split_seed`` as in training.
        min_candidates: prompts with fewer rows in the split are left out (N >= 2 to select at all).

    Raises:
        DatasetError: a probe does not fit the dataset (family, tap, feature or x0 shape, text width,
            reduction, evaluator), the probes predict different evaluators, no checkpoint of the
            dataset is covered by a probe, or no prompt of the split has ``min_candidates`` rows.
        ValueError: bad arguments (no probe, steps < 2, unknown split, min_candidates < 2).
    """
    if not probes:
        raise ValueError("probe_score_tables needs at least one probe")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be a whole number >= 2, got {steps!r}")
    if min_candidates < 2:
        raise ValueError(f"min_candidates must be >= 2 (selection needs two candidates), got {min_candidates}")
    metadata = [meta for _, meta in probes]
    evaluators = sorted({meta.evaluator for meta in metadata})
    if len(evaluators) > 1:
        raise DatasetError(f"the probes predict different evaluators ({', '.join(evaluators)}), so their stages "
                           f"rank by different rewards; use probes trained on the same evaluator.")
    evaluator = evaluators[0]
    for meta in metadata:
        check_probe_matches(dataset, meta, require_checkpoint=False)
    manifest = dataset.manifest
    columns, uncovered = _columns(manifest.checkpoints, [meta.checkpoint_t for meta in metadata], steps)
    if not columns:
        trained = ", ".join(f"t={meta.checkpoint_t:.3f}" for meta in metadata)
        raise DatasetError(
            f"no checkpoint of dataset {dataset.root} (t in {[round(t, 4) for t in manifest.checkpoints]}, with "
            f"{steps} steps) is within {CHECKPOINT_TOLERANCE} of a probe's checkpoint ({trained}), so the probe(s) "
            f"can't score any stage. Use a dataset collected at the probe's checkpoint, or a probe trained at one "
            f"of the dataset's.")

    prompt_ids = dataset.prompt_ids
    rows = split_rows(prompt_ids, split, split_seed)
    held_out, note = _split_provenance(metadata, prompt_ids, split, split_seed)
    groups: dict[str, list[int]] = {}
    for position, row in enumerate(rows.tolist()):
        groups.setdefault(prompt_ids[row], []).append(position)
    kept = {pid: positions for pid, positions in groups.items() if len(positions) >= min_candidates}
    if not kept:
        most = max((len(p) for p in groups.values()), default=0)
        raise DatasetError(
            f"no prompt of the {split} split of dataset {dataset.root} ({len(groups)} prompts, split seed "
            f"{split_seed}) has {min_candidates} candidates or more (the most is {most}); selection compares "
            f"candidates of one prompt. Collect several seeds per prompt (ProbeSelectCollectSampler candidates "
            f">= 2){', or use the split all' if split != 'all' else ''}.")

    final = dataset.scores(evaluator)[rows].double()
    score_columns = []
    for _fraction, t, index in columns:
        probe, meta = probes[index]
        arrays = dataset.arrays(t, evaluator).select(rows)
        score_columns.append(probe_predictions(probe, meta, arrays, batch_size).double())
    scores = torch.stack(score_columns, dim=1)                  # [rows of the split, columns]

    tables, table_prompts, counts = [], [], []
    checkpoints = tuple(fraction for fraction, _, _ in columns)
    for pid, positions in kept.items():
        index = torch.tensor(positions, dtype=torch.long)
        tables.append(ScoreTable(checkpoints, scores[index], final[index]))
        table_prompts.append(pid)
        counts.append(len(positions))
    off_grid = tuple(t for fraction, t, _ in columns if abs(fraction - t) > 1e-6)
    if not all(math.isfinite(v) for v in scores.flatten().tolist()):
        logger.warning("the probe gave non-finite scores to some rows; they rank last")
    return PlannerData(tables=tables, prompt_ids=table_prompts, checkpoints=checkpoints,
                       recorded=tuple(t for _, t, _ in columns), probe_index=tuple(i for _, _, i in columns),
                       uncovered=tuple(uncovered), off_grid=off_grid, evaluator=evaluator, split=split,
                       split_seed=int(split_seed), held_out=held_out, split_note=note,
                       dropped_prompts=len(groups) - len(kept), rows=sum(counts), candidate_counts=tuple(counts))
