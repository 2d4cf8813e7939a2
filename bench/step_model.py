"""Wall time of generate-all and Probe-Select predicted from measured per-call costs (pure arithmetic).

bench/bench_sd15_measured.py measures what one denoiser call costs at each batch size and what one
VAE decode call costs for each number of images, and predicts the two runs from them:

- generate-all (a plain KSampler batch of N, then one decode of N):
      T * S(r*N) + D(N)
- Probe-Select (N candidates to step c in one batch, the top K finished in one batch, one decode of K):
      c * S(r*N) + (T - c) * S(r*K) + D(K)

S(b) is the seconds of one denoiser call on a batch of b rows (r = 2 rows per candidate under CFG:
cond + uncond in one call, as ComfyUI batches them; r = 1 without CFG), D(n) the seconds of one decode
call of n latents, T the steps and c = round(t * T) the checkpoint step (the pack's rounding). The early
phase stops at the first model call of step c, and the resume replays the c recorded calls without
evaluating the model, so these are all the model calls of the two runs; everything else (the pack's
nodes, ComfyUI's sampler loop) is left out and measured as the remainder.

The FLOP model (bench/flops_model.py) prices a step per candidate, the same at every batch size; the
two models agree when S(b) is proportional to b and D(n) to n (:func:`linear_costs`).
"""
from __future__ import annotations

from dataclasses import dataclass

from probe_select.probes.checkpoints import checkpoint_step


@dataclass(frozen=True)
class CallCosts:
    """Measured seconds per call.

    Attributes:
        step: rows in the denoiser call -> seconds of that call.
        decode: latents in the decode call -> seconds of that call.
    """

    step: dict[int, float]
    decode: dict[int, float]

    def step_seconds(self, rows: int) -> float:
        if rows not in self.step:
            raise KeyError(f"no denoiser call measured at a batch of {rows} rows (have {sorted(self.step)})")
        return self.step[rows]

    def decode_seconds(self, images: int) -> float:
        if images not in self.decode:
            raise KeyError(f"no decode measured for {images} images (have {sorted(self.decode)})")
        return self.decode[images]


@dataclass(frozen=True)
class RunPrediction:
    generate_all: float      # seconds
    probe_select: float      # seconds
    early: float             # Probe-Select's early phase (N candidates, c steps)
    finish: float            # Probe-Select's resume (K candidates, T - c steps)
    decode_probe_select: float
    decode_generate_all: float

    @property
    def ratio(self) -> float:
        return self.probe_select / self.generate_all


def predict(costs: CallCosts, candidates: int, keep: int, steps: int, checkpoint: float,
            rows_per_candidate: int = 2) -> RunPrediction:
    """The two runs' seconds from per-call costs (formulas in the module docstring)."""
    if not 1 <= keep <= candidates:
        raise ValueError(f"keep must be in 1..candidates, got K={keep}, N={candidates}")
    stop = checkpoint_step(steps, checkpoint)
    full_batch = costs.step_seconds(rows_per_candidate * candidates)
    kept_batch = costs.step_seconds(rows_per_candidate * keep)
    early, finish = stop * full_batch, (steps - stop) * kept_batch
    decode_kept, decode_all = costs.decode_seconds(keep), costs.decode_seconds(candidates)
    return RunPrediction(generate_all=steps * full_batch + decode_all, probe_select=early + finish + decode_kept,
                         early=early, finish=finish, decode_probe_select=decode_kept, decode_generate_all=decode_all)


def linear_costs(costs: CallCosts, candidates: int, keep: int, rows_per_candidate: int = 2) -> CallCosts:
    """The costs scaled linearly from the N-candidate calls: every row and every image costs what it costs
    in the batch of N (no batch effects), as the FLOP model assumes."""
    per_row = costs.step_seconds(rows_per_candidate * candidates) / (rows_per_candidate * candidates)
    per_image = costs.decode_seconds(candidates) / candidates
    step = {rows_per_candidate * n: per_row * rows_per_candidate * n for n in (candidates, keep)}
    decode = {n: per_image * n for n in (candidates, keep)}
    return CallCosts(step=step, decode=decode)


def per_candidate_step(costs: CallCosts, candidates: int, rows_per_candidate: int = 2) -> float:
    """Seconds of one step for one candidate when `candidates` run in one batch."""
    return costs.step_seconds(rows_per_candidate * candidates) / candidates


def relative_error(measured: float, predicted: float) -> float:
    """|measured - predicted| / predicted."""
    return abs(measured - predicted) / predicted
