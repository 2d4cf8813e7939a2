"""The noise-aware preview reward (bench/preview_reward.py): its features are the evaluator's own factors, and its
ranker learns which of them rank a prompt's rows."""
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module")
def preview_reward(pack):
    sys.path.append(str(ROOT / "bench"))     # after ComfyUI: the pack's nodes/ must not shadow ComfyUI's nodes
    import preview_reward
    return preview_reward


class StoredRows:
    """What preview_features reads of a dataset: its prompts and each row's x0 latent at a checkpoint."""

    def __init__(self, latents: torch.Tensor, prompts: list[str]):
        self.latents, self.prompts = latents, prompts

    def x0(self, t: float) -> torch.Tensor:
        return self.latents


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_features_are_the_evaluators_factors_of_the_decoded_preview(preview_reward, family):
    from bench.proxy_world import evaluator, grammar, models
    from bench.proxy_world.render import render_batch

    prompts = ["a red circle left of a blue square", "two green triangles", "a white cross above a yellow circle"]
    images = render_batch([grammar.parse_prompt(p) for p in prompts], rng=[0, 1, 2])
    features, scores = preview_reward.preview_features(StoredRows(models.image_to_latent(images, family), prompts),
                                                       family, 0.2)
    terms = evaluator.score_terms(images, [grammar.parse_prompt(p) for p in prompts])
    assert features.shape == (3, len(preview_reward.FEATURES))
    np.testing.assert_allclose(scores, terms["score"].numpy(), rtol=1e-4, atol=1e-6)
    # the score is the product of the six factors: their logs add up to its log
    factors = [preview_reward.FEATURES.index(name) for name in preview_reward.TERMS]
    np.testing.assert_allclose(features[:, factors].sum(1), np.log(scores), rtol=1e-4)
    np.testing.assert_allclose(features[:, preview_reward.FEATURES.index("fill")], terms["fill"].numpy(), rtol=1e-4)


def test_within_pairs_orders_rows_of_one_prompt_only(pack):
    from probe_select.probes.training.distillation import within_pairs
    target = np.array([0.1, 0.5, 0.3, 0.9, 0.9])
    groups = np.array([0, 0, 0, 1, 1])
    better, worse = within_pairs(target, groups)
    assert sorted(zip(better.tolist(), worse.tolist())) == [(1, 0), (1, 2), (2, 0)]     # the tie makes no pair


def test_ranker_finds_the_feature_that_ranks_a_prompts_rows(preview_reward):
    rng = np.random.default_rng(0)
    prompts, rows = 60, 8
    groups = np.repeat(np.arange(prompts), rows)
    features = rng.normal(size=(prompts * rows, len(preview_reward.FEATURES)))
    relation = preview_reward.FEATURES.index("relation")
    # a prompt-level offset on another feature moves every row of a prompt alike: it must not be learned
    features[:, 0] += 5.0 * np.repeat(rng.normal(size=prompts), rows)
    target = features[:, relation] + 0.1 * rng.normal(size=len(groups)) + np.repeat(rng.normal(size=prompts), rows)
    fit, held = groups < 40, groups >= 40
    ranker = preview_reward.fit_ranker(features[fit], target[fit], groups[fit])
    assert preview_reward.within(ranker(features[held]), target[held], groups[held]) > 0.9
    weights = ranker.weights()
    assert max(weights, key=lambda name: abs(weights[name])) == "relation" and weights["relation"] > 0
    mlp = preview_reward.fit_ranker(features[fit], target[fit], groups[fit], hidden=16)
    assert mlp.weights() == {} and preview_reward.within(mlp(features[held]), target[held], groups[held]) > 0.8


def test_ranker_refuses_targets_with_nothing_to_rank(preview_reward):
    with pytest.raises(ValueError, match="nothing to rank"):
        preview_reward.fit_ranker(np.ones((4, 9)), np.array([1.0, 1.0, 2.0, 2.0]), np.array([0, 0, 1, 1]))


def test_coarser_read_is_the_evaluator_on_the_latent_pooled_once_more(preview_reward):
    from bench.proxy_world import evaluator, grammar, models
    from bench.proxy_world.render import render_batch

    prompts = ["a red circle left of a blue square", "two green triangles"]
    images = render_batch([grammar.parse_prompt(p) for p in prompts], rng=[3, 4])
    latents = models.image_to_latent(images, "unet")
    rows = StoredRows(latents, prompts)
    coarse = torch.nn.functional.interpolate(models.latent_to_image(torch.nn.functional.avg_pool2d(latents, 2), "unet"),
                                             size=models.IMAGE_SIZE, mode="bilinear", align_corners=False)
    features, scores = preview_reward.preview_features(rows, "unet", 0.2, coarser=1)
    expected = evaluator.score_terms(coarse, [grammar.parse_prompt(p) for p in prompts])["score"].numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    both = preview_reward.side_by_side(preview_reward.preview_reads(rows, "unet", 0.2, scales=2), scales=2)
    assert both.shape == (2, 2 * len(preview_reward.FEATURES))
    np.testing.assert_allclose(both[:, len(preview_reward.FEATURES):], features)
    np.testing.assert_allclose(both[:, :len(preview_reward.FEATURES)],
                               preview_reward.preview_features(rows, "unet", 0.2)[0])
    names = preview_reward.feature_names(2)
    assert names[:9] == preview_reward.FEATURES and names[9] == "presence@2x" and len(names) == 18
    assert [preview_reward.factor_of(n) for n in names] == list(preview_reward.FEATURES) * 2


def test_prompt_folds_keep_a_prompts_rows_together_and_are_even(preview_reward):
    groups = np.repeat(np.arange(13), 4)
    folds = preview_reward.prompt_folds(groups, folds=5, seed=1)
    for g in range(13):
        assert len(set(folds[groups == g].tolist())) == 1
    prompts_per_fold = np.bincount(folds[::4], minlength=5)
    assert sorted(prompts_per_fold.tolist()) == [2, 2, 3, 3, 3]
    assert not np.array_equal(folds, preview_reward.prompt_folds(groups, folds=5, seed=2))
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        preview_reward.prompt_folds(np.array([0, 0, 1, 1]), folds=5)


def test_cross_validation_chooses_the_read_that_carries_the_ranking(preview_reward):
    rng = np.random.default_rng(0)
    prompts, rows = 40, 6
    groups = np.repeat(np.arange(prompts), rows)
    width = len(preview_reward.FEATURES)
    fine = rng.normal(size=(len(groups), width))
    coarse = rng.normal(size=(len(groups), width))
    target = coarse[:, 4] + 0.2 * rng.normal(size=len(groups))      # only the coarser read's relation ranks
    best, cv, ranker = preview_reward.choose_ranker({1: fine, 2: np.concatenate([fine, coarse], 1)}, target, groups,
                                                    folds=3, seeds=2)
    assert best[0] == 2 and set(cv) == {(1, 0), (1, 16), (2, 0), (2, 16)}
    assert cv[best] > 0.8 and max(cv[(1, 0)], cv[(1, 16)]) < 0.3
    assert len(ranker.rankers) == 2
    if best[1] == 0:      # linear: the mean weights name the coarser read's relation
        weights = ranker.weights()
        assert max(weights, key=lambda name: abs(weights[name])) == "relation@2x"
    scores = ranker(np.concatenate([fine, coarse], 1))
    np.testing.assert_allclose(scores, np.mean([r(np.concatenate([fine, coarse], 1)) for r in ranker.rankers], 0))


def _match(compute, chosen_on, reward=0.7):
    return {"schedule": "8: 0.1->2", "compute": compute, "chosen_on": chosen_on, "reward": reward, "best_of_8": 0.69}


def _entry():
    every = {"one stage at 0.1 / tuned_preview": [_match(3.0, 0), _match(2.0, 1, 0.6)],
             "two stages (0.1, 0.4) / tuned_preview": [_match(2.5, 0)],
             "two stages (0.1, 0.4) / oracle": [_match(1.0, 0), _match(1.0, 1)],
             "one stage at 0.4 / tuned_preview": []}
    by_t = {f"{t:g}": {"tuned": {"within": 0.5 + t, "low": 0.4, "high": 0.9}, "x0_preview": {"within": t}}
            for t in (0.1, 0.2, 0.3, 0.4)}         # string keys: as read back from the JSON
    return {"best_of_8": {"compute": 8.0}, "by_t": by_t, "every_checkpoint": {"match_best_of_8": every},
            "match_best_of_8": {"one stage at 0.2 / tuned_preview": [_match(4.0, 0), _match(3.6, 1)],
                                "two stages (0.2, 0.4) / tuned_preview": [_match(4.4, 1)]}}


def test_the_cheapest_cut_anywhere_is_chosen_on_each_half_apart(preview_reward):
    cheapest = preview_reward.cheapest_anywhere(_entry())
    assert [(method, match["compute"], match["chosen_on"]) for method, match in cheapest] == [
        ("two stages (0.1, 0.4)", 2.5, 0), ("one stage at 0.1", 2.0, 1)]      # the oracle's cheaper cuts are not its
    assert preview_reward.cheapest_anywhere(_entry(), scorer="oracle")[0][1]["compute"] == 1.0
    assert preview_reward.cheapest_anywhere({"every_checkpoint": {"match_best_of_8": {}}}) == []


def test_the_reports_sentence_reads_the_figures_back_from_json(preview_reward):
    line = preview_reward.summary_line("unet", _entry())
    assert "at t = 0.2 0.700 [0.400, 0.900] against the x0 preview's 0.200, at t = 0.1 0.600 against 0.100" in line
    assert "0.50 / 0.45 of its compute in one stage at 0.2 and at 0.55 (one half only) in two stages" in line
    assert ("two stages (0.1, 0.4) at 0.31, reaching 0.700 on the other half against best-of-8's 0.690; "
            "one stage at 0.1 at 0.25, reaching 0.600") in line


def test_a_family_without_its_sets_is_skipped_and_none_writes_nothing(preview_reward, tmp_path):
    assert preview_reward.measure("unet", tmp_path / "cache") == {}
    with pytest.raises(SystemExit, match="no family has the proxy bench's training and held-out sets"):
        preview_reward.report(["unet", "dit"], tmp_path / "cache", tmp_path / "out", "bench/preview_reward.py")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
