"""Checkpoints: the fraction of the sampling at which a probe reads the denoiser.

A user asks for a fraction r of the sampling (the nodes' ``checkpoint_percent``, the command line's
``--checkpoint``). A sampler with T steps stops at the whole step ``round(r * T)`` and records
``t = step / T``, so 0.2 of 6 steps is stored as 1/6. Datasets, probe files and activations hold
these stored values. :func:`stored_checkpoint` is the one rule that turns a requested fraction
into a stored one, used by the nodes, the command line, the dataset reader and scoring: the
nearest stored value, if it is within :data:`CHECKPOINT_TOLERANCE`.
"""
from __future__ import annotations

import logging
from typing import Sequence

__all__ = ["CHECKPOINT_TOLERANCE", "CheckpointError", "checkpoint_step", "stored_checkpoint", "checkpoint_index"]

logger = logging.getLogger(__name__)

# Rounding to whole steps moves a fraction by at most 1 / (2 T): 0.1 covers every run of 5 steps
# or more, and a probe is time-conditioned, so reading activations that far off is still sound.
CHECKPOINT_TOLERANCE = 0.1
# Stored values closer than this are the same value (float noise of step / T).
_SAME = 1e-6


class CheckpointError(ValueError):
    """No stored checkpoint is within the tolerance of the requested fraction."""


def checkpoint_step(steps: int, fraction: float) -> int:
    """The step at which a run of ``steps`` steps stops for the fraction ``fraction``: round(fraction * steps)."""
    return int(round(fraction * steps))


def checkpoint_index(stored: Sequence[float], requested: float, tolerance: float = CHECKPOINT_TOLERANCE) -> int:
    """Position in ``stored`` of the value nearest ``requested`` (the first of equally near ones).

    Raises:
        CheckpointError: if ``stored`` is empty or no value is within ``tolerance``; the message
            lists the stored values.
    """
    if not stored:
        raise CheckpointError("no checkpoints are stored")
    requested = float(requested)
    index = min(range(len(stored)), key=lambda i: abs(float(stored[i]) - requested))
    gap = abs(float(stored[index]) - requested)
    if gap > tolerance:
        raise CheckpointError(f"checkpoint t={requested} is not stored; the stored checkpoints are t in "
                              f"{[round(float(t), 4) for t in stored]} (a request is matched within {tolerance})")
    if gap > _SAME:
        logger.info("checkpoint t=%s is stored as t=%.4f (whole steps)", requested, float(stored[index]))
    return index


def stored_checkpoint(stored: Sequence[float], requested: float, tolerance: float = CHECKPOINT_TOLERANCE) -> float:
    """The stored value :func:`checkpoint_index` picks for ``requested``."""
    return float(stored[checkpoint_index(stored, requested, tolerance)])
