"""Analytic renderer of proxy-world scenes.

A scene is first laid out (``layout_scene``: one ``Placed`` per drawn object, positions in [0, 1]
image coordinates, x to the right, y downwards), then rasterised (``rasterize``) with signed
distance functions and a one-pixel linear coverage ramp (anti-aliased edges) over a dark
background. Layout and rasterisation are separate so that a layout can be edited (an object moved,
removed, recoloured) and drawn again; the evaluator checks use that.

Without ``rng`` the layout is canonical (fixed positions and sizes, exact palette colours, no
rotation). With ``rng`` (a numpy Generator or an int seed) positions, sizes, a small rotation and a
slight colour shade are drawn, always consistent with the prompt: the relation holds with a clear
margin (primary-axis gap >= 0.36 of the image, orthogonal offset <= 0.12) and counted copies never
touch (>= ~2 px between their extents at 32 px).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .grammar import SHAPES, Scene, _as_rng

# Palette: far apart in RGB (min pairwise distance ~0.8) and from the background.
COLOR_RGB = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.80, 0.15),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "white": (0.92, 0.92, 0.92),
}
BACKGROUND = (0.05, 0.05, 0.07)

# Geometry of each shape relative to its size parameter s (half-extent, fraction of the image).
SQUARE_HALF = 0.84      # half side
TRI_CIRCUM = 1.25       # circumradius (apex up, centroid at the anchor)
CROSS_HALF_T = 0.36     # half thickness of a bar (bar half length is s)
EXTENT = {"circle": 1.0, "square": SQUARE_HALF * math.sqrt(2), "triangle": TRI_CIRCUM,
          "cross": math.hypot(1.0, CROSS_HALF_T)}

REL_SIZE = 0.14                     # canonical size in relation scenes
REL_SIZE_RANGE = (0.115, 0.16)
COUNT_SIZE = {1: 0.16, 2: 0.13, 3: 0.115}
COUNT_SIZE_RANGE = {1: (0.13, 0.18), 2: (0.11, 0.15), 3: (0.10, 0.13)}
COUNT_CANON = {1: ((0.5, 0.5),), 2: ((0.28, 0.5), (0.72, 0.5)), 3: ((0.26, 0.3), (0.74, 0.3), (0.5, 0.73))}
ROT_JITTER = 0.12                   # radians
MARGIN = 0.02                       # minimum distance of an object's extent from the border


@dataclass(frozen=True)
class Placed:
    """One drawn object: centre (x, y) in [0, 1] (y down), size s, rotation (radians), colour."""

    shape: str
    color: str
    x: float
    y: float
    size: float
    rot: float = 0.0
    rgb: Optional[Tuple[float, float, float]] = None

    @property
    def extent(self) -> float:
        return EXTENT[self.shape] * self.size

    def color_rgb(self) -> Tuple[float, float, float]:
        return self.rgb if self.rgb is not None else COLOR_RGB[self.color]


Layout = Tuple[Placed, ...]


def _shade(g: Optional[np.random.Generator], color: str):
    if g is None:
        return None
    base = np.asarray(COLOR_RGB[color])
    rgb = np.clip(base * g.uniform(0.88, 1.0) + g.normal(0.0, 0.02, 3), 0.0, 1.0)
    return tuple(float(v) for v in rgb)


def _clip_pos(v: float, ext: float) -> float:
    lo, hi = ext + MARGIN, 1.0 - ext - MARGIN
    return float(min(max(v, lo), hi))


def _relation_layout(scene: Scene, g: Optional[np.random.Generator]) -> Layout:
    a, b = scene.objects
    rel = scene.relation
    if g is None:
        sa = sb = REL_SIZE
        gap, mid, oa, ob = 0.44, 0.5, 0.5, 0.5
        ra = rb = 0.0
    else:
        sa, sb = g.uniform(*REL_SIZE_RANGE, size=2)
        gap = g.uniform(0.36, 0.50)
        mid = 0.5 + g.uniform(-0.05, 0.05)
        common = g.uniform(-0.13, 0.13)
        oa, ob = 0.5 + common + g.uniform(-0.06, 0.06, size=2)
        ra, rb = g.uniform(-ROT_JITTER, ROT_JITTER, size=2)
    # primary coordinate of a and b: "a left of b" -> a has the smaller x.
    first, second = mid - gap / 2, mid + gap / 2
    pa, pb = (first, second) if rel in ("left of", "above") else (second, first)
    horizontal = rel in ("left of", "right of")
    ea, eb = EXTENT[a.shape] * sa, EXTENT[b.shape] * sb
    pa, pb, oa, ob = _clip_pos(pa, ea), _clip_pos(pb, eb), _clip_pos(oa, ea), _clip_pos(ob, eb)
    xa, ya = (pa, oa) if horizontal else (oa, pa)
    xb, yb = (pb, ob) if horizontal else (ob, pb)
    return (
        Placed(a.shape, a.color, xa, ya, float(sa), float(ra), _shade(g, a.color)),
        Placed(b.shape, b.color, xb, yb, float(sb), float(rb), _shade(g, b.color)),
    )


def _count_layout(scene: Scene, g: Optional[np.random.Generator]) -> Layout:
    obj, n = scene.objects[0], scene.count
    if g is None:
        s = COUNT_SIZE[n]
        return tuple(Placed(obj.shape, obj.color, x, y, s) for x, y in COUNT_CANON[n])
    sizes = g.uniform(*COUNT_SIZE_RANGE[n], size=n)
    exts = EXTENT[obj.shape] * sizes
    centres = None
    for _ in range(200):
        lo, hi = exts + MARGIN, 1.0 - exts - MARGIN
        cand = g.uniform(lo[:, None], hi[:, None], size=(n, 2))
        ok = True
        for i in range(n):
            for j in range(i):
                if np.hypot(*(cand[i] - cand[j])) < exts[i] + exts[j] + 0.07:
                    ok = False
        if ok:
            centres = cand
            break
    if centres is None:  # practically unreachable; canonical spots with a little jitter
        centres = np.asarray(COUNT_CANON[n]) + g.uniform(-0.02, 0.02, size=(n, 2))
    rots = g.uniform(-ROT_JITTER, ROT_JITTER, size=n)
    return tuple(
        Placed(obj.shape, obj.color, float(centres[i, 0]), float(centres[i, 1]), float(sizes[i]),
               float(rots[i]), _shade(g, obj.color))
        for i in range(n)
    )


def layout_scene(scene: Scene, rng=None) -> Layout:
    """Positions of every object of ``scene``; canonical when ``rng`` is None."""
    g = None if rng is None else _as_rng(rng)
    if scene.relation is not None:
        return _relation_layout(scene, g)
    return _count_layout(scene, g)


def free_spot(layout: Layout, size: float, shape: str = "circle", rng=None) -> Tuple[float, float]:
    """The position (on a 21x21 grid, ties broken by ``rng`` jitter) farthest from the objects of
    ``layout`` that keeps an object of ``size`` inside the image."""
    ext = EXTENT[shape] * size
    lin = np.linspace(ext + MARGIN, 1 - ext - MARGIN, 21)
    xs, ys = np.meshgrid(lin, lin)
    pts = np.stack([xs.ravel(), ys.ravel()], 1)
    if not layout:
        dist = -np.hypot(pts[:, 0] - 0.5, pts[:, 1] - 0.5)
    else:
        dist = np.min(np.stack([np.hypot(pts[:, 0] - p.x, pts[:, 1] - p.y) - p.extent for p in layout], 1), 1)
    if rng is not None:
        dist = dist + _as_rng(rng).uniform(0, 1e-3, size=dist.shape)
    k = int(np.argmax(dist))
    return float(pts[k, 0]), float(pts[k, 1])


# ----------------------------------------------------------------------------- rasterisation

def _sd_box(px, py, bx, by):
    qx, qy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _signed_distance(shape_id, px, py, s):
    """px, py: local coordinates (pixels) [B,S,H,W]; s: size in pixels [B,S,1,1]."""
    d_circle = torch.sqrt(px ** 2 + py ** 2) - s
    d_square = _sd_box(px, py, SQUARE_HALF * s, SQUARE_HALF * s)
    # triangle with a per-object circumradius: clamp bound is a tensor
    circum = TRI_CIRCUM * s
    r = circum * (math.sqrt(3) / 2)
    k = math.sqrt(3)
    x = px.abs() - r
    y = -py + r / k
    fold = (x + k * y) > 0
    x2 = torch.where(fold, (x - k * y) / 2, x)
    y2 = torch.where(fold, (-k * x - y) / 2, y)
    x2 = x2 - torch.maximum(torch.minimum(x2, torch.zeros_like(x2)), -2 * r)
    d_tri = -torch.sqrt(x2 ** 2 + y2 ** 2) * torch.sign(y2)
    t = CROSS_HALF_T * s
    d_cross = torch.minimum(_sd_box(px, py, s, t), _sd_box(px, py, t, s))
    stack = torch.stack([d_circle, d_square, d_tri, d_cross], 0)  # [4,B,S,H,W]
    idx = shape_id.clamp(min=0)[None, :, :, None, None].expand(1, *px.shape)
    return torch.gather(stack, 0, idx)[0]


def rasterize(layouts: Sequence[Layout], size: int = 32, dtype=torch.float32) -> torch.Tensor:
    """Draw layouts (in order, later objects on top) -> Tensor[B,3,size,size] in [0,1]."""
    if len(layouts) > 256:
        return torch.cat([rasterize(layouts[i:i + 256], size, dtype) for i in range(0, len(layouts), 256)])
    B = len(layouts)
    S = max([len(l) for l in layouts] + [1])
    shape_id = torch.full((B, S), -1, dtype=torch.long)
    par = torch.zeros(B, S, 7, dtype=torch.float64)  # x, y, size, rot, r, g, b
    for i, lay in enumerate(layouts):
        for j, p in enumerate(lay):
            shape_id[i, j] = SHAPES.index(p.shape)
            par[i, j] = torch.tensor([p.x, p.y, p.size, p.rot, *p.color_rgb()], dtype=torch.float64)
    par = par.to(dtype)
    coords = (torch.arange(size, dtype=dtype) + 0.5)  # pixel centres, in pixels
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    cx = par[:, :, 0, None, None] * size
    cy = par[:, :, 1, None, None] * size
    s = par[:, :, 2, None, None] * size
    cos, sin = torch.cos(par[:, :, 3])[..., None, None], torch.sin(par[:, :, 3])[..., None, None]
    dx, dy = gx - cx, gy - cy
    px = cos * dx + sin * dy          # rotate the sample point by -rot
    py = -sin * dx + cos * dy
    d = _signed_distance(shape_id, px, py, s)
    cover = (0.5 - d).clamp(0.0, 1.0) * (shape_id >= 0)[..., None, None].to(dtype)  # [B,S,H,W]
    img = torch.tensor(BACKGROUND, dtype=dtype)[None, :, None, None].expand(B, 3, size, size).clone()
    for j in range(S):
        a = cover[:, j, None]
        img = img * (1 - a) + par[:, j, 4:7, None, None] * a
    return img


def render_layout(layout: Layout, size: int = 32) -> torch.Tensor:
    return rasterize([layout], size)[0]


def render(scene: Scene, size: int = 32, rng=None) -> torch.Tensor:
    """Tensor[3,size,size] in [0,1]; canonical layout without ``rng``, jittered with it."""
    return rasterize([layout_scene(scene, rng)], size)[0]


def render_batch(scenes: Sequence[Scene], size: int = 32, rng=None) -> torch.Tensor:
    """Tensor[B,3,size,size]. ``rng``: None (canonical), one Generator/int seed shared by the batch
    (drawn in order), or a sequence with one Generator/int seed per scene."""
    if rng is None:
        lays = [layout_scene(s) for s in scenes]
    elif isinstance(rng, (list, tuple)):
        if len(rng) != len(scenes):
            raise ValueError("one rng per scene expected")
        lays = [layout_scene(s, r) for s, r in zip(scenes, rng)]
    else:
        g = _as_rng(rng)
        lays = [layout_scene(s, g) for s in scenes]
    return rasterize(lays, size)
