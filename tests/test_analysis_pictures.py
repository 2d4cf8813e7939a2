"""The pieces of the README's analysis pictures (bench/analysis_pictures.py) that are logic: the
proxy-world tokenizer seen as a CLIP by the attention node, the weightless schedule models, the
sampler and CFG of each family, text wrapping, and the picture thumbnails of the analysis templates (scripts/thumbnails.py)."""
import io
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pictures(pack):
    from bench import analysis_pictures
    return analysis_pictures


@pytest.fixture(scope="module")
def thumbnails():
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import thumbnails as module
    return module


def test_proxy_clip_gives_the_attention_node_one_word_per_token(pictures):
    from probe_select.nodes.nodes_attention import prompt_words
    from probe_select.probes.analysis.attention import select_tokens

    clip = pictures.ProxyClip(SimpleNamespace(length=8))
    words = prompt_words(clip, "a red circle left of a blue square", "sd1", 8)
    assert [(w.text, w.positions) for w in words] == [
        ("a", [0]), ("red", [1]), ("circle", [2]), ("left", [3]), ("of", [4]), ("a", [5]), ("blue", [6]),
        ("square", [7])]
    assert select_tokens("blue square, left of", words, 8) == [("blue square", [6, 7]), ("left of", [3, 4])]
    # padding (word id 0) belongs to no word: a short prompt leaves the tail out
    short = prompt_words(clip, "two green triangles", "sd1", 8)
    assert [(w.text, w.positions) for w in short] == [("two", [0]), ("green", [1]), ("triangles", [2])]
    with pytest.raises(Exception, match="tokens"):
        prompt_words(clip, "two green triangles", "sd1", 77)       # a conditioning of another length


def test_weightless_schedule_models_are_comfyuis_own_sampling(pictures):
    import comfy.model_base
    import comfy.model_sampling
    import comfy.supported_models

    sd15 = pictures.real_schedule_model(comfy.supported_models.SD15, comfy.model_base.ModelType.EPS)
    sampling = sd15.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.EPS)
    assert float(sampling.sigma_max) == pytest.approx(14.6146, abs=1e-3)      # scaled-linear, 1000 steps
    sd3 = pictures.real_schedule_model(comfy.supported_models.SD3, comfy.model_base.ModelType.FLOW)
    assert isinstance(sd3.get_model_object("model_sampling"), comfy.model_sampling.CONST)
    assert sd3.get_model_object("model_sampling").shift == pytest.approx(3.0)
    flux = pictures.real_schedule_model(comfy.supported_models.Flux, comfy.model_base.ModelType.FLUX)
    flux_sampling = flux.get_model_object("model_sampling")
    assert isinstance(flux_sampling, comfy.model_sampling.ModelSamplingFlux)
    assert flux_sampling.shift == pytest.approx(1.15)
    # what the inspector reads: sigma at t = 0.5 is the shifted time exp(mu) t / (1 + (exp(mu) - 1) t)
    s = math.exp(1.15)
    assert float(flux_sampling.sigma(torch.tensor(0.5))) == pytest.approx(s * 0.5 / (1 + (s - 1) * 0.5), abs=1e-4)


def test_pictures_sample_each_family_as_the_proxy_bench_does(pictures, monkeypatch):
    """Every KSampler run of the pictures gets its family's sampler and CFG from the proxy models; only
    an explicit sampler (the slerp's and the direction's deterministic one) or CFG overrides them."""
    from bench.proxy_world import models

    calls = []

    def record(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent):
        calls.append((seed, steps, cfg, sampler_name, scheduler))
        return ({"samples": torch.zeros(1)},)

    monkeypatch.setattr(pictures.comfy_nodes, "common_ksampler", record)
    for family in ("unet", "dit"):
        pictures.sample(None, family, None, None, {}, seed=3)
    pictures.sample(None, "unet", None, None, {}, seed=4, steps=3, cfg=25.0, sampler=pictures.DETERMINISTIC_SAMPLER)
    assert calls == [
        (3, 20, models.DEFAULT_CFG["unet"], models.DEFAULT_SAMPLER["unet"], "normal"),
        (3, 20, models.DEFAULT_CFG["dit"], models.DEFAULT_SAMPLER["dit"], "normal"),
        (4, 3, 25.0, pictures.DETERMINISTIC_SAMPLER, "normal")]
    # the batch-row comparisons need a sampler that draws no noise after the first step
    assert not any(kind in pictures.DETERMINISTIC_SAMPLER for kind in ("ancestral", "sde"))


def test_text_block_wraps_within_its_width(pictures):
    width, size = 200, 12
    block = pictures.text_block([("word " * 40).strip(), "short"], width, size=size)
    assert block.width == width
    lines = (block.height - 10) // (size + 5)
    assert lines >= 5                                      # 40 words of ~35 px do not fit in 200 px
    ink = np.asarray(block.convert("L")) < 128
    assert ink.any() and not ink[:, width - 8:].any()      # no text runs off the right edge
    rows = ink.any(axis=1)
    assert rows[5 + (lines - 1) * (size + 5): 5 + lines * (size + 5)].any()    # the last line ("short") is drawn


def test_picture_thumbnail_fits_the_card_and_the_size_limit(thumbnails, tmp_path):
    # random colour blocks of 10 px: they survive the shrinking (6 px blocks) and are costly for JPEG
    blocks = np.random.default_rng(0).integers(0, 255, size=(90, 140, 3), dtype=np.uint8)
    noise = blocks.repeat(10, axis=0).repeat(10, axis=1)
    picture = tmp_path / "wide.png"
    Image.fromarray(noise).save(picture)
    data = thumbnails.picture_thumbnail(picture, "SD1.5_analysis_schedule_inspector")
    assert len(data) < thumbnails.MAX_BYTES                # pure noise forces the quality down
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == thumbnails.THUMB_SIZE
        pixels = np.asarray(image.convert("L")).astype(float)
    graph_height = thumbnails.THUMB_SIZE[1] - thumbnails.CAPTION_HEIGHT
    # the picture keeps its aspect (1400 x 900 -> 262 x 168 centred): white bands left and right of it
    assert pixels[:graph_height, :20].mean() > 240 and pixels[:graph_height, -20:].mean() > 240
    assert pixels[20:graph_height - 20, 100:220].std() > 20       # the noise is there
    assert pixels[graph_height + 2:, :].mean() < 80                # the dark caption bar
    plain = tmp_path / "plain.png"
    Image.new("RGB", (400, 300), (250, 250, 250)).save(plain)
    assert len(thumbnails.picture_thumbnail(plain, "x_y")) < len(data)
