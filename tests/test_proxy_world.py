"""Proxy world: grammar, tokenizer, renderer and the analytic evaluator (bench/proxy_world)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from bench.proxy_world import (CORRUPTIONS, RELATIONS, VOCAB, Obj, Scene, all_prompts,
                               corrupt, every_scene, evaluator_report, layout_scene, parse_prompt,
                               prompt_of, rasterize, render, render_batch, sample_scene, score,
                               score_terms, split_prompts, tokenize, tokenize_batch)
from bench.proxy_world.tokens import UNK_ID


# ----------------------------------------------------------------------------- grammar

def test_prompt_scene_round_trip_for_every_scene():
    scenes = every_scene()
    assert len(scenes) == 1340
    prompts = [prompt_of(s) for s in scenes]
    assert len(set(prompts)) == len(prompts)
    for s, p in zip(scenes, prompts):
        assert parse_prompt(p) == s
        assert prompt_of(parse_prompt(p)) == p


def test_prompt_forms():
    s = Scene((Obj("circle", "red"), Obj("square", "blue")), "left of")
    assert prompt_of(s) == "a red circle left of a blue square"
    assert parse_prompt("two green triangles") == Scene((Obj("triangle", "green"),), None, 2)
    assert parse_prompt("A  White Cross") == Scene((Obj("cross", "white"),), None, 1)
    assert parse_prompt("three yellow crosses").instances() == (Obj("cross", "yellow"),) * 3
    for bad in ["", "a red", "two green triangle", "a red circle near a blue square", "four red circles",
                "a purple circle", "a red circle left of a red square"]:
        with pytest.raises(ValueError):
            parse_prompt(bad)
    with pytest.raises(ValueError):
        Scene((Obj("circle", "red"), Obj("circle", "red")), "above")
    with pytest.raises(ValueError):
        Scene((Obj("circle", "red"),), None, 4)


def test_sample_scene_deterministic_and_covers_both_kinds():
    a = [sample_scene(np.random.default_rng(3)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    g1, g2 = np.random.default_rng(5), np.random.default_rng(5)
    s1 = [sample_scene(g1) for _ in range(300)]
    s2 = [sample_scene(g2) for _ in range(300)]
    assert s1 == s2
    kinds = {s.kind for s in s1}
    assert kinds == {"relation", "count"}
    assert {s.relation for s in s1 if s.relation} == set(RELATIONS)
    assert {s.count for s in s1 if s.kind == "count"} == {1, 2, 3}


def test_all_prompts_and_split():
    p = all_prompts(400, seed=0)
    assert p == all_prompts(400, seed=0) and p != all_prompts(400, seed=1)
    assert len(p) == len(set(p)) == 400
    assert all_prompts(seed=0)[:400] == p and len(all_prompts()) == 1340
    assert sum(parse_prompt(x).kind == "count" for x in p[:100]) >= 20
    train, held = split_prompts(p, seed=0)
    assert (train, held) == split_prompts(p, seed=0)
    assert not set(train) & set(held) and set(train) | set(held) == set(p)
    assert 0.15 < len(held) / len(p) < 0.25
    assert {parse_prompt(x).kind for x in held} == {"relation", "count"}


# ----------------------------------------------------------------------------- tokens

def test_tokenizer_fixed_and_injective():
    t = tokenize("a red circle left of a blue square")
    assert t.dtype == torch.long and t.shape == (12,)
    assert torch.equal(t, tokenize("a red circle left of a blue square"))
    assert t[8:].eq(0).all() and t[:8].ne(0).all()
    assert tokenize("two green triangles", length=5).tolist()[3:] == [0, 0]
    assert tokenize("a mauve circle")[1].item() == UNK_ID
    assert VOCAB[0] == "<pad>" and len(set(VOCAB)) == len(VOCAB)
    prompts = all_prompts()
    toks = tokenize_batch(prompts)
    assert toks.shape == (1340, 12)
    assert len({tuple(r) for r in toks.tolist()}) == 1340   # injective on the grammar


# ----------------------------------------------------------------------------- render

def test_render_shape_range_determinism():
    s = parse_prompt("a red circle left of a blue square")
    x = render(s)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x, render(s))                               # canonical
    assert torch.equal(render(s, rng=7), render(s, rng=7))         # same seed
    assert not torch.equal(render(s, rng=7), render(s, rng=8))
    assert not torch.equal(render(s, rng=7), x)
    assert render(s, size=64).shape == (3, 64, 64)
    scenes = [parse_prompt(p) for p in all_prompts(20)]
    batch = render_batch(scenes, rng=list(range(20)))
    for i in (0, 7, 19):
        assert torch.equal(batch[i], render(scenes[i], rng=i))
    # dark background, soft (anti-aliased) edges: some pixels strictly between background and colour
    assert x[:, 0, 0].max() < 0.1
    red = x[0]
    assert ((red > 0.2) & (red < 0.8)).any()


def test_render_layout_consistent_with_prompt():
    for i, s in enumerate(every_scene()[::7]):
        lay = layout_scene(s, rng=i)
        assert len(lay) == len(s.instances())
        for p in lay:
            assert p.extent <= p.x <= 1 - p.extent and p.extent <= p.y <= 1 - p.extent
        if s.relation:
            a, b = lay
            dx, dy = b.x - a.x, b.y - a.y
            prim = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[s.relation]
            orth = dy if s.relation in ("left of", "right of") else dx
            assert prim >= 0.3 and abs(orth) <= 0.13
        else:
            for j in range(len(lay)):
                for k in range(j):
                    d = np.hypot(lay[j].x - lay[k].x, lay[j].y - lay[k].y)
                    assert d > lay[j].extent + lay[k].extent + 0.05


def test_render_batch_of_many_scenes_is_seeded():
    # (how fast it renders is for benchmarks, not a timed test)
    g = np.random.default_rng(0)
    scenes = [sample_scene(g) for _ in range(1000)]
    x = render_batch(scenes, rng=1)
    assert x.shape == (1000, 3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x, render_batch(scenes, rng=1)) and not torch.equal(x, render_batch(scenes, rng=2))


# ----------------------------------------------------------------------------- evaluator

@pytest.fixture(scope="module")
def report():
    return evaluator_report(n=200, seed=0)


def test_evaluator_high_on_ground_truth(report):
    assert report["canonical"]["mean"] >= 0.85
    assert report["jittered"]["mean"] >= 0.85
    assert report["jittered"]["min"] >= 0.7


def test_evaluator_low_on_each_single_corruption(report):
    assert set(report["corruptions"]) == set(CORRUPTIONS)
    for kind, r in report["corruptions"].items():
        assert r["n"] >= 100, kind
        # a wrong shape costs at most 20% (the tolerant shape factor): lower than the right image,
        # but not a failure of the prompt; every other corruption fails it
        if kind == "wrong_shape":
            assert 0.5 < r["mean"] <= 0.8 * report["jittered"]["mean"] + 1e-9, (kind, r)
        else:
            assert r["mean"] <= 0.5, (kind, r)
        assert r["max"] < report["jittered"]["min"], (kind, r)
        assert r["frac_below_correct"] >= 0.95, (kind, r)


def test_evaluator_few_ties(report):
    assert report["tie_pairs"] == 600
    assert report["tie_rate"] < 0.01


def test_score_api_and_determinism():
    s = parse_prompt("two blue crosses")
    x = render(s, rng=3)
    v = score(x, s)
    assert isinstance(v, float) and 0.0 <= v <= 1.0
    assert v == score(x, "two blue crosses") == score(x.clone(), s)
    xb = torch.stack([x, render(s, rng=4)])
    vb = score(xb, s)
    assert vb.shape == (2,) and vb[0].item() == pytest.approx(v, abs=1e-12)
    assert torch.equal(vb, score(xb, [s, "two blue crosses"]))
    # a single-scene batch larger than one evaluation chunk gives the same numbers
    scenes = [parse_prompt(p) for p in all_prompts(300, seed=3)]
    imgs = render_batch(scenes, rng=5)
    full = score(imgs, scenes)
    assert torch.allclose(full[250:260], score(imgs[250:260], scenes[250:260]), atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        score(xb, [s])


def test_score_terms_explain_failures():
    s = parse_prompt("a red circle left of a blue square")
    good = score_terms(render(s, rng=1), s)
    assert good["chi"].item() == pytest.approx(2.0, abs=0.05)
    flipped = score_terms(render(parse_prompt("a red circle right of a blue square"), rng=1), s)
    # a wrong relation fails the prompt but costs less than a wrong object (relation floor 0.4)
    assert flipped["relation"].item() == pytest.approx(0.4, abs=0.02) and flipped["shape"].item() > 0.9
    assert 0.1 < flipped["score"].item() < 0.4 < 0.5 < good["score"].item()
    wrong_shape = score_terms(render(parse_prompt("a red triangle left of a blue square"), rng=1), s)
    # the shape factor is tolerant: floor 0.8 (a wrong shape costs 20%); strict on request
    assert wrong_shape["shape"].item() < 0.81 and good["shape"].item() > 0.99 and wrong_shape["relation"].item() > 0.9
    strict = score_terms(render(parse_prompt("a red triangle left of a blue square"), rng=1), s, shape_floor=0.1)
    assert strict["shape"].item() < 0.2 and strict["score"].item() < 0.2 < 0.5 < wrong_shape["score"].item()
    three = parse_prompt("three green circles")
    two = score_terms(render(parse_prompt("two green circles"), rng=2), three)
    assert two["chi"].item() == pytest.approx(2.0, abs=0.1) and two["count"].item() < 0.2


def test_score_is_smooth_when_an_object_moves():
    for prompt in ["a red circle left of a blue square", "three yellow crosses"]:
        s = parse_prompt(prompt)
        lay = layout_scene(s, rng=5)
        shifts = np.linspace(0.0, 0.02, 41)      # steps of 0.016 px
        lays = [(replace(lay[0], x=lay[0].x + d),) + lay[1:] for d in shifts]
        v = score(rasterize(lays), s).numpy()
        steps = np.abs(np.diff(v))
        assert steps.max() < 0.01, prompt          # no jump
        assert (steps > 0).all(), prompt           # never flat: every sub-pixel move is seen
    # moving the left object across the right one: the score falls continuously from high to low
    s = parse_prompt("a red circle left of a blue square")
    lay = layout_scene(s)
    xs = np.linspace(lay[0].x, 0.95, 121)
    lays = [(replace(lay[0], x=float(x), y=lay[0].y - 0.3),) + lay[1:] for x in xs]
    v = score(rasterize(lays), s).numpy()
    # ... to a failure that keeps the relation's floor (0.4), above a wrong object's 0.1
    assert v[0] > 0.8 and 0.1 < v[-1] < 0.4 < 0.5
    assert np.abs(np.diff(v)).max() < 0.1


def test_score_differentiable():
    s = parse_prompt("two green triangles")
    x = render(s, rng=3).double().requires_grad_()
    score_terms(x, s)["score"].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_score_robust_to_mild_noise_and_blur():
    g = np.random.default_rng(3)
    scenes = [sample_scene(g) for _ in range(100)]
    good = rasterize([layout_scene(s, 100 + i) for i, s in enumerate(scenes)])
    bad = rasterize([corrupt(s, "wrong_shape", 100 + i, g) for i, s in enumerate(scenes)])
    gen = torch.Generator().manual_seed(0)
    noisy = lambda x: x + 0.03 * torch.randn(x.shape, generator=gen)
    sg, sb = score(noisy(good), scenes), score(noisy(bad), scenes)
    assert sg.mean() > 0.8 and (sg > sb).float().mean() >= 0.95
    k = torch.tensor([0.25, 0.5, 0.25])
    blur = lambda x: torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"),
        (k[:, None] * k[None]).expand(3, 1, 3, 3), groups=3)
    sg, sb = score(blur(good), scenes), score(blur(bad), scenes)
    assert sg.mean() > 0.7 and (sg > sb).float().mean() >= 0.95


def test_empty_and_degenerate_images_are_finite_and_low():
    for x in [torch.zeros(3, 32, 32), torch.ones(3, 32, 32), torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))]:
        for p in ["three red circles", "a red circle left of a blue square", "a white cross"]:
            v = score(x, p)
            assert np.isfinite(v) and 0.0 <= v < 0.2
