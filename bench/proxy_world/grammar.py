"""Prompt grammar of the proxy world.

Two kinds of scene, both with a closed vocabulary:

* relation scenes: two objects with different colours and a spatial relation,
  ``"a red circle left of a blue square"`` -> ``Scene((Obj("circle", "red"), Obj("square", "blue")),
  "left of", 1)``. The relation reads "objects[0] <relation> objects[1]" (image y grows downwards,
  so "above" means a smaller y). The two colours always differ: colour is what binds a shape to
  its object, so the evaluator can tell the two apart.
* count scenes: 1-3 copies of one object, ``"two green triangles"`` ->
  ``Scene((Obj("triangle", "green"),), None, 2)``; count 1 reads ``"a green triangle"``.

With 5 colours, 4 shapes and 4 relations there are 5*4*4*4*4 = 1280 relation prompts and
5*4*3 = 60 count prompts (1340 distinct prompts).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

COLORS: Tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
RELATIONS: Tuple[str, ...] = ("left of", "right of", "above", "below")
COUNTS: Tuple[int, ...] = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

_SINGULAR = {v: k for k, v in PLURALS.items()}
_COUNT_OF_WORD = {v: k for k, v in COUNT_WORDS.items()}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLORS}")


@dataclass(frozen=True)
class Scene:
    """``objects``: 2 objects for a relation scene, 1 for a count scene; ``relation``: one of
    RELATIONS or None; ``count``: copies of the single object (1 for relation scenes)."""

    objects: Tuple[Obj, ...]
    relation: Optional[str] = None
    count: int = 1

    def __post_init__(self):
        objs = tuple(self.objects)
        object.__setattr__(self, "objects", objs)
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
            if len(objs) != 2 or self.count != 1:
                raise ValueError("a relation scene has exactly two objects and count 1")
            if objs[0].color == objs[1].color:
                raise ValueError("the two objects of a relation scene must have different colours")
        else:
            if len(objs) != 1:
                raise ValueError("a scene without relation has exactly one object (repeated `count` times)")
            if self.count not in COUNTS:
                raise ValueError(f"count must be one of {COUNTS}, got {self.count}")

    @property
    def kind(self) -> str:
        return "relation" if self.relation is not None else "count"

    def instances(self) -> Tuple[Obj, ...]:
        """Every object drawn in the image, in drawing order."""
        if self.relation is not None:
            return self.objects
        return self.objects * self.count

    def groups(self) -> Tuple[Tuple[Obj, int], ...]:
        """(object, number of copies) per distinct colour required by the prompt."""
        if self.relation is not None:
            return ((self.objects[0], 1), (self.objects[1], 1))
        return ((self.objects[0], self.count),)


def opposite(relation: str) -> str:
    return _OPPOSITE[relation]


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, random.Random):
        return np.random.default_rng(rng.getrandbits(63))
    raise TypeError(f"rng must be a numpy Generator, random.Random or an int seed, got {type(rng)}")


def sample_scene(rng=None, count_fraction: float = 0.3) -> Scene:
    """A random scene: a count scene with probability ``count_fraction``, else a relation scene."""
    g = _as_rng(rng)
    if g.random() < count_fraction:
        return Scene((Obj(SHAPES[g.integers(len(SHAPES))], COLORS[g.integers(len(COLORS))]),), None,
                     int(COUNTS[g.integers(len(COUNTS))]))
    c0, c1 = g.choice(len(COLORS), size=2, replace=False)
    s0, s1 = g.integers(len(SHAPES), size=2)
    return Scene((Obj(SHAPES[s0], COLORS[c0]), Obj(SHAPES[s1], COLORS[c1])),
                 RELATIONS[g.integers(len(RELATIONS))], 1)


def _np(obj: Obj) -> str:
    return f"a {obj.color} {obj.shape}"


def prompt_of(scene: Scene) -> str:
    if scene.relation is not None:
        a, b = scene.objects
        return f"{_np(a)} {scene.relation} {_np(b)}"
    obj = scene.objects[0]
    if scene.count == 1:
        return _np(obj)
    return f"{COUNT_WORDS[scene.count]} {obj.color} {PLURALS[obj.shape]}"


def parse_prompt(prompt: str) -> Scene:
    """Inverse of prompt_of (case and surrounding/duplicate whitespace are ignored)."""
    words = prompt.lower().split()
    try:
        if len(words) == 3:
            n = _COUNT_OF_WORD[words[0]]
            shape = words[2] if n == 1 else _SINGULAR[words[2]]
            return Scene((Obj(shape, words[1]),), None, n)
        if len(words) in (7, 8) and words[0] == "a":
            rel_len = 2 if words[3] in ("left", "right") else 1
            relation = " ".join(words[3:3 + rel_len])
            rest = words[3 + rel_len:]
            if len(rest) != 3 or rest[0] != "a":
                raise ValueError
            return Scene((Obj(words[2], words[1]), Obj(rest[2], rest[1])), relation, 1)
    except (KeyError, ValueError, IndexError) as err:
        raise ValueError(f"not a proxy-world prompt: {prompt!r} ({err})") from None
    raise ValueError(f"not a proxy-world prompt: {prompt!r}")


def every_scene() -> List[Scene]:
    """All 1340 scenes in a fixed canonical order (relation scenes first)."""
    out = []
    for c0 in COLORS:
        for s0 in SHAPES:
            for rel in RELATIONS:
                for c1 in COLORS:
                    if c1 == c0:
                        continue
                    for s1 in SHAPES:
                        out.append(Scene((Obj(s0, c0), Obj(s1, c1)), rel, 1))
    for c in COLORS:
        for s in SHAPES:
            for n in COUNTS:
                out.append(Scene((Obj(s, c),), None, n))
    return out


def all_prompts(limit: Optional[int] = None, seed: int = 0, count_fraction: float = 0.25) -> List[str]:
    """Deterministic list of distinct prompts. Relation and count prompts are shuffled separately
    (by ``seed``) and interleaved so that about ``count_fraction`` of any prefix are count prompts
    (until the 60 count prompts run out). ``limit`` None gives all 1340."""
    g = np.random.default_rng(seed)
    scenes = every_scene()
    rel = [prompt_of(s) for s in scenes if s.relation is not None]
    cnt = [prompt_of(s) for s in scenes if s.relation is None]
    rel = [rel[i] for i in g.permutation(len(rel))]
    cnt = [cnt[i] for i in g.permutation(len(cnt))]
    out: List[str] = []
    i = j = 0
    total = len(rel) + len(cnt) if limit is None else min(int(limit), len(rel) + len(cnt))
    while len(out) < total:
        want_count = j < len(cnt) and (i >= len(rel) or (j + 1) <= count_fraction * (len(out) + 1) + 1e-9)
        if want_count:
            out.append(cnt[j])
            j += 1
        else:
            out.append(rel[i])
            i += 1
    return out


def split_prompts(prompts: Sequence[str], seed: int = 0, held_out: float = 0.2) -> Tuple[List[str], List[str]]:
    """Split by prompt into (train, held_out), stratified by scene kind, deterministic in ``seed``.
    Order within each part follows the input order. Duplicates are removed first."""
    uniq = list(dict.fromkeys(prompts))
    g = np.random.default_rng(seed)
    held = set()
    for kind in ("relation", "count"):
        idx = [k for k, p in enumerate(uniq) if parse_prompt(p).kind == kind]
        if not idx:
            continue
        n_held = int(round(held_out * len(idx)))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        for k in g.permutation(idx)[:n_held]:
            held.add(int(k))
    train = [p for k, p in enumerate(uniq) if k not in held]
    test = [p for k, p in enumerate(uniq) if k in held]
    return train, test


def scenes_of(prompts: Iterable[Union[str, Scene]]) -> List[Scene]:
    return [p if isinstance(p, Scene) else parse_prompt(p) for p in prompts]
