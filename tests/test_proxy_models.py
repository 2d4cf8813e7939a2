"""The proxy-world diffusion models (bench/proxy_world/models.py, text.py, train_models.py) and
their bench-only ComfyUI nodes. Fast: random or freshly saved weights, a few training steps."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.latent_formats
import comfy.model_base
import comfy.supported_models
import nodes as comfy_nodes_core

from bench.proxy_world import models, train_models
from bench.proxy_world.grammar import parse_prompt
from bench.proxy_world.render import render_batch
from bench.proxy_world.text import CONTEXT_DIM, POOLED_DIM, TEXT_LENGTH, TextEncoder

from conftest import ROOT

PROMPTS = ["a red circle left of a blue square", "two green triangles", "a white cross above a yellow circle"]


def _images(n=3, seed=0):
    scenes = [parse_prompt(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    return render_batch(scenes, size=32, rng=seed)


@pytest.fixture(scope="module")
def built():
    return {fam: (models.build(fam, seed=0), models.build_text_encoder(fam, seed=0)) for fam in models.FAMILIES}


@pytest.mark.parametrize("family", models.FAMILIES)
def test_latent_image_round_trip(family):
    images = _images(4)
    latent = models.image_to_latent(images, family)
    channels, side = (4, 32) if family == "unet" else (16, 16)
    assert latent.shape == (4, channels, side, side)
    back = models.latent_to_image(latent, family)
    torch.testing.assert_close(back, images, rtol=0, atol=1e-6)
    # and the other way round on the RGB part: latent -> image -> latent
    again = models.image_to_latent(back, family)
    torch.testing.assert_close(again, latent, rtol=0, atol=1e-5)
    # what the model sees (ComfyUI's process_latent_in): the standardised image plus zero channels
    fmt = comfy.latent_formats.SD15() if family == "unet" else comfy.latent_formats.SD3()
    data = fmt.process_in(latent)
    torch.testing.assert_close(data, models.image_to_data(images, family), rtol=0, atol=1e-5)
    rgb = 3 if family == "unet" else 12
    assert torch.all(data[:, rgb:].abs() < 1e-5)
    lo, hi = [models.DATA_SCALE * (v - models.DATA_CENTER) for v in (-1.0, 1.0)]
    assert data[:, :rgb].min() >= lo - 1e-5 and data[:, :rgb].max() <= hi + 1e-5
    assert 0.5 < float(data[:, :rgb].std()) < 1.5 and abs(float(data[:, :rgb].mean())) < 0.5


@pytest.mark.parametrize("family", models.FAMILIES)
def test_models_use_comfy_classes(built, family):
    patcher, _ = built[family]
    model = patcher.model
    assert isinstance(model, comfy.model_base.BaseModel)
    if family == "unet":
        assert type(model.model_config) is comfy.supported_models.SD15
        assert model.model_type == comfy.model_base.ModelType.EPS
        assert type(model.diffusion_model).__name__ == "UNetModel"
        assert isinstance(model.latent_format, comfy.latent_formats.SD15)
    else:
        assert type(model.model_config) is comfy.supported_models.SD3
        assert isinstance(model, comfy.model_base.SD3)
        assert model.model_type == comfy.model_base.ModelType.FLOW
        assert type(model.diffusion_model).__name__ == "OpenAISignatureMMDITWrapper"
        assert model.adm_channels == POOLED_DIM
        assert float(model.model_sampling.shift) == 3.0
    n = models.param_count(patcher)
    assert (1_500_000 <= n <= 2_500_000) if family == "unet" else (4_500_000 <= n <= 5_500_000), n   # 1.87 M, 5.10 M
    for p in model.diffusion_model.parameters():
        assert torch.isfinite(p).all()


def test_pack_sees_the_families(pack, built):
    from probe_select.nodes.engine.families import auto_tap_path, model_family, resolve_module

    assert model_family(built["unet"][0]) == "sd1"
    assert model_family(built["dit"][0]) == "sd3"
    for fam in models.FAMILIES:
        resolve_module(built[fam][0], auto_tap_path(built[fam][0]))


@pytest.mark.parametrize("family", models.FAMILIES)
def test_random_models_sample_with_common_ksampler(built, family):
    patcher, enc = built[family]
    pos, neg = enc.conditioning(PROMPTS[0]), enc.conditioning("")
    latent = models.empty_latent(family, batch=2)
    (out,) = comfy_nodes_core.common_ksampler(patcher.clone(), 7, 4, 3.0, "euler", "normal", pos, neg, latent)
    samples = out["samples"]
    assert samples.shape == latent["samples"].shape
    assert torch.isfinite(samples).all()
    images = models.latent_to_image(samples, family)
    assert images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("family", models.FAMILIES)
def test_conditioning_shapes(built, family):
    _, enc = built[family]
    pooled_width = TEXT_LENGTH * CONTEXT_DIM if family == "unet" else POOLED_DIM
    assert enc.pooling == models.TEXT_POOLING[family] and enc.pooled_width == pooled_width
    cond = enc.conditioning(PROMPTS[0])
    assert isinstance(cond, list) and len(cond) == 1 and len(cond[0]) == 2
    context, extras = cond[0]
    assert context.shape == (1, TEXT_LENGTH, CONTEXT_DIM)
    assert extras["pooled_output"].shape == (1, pooled_width)
    uncond = enc.conditioning("")
    assert uncond[0][0].shape == context.shape
    assert not torch.allclose(uncond[0][0], context)
    # deterministic, and a batch encodes like single prompts
    torch.testing.assert_close(enc.conditioning(PROMPTS[0])[0][0], context)
    ctx, pooled = enc.encode(PROMPTS)
    assert ctx.shape == (3, TEXT_LENGTH, CONTEXT_DIM) and pooled.shape == (3, pooled_width)
    torch.testing.assert_close(ctx[:1], context, rtol=1e-5, atol=1e-5)
    if family == "unet":         # the token features in order, as the cross-attention reads them
        torch.testing.assert_close(pooled, ctx.flatten(1))
    else:                        # the DiT's y: a projection of the token mean
        torch.testing.assert_close(pooled, enc.pool_proj(ctx.mean(1)))


def test_only_the_unet_pooled_output_tells_word_order(built):
    swapped = ["a red cross below a yellow cross", "a yellow cross below a red cross"]
    gaps = {}
    for family in models.FAMILIES:
        with torch.no_grad():
            context, pooled = built[family][1].encode(swapped)
        gaps[family] = float((pooled[0] - pooled[1]).norm() / pooled.norm(dim=1).mean())
        assert float((context[0] - context[1]).norm()) > 0
    # the mean over positions (DiT) all but loses which colour comes first; the UNet's token features keep it
    assert gaps["unet"] > 5 * gaps["dit"], gaps


def test_the_unet_never_reads_its_pooled_output(built):
    patcher, enc = built["unet"]
    pos, neg = enc.conditioning(PROMPTS[0]), enc.conditioning("")
    blank = [[c, {**extras, "pooled_output": torch.zeros_like(extras["pooled_output"])}] for c, extras in pos]
    latent = models.empty_latent("unet", batch=1)
    (a,) = comfy_nodes_core.common_ksampler(patcher.clone(), 3, 3, 3.0, "euler", "normal", pos, neg, latent)
    (b,) = comfy_nodes_core.common_ksampler(patcher.clone(), 3, 3, 3.0, "euler", "normal", blank, neg, latent)
    assert torch.equal(a["samples"], b["samples"])


def test_a_weights_file_without_a_pooling_gets_its_familys(built, tmp_path):
    for family in models.FAMILIES:
        path = models.save(tmp_path / f"{family}.safetensors", *built[family], family)
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(meta["text_config"])["pooling"] == models.TEXT_POOLING[family]
        older = {k: v for k, v in json.loads(meta["text_config"]).items() if k != "pooling"}
        save_file(tensors, str(path), metadata={**meta, "text_config": json.dumps(older)})
        assert models.load(family, path)[1].pooling == models.TEXT_POOLING[family]
    with pytest.raises(ValueError, match="pooling must be one of"):
        TextEncoder(pooling="max")


def test_training_is_deterministic():
    for family in models.FAMILIES:
        cfg = train_models.TrainConfig(family=family, steps=3, batch_size=4, log_every=0)
        a = train_models.train(cfg)
        b = train_models.train(cfg)
        assert a.losses == b.losses
        assert all(math.isfinite(x) for x in a.losses)
        for pa, pb in zip(a.patcher.model.diffusion_model.parameters(), b.patcher.model.diffusion_model.parameters()):
            assert torch.equal(pa, pb)


def test_training_continues_from_saved_weights(tmp_path):
    first = train_models.train(train_models.TrainConfig(family="unet", steps=3, batch_size=4, log_every=0))
    saved = models.save(tmp_path / "proxy_unet.safetensors", first.patcher, first.text_encoder, "unet",
                        first.info, dtype=train_models.STORED_DTYPE)
    # No step: the result is the saved file's weights (stored as float16), not a fresh initialisation.
    resumed = train_models.train(train_models.TrainConfig(family="unet", steps=0, init_from=str(saved), log_every=0))
    stored, _ = models.load("unet", saved)
    for name, value in stored.model.diffusion_model.state_dict().items():
        assert torch.equal(resumed.patcher.model.diffusion_model.state_dict()[name], value.float()), name
    fresh = models.build("unet", seed=0).model.diffusion_model.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in resumed.patcher.model.diffusion_model.state_dict().items())
    assert resumed.info["init_from"] == {"path": str(saved), "info": first.info}
    # Two more steps train on from there.
    more = train_models.train(train_models.TrainConfig(family="unet", steps=2, batch_size=4, init_from=str(saved),
                                                       log_every=0))
    assert len(more.losses) == 2 and more.info["init_from"]["info"]["steps_done"] == 3


@pytest.mark.parametrize("family", models.FAMILIES)
def test_loss_decreases_on_a_fixed_batch(family):
    cfg = train_models.TrainConfig(family=family, steps=20, batch_size=4, warmup=5, fixed_batch=True, log_every=0)
    losses = train_models.train(cfg).losses
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_training_fails_loudly_when_nothing_would_train():
    patcher = models.build("unet", seed=0)
    enc = models.build_text_encoder("unet", seed=0)
    with pytest.raises(RuntimeError, match="no parameter of the denoiser received a gradient"):
        train_models.require_gradients("unet", patcher.model.diffusion_model, enc)
    for p in patcher.model.diffusion_model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="no parameter of the text encoder received a gradient"):
        train_models.require_gradients("unet", patcher.model.diffusion_model, enc)
    first = next(enc.parameters())
    first.grad = torch.zeros_like(first)
    train_models.require_gradients("unet", patcher.model.diffusion_model, enc)


def test_train_split_is_disjoint():
    train, held = train_models.prompt_split()
    assert len(train) + len(held) == 1340 and not set(train) & set(held)
    assert any(parse_prompt(p).kind == "count" for p in held[:40])


@pytest.fixture(scope="module")
def proxy_nodes():
    """The bench node folder, imported the way ComfyUI imports a custom node folder."""
    path = ROOT / "bench" / "proxy_world" / "comfy_nodes" / "__init__.py"
    spec = importlib.util.spec_from_file_location("proxy_world_comfy_nodes", path,
                                                  submodule_search_locations=[str(path.parent)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nodes_round_trip_through_saved_weights(proxy_nodes, built, tmp_path, monkeypatch, pack):
    mapping = proxy_nodes.NODE_CLASS_MAPPINGS
    assert set(mapping) == {"ProxyWorldLoader", "ProxyWorldEncode", "ProxyWorldDecode", "ProxyWorldVAE",
                            "ProxyWorldEvaluator"}
    assert not set(mapping) & set(getattr(pack, "NODE_CLASS_MAPPINGS", {}) or {})
    assert mapping["ProxyWorldLoader"].RETURN_TYPES == ("MODEL", "PROXY_TEXT")
    assert mapping["ProxyWorldEncode"].RETURN_TYPES == ("CONDITIONING",)
    assert mapping["ProxyWorldDecode"].RETURN_TYPES == ("IMAGE",)
    assert mapping["ProxyWorldVAE"].RETURN_TYPES == ("VAE",)
    assert mapping["ProxyWorldEvaluator"].RETURN_TYPES == ("PS_EVALUATOR",)
    for cls in mapping.values():
        cls.INPUT_TYPES()
        assert callable(getattr(cls(), cls.FUNCTION))

    # The loader reads weights files: point it at files saved from the (random) built models.
    files = {}
    for fam in models.FAMILIES:
        patcher, enc = built[fam]
        files[fam] = models.save(tmp_path / f"{fam}.safetensors", patcher, enc, fam, {"test": True})
    monkeypatch.setattr(models, "weights_candidates", lambda fam: [files[fam]])

    for fam in models.FAMILIES:
        model, text = mapping["ProxyWorldLoader"]().load(fam)
        ref_patcher, ref_enc = built[fam]
        for (k, a), (_, b) in zip(model.model.diffusion_model.state_dict().items(),
                                  ref_patcher.model.diffusion_model.state_dict().items()):
            assert torch.equal(a, b), k
        (pos,) = mapping["ProxyWorldEncode"]().encode(text, PROMPTS[1])
        (neg,) = mapping["ProxyWorldEncode"]().encode(text, "")
        torch.testing.assert_close(pos[0][0], ref_enc.conditioning(PROMPTS[1])[0][0])
        (out,) = comfy_nodes_core.common_ksampler(model, 0, 3, 2.0, "euler", "normal", pos, neg,
                                                  models.empty_latent(fam, batch=2))
        (images,) = mapping["ProxyWorldDecode"]().decode(out, fam)
        assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
        other = "dit" if fam == "unet" else "unet"
        with pytest.raises(ValueError, match="channels"):
            mapping["ProxyWorldDecode"]().decode(out, other)
        # the VAE node decodes the same way (what ProbeSelectPreviewScore calls on a VAE)
        (vae,) = mapping["ProxyWorldVAE"]().make(fam)
        assert torch.equal(vae.decode(out["samples"]), images)
        with pytest.raises(ValueError, match="channels"):
            mapping["ProxyWorldVAE"]().make(other)[0].decode(out["samples"])
        # The DiT samples with SD3's own shift (3.0, its model_sampling default: no patch); another
        # shift is patched on a clone by ComfyUI's own ModelSamplingSD3 node (an object patch).
        sampling = model.get_model_object("model_sampling")
        if fam == "dit":
            assert "model_sampling" not in model.object_patches and sampling.shift == models.DIT_SAMPLING_SHIFT == 3.0
            shifted, _ = models.load(fam, shift=1.5)
            assert "model_sampling" in shifted.object_patches
            t = torch.tensor([0.8])
            torch.testing.assert_close(shifted.get_model_object("model_sampling").sigma(t * 1000),
                                       t * 1.5 / (1 + 0.5 * t))
        else:
            assert "model_sampling" not in model.object_patches


def test_evaluator_node(proxy_nodes, pack):
    (evaluator,) = proxy_nodes.NODE_CLASS_MAPPINGS["ProxyWorldEvaluator"]().make()
    images = _images(3).permute(0, 2, 3, 1)                        # ComfyUI IMAGE [B, H, W, 3]
    scores = evaluator.score(images, PROMPTS)
    assert type(scores).__name__ == "ImageScores"
    assert scores.scores.shape == (3,) and scores.evaluator == "proxy_world" and scores.prompts == PROMPTS
    assert float(scores.scores.min()) > 0.5                        # correct renders score high
    wrong = evaluator.score(images[:1], "two blue squares")
    assert float(wrong.scores[0]) < 0.5
    # the pack's evaluate node accepts it
    from probe_select.nodes.nodes_evaluators import ProbeSelectEvaluateImages

    out = ProbeSelectEvaluateImages.execute(images, PROMPTS[0], evaluator)
    assert len(out.result[0]) == 3


@pytest.mark.parametrize("family", models.FAMILIES)
def test_models_sample_on_the_schedules_of_their_real_families(built, family):
    """20% of the steps lands where it lands on real SD1.5 (eps) and on real SD3/FLUX (flow with their
    shift): the proxy world's t means what it means on a real model (bench/results/noise_levels.json)."""
    from bench.proxy_world import sample

    patcher, _ = built[family]
    level = sample.checkpoint_level(patcher, family, 0.2)
    assert (level.step, level.steps) == (4, 20)
    if family == "unet":
        assert level.kind == "vp" and level.log_snr == pytest.approx(-3.1603, abs=1e-3)   # SD1.5 and SDXL
    else:
        # shift 3, ComfyUI's "normal" spacing (20 timesteps from 1 down to ~0): u ~ 1 - 4 / 19, sigma =
        # 3u / (1 + 2u) = 0.9187, log-SNR -4.85: between SD3-medium (-4.80) and FLUX.1-dev (-5.07)
        u = 1 - 4 / 19
        assert level.kind == "flow" and level.sigma == pytest.approx(3 * u / (1 + 2 * u), abs=5e-4)
        assert -5.07 < level.log_snr < -4.80


@pytest.mark.parametrize("family", models.FAMILIES)
def test_sample_x0_preview_is_what_the_early_sampler_holds(built, family, pack):
    """The x0 preview sample.py scores at the checkpoint equals the pack's early sampler's x0 there, and each
    row of its images is what a batch-1 KSampler run with that row's seed gives (the world samples with
    a stochastic sampler: its per-step noise must come from the row's own seed too)."""
    from bench.proxy_world import sample
    from probe_select.nodes.engine import split_sampling

    patcher, enc = built[family]
    prompt, steps, k = PROMPTS[0], 5, 2
    sampler = models.DEFAULT_SAMPLER[family]
    assert sampler in ("euler_ancestral", "dpmpp_2m_sde")
    images, previews = sample.generate(patcher, enc, family, prompt, [7, 8, 9], 2.0, steps=steps, preview_step=k)
    pos, neg = enc.conditioning(prompt), enc.conditioning("")
    early = split_sampling.run_early(patcher, pos, neg, models.empty_latent(family, 1), 7, 3, steps, 2.0, sampler,
                                     "normal", k / steps)
    torch.testing.assert_close(previews, models.latent_to_image(early.x0["samples"], family), rtol=0, atol=1e-5)
    (one,) = comfy_nodes_core.common_ksampler(patcher, 8, steps, 2.0, sampler, "normal", pos, neg,
                                              models.empty_latent(family, 1))
    torch.testing.assert_close(images[1:2], models.latent_to_image(one["samples"], family), rtol=0, atol=1e-4)
    if family == "unet":   # (the untrained DiT's zero-initialised output layer predicts x0 = x at every step)
        assert not torch.allclose(previews, images, atol=1e-2)   # the preview is not the final image
    with pytest.raises(ValueError, match="consecutive"):
        sample.generate(patcher, enc, family, prompt, [7, 9], 2.0, steps=steps)


def test_within_prompt_spearman_of_sample_figures():
    from bench.proxy_world import sample

    target = np.array([[0.1, 0.5, 0.9, 0.3], [0.2, 0.2, 0.2, 0.2], [0.9, 0.1, 0.5, 0.3]])
    same = sample.within_prompt(target.copy(), target)
    assert same["mean"] == pytest.approx(1.0) and same["prompts"] == 2        # the constant prompt is left out
    flipped = sample.within_prompt(-target, target)
    assert flipped["mean"] == pytest.approx(-1.0)
    assert flipped["low"] <= flipped["mean"] <= flipped["high"]


def test_calibration_verdict_names_every_missed_target():
    from bench.proxy_world import sample

    figures = {"success_fraction": 0.32, "prompts_with_mixed_outcomes": 0.62, "semantic_failure_share": 0.9,
               "x0_preview_within_spearman": {"mean": 0.49}}
    checks = sample.calibration_checks(figures)
    assert [ok for ok in checks.values()] == [True, True, True, False]
    assert "x0-preview Spearman 0.49 (target 0.15-0.35)" in checks
    figures.update(success_fraction=0.06, x0_preview_within_spearman={"mean": 0.25})
    assert [ok for ok in sample.calibration_checks(figures).values()] == [False, True, True, True]


def test_a_run_for_one_family_keeps_the_others_figures():
    from bench.proxy_world import sample

    previous = {"unet": {"mean_score": 0.1, "command": "old"}, "dit": {"mean_score": 0.3, "command": "old"}}
    new = {"unet": {"mean_score": 0.4, "command": "sample.py --family unet"}}
    merged = sample.merge_families(previous, new)
    assert list(merged) == ["unet", "dit"]
    assert merged["unet"]["mean_score"] == 0.4 and merged["dit"] == previous["dit"]
    assert sample.reproduce_lines({"families": merged}, "sample.py --family unet") == [
        "Reproduce (each family's figures come from their own run):", "",
        "- unet: `sample.py --family unet`", "- dit: `old`"]
    both = {"families": {"unet": {"command": "all"}, "dit": {"command": "all"}}}
    assert sample.reproduce_lines(both, "all") == ["Reproduce: `all`"]


def test_training_figures_add_up_a_continued_run():
    from bench.proxy_world import sample

    first = {"steps_done": 3418, "steps": 5000, "batch_size": 8, "wall_s": 2220.0}
    continued = {"steps_done": 1600, "steps": 1600, "batch_size": 8, "wall_s": 1158.0,
                 "init_from": {"path": "first.safetensors", "info": first}}
    assert sample._training_runs(continued) == [continued, first]
    assert sample._training_cell(continued) == "3418 + 1600 steps x 8, 56.3 min"
    assert sample._training_cell(first) == "3418 steps x 8, 37.0 min"


def test_evaluator_variants_name_their_floors_and_rescore():
    from bench.proxy_world import sample
    from bench.proxy_world.render import render

    variants = sample.evaluator_variants("0.1,1.0", "0.1")
    assert variants == {"shape floor 0.1": {"shape_floor": 0.1}, "shape floor 1": {"shape_floor": 1.0},
                        "relation floor 0.1": {"relation_floor": 0.1}}
    assert sample.evaluator_variants("", "") == {}
    # the same image, a wrong relation: the strict floor scores it at about a quarter of the default's 0.4
    prompt = "a red circle left of a blue square"
    flipped = render(parse_prompt("a red circle right of a blue square"), rng=1)[None]
    default = sample.summarize([flipped], [flipped], [prompt])
    strict = sample.summarize([flipped], [flipped], [prompt], **variants["relation floor 0.1"])
    ratio = strict["per_prompt"][0]["scores"][0] / default["per_prompt"][0]["scores"][0]
    assert ratio == pytest.approx(0.1 / 0.4, rel=0.05)
