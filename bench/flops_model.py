"""Compute of each selection method from per-component costs (pure arithmetic; bench/flops.py feeds it).

The methods are the one-stage schedules of `probe_select.probes.pruning` ("N: t->K"), priced with
`probe_select.probes.pruning.schedule_cost`, so that the FLOP report and the pruning planner share one cost model.
"""
from __future__ import annotations

from dataclasses import dataclass

from probe_select.probes.pruning import PruningSchedule, Stage, StageCosts, checkpoint_step, schedule_cost

FORMULAS = """With S one denoiser step for one candidate, D a full VAE decode, Dp a preview decode (VAE or TAESD),
E the evaluator, P the probe, T steps and c = round(t * T) the checkpoint step (the pack's rounding,
`probe_select.probes.pruning.checkpoint_step`; c = 4 at t = 0.2, T = 20), and [K > 1] = 1 when the final pick
among the K finished candidates needs the evaluator (0 when only one is finished):

- generate-all (best-of-N): N*T*S + N*D + [N > 1]*N*E
- Probe-Select:             N*c*S + N*P + K*(T-c)*S + K*D + [K > 1]*K*E
- x0-preview scoring:       N*c*S + N*(Dp + E) + K*(T-c)*S + K*D + [K > 1]*K*E
  (the x0 prediction at step c is a by-product of the denoiser call: only its decode and evaluation cost)
- steps only:               (N*c + K*(T-c)) / (N*T), the ratio with every cost but the denoiser left out

Each ratio is the method's cost over generate-all's for the same N."""


@dataclass(frozen=True)
class Components:
    """Cost of one call of each component for one candidate, in any one unit (FLOPs here).

    Attributes:
        step: one denoiser evaluation of one candidate (CFG included).
        decode: full VAE decode of one latent.
        preview_decode: the decode used for x0 previews (TAESD, or the VAE itself).
        probe: the probe on one candidate's pooled activations.
        evaluator: the evaluator (reward model) on one decoded image.
    """

    step: float
    decode: float
    preview_decode: float
    probe: float
    evaluator: float


def scorer_costs(c: Components) -> dict[str, StageCosts]:
    """Per-candidate extras of each method in step-equivalents, for `probe_select.probes.pruning` (costs and planner).

    ``random`` scores for free; ``probe`` runs the probe; ``x0_preview_vae`` / ``x0_preview_taesd``
    decode the x0 prediction (full VAE / preview decoder) and run the evaluator on it. Every method
    decodes what it finishes and evaluates the finished candidates when more than one is left.
    """
    finish = dict(decode=c.decode / c.step, final_score=c.evaluator / c.step)
    return {
        "random": StageCosts(**finish),
        "probe": StageCosts(score=c.probe / c.step, **finish),
        "x0_preview_vae": StageCosts(score=(c.decode + c.evaluator) / c.step, **finish),
        "x0_preview_taesd": StageCosts(score=(c.preview_decode + c.evaluator) / c.step, **finish),
    }


def method_costs(c: Components, candidates: int, keep: int, steps: int, checkpoint: float) -> dict[str, float]:
    """Cost of each method in step-equivalents (units of ``c.step``) for N=``candidates``, K=``keep``."""
    one_stage = PruningSchedule(candidates, (Stage(checkpoint, keep),))
    extras = scorer_costs(c)
    return {
        "generate_all": schedule_cost(PruningSchedule(candidates), steps, extras["random"]),
        "probe_select": schedule_cost(one_stage, steps, extras["probe"]),
        "x0_preview_vae": schedule_cost(one_stage, steps, extras["x0_preview_vae"]),
        "x0_preview_taesd": schedule_cost(one_stage, steps, extras["x0_preview_taesd"]),
    }


def method_ratios(c: Components, candidates: int, keep: int, steps: int, checkpoint: float) -> dict[str, float]:
    """Each method's cost over generate-all's, plus ``steps_only`` (denoiser steps alone)."""
    costs = method_costs(c, candidates, keep, steps, checkpoint)
    stop = checkpoint_step(steps, checkpoint)
    ratios = {name: value / costs["generate_all"] for name, value in costs.items()}
    ratios["steps_only"] = (candidates * stop + keep * (steps - stop)) / (candidates * steps)
    return ratios
