"""The tap, split sampling and resume on tiny random models of every supported family."""
import pytest
import torch

from helpers import ApplyModelRecorder, max_rel_diff, with_recorder
from devtools.tiny_models import FAMILIES, build_tiny


@pytest.fixture(scope="module")
def mods(pack):
    from probe_select.nodes import nodes_tap as tap
    from probe_select.nodes.engine import capture, families, split_sampling
    from probe_select.probes import features

    class M:
        pass
    m = M()
    m.capture, m.families, m.split, m.tap, m.features = capture, families, split_sampling, tap, features
    return m


def _early(mods, model, tiny, n=3, steps=5, checkpoint=0.4, cfg=5.0, sampler="euler", seed=100, size=None):
    latent = tiny.empty_latent(1, size or (16 if tiny.latent_channels == 16 else 8))
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    return mods.split.run_early(model, pos, neg, latent, seed, n, steps, cfg, sampler, "normal", checkpoint), pos, neg


@pytest.mark.parametrize("family", FAMILIES)
def test_tap_captures_positive_rows_at_checkpoint_step(mods, family):
    tiny = build_tiny(family)
    tapped = mods.tap.apply_tap(tiny.patcher, "auto", 4)
    tap = mods.capture.find_tap(tapped)
    assert mods.families.model_family(tiny.patcher) == family
    recorder = ApplyModelRecorder(tap.path)
    result, _, _ = _early(mods, with_recorder(tapped, recorder), tiny, n=3, steps=5, checkpoint=0.4)

    acts = result.activations
    assert acts.step == 2 and acts.steps == 5 and acts.family == family and acts.tap == tap.path
    assert acts.features.dtype == torch.float16 and acts.features.shape[0] == 3
    assert acts.features.shape[-2:] == (4, 4)
    assert acts.seeds == [100, 101, 102]

    # Euler with CFG: one call per step, chunks [uncond, cond] or [cond, uncond]: recompute both halves.
    assert len(recorder.calls) == 2
    call = recorder.calls[1]                  # the last early step (index s-1 = 1) is the checkpoint
    assert sorted(call["flags"]) == [0, 1]
    latent_hw = tuple(result.latent["samples"].shape[-2:])
    dm = tiny.patcher.model.diffusion_model
    patch = getattr(dm, "patch_size", 1)
    patch = patch[-1] if isinstance(patch, (tuple, list)) else int(patch)
    fmap = mods.capture.block_output_to_map(call["output"], family, tap.path, latent_hw, patch, 8)
    chunks = fmap.chunk(2)
    cond = mods.features.pool_feature_map(chunks[call["flags"].index(0)], 4)
    uncond = mods.features.pool_feature_map(chunks[call["flags"].index(1)], 4)
    assert torch.equal(acts.features, cond)
    assert not torch.allclose(acts.features.float(), uncond.float(), atol=1e-3)
    # ... and not the step before the checkpoint.
    earlier = mods.capture.block_output_to_map(recorder.calls[0]["output"], family, tap.path, latent_hw, patch, 8)
    earlier_cond = mods.features.pool_feature_map(earlier.chunk(2)[recorder.calls[0]["flags"].index(0)], 4)
    assert not torch.allclose(acts.features.float(), earlier_cond.float(), atol=1e-3)


def test_tap_with_cfg_one_and_split_cond_calls(mods):
    tiny = build_tiny("sd1")
    tapped = mods.tap.apply_tap(tiny.patcher, "auto", 4)
    result, _, _ = _early(mods, tapped, tiny, n=2, steps=4, checkpoint=0.5, cfg=1.0)
    assert result.activations.features.shape[0] == 2

    # Cond and uncond in separate calls (ComfyUI does this under memory pressure): the uncond call is skipped.
    tap = mods.capture.find_tap(tapped)
    session = tap.open_session("r", (0,))
    x = torch.randn(2, 4, 8, 8)

    class Exec:
        class_obj = tiny.patcher.model

        def __call__(self, *args, **kw):
            return tiny.patcher.model.apply_model(*args[:1], args[1], c_crossattn=args[3], transformer_options={})

    cond = tiny.conditioning(1)[0][0].repeat(2, 1, 1)
    t = torch.full((2,), 5.0)
    tap(Exec(), x, t, None, cond, None, {"probe_select_run": "r", "cond_or_uncond": [1]})
    assert session.features == {}
    tap(Exec(), x, t, None, cond, None, {"probe_select_run": "r", "cond_or_uncond": [0]})
    assert session.features[0].shape[0] == 2
    tap.close_session("r")


def test_unknown_tap_path_lists_valid_paths(pack, mods):
    tiny = build_tiny("sd1")
    with pytest.raises(ValueError) as err:
        mods.tap.apply_tap(tiny.patcher, "output_blocks.99.0", 4)
    msg = str(err.value)
    assert "[ProbeSelectTap]" in msg and "output_blocks.99.0" in msg and "output_blocks.1.0" in msg
    # A UNet block container is run child by child: the tap moves to its last child so it fires.
    tapped = mods.tap.apply_tap(tiny.patcher, "output_blocks[1]", 4)
    assert mods.capture.find_tap(tapped).path.startswith("output_blocks.1.")


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "euler_ancestral", "dpmpp_sde"])
def test_kept_candidate_matches_plain_ksampler(mods, sampler):
    import nodes
    from probe_select.probes.scoring import CandidateScores

    tiny = build_tiny("sd1")
    tapped = mods.tap.apply_tap(tiny.patcher, "auto", 4)
    latent = tiny.empty_latent(1, 8)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    steps, cfg, seed = 8, 4.0, 40
    early = mods.split.run_early(tapped, pos, neg, latent, seed, 4, steps, cfg, sampler, "normal", 0.25)
    scores = CandidateScores(torch.tensor([0.1, 0.3, 0.9, 0.2]), "test", early.latent["probe_select"]["run_id"],
                             [40, 41, 42, 43])
    from probe_select.nodes.engine.selection import top_k_or_fail

    kept, _, idx = top_k_or_fail("ProbeSelectTopK", early.latent, scores, 2)
    assert idx == [2, 1]
    finished = mods.split.resume(tiny.patcher, pos, neg, kept, cfg)["samples"]
    for row, s in enumerate([42, 41]):
        (ref,) = nodes.common_ksampler(tiny.patcher, s, steps, cfg, sampler, "normal", pos, neg, latent)
        assert max_rel_diff(finished[row:row + 1], ref["samples"]) <= 1e-5, (sampler, s)


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sd3", "flux"])
@pytest.mark.parametrize("sampler", ["euler_ancestral", "heun"])
def test_resume_reproduces_ksampler_on_other_families(mods, family, sampler):
    import nodes

    tiny = build_tiny(family)
    size = 16 if tiny.latent_channels == 16 else 8
    latent = tiny.empty_latent(1, size)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = mods.split.run_early(tiny.patcher, pos, neg, latent, 7, 2, 6, 3.0, sampler, "simple", 0.34)
    kept = mods.split.select_rows(early.latent, [1])
    finished = mods.split.resume(tiny.patcher, pos, neg, kept, 3.0)["samples"]
    (ref,) = nodes.common_ksampler(tiny.patcher, 8, 6, 3.0, sampler, "simple", pos, neg, latent)
    assert max_rel_diff(finished, ref["samples"]) <= 1e-5


def test_resume_follows_a_latent_changed_after_early_sampling(mods):
    tiny = build_tiny("sd1")
    latent = tiny.empty_latent(1, 8)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = mods.split.run_early(tiny.patcher, pos, neg, latent, 3, 2, 6, 3.0, "euler", "normal", 0.5)
    as_is = mods.split.resume(tiny.patcher, pos, neg, early.latent, 3.0)["samples"]
    changed = dict(early.latent, samples=early.latent["samples"] * 1.5)
    edited = mods.split.resume(tiny.patcher, pos, neg, changed, 3.0)["samples"]
    assert max_rel_diff(edited, as_is) > 1e-3


def test_denoiser_evaluations_are_n_s_plus_k_rest(mods):
    import nodes
    from probe_select.probes.scoring import CandidateScores
    from probe_select.nodes.engine.selection import top_k_or_fail

    tiny = build_tiny("sd1")
    n, k, steps, checkpoint = 5, 1, 10, 0.2
    s = 2
    recorder = ApplyModelRecorder()
    model = with_recorder(mods.tap.apply_tap(tiny.patcher, "auto", 4), recorder)
    latent = tiny.empty_latent(1, 8)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = mods.split.run_early(model, pos, neg, latent, 0, n, steps, 6.0, "euler", "normal", checkpoint)
    assert recorder.evaluations == n * s
    scores = CandidateScores(torch.arange(n, dtype=torch.float32), "t", early.activations.run_id, early.activations.seeds)
    kept, _, _ = top_k_or_fail("ProbeSelectTopK", early.latent, scores, k)
    mods.split.resume(model, pos, neg, kept, 6.0)
    assert recorder.evaluations == n * s + k * (steps - s) == 18
    # What generating every candidate costs, counted the same way: a plain KSampler run of the N seeds.
    plain = ApplyModelRecorder()
    nodes.common_ksampler(with_recorder(tiny.patcher, plain), 0, steps, 6.0, "euler", "normal", pos, neg,
                          tiny.empty_latent(n, 8))
    assert plain.evaluations == n * steps == 50
    assert [c["rows"] for c in plain.calls] == [2 * n] * steps       # cond + uncond rows, one call per step


def test_x0_preview_is_the_denoised_estimate(mods):
    tiny = build_tiny("sd1")
    result, _, _ = _early(mods, tiny.patcher, tiny, n=2, steps=6, checkpoint=0.5)
    x0, xs = result.x0["samples"], result.latent["samples"]
    assert x0.shape == xs.shape
    assert not torch.allclose(x0, xs)
    assert result.activations is None            # no tap on this model


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_single_candidate_split_is_bit_identical_to_ksampler(mods, family):
    """With N=1 nothing is batched differently, so the split run is exactly one KSampler run."""
    import nodes

    tiny = build_tiny(family)
    latent = tiny.empty_latent(1, 16 if tiny.latent_channels == 16 else 8)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    early = mods.split.run_early(tiny.patcher, pos, neg, latent, 52, 1, 10, 4.0, "heun", "normal", 0.2)
    finished = mods.split.resume(tiny.patcher, pos, neg, early.latent, 4.0)["samples"]
    (ref,) = nodes.common_ksampler(tiny.patcher, 52, 10, 4.0, "heun", "normal", pos, neg, latent)
    assert torch.equal(finished, ref["samples"])


def test_x0_previews_at_every_checkpoint(mods):
    tiny = build_tiny("sd1")
    latent = tiny.empty_latent(1, 8)
    pos, neg = tiny.conditioning(1), tiny.conditioning(2)
    full = mods.split.run_candidates(tiny.patcher, pos, neg, latent, 5, 2, 10, 3.0, "euler", "normal",
                                     stop_step=10, capture_at=(2, 4))
    assert sorted(full.x0_at) == [2, 4]
    early = mods.split.run_early(tiny.patcher, pos, neg, latent, 5, 2, 10, 3.0, "euler", "normal", 0.4)
    assert torch.allclose(full.x0_at[4], early.x0["samples"], atol=1e-6)
    assert not torch.allclose(full.x0_at[2], full.x0_at[4])
