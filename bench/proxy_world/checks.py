"""Sanity figures of the proxy-world evaluator (printed by the benchmark report).

``evaluator_report`` scores, for n sampled prompts: the canonical render, three jittered renders
(different seeds; the tie rate is over their 3n pairs), and single-attribute corruptions of the first jittered render that keep
everything else (positions, sizes, shades) identical:

- ``swap_colors``    relation scenes: the two objects exchange colours;
- ``wrong_color``    one object (relation) / the object (count) gets a colour absent from the prompt;
- ``wrong_shape``    one object (relation) / every copy (count) gets another shape;
- ``wrong_relation`` relation scenes: another relation (opposite or orthogonal);
- ``wrong_count``    count scenes: count +-1; relation scenes: a duplicate of one of the objects;
- ``missing_object`` one drawn object removed (a count-1 scene becomes empty);
- ``extra_object``   one object of a colour absent from the prompt added at the freest spot.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict, List

import numpy as np

from .evaluator import score_terms
from .grammar import COLORS, RELATIONS, SHAPES, Obj, Scene, sample_scene
from .render import Layout, Placed, free_spot, layout_scene, rasterize

log = logging.getLogger(__name__)

CORRUPTIONS = ("swap_colors", "wrong_color", "wrong_shape", "wrong_relation", "wrong_count",
               "missing_object", "extra_object")
TIE_EPS = 1e-4


def _other(g: np.random.Generator, options, exclude) -> str:
    pool = [o for o in options if o not in exclude]
    return pool[int(g.integers(len(pool)))]


def corrupt(scene: Scene, kind: str, seed: int, g: np.random.Generator):
    """Layout of ``scene`` drawn with ``seed`` and one attribute changed, or None when ``kind``
    does not apply to the scene."""
    rel = scene.relation is not None
    objs = scene.objects
    used = {o.color for o in objs}
    if kind == "swap_colors":
        if not rel:
            return None
        a, b = objs
        return layout_scene(Scene((Obj(a.shape, b.color), Obj(b.shape, a.color)), scene.relation), seed)
    if kind == "wrong_color":
        i = int(g.integers(len(objs)))
        new = list(objs)
        new[i] = Obj(objs[i].shape, _other(g, COLORS, used))
        return layout_scene(Scene(tuple(new), scene.relation, scene.count), seed)
    if kind == "wrong_shape":
        i = int(g.integers(len(objs)))
        new = list(objs)
        new[i] = Obj(_other(g, SHAPES, {objs[i].shape}), objs[i].color)
        return layout_scene(Scene(tuple(new), scene.relation, scene.count), seed)
    if kind == "wrong_relation":
        if not rel:
            return None
        return layout_scene(Scene(objs, _other(g, RELATIONS, {scene.relation})), seed)
    if kind == "wrong_count":
        if not rel:
            n = scene.count
            new_n = 2 if n in (1, 3) else int(g.choice([1, 3]))
            return layout_scene(Scene(objs, None, new_n), seed)
        lay = layout_scene(scene, seed)
        src = lay[int(g.integers(2))]
        size = min(src.size, 0.12)
        x, y = free_spot(lay, size, src.shape, g)
        return lay + (replace(src, x=x, y=y, size=size),)
    if kind == "missing_object":
        lay = layout_scene(scene, seed)
        i = int(g.integers(len(lay)))
        return lay[:i] + lay[i + 1:]
    if kind == "extra_object":
        lay = layout_scene(scene, seed)
        shape = SHAPES[int(g.integers(len(SHAPES)))]
        color = _other(g, COLORS, used)
        size = 0.12
        x, y = free_spot(lay, size, shape, g)
        return lay + (Placed(shape, color, x, y, size),)
    raise ValueError(f"unknown corruption {kind!r}")


def evaluator_report(n: int = 200, seed: int = 0, size: int = 32) -> Dict:
    """Scores of correct and corrupted renders of ``n`` sampled prompts; see the module docstring.

    Returns {"n", "canonical": {mean, min}, "jittered": {mean, min}, "tie_rate", "tie_pairs",
    "corruptions": {kind: {n, mean, max, frac_below_correct}}, "factors_jittered": mean of every
    factor on the jittered renders}.
    """
    g = np.random.default_rng(seed)
    scenes: List[Scene] = [sample_scene(g) for _ in range(n)]
    seeds = g.integers(0, 2 ** 31 - 1, size=(n, 3)).tolist()
    lays: List[Layout] = []
    tags = []   # (kind, scene index)
    for i, sc in enumerate(scenes):
        lays.append(layout_scene(sc))
        tags.append(("canonical", i))
        lays.append(layout_scene(sc, seeds[i][0]))
        tags.append(("jittered", i))
        lays.append(layout_scene(sc, seeds[i][1]))
        tags.append(("jittered2", i))
        lays.append(layout_scene(sc, seeds[i][2]))
        tags.append(("jittered3", i))
        for kind in CORRUPTIONS:
            lay = corrupt(sc, kind, seeds[i][0], g)
            if lay is not None:
                lays.append(lay)
                tags.append((kind, i))
    imgs = rasterize(lays, size)
    terms = score_terms(imgs, [scenes[i] for _, i in tags])
    s = terms["score"]
    by: Dict[str, Dict[int, float]] = {}
    rows: Dict[str, List[int]] = {}
    for r, (kind, i) in enumerate(tags):
        by.setdefault(kind, {})[i] = float(s[r])
        rows.setdefault(kind, []).append(r)
    canon = np.array([by["canonical"][i] for i in range(n)])
    jit = np.array([by["jittered"][i] for i in range(n)])
    jit2 = np.array([by["jittered2"][i] for i in range(n)])
    jit3 = np.array([by["jittered3"][i] for i in range(n)])
    pairs = np.concatenate([np.abs(jit - jit2), np.abs(jit - jit3), np.abs(jit2 - jit3)])
    out = {
        "n": n,
        "canonical": {"mean": float(canon.mean()), "min": float(canon.min())},
        "jittered": {"mean": float(np.concatenate([jit, jit2, jit3]).mean()),
                     "min": float(np.concatenate([jit, jit2, jit3]).min())},
        "tie_rate": float(np.mean(pairs < TIE_EPS)),
        "tie_pairs": int(pairs.size),
        "corruptions": {},
        "factors_jittered": {k: float(v[rows["jittered"]].mean()) for k, v in terms.items()},
    }
    for kind in CORRUPTIONS:
        d = by.get(kind, {})
        if not d:
            continue
        idx = sorted(d)
        vals = np.array([d[i] for i in idx])
        ref = np.array([by["jittered"][i] for i in idx])
        out["corruptions"][kind] = {"n": len(idx), "mean": float(vals.mean()), "max": float(vals.max()),
                                    "frac_below_correct": float(np.mean(vals < ref))}
    log.info("proxy-world evaluator: canonical %.3f, jittered %.3f, tie rate %.4f",
             out["canonical"]["mean"], out["jittered"]["mean"], out["tie_rate"])
    for kind, v in out["corruptions"].items():
        log.info("  %-15s n=%3d mean %.3f max %.3f below-correct %.3f", kind, v["n"], v["mean"], v["max"],
                 v["frac_below_correct"])
    return out
