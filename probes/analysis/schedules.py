"""Noise schedules seen through their signal-to-noise ratio.

Every family ComfyUI samples is described here by the sigma it feeds the sampler:

* eps / v-prediction (variance preserving, k-diffusion's sigma): ``x = x0 + sigma * noise``, which
  is the VP process ``sqrt(a) x0 + sqrt(1 - a) noise`` scaled by ``1 / sqrt(a)`` with
  ``alpha_cumprod a = 1 / (1 + sigma^2)``. Hence ``SNR = a / (1 - a) = 1 / sigma^2`` and
  ``logSNR = -2 log sigma``.
* flow matching (rectified flow, SD3 / Flux): ``x = (1 - t) x0 + t noise`` with ``sigma = t``:
  ``SNR = ((1 - t) / t)^2``, ``logSNR = 2 log((1 - t) / t)``. The flow analogue of alpha_cumprod is
  the signal fraction ``SNR / (1 + SNR) = (1 - t)^2 / ((1 - t)^2 + t^2)``, which equals
  alpha_cumprod exactly for the VP case, so both families share one axis.
* A shift ``s`` (SD3's ``time_snr_shift``, Flux's ``exp(mu)``) maps ``t -> s t / (1 + (s - 1) t)``,
  which lowers the log-SNR of every t by exactly ``2 log s``.

The final sigma of a schedule is 0 (a clean sample, log-SNR +inf); it is kept in the tensors but
left out of ranges, monotonicity and plots.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw

from .. import plots

__all__ = [
    "VP", "FLOW", "PREDICTION_KINDS", "ScheduleCurves", "log_snr", "signal_fraction", "shift_flow_time",
    "flow_log_snr_closed_form", "schedule_curves", "checkpoint_step", "step_budget", "summary_text",
    "schedule_plot", "SNR_BANDS",
]

VP = "vp"        # eps and v-prediction (and EDM): sigma is k-diffusion's sigma
FLOW = "flow"    # rectified flow: sigma is the time t in [0, 1]
PREDICTION_KINDS = (VP, FLOW)

# Log-SNR bands used to say where a schedule spends its steps: coarse layout is decided while the
# noise dominates (log-SNR < -2, signal fraction < 12%), details once the signal dominates (> 2).
SNR_BANDS = ((-math.inf, -2.0, "noise-dominated (logSNR < -2)"),
             (-2.0, 2.0, "mid (-2 <= logSNR <= 2)"),
             (2.0, math.inf, "signal-dominated (logSNR > 2)"))


def _check_kind(kind: str) -> None:
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {PREDICTION_KINDS}")


def log_snr(sigmas: torch.Tensor, kind: str) -> torch.Tensor:
    """log SNR of every sigma (float64): VP ``-2 log sigma``; flow ``2 log((1 - t) / t)``.

    sigma = 0 gives +inf (clean); a flow t = 1 gives -inf (pure noise).
    """
    _check_kind(kind)
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    if kind == VP:
        return -2.0 * torch.log(s)
    return 2.0 * (torch.log1p(-s) - torch.log(s))


def signal_fraction(sigmas: torch.Tensor, kind: str) -> torch.Tensor:
    """``SNR / (1 + SNR)``: alpha_cumprod ``1 / (1 + sigma^2)`` for VP, ``(1-t)^2 / ((1-t)^2 + t^2)`` for flow."""
    _check_kind(kind)
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    if kind == VP:
        return 1.0 / (1.0 + s * s)
    return (1.0 - s) ** 2 / ((1.0 - s) ** 2 + s * s)


def shift_flow_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift: ``s t / (1 + (s - 1) t)`` (Flux's ``exp(mu)`` time shift with ``s = exp(mu)``)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_log_snr_closed_form(t: torch.Tensor, shift: float) -> torch.Tensor:
    """log SNR of unshifted time t after a shift: ``2 log((1 - t) / t) - 2 log(shift)``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return 2.0 * (torch.log1p(-t) - torch.log(t)) - 2.0 * math.log(shift)


def checkpoint_step(steps: int, percent: float) -> int:
    """The step a split run stops at after ``percent`` of ``steps`` (round, as the samplers do)."""
    return int(round(percent * steps))


@dataclass
class ScheduleCurves:
    """One schedule: its sigmas (``steps + 1`` values, last usually 0) and what they mean."""

    name: str
    kind: str
    sigmas: torch.Tensor                    # float64 [steps + 1]
    log_snr: torch.Tensor = field(init=False)
    signal: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        self.sigmas = torch.as_tensor(self.sigmas, dtype=torch.float64).flatten().cpu()
        if self.sigmas.numel() < 2:
            raise ValueError(f"schedule {self.name!r} has {self.sigmas.numel()} sigmas; need at least 2 (one step)")
        self.log_snr = log_snr(self.sigmas, self.kind)
        self.signal = signal_fraction(self.sigmas, self.kind)

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def noisy(self) -> torch.Tensor:
        """Mask of the sigmas with a finite log-SNR: neither the clean end (sigma 0) nor, for flow
        schedules, the pure-noise start (t = 1, log-SNR -inf)."""
        return torch.isfinite(self.log_snr)

    @property
    def starts_at_pure_noise(self) -> bool:
        return float(self.log_snr[0]) == -math.inf

    def log_snr_range(self) -> tuple[float, float]:
        finite = self.log_snr[self.noisy]
        return float(finite.min()), float(finite.max())

    def strictly_decreasing_sigma(self) -> bool:
        """True when every step lowers sigma (log-SNR strictly increasing over the whole schedule)."""
        return bool((self.sigmas[1:] < self.sigmas[:-1]).all())

    def repeated_sigmas(self) -> int:
        """Number of steps that do not move sigma (wasted model evaluations)."""
        return int((self.sigmas[1:] == self.sigmas[:-1]).sum())


def schedule_curves(name: str, sigmas: torch.Tensor, kind: str) -> ScheduleCurves:
    return ScheduleCurves(name, kind, sigmas)


def step_budget(curves: ScheduleCurves) -> list[tuple[str, int]]:
    """How many steps start in each log-SNR band of :data:`SNR_BANDS` (a step starts at sigma_i)."""
    starts = curves.log_snr[:-1]
    return [(label, int(((starts >= lo) & (starts < hi)).sum())) for lo, hi, label in SNR_BANDS]


def summary_text(schedules: Sequence[ScheduleCurves], checkpoint_percent: Optional[float] = None) -> str:
    """A few lines per schedule: log-SNR range, monotonicity, step budget per band, checkpoint."""
    lines = []
    for curves in schedules:
        lo, hi = curves.log_snr_range()
        mono = "strictly decreasing sigma" if curves.strictly_decreasing_sigma() else (
            f"NOT strictly decreasing ({curves.repeated_sigmas()} repeated sigmas)")
        start = f"-inf (t = 1, pure noise), then {lo:.2f}" if curves.starts_at_pure_noise else f"{lo:.2f}"
        lines.append(f"{curves.name} [{curves.kind}, {curves.steps} steps]: logSNR {start} .. {hi:.2f} "
                     f"(sigma {float(curves.sigmas[0]):.4g} -> {float(curves.sigmas[-1]):.4g}); {mono}")
        budget = ", ".join(f"{count} {label}" for label, count in step_budget(curves))
        lines.append(f"  steps start in: {budget}")
        if checkpoint_percent is not None:
            s = checkpoint_step(curves.steps, checkpoint_percent)
            value = float(curves.log_snr[s])
            lines.append(f"  checkpoint {checkpoint_percent:.0%} = step {s}/{curves.steps}: sigma "
                         f"{float(curves.sigmas[s]):.4g}, logSNR {value:.2f}, signal fraction {float(curves.signal[s]):.3f}")
    return "\n".join(lines)


def schedule_plot(schedules: Sequence[ScheduleCurves], checkpoint_percent: Optional[float] = None,
                  width: int = 720, panel_height: int = 220) -> Image.Image:
    """Three stacked panels (sigma, signal fraction, log-SNR) per step, one line per schedule.

    x is the fraction of steps done (0..1), so schedules with different step counts overlay. The
    clean end point is left out. A vertical line marks the checkpoint percent; the log-SNR each
    schedule reaches there is written in the legend.
    """
    sig, sfrac, lsnr, xs = {}, {}, {}, []
    for curves in schedules:
        keep = curves.noisy
        x = (torch.arange(curves.steps + 1, dtype=torch.float64) / curves.steps)[keep]
        label = curves.name
        if checkpoint_percent is not None:
            s = checkpoint_step(curves.steps, checkpoint_percent)
            label += f" (ckpt logSNR {float(curves.log_snr[s]):.2f})"
        sig[label] = curves.sigmas[keep].tolist()
        sfrac[label] = curves.signal[keep].tolist()
        lsnr[label] = curves.log_snr[keep].tolist()
        xs.append(x.tolist())
    return _overlay_plot([sig, sfrac, lsnr], ["sigma", "signal fraction (alpha_cumprod / flow analogue)", "log-SNR"],
                         xs, checkpoint_percent, width, panel_height)


def _overlay_plot(panels, titles, xs, checkpoint_percent, width, panel_height) -> Image.Image:
    """Like plots.line_plot, but every series has its own x values (schedules of different lengths
    share a panel) and a vertical line marks the checkpoint."""
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for p, (series, title) in enumerate(zip(panels, titles)):
        top = p * panel_height
        box = (plots.MARGIN[0], top + plots.MARGIN[1], width - plots.MARGIN[2], top + panel_height - plots.MARGIN[3])
        all_y = torch.tensor([v for values in series.values() for v in values], dtype=torch.float64).numpy()
        axes = plots._Axes(draw, box, (0.0, 1.0), plots._range(all_y), title, x_ticks=[0.0, 0.25, 0.5, 0.75, 1.0])
        if checkpoint_percent is not None:
            cx = axes.x(checkpoint_percent)
            draw.line((cx, box[1], cx, box[3]), fill=(120, 120, 120), width=1)
        for i, ((name, values), x) in enumerate(zip(series.items(), xs)):
            color = plots.COLORS[i % len(plots.COLORS)]
            points = [(axes.x(xv), axes.y(yv)) for xv, yv in zip(x, values) if math.isfinite(yv)]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for px, py in points:
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
            draw.text((box[0] + 6, box[1] + 4 + 12 * i), name, fill=color)
    return image
