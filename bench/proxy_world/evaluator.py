r"""Analytic, smooth evaluator of proxy-world images.

``score(image, scene)`` returns a value in [0, 1]: ~0.9 when the image shows exactly the objects of
the prompt with the right colour-shape binding, relation and count (analytic renders: mean ~0.89),
<= ~0.1 when any one object is missing, miscoloured or miscounted (~0.1^k with k such attributes wrong),
<= ~0.4 when only the relation is wrong. Every step is a continuous
function of the pixels (soft colour unmixing, soft masks, moments, softmax posteriors, sigmoids,
rational functions, threshold-averaged Euler characteristic); there is no hard threshold, no
connected-component labelling and no randomness. The score is deterministic, moves continuously
when an object moves, and is differentiable with torch autograd (almost everywhere).

Formula (image x in [0,1], H x W pixels, coordinates p in [0,1]^2 with y downwards; masses are
fractions of the image area; float64 throughout):

1. Colour unmixing. b: background, c_k: palette colours, v_k = c_k - b, d(p) = x(p) - b.
   alpha_k = <d, v_k> / |v_k|^2 (how much of colour k over the background: exactly the coverage of
   an anti-aliased edge); sin2_k = 1 - <d, v_k>^2 / (|v_k|^2 |d|^2) (angle between d and v_k).
   w = softmax over {palette colours, "other"} of -sin2_k / (2 * 0.1^2), "other" at the constant
   sin2 = 0.15 (~23 degrees away from every palette direction).
   Coverage h(a) = smin(max(a, 0), 1) * smoothstep(a; 0.12, 0.42)  (faint noise carries no mass).
   Soft masks: m_k = w_k h(alpha_k);  m_other = w_other h(|d| / 0.9).
2. For each required colour group g: object (shape_g, colour k), n_g copies (a relation scene
   has two groups with different colours; a count scene one group with n_g = count):
   - presence  P_g = a^2 / (a^2 + 0.003^2) / (1 + (a / 0.3)^8),  a = mean_p m_k / n_g (an object is
               neither missing nor image-filling).
   - count     C_g = exp(-(chi_g - n_g)^2 / (2 * 0.3^2)); chi_g = Euler characteristic of the
               superlevel sets {B * m_k > t} (B the 3x3 binomial blur, so specks and pinholes do not
               count; 8-connected), averaged over t with a smoothstep density on
               [0.3, 0.7]: sum W(m) - sum_{4-adjacent pairs} W(min) + sum_{2x2} W(min of 4)
               - sum_{2x2} relu(W(min of a diagonal) - W(max of the other diagonal)), W the
               smoothstep CDF. = number of blobs for crisp hole-free blobs; continuous in m.
   - shape     S_g = prod_j Post(shape_g | f_j)^(1/n_g). For n_g > 1 the mask is split by soft
               k-means (n_g centres, 10 iterations, assignment scale 0.04) from 4-6 fixed initial
               layouts, each layout weighted by softmax(-objective / 2e-4). f_j: moment descriptor
               of copy j, after localising its mask twice with 1 / (1 + (|p - c| / (3.5 r))^8)
               (c its centroid, r^2 = E|z|^2): [E|z|^2 / area, |E z^2| / E|z|^2,
               |E z^3| / E|z|^2^1.5, Re E z^4 / E|z|^2^2, E|z|^4 / E|z|^2^2], z = p - c as a complex
               number (scale- and translation-invariant; z^3 flags triangles, the sign of Re z^4
               separates squares (-) from crosses (+)). Post: softmax over the 4 shapes of diagonal
               Gaussian log-likelihoods fitted once on 96 jittered renders per shape (fixed seed),
               std widened x1.5.
3. Extra objects: E = sum over palette colours not in the prompt of mean_p m_k + mean_p m_other;
   X = 1 / (1 + (E / 0.005)^2). (Extra copies of a required colour are caught by C_g.)
4. Relation (relation scenes): u = c(object 1) - c(object 0) (localised centroids of step 2),
   primary = component of u along the relation ("left of": u_x, "right of": -u_x, "above": u_y,
   "below": -u_y), ortho = the other one; R = sigmoid((primary - sqrt(ortho^2 + 1e-4)) / 0.04).
5. Quality (mild, never saturates, so two correct images differ):
   Q = 1 - 0.15 * (1 - exp(-D / 10)) - 0.5 * (1 - fill);  fill = sum m^2 / sum m over the required
   colours (crisp, saturated, larger objects -> 1; blur lowers it), D = mean over copies of the
   squared standardised distance of f_j to the mean descriptor of the required shape.

   score = Q * fl(X) * fr(R) * prod_g fl(P_g) fl(C_g) fs(S_g),   fl(f) = 0.1 + 0.9 f,
   fr(f) = 0.4 + 0.6 f,  fs(f) = 0.8 + 0.2 f.

fl keeps a graded floor: one wrong attribute gives <= ~0.1, two ~0.01, so seeds that fail in
different ways remain comparable. fs is tolerant: a wrong or blobby shape costs at most 20%, so an
image fails its prompt on meaning (colour binding, count, relation, missing or extra objects), as a
reward model judges a 32 px sketch. fr is milder than fl: a wrong relation still fails the prompt but
ranks above a wrong object, as real reward models see spatial relations only weakly.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .grammar import COLORS, SHAPES, Scene, parse_prompt
from .render import BACKGROUND, COLOR_RGB

SIGMA_ANGLE = 0.10    # colour membership: scale of sin(angle) between (x - bg) and (c_k - bg)
SIN2_OTHER = 0.15     # sin^2 of the angle (~23 deg) beyond which "other colour" wins
PRESENCE_M0 = 0.003   # mass (fraction of the image) of half presence
PRESENCE_MAX = 0.3    # mass per copy (fraction of the image) at which presence halves again: not an object
EXTRA_E0 = 0.005      # extra mass (fraction of the image) at which X = 1/2
COUNT_SIGMA = 0.3
REL_SCALE = 0.04
CLUSTER_TAU = 0.04    # soft k-means assignment scale (image units)
CLUSTER_ITERS = 10
INIT_TEMP = 2e-4      # softmax temperature over k-means initialisations (objective units)
N_FEATURES = 5
COVERAGE_GATE = (0.12, 0.42)
WINDOW_PASSES, WINDOW_RHO = 2, 3.5   # localisation of the moment descriptors
SHAPE_STD_INFLATE = 1.5   # widen the fitted shape Gaussians: softer, more noise-tolerant posteriors
FLOOR = 0.1           # every semantic factor f enters as FLOOR + (1 - FLOOR) f
# ... except the shape factor, which enters as SHAPE_FLOOR + (1 - SHAPE_FLOOR) S: tolerant, so that a
# blobby but otherwise right image still satisfies its prompt (at 32 px a shape is a detail, as a
# reward model would see it) and failures are semantic: count, relation, colour binding. Chosen in
# calibration round 2 on 16 held-out prompts the reports do not show (bench/results/proxy_models.md):
# the strict 0.1 left 3% of the DiT's samples satisfying their prompt, 0.8 gives 32%.
SHAPE_FLOOR = 0.8
# ... and the relation factor, which enters as RELATION_FLOOR + (1 - RELATION_FLOOR) R. A wrong relation
# still fails the prompt (<= 0.4 x the rest, below 0.5) but ranks above a missing, miscoloured or
# miscounted object, as real reward models (ImageReward, PickScore, HPSv2) see spatial relations only
# weakly. With the strict 0.1 the side each colour landed on, fixed in a sampler's first steps, ruled the
# within-prompt ranking: the x0 preview at 20% of the steps ranked the UNet's seeds at 0.41 (relation
# prompts 0.46, count prompts 0.28), above the 0.17-0.27 of real models. Calibration round 5 (48 held-out
# prompts x 10 seeds, bench/results/proxy_models.md): floors 0.3-0.5 bring the UNet to 0.34 and the DiT
# to 0.20-0.26 and leave success, mixed prompts and the semantic share of failures unchanged.
RELATION_FLOOR = 0.4
Q_SHAPE, Q_SHAPE_D, Q_FILL = 0.15, 10.0, 0.5   # quality term weights

_RELATION_AXIS = {"left of": (0, 1.0), "right of": (0, -1.0), "above": (1, 1.0), "below": (1, -1.0)}


def _floor(f: torch.Tensor, floor: float = FLOOR) -> torch.Tensor:
    return floor + (1.0 - floor) * f


def _softplus(x, beta):
    return F.softplus(x * beta) / beta


def _smoothstep(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((a - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


def coverage(a: torch.Tensor) -> torch.Tensor:
    """C^1 ramp: exactly 0 for a <= COVERAGE_GATE[0] (faint noise and the background carry no
    mass), ~a from COVERAGE_GATE[1] on, softly saturating at 1."""
    a1 = a.clamp(min=0.0)
    a1 = a1 - _softplus(a1 - 1.0, 30.0) + _softplus(torch.tensor(-1.0, dtype=a.dtype), 30.0)
    return a1 * _smoothstep(a, *COVERAGE_GATE)


def soft_masks(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """images [B,3,H,W] -> (m [B,K,H,W] per palette colour, m_other [B,H,W])."""
    x = images.to(torch.float64)
    bg = torch.tensor(BACKGROUND, dtype=torch.float64)
    pal = torch.tensor([COLOR_RGB[c] for c in COLORS], dtype=torch.float64)
    v = pal - bg                                     # [K,3]
    d = x - bg[None, :, None, None]                  # [B,3,H,W]
    dv = torch.einsum("bchw,kc->bkhw", d, v)
    vv = (v * v).sum(1)[None, :, None, None]
    alpha = dv / vv
    dd = (d * d).sum(1, keepdim=True)
    sin2 = (1.0 - dv * dv / (vv * dd + 1e-12)).clamp(min=0.0)   # sin^2 of the angle between d and v_k
    logits = torch.cat([-sin2, torch.full_like(dd, -SIN2_OTHER)], 1) / (2 * SIGMA_ANGLE ** 2)
    w = torch.softmax(logits, 1)
    m = w[:, :-1] * coverage(alpha)
    norm = torch.sqrt(dd[:, 0] + 1e-12) / 0.9
    m_other = w[:, -1] * coverage(norm)
    return m, m_other


EULER_BAND = (0.3, 0.7)  # thresholds over which the Euler characteristic is averaged
# The count reads smooth_for_count(mask): specks and pinholes do not change it (calibration round 2:
# the DiT's count factor passed 41% of its samples on the raw masks, 77% on the smoothed ones).


def soft_euler(m: torch.Tensor) -> torch.Tensor:
    """m [...,H,W] -> Euler characteristic (8-connected foreground) of the superlevel sets
    {m > t}, averaged over thresholds t with a smooth density on EULER_BAND.

    For one threshold, chi = #pixels - #4-adjacent pairs + #full 2x2 blocks - #diagonal-only
    2x2 blocks (Gray's bit-quad formula for 8-connectivity). Averaging an indicator [v > t] over t
    gives W(v) (W: the CDF of the threshold density), so every term becomes W of a min / max of
    pixel values: exact (an integer) for crisp masks, continuous in m everywhere.
    """
    W = lambda v: _smoothstep(v, *EULER_BAND)
    a, b = m[..., :-1, :-1], m[..., :-1, 1:]
    c, d = m[..., 1:, :-1], m[..., 1:, 1:]
    v = W(m).sum((-1, -2))
    eh = W(torch.minimum(m[..., :, 1:], m[..., :, :-1])).sum((-1, -2))
    ev = W(torch.minimum(m[..., 1:, :], m[..., :-1, :])).sum((-1, -2))
    f = W(torch.minimum(torch.minimum(a, b), torch.minimum(c, d))).sum((-1, -2))
    # diagonal-only quads: [min(a,d) > t >= max(b,c)] -> W(min(a,d)) - W(max(b,c)) when positive
    d1 = (W(torch.minimum(a, d)) - W(torch.maximum(b, c))).clamp(min=0).sum((-1, -2))
    d2 = (W(torch.minimum(b, c)) - W(torch.maximum(a, d))).clamp(min=0).sum((-1, -2))
    return v - eh - ev + f - d1 - d2


def smooth_for_count(m: torch.Tensor) -> torch.Tensor:
    """m [..., H, W] blurred with the 3x3 binomial kernel ([1, 2, 1] / 4 per axis, edges replicated), so
    that the count sees objects, not specks: a lone saturated pixel drops to 0.25 and a one-pixel hole
    inside an object rises to 0.75, both outside EULER_BAND, while a two-pixel gap between copies
    stays below 0.25 (one kernel column of an object reaches it)."""
    shape = m.shape
    x = m.reshape(-1, 1, *shape[-2:])
    k = torch.tensor([0.25, 0.5, 0.25], dtype=m.dtype)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None])[None, None])
    return x.reshape(shape)


def _grid(h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    ys = (torch.arange(h, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=dtype) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)   # [HW,2] (x, y)


_MONOMIALS = [(i, j) for i in range(5) for j in range(5) if i + j <= 4]


@lru_cache(maxsize=8)
def _basis(h: int, w: int) -> torch.Tensor:
    # cached across calls: built as a normal tensor even when the first call runs under
    # inference_mode, so that later calls with autograd can still use it
    with torch.inference_mode(False):
        pts = _grid(h, w)
        return torch.stack([pts[:, 0] ** i * pts[:, 1] ** j for i, j in _MONOMIALS], 1)   # [HW,15]


def _raw_moments(weights: torch.Tensor, h: int, w: int):
    raw = weights @ _basis(h, w)                         # [...,15]
    mass = raw[..., 0]
    M = {ij: raw[..., k] / (mass + 1e-9) for k, ij in enumerate(_MONOMIALS)}
    return mass, M


def _central(M, cx, cy, p, q):
    out = 0.0
    for i in range(p + 1):
        for j in range(q + 1):
            out = out + math.comb(p, i) * math.comb(q, j) * (-cx) ** (p - i) * (-cy) ** (q - j) * M[(i, j)]
    return out


def descriptors(weights: torch.Tensor, h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weights [...,HW] (soft mask of one object each) -> (features [...,5], area [...] as image
    fraction, centroid [...,2]).

    The mask is first localised: WINDOW_PASSES times, it is multiplied by the window
    1 / (1 + (|p - c| / rho)^8) around the current centroid c, rho = WINDOW_RHO * sqrt(E|z|^2)
    (flat over the object, ~0 far away, so stray specks do not dominate the 4th-order moments).
    Features, with z = p - centroid as a complex number and E the weighted mean:
    E|z|^2 / area, |E z^2| / E|z|^2, |E z^3| / E|z|^2^1.5, Re E z^4 / E|z|^2^2,
    E|z|^4 / E|z|^2^2 (translation and scale invariant). Central moments come from raw moments
    (one matmul) by binomial expansion."""
    pts = _grid(h, w)
    wts = weights
    mass, M = _raw_moments(wts, h, w)
    for _ in range(WINDOW_PASSES):
        cx, cy = M[(1, 0)], M[(0, 1)]
        e2 = (_central(M, cx, cy, 2, 0) + _central(M, cx, cy, 0, 2)).clamp(min=0.0) + 1e-12
        rho2 = (WINDOW_RHO ** 2) * e2
        r2 = (pts[:, 0] - cx[..., None]) ** 2 + (pts[:, 1] - cy[..., None]) ** 2
        wts = weights / (1.0 + (r2 / rho2[..., None]) ** 4)
        mass, M = _raw_moments(wts, h, w)
    cx, cy = M[(1, 0)], M[(0, 1)]
    mu = {pq: _central(M, cx, cy, *pq) for pq in [(2, 0), (0, 2), (1, 1), (3, 0), (2, 1), (1, 2),
                                                  (0, 3), (4, 0), (2, 2), (0, 4)]}
    e2 = (mu[(2, 0)] + mu[(0, 2)]).clamp(min=0.0) + 1e-12
    area = mass / (h * w)
    z2r, z2i = mu[(2, 0)] - mu[(0, 2)], 2 * mu[(1, 1)]
    z3r, z3i = mu[(3, 0)] - 3 * mu[(1, 2)], 3 * mu[(2, 1)] - mu[(0, 3)]
    z4r = mu[(4, 0)] - 6 * mu[(2, 2)] + mu[(0, 4)]
    r4 = mu[(4, 0)] + 2 * mu[(2, 2)] + mu[(0, 4)]
    feats = torch.stack([
        e2 / (area + 1e-9),
        torch.sqrt(z2r ** 2 + z2i ** 2 + 1e-12) / e2,
        torch.sqrt(z3r ** 2 + z3i ** 2 + 1e-14) / e2 ** 1.5,
        z4r / e2 ** 2,
        r4 / e2 ** 2,
    ], -1)
    return feats, area, torch.stack([cx, cy], -1)


def _init_centres(weights: torch.Tensor, pts: torch.Tensor, k: int) -> torch.Tensor:
    """Fixed initial layouts for soft k-means: [N, I, k, 2] (k points on a circle around the
    centroid at 4 rotations; for k = 3 also two lines)."""
    mass = weights.sum(1, keepdim=True) + 1e-9
    c = (weights @ pts) / mass                          # [N,2]
    d = pts[None] - c[:, None]
    var = (weights[..., None] * d * d).sum(1) / mass    # [N,2]
    rad = torch.sqrt(var.sum(1) + 1e-6)                 # [N]
    offs = []
    period = 2 * math.pi / k
    for i in range(4):
        phi = period / 2 * i / 4 + (math.pi / 2 if k == 3 else 0.0)
        ang = torch.tensor([phi + 2 * math.pi * j / k for j in range(k)], dtype=pts.dtype)
        offs.append(torch.stack([torch.cos(ang), torch.sin(ang)], 1))
    if k == 3:
        for ax in (0, 1):
            off = torch.zeros(3, 2, dtype=pts.dtype)
            off[:, ax] = torch.tensor([-1.2, 0.0, 1.2], dtype=pts.dtype)
            offs.append(off)
    off = torch.stack(offs, 0)                          # [I,k,2]
    return c[:, None, None] + rad[:, None, None, None] * off[None]


def _sqdist(pts: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """pts [HW,2], centres [...,k,2] -> [...,k,HW]."""
    pp = (pts * pts).sum(1)
    cc = (centres * centres).sum(-1, keepdim=True)
    return (cc - 2 * centres @ pts.T + pp).clamp(min=0.0)


def cluster(weights: torch.Tensor, pts: torch.Tensor, k: int):
    """Soft k-means of each mask [N,HW] into k blobs from every initial layout.
    Returns (responsibility-weighted masks [N,I,k,HW], softmax weights of the layouts [N,I]
    from their final objective: layouts that split the mask well dominate)."""
    centres = _init_centres(weights, pts, k)                         # [N,I,k,2]
    w = weights[:, None, None, :]                                    # [N,1,1,HW]
    t2 = 2 * CLUSTER_TAU ** 2
    for _ in range(CLUSTER_ITERS):
        resp = torch.softmax(-_sqdist(pts, centres) / t2, 2)
        rw = resp * w
        centres = (rw @ pts) / (rw.sum(-1, keepdim=True) + 1e-9)
    d2 = _sqdist(pts, centres)
    softmin = -t2 * torch.logsumexp(-d2 / t2, 2)                                          # [N,I,HW]
    obj = (softmin * weights[:, None]).sum(-1) / (weights.sum(-1)[:, None] + 1e-9)      # [N,I]
    sel = torch.softmax(-obj / INIT_TEMP, 1)
    resp = torch.softmax(-d2 / t2, 2)
    return resp * w, sel


@lru_cache(maxsize=None)
def shape_model(size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean [4,5], std [4,5]) of the descriptor per shape, fitted on 96 jittered single-object
    renders per shape at ``size`` x ``size`` (fixed seed, so deterministic; ~0.3 s once)."""
    with torch.inference_mode(False), torch.no_grad():    # cached: see _basis
        return _fit_shape_model(size)


def _fit_shape_model(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    from .render import COUNT_SIZE_RANGE, Placed, REL_SIZE_RANGE, EXTENT, ROT_JITTER, rasterize, _shade

    g = np.random.default_rng(12345)
    lo = min(COUNT_SIZE_RANGE[3][0], REL_SIZE_RANGE[0])
    hi = max(COUNT_SIZE_RANGE[1][1], REL_SIZE_RANGE[1])
    lays, cols = [], []
    per = 96
    for shape in SHAPES:
        for i in range(per):
            color = COLORS[i % len(COLORS)]
            s = float(g.uniform(lo, hi))
            e = EXTENT[shape] * s
            x, y = g.uniform(e + 0.02, 1 - e - 0.02, size=2)
            rot = float(g.uniform(-ROT_JITTER, ROT_JITTER))
            lays.append((Placed(shape, color, float(x), float(y), s, rot, _shade(g, color)),))
            cols.append(COLORS.index(color))
    img = rasterize(lays, size)
    m, _ = soft_masks(img)
    sel = m[torch.arange(len(lays)), torch.tensor(cols)].reshape(len(lays), -1)
    feats, _, _ = descriptors(sel, size, size)
    feats = feats.reshape(len(SHAPES), per, N_FEATURES)
    mean = feats.mean(1)
    std = feats.std(1).clamp(min=1e-3)
    # pooled floor so that one very tight shape does not become over-confident
    std = torch.maximum(std, 0.5 * std.mean(0, keepdim=True)) * SHAPE_STD_INFLATE
    return mean, std


def shape_log_likelihood(feats: torch.Tensor, size: int = 32) -> torch.Tensor:
    """feats [...,5] -> [...,4] diagonal-Gaussian log-likelihood per shape."""
    mean, std = shape_model(size)
    z = (feats[..., None, :] - mean) / std
    return -0.5 * (z * z).sum(-1) - torch.log(std).sum(-1)


def _as_scenes(scenes, n: int) -> List[Scene]:
    if isinstance(scenes, (Scene, str)):
        scenes = [scenes] * n
    out = [s if isinstance(s, Scene) else parse_prompt(s) for s in scenes]
    if len(out) != n:
        raise ValueError(f"{n} images but {len(out)} scenes")
    return out


CHUNK = 256  # images per pass (keeps the intermediate tensors cache-sized)


def score_terms(images: torch.Tensor, scenes, shape_floor: Optional[float] = None,
                relation_floor: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """All factors of the score, each Tensor[B] (float64): score, presence, count, shape, extra,
    relation, quality; diagnostics: chi (soft Euler characteristic summed over the required
    colours), extra_mass, fill, shape_dist2 (D of the quality term). ``shape_floor`` and
    ``relation_floor``: evaluator variants (default :data:`SHAPE_FLOOR`, :data:`RELATION_FLOOR`)."""
    if images.dim() == 3:
        images = images[None]
    B = images.shape[0]
    scenes = _as_scenes(scenes, B)
    floor = SHAPE_FLOOR if shape_floor is None else float(shape_floor)
    rel_floor = RELATION_FLOOR if relation_floor is None else float(relation_floor)
    if B <= CHUNK:
        return _score_terms(images, scenes, floor, rel_floor)
    parts = [_score_terms(images[i:i + CHUNK], scenes[i:i + CHUNK], floor, rel_floor) for i in range(0, B, CHUNK)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _score_terms(images: torch.Tensor, scenes: List[Scene], shape_floor: float,
                 relation_floor: float) -> Dict[str, torch.Tensor]:
    B, _, H, W = images.shape
    hw = H * W
    pts = _grid(H, W)
    m, m_other = soft_masks(images)                      # [B,K,H,W], [B,H,W]
    mass_all = m.sum((-1, -2)) / hw                       # [B,K]

    gb, gk, gs, gn = [], [], [], []
    required = torch.zeros(B, len(COLORS), dtype=torch.float64)
    for b, sc in enumerate(scenes):
        for obj, n in sc.groups():
            k = COLORS.index(obj.color)
            gb.append(b)
            gk.append(k)
            gs.append(SHAPES.index(obj.shape))
            gn.append(n)
            required[b, k] = 1.0
    gb_t, gk_t, gs_t = torch.tensor(gb), torch.tensor(gk), torch.tensor(gs)
    gn_t = torch.tensor(gn, dtype=torch.float64)
    G = len(gb)
    gm = m[gb_t, gk_t]                                     # [G,H,W]
    flat = gm.reshape(G, hw)

    # presence and count
    mass = flat.sum(1) / hw
    a = mass / gn_t
    # ... and an object is object-sized: with a tolerant shape factor, a blob filling the image would
    # otherwise pass for "a white cross" (rendered objects cover at most ~0.1 of the image each)
    presence = a * a / (a * a + PRESENCE_M0 ** 2) / (1.0 + (a / PRESENCE_MAX) ** 8)
    chi = soft_euler(smooth_for_count(gm))
    count = torch.exp(-((chi - gn_t) ** 2) / (2 * COUNT_SIGMA ** 2))

    # shape: clusters per group (grouped by number of copies)
    shape_p = torch.zeros(G, dtype=torch.float64)
    dist2 = torch.zeros(G, dtype=torch.float64)
    centroid = torch.zeros(G, 2, dtype=torch.float64)   # localised centroid of single-copy groups
    mean, std = shape_model(H)
    for k in sorted(set(gn)):
        idx = torch.tensor([i for i in range(G) if gn[i] == k])
        wts = flat[idx]
        if k == 1:
            feats, _, cen = descriptors(wts, H, W)                        # [n,5]
            centroid = centroid.index_copy(0, idx, cen)
            ll = shape_log_likelihood(feats, H)                            # [n,4]
            logp = torch.log_softmax(ll, -1).gather(1, gs_t[idx, None])[:, 0]
            z = (feats - mean[gs_t[idx]]) / std[gs_t[idx]]
            shape_p = shape_p.index_copy(0, idx, torch.exp(logp))
            dist2 = dist2.index_copy(0, idx, (z * z).sum(-1))
        else:
            cw, sel = cluster(wts, pts, k)                                # [n,I,k,HW], [n,I]
            n_, I = sel.shape
            feats, _, _ = descriptors(cw, H, W)                           # [n,I,k,5]
            ll = shape_log_likelihood(feats, H)                            # [n,I,k,4]
            req = gs_t[idx][:, None, None, None].expand(n_, I, k, 1)
            logp = torch.log_softmax(ll, -1).gather(-1, req)[..., 0]      # [n,I,k]
            z = (feats - mean[gs_t[idx]][:, None, None]) / std[gs_t[idx]][:, None, None]
            # geometric mean over copies, averaged over the k-means layouts by their weights
            shape_p = shape_p.index_copy(0, idx, torch.exp((sel * logp.mean(-1)).sum(1)))
            dist2 = dist2.index_copy(0, idx, (sel * (z * z).sum(-1).mean(-1)).sum(1))

    # per-image products over groups
    def prod(v):  # product over the groups of each image
        logs = torch.zeros(B, dtype=torch.float64).index_add(0, gb_t, torch.log(v))
        return torch.exp(logs)

    P, C, S = prod(_floor(presence)), prod(_floor(count)), prod(_floor(shape_p, shape_floor))
    ng = torch.zeros(B, dtype=torch.float64).index_add(0, gb_t, torch.ones(G, dtype=torch.float64))
    D = torch.zeros(B, dtype=torch.float64).index_add(0, gb_t, dist2) / ng

    extra_mass = (mass_all * (1 - required)).sum(1) + m_other.sum((-1, -2)) / hw
    X = _floor(1.0 / (1.0 + (extra_mass / EXTRA_E0) ** 2))

    # relation: groups of a relation scene are consecutive (object 0, then object 1)
    R = torch.ones(B, dtype=torch.float64)
    rel_b = [b for b, sc in enumerate(scenes) if sc.relation is not None]
    if rel_b:
        first_of = {}
        for i, b in enumerate(gb):
            first_of.setdefault(b, i)
        i0 = torch.tensor([first_of[b] for b in rel_b])
        axis = torch.tensor([_RELATION_AXIS[scenes[b].relation][0] for b in rel_b])
        sign = torch.tensor([_RELATION_AXIS[scenes[b].relation][1] for b in rel_b], dtype=torch.float64)
        u = centroid[i0 + 1] - centroid[i0]                                   # [R,2]
        prim = sign * u.gather(1, axis[:, None])[:, 0]
        orth = u.gather(1, (1 - axis)[:, None])[:, 0]
        r = torch.sigmoid((prim - torch.sqrt(orth * orth + 1e-4)) / REL_SCALE)
        R = R.index_copy(0, torch.tensor(rel_b), _floor(r, relation_floor))

    req_m = m * required[:, :, None, None]
    fill = (req_m * req_m).sum((1, 2, 3)) / (req_m.sum((1, 2, 3)) + 1e-9)
    Q = 1.0 - Q_SHAPE * (1.0 - torch.exp(-D / Q_SHAPE_D)) - Q_FILL * (1.0 - fill)

    score = X * R * Q * P * C * S
    chi_img = torch.zeros(B, dtype=torch.float64).index_add(0, gb_t, chi)
    return {"score": score, "presence": P, "count": C, "shape": S, "extra": X, "relation": R,
            "quality": Q, "chi": chi_img, "extra_mass": extra_mass, "fill": fill, "shape_dist2": D}


def score(images: torch.Tensor, scenes, shape_floor: Optional[float] = None,
          relation_floor: Optional[float] = None) -> Union[float, torch.Tensor]:
    """images [3,H,W] or [B,3,H,W] in [0,1]; scenes: a Scene/prompt (shared) or one per image.
    Returns a float for a single image, else Tensor[B] (float64). See the module docstring."""
    single = images.dim() == 3
    out = score_terms(images, scenes, shape_floor, relation_floor)["score"]
    return float(out[0]) if single else out
