"""Small, dependency-free plots (PIL + numpy) for training curves and predicted-vs-actual scatters.

matplotlib is not a dependency of ComfyUI or of this pack; these plots only need to be legible in a
node preview, so they are drawn directly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["line_plot", "scatter_plot"]

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
MARGIN = (56, 28, 20, 40)   # left, top, right, bottom


def _range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if math.isclose(lo, hi):
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def tick_labels(values: Sequence[float]) -> list[str]:
    """The values in the fewest significant digits (3 at least, 8 at most) that tell them apart: a curve that
    moves within 0.998-1.0 gets 0.998 / 0.999 / 1, not 0.999 twice."""
    for digits in range(3, 9):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(set(float(v) for v in values)):
            return labels
    return labels


class _Axes:
    def __init__(self, panel: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xr, yr, title: str,
                 x_ticks: Optional[Sequence[float]] = None):
        self.draw, self.box, self.xr, self.yr = panel, box, xr, yr
        x0, y0, x1, y1 = box
        panel.rectangle(box, outline=(90, 90, 90))
        panel.text((x0, y0 - 16), title, fill=(0, 0, 0))
        if yr[0] < 0 < yr[1]:       # the zero line: where "better than chance" starts for correlations
            panel.line((x0, self.y(0.0), x1, self.y(0.0)), fill=(200, 200, 200), width=1)
        y_ticks = [yr[0] + frac * (yr[1] - yr[0]) for frac in (0.0, 0.5, 1.0)]
        for yv, label in zip(y_ticks, tick_labels(y_ticks)):
            panel.text((x0 - 52, self.y(yv) - 6), label, fill=(60, 60, 60))
        ticks = x_ticks if x_ticks is not None else [xr[0] + f * (xr[1] - xr[0]) for f in (0.0, 0.5, 1.0)]
        for xv, label in zip(ticks, tick_labels(ticks)):
            panel.text((self.x(xv) - 10, y1 + 4), label, fill=(60, 60, 60))

    def x(self, v: float) -> float:
        x0, _, x1, _ = self.box
        return x0 + (v - self.xr[0]) / (self.xr[1] - self.xr[0]) * (x1 - x0)

    def y(self, v: float) -> float:
        _, y0, _, y1 = self.box
        return y1 - (v - self.yr[0]) / (self.yr[1] - self.yr[0]) * (y1 - y0)


def line_plot(panels: Sequence[dict[str, Sequence[float]]], titles: Sequence[str], width: int = 640,
              panel_height: int = 220, x_values: Optional[Sequence[Optional[Sequence[float]]]] = None) -> Image.Image:
    """One panel per dict of named series, stacked vertically, with a legend.

    ``x_values[p]`` gives the x of every point of panel p (ticks at those values, a marker on every
    point); without it x is the index and only the last point is marked.
    """
    image = Image.new("RGB", (width, panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for p, (series, title) in enumerate(zip(panels, titles)):
        top = p * panel_height
        box = (MARGIN[0], top + MARGIN[1], width - MARGIN[2], top + panel_height - MARGIN[3])
        values = [np.asarray(v, dtype=np.float64) for v in series.values()]
        n = max((len(v) for v in values), default=1)
        ys = np.concatenate(values) if values else np.zeros(1)
        xs = None if x_values is None or x_values[p] is None else [float(x) for x in x_values[p]]
        if xs is not None and any(len(v) != len(xs) for v in values):
            raise ValueError(f"line_plot: panel {p} has {len(xs)} x values but series of lengths "
                             f"{[len(v) for v in values]}")
        xr = (min(xs), max(xs)) if xs and max(xs) > min(xs) else (0.0, float(max(n - 1, 1)))
        axes = _Axes(draw, box, xr, _range(ys), title, x_ticks=xs)
        for i, (name, v) in enumerate(series.items()):
            color = COLORS[i % len(COLORS)]
            at = xs if xs is not None else range(len(v))
            points = [(axes.x(x), axes.y(float(val))) for x, val in zip(at, v) if np.isfinite(val)]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            for px, py in (points if xs is not None else points[-1:]):
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
            draw.text((box[2] - 150, box[1] + 4 + 12 * i), name, fill=color)
    return image


def scatter_plot(x: Sequence[float], y: Sequence[float], title: str, x_label: str, y_label: str,
                 group: Optional[Sequence[int]] = None, size: int = 480) -> Image.Image:
    """Predicted (x) vs actual (y); points coloured by group when given."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (MARGIN[0], MARGIN[1], size - MARGIN[2], size - MARGIN[3])
    axes = _Axes(draw, box, _range(xs), _range(ys), title)
    groups = np.zeros(len(xs), dtype=np.int64) if group is None else np.asarray(group)
    for xv, yv, g in zip(xs, ys, groups):
        color = COLORS[int(g) % len(COLORS)]
        px, py = axes.x(xv), axes.y(yv)
        draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
    draw.text((box[0] + (box[2] - box[0]) // 2 - 30, size - 18), x_label, fill=(0, 0, 0))
    draw.text((4, box[1] - 16), y_label, fill=(0, 0, 0))
    return image
