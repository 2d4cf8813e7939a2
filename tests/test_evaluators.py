"""Image evaluators: CLIPScore on random open_clip weights (no weights exist offline), the adapters
with their package absent or replaced by a small stand-in with the package's API, and the nodes."""
import json
import logging
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from probe_select.probes import evaluators as ev

PROMPT = "a photo of a red apple on a wooden table"
OTHER = "an astronaut riding a horse on the moon"
SMALL = "ViT-S-32"          # 63 M parameters, builds in < 1 s: for file round trips


def smooth_images(n, h=64, w=64, seed=0):
    """[n, h, w, 3] in 0..1 with image-like (smooth) content."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 6, 6, generator=g)
    return F.interpolate(base, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()


def to_pil(images):
    from PIL import Image

    arrays = (255.0 * images.numpy()).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def give_embeddings_a_shared_direction(model, seed=0):
    """Random CLIP weights put image and text embeddings at cosine ~0, so max(cos, 0) is often 0. Shift
    both towers' final LayerNorm biases so that their embeddings share one direction as strongly as
    their random part: cosines then spread around ~0.5 and vary with image and prompt."""
    import open_clip

    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(model.text_projection.shape[1], generator=g), dim=0)
    with torch.no_grad():
        image_norm = model.encode_image(torch.randn(2, 3, 224, 224, generator=g)).norm(dim=-1).mean()
        text_norm = model.encode_text(open_clip.get_tokenizer("ViT-B-32")([PROMPT, OTHER])).norm(dim=-1).mean()
        model.visual.ln_post.bias += torch.linalg.pinv(model.visual.proj.T) @ (u * image_norm)
        model.ln_final.bias += torch.linalg.pinv(model.text_projection.T) @ (u * text_norm)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    evaluator = ev.CLIPScoreEvaluator("ViT-B-32", weights=None, allow_random_weights=True)
    give_embeddings_a_shared_direction(evaluator.model)
    return evaluator


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A ViT-S-32 open_clip checkpoint with known random weights, in a folder named like the models folder."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model, _, preprocess = open_clip.create_model_and_transforms(SMALL, pretrained=None, output_dict=True)
    model.eval()
    folder = tmp_path_factory.mktemp("evaluators")
    path = folder / "small_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, preprocess, path


# ---- CLIPScore ------------------------------------------------------------------------------


def test_clipscore_per_image_scores(clip):
    images = smooth_images(4, seed=1)
    out = clip.score(images, PROMPT)
    assert isinstance(out, ev.ImageScores)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"
    assert out.prompts == [PROMPT] * 4
    assert "ViT-B-32" in out.evaluator and "random" in out.evaluator
    assert ((out.scores >= 0) & (out.scores <= 100)).all()
    assert (out.scores > 0).any() and len(set(out.tolist())) == 4       # not constant, not all clamped
    # Per image: scoring each image alone gives the batch's numbers (nothing is normalised over the batch).
    alone = torch.cat([clip.score(images[i:i + 1], PROMPT).scores for i in range(4)])
    assert torch.allclose(alone, out.scores, atol=1e-4)
    # Deterministic, and batch_size only changes memory use.
    assert torch.equal(clip.score(images, PROMPT).scores, out.scores)
    clip.batch_size = 3
    try:
        assert torch.allclose(clip.score(images, PROMPT).scores, out.scores, atol=1e-4)
    finally:
        clip.batch_size = 8


def test_clipscore_depends_on_prompt_and_aligns_prompts(clip):
    images = smooth_images(4, seed=2)
    a = clip.score(images, PROMPT).scores
    b = clip.score(images, OTHER).scores
    assert not torch.allclose(a, b, atol=1e-3)
    mixed = clip.score(images, [PROMPT, OTHER, PROMPT, OTHER])
    assert mixed.prompts == [PROMPT, OTHER, PROMPT, OTHER]
    assert torch.allclose(mixed.scores, torch.stack([a[0], b[1], a[2], b[3]]), atol=1e-4)
    with pytest.raises(ValueError, match="3 prompts for 4 images"):
        clip.score(images, [PROMPT] * 3)


def test_clipscore_matches_open_clip_pipeline(clip):
    """Our tensor preprocessing + formula vs open_clip's own PIL transform on the same images."""
    import open_clip

    images = smooth_images(3, h=256, w=320, seed=3)
    pil = to_pil(images)
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    reference_pixels = torch.stack([preprocess(p) for p in pil])
    quantised = torch.stack([torch.from_numpy(np.array(p)).float() / 255 for p in pil])
    ours = clip.preprocess(quantised)
    assert ours.shape == reference_pixels.shape == (3, 3, 224, 224)
    assert (ours - reference_pixels).abs().max() < 0.05
    with torch.no_grad():
        fi = F.normalize(clip.model.encode_image(reference_pixels), dim=-1)
        ft = F.normalize(clip.model.encode_text(open_clip.get_tokenizer("ViT-B-32")([PROMPT])), dim=-1)
    expected = 100 * (fi @ ft.T).squeeze(1).clamp(min=0)
    assert torch.allclose(clip.score(quantised, PROMPT).scores, expected, atol=0.05)


def test_clipscore_clamps_negative_cosine_to_zero(clip, monkeypatch):
    encode_text = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda tokens: -encode_text(tokens))
    assert torch.equal(clip.score(smooth_images(2), PROMPT).scores, torch.zeros(2))


def test_clipscore_warns_when_prompt_is_truncated(clip, caplog):
    long_prompt = "a very detailed painting of " + " ".join(f"flower{i}" for i in range(80))
    with caplog.at_level(logging.WARNING):
        clip.score(smooth_images(1), PROMPT)
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        clip.score(smooth_images(2), long_prompt)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1                       # once per distinct prompt, not per image
    assert "77" in warnings[0] and "a very detailed painting of flower0" in warnings[0]


def test_clipscore_without_weights_says_where_to_put_them():
    with pytest.raises(ev.EvaluatorUnavailable) as info:
        ev.CLIPScoreEvaluator("ViT-B-32")
    message = str(info.value)
    assert "ComfyUI/models/evaluators" in message and "models/clip" in message and "cache" in message
    with pytest.raises(ev.EvaluatorUnavailable, match="not in your open_clip / Hugging Face cache"):
        ev.CLIPScoreEvaluator("ViT-B-32", weights="laion2b_s34b_b79k", cache_dir="/nonexistent-cache")
    with pytest.raises(ev.EvaluatorUnavailable, match="neither a file nor"):
        ev.CLIPScoreEvaluator("ViT-B-32", weights="/no/such/file.safetensors")
    with pytest.raises(ev.EvaluatorUnavailable, match="no model 'ViT-Q-99'"):
        ev.CLIPScoreEvaluator("ViT-Q-99", allow_random_weights=True)


def test_clipscore_loads_a_local_checkpoint(small_checkpoint, tmp_path):
    model, preprocess, path = small_checkpoint
    loaded = ev.CLIPScoreEvaluator(SMALL, weights=str(path))
    assert loaded.name == f"clipscore:{SMALL}:small_clip"
    for (k, a), b in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), k
    images = smooth_images(2, seed=4)
    with torch.no_grad():
        fi = F.normalize(model.encode_image(loaded.preprocess(images)), dim=-1)
        ft = F.normalize(model.encode_text(loaded.tokenizer([PROMPT])), dim=-1)
    assert torch.allclose(loaded.score(images, PROMPT).scores, 100 * (fi @ ft.T).squeeze(1).clamp(min=0), atol=1e-4)

    # A text-encoder-only file (what ComfyUI's models/clip usually holds) is refused with an explanation.
    from safetensors.torch import save_file

    text_only = tmp_path / "clip_l.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("visual.")}, str(text_only))
    with pytest.raises(ev.EvaluatorUnavailable, match="text encoders only"):
        ev.CLIPScoreEvaluator(SMALL, weights=str(text_only))


# ---- adapters without their package ---------------------------------------------------------


@pytest.mark.parametrize("hidden, pip_name, build", [
    ("open_clip", "open_clip_torch", lambda: ev.CLIPScoreEvaluator("ViT-B-32", allow_random_weights=True)),
    ("ImageReward", "image-reward", lambda: ev.ImageRewardEvaluator("/x/ImageReward.safetensors")),
    ("hpsv2", "hpsv2", lambda: ev.HPSv2Evaluator("/x/HPS_v2.1_compressed.safetensors", version="v2.1")),
    ("transformers", "transformers", lambda: ev.PickScoreEvaluator("/x/PickScore_v1")),
])
def test_missing_package_says_what_to_pip_install(monkeypatch, hidden, pip_name, build):
    monkeypatch.setitem(sys.modules, hidden, None)      # `import hidden` now raises ImportError
    with pytest.raises(ev.EvaluatorUnavailable) as info:
        build()
    message = str(info.value)
    assert f"pip install {pip_name}`" in message
    assert "ComfyUI/models/evaluators" in message or "models/clip" in message


# ---- HPSv2 with a stand-in for the hpsv2 package ----------------------------------------------


@pytest.fixture
def fake_hpsv2(monkeypatch):
    """`hpsv2.src.open_clip` (the package's own open_clip copy) served by open_clip with a small model."""
    import open_clip

    calls = []

    def create_model_and_transforms(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        torch.manual_seed(123)                      # other weights than the checkpoint: loading must replace them
        return open_clip.create_model_and_transforms(SMALL, pretrained=None, output_dict=kwargs["output_dict"],
                                                     device=kwargs["device"])

    package, src, oc = (types.ModuleType(n) for n in ("hpsv2", "hpsv2.src", "hpsv2.src.open_clip"))
    oc.create_model_and_transforms = create_model_and_transforms
    oc.get_tokenizer = lambda name: open_clip.get_tokenizer(SMALL)
    package.src, src.open_clip = src, oc
    for module in (package, src, oc):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


def test_hpsv2_adapter(fake_hpsv2, small_checkpoint, tmp_path):
    model, preprocess, path = small_checkpoint
    hps = ev.HPSv2Evaluator(str(path), version="v2.1")
    name, pretrained, kwargs = fake_hpsv2[0]
    assert name == "ViT-H-14" and pretrained is None          # no LAION download: the checkpoint is the model
    assert kwargs["output_dict"] is True and kwargs["precision"] == "fp32"
    assert hps.name == "hpsv2.1" and ev.HPSv2Evaluator(str(path), version="v2.0").name == "hpsv2.0"

    images = smooth_images(3, h=96, w=80, seed=5)
    out = hps.score(images, [PROMPT, OTHER, PROMPT])
    with torch.no_grad():
        pixels = torch.stack([preprocess(p) for p in to_pil(images)])
        feats = model(pixels, hps.tokenizer([PROMPT, OTHER, PROMPT]))
    expected = 100 * (feats["image_features"] * feats["text_features"]).sum(-1)     # 100 * cosine, no clamp
    assert torch.allclose(out.scores, expected, atol=1e-4)
    assert torch.allclose(hps.score(images[1:2], OTHER).scores, expected[1:2], atol=1e-4)

    pt = tmp_path / "HPS_v2.1_compressed.pt"
    pt.write_bytes(b"not read")
    with pytest.raises(ev.EvaluatorUnavailable) as info:
        ev.HPSv2Evaluator(str(pt))
    assert "safetensors" in str(info.value) and "weights_only=True" in str(info.value)
    with pytest.raises(ev.EvaluatorUnavailable, match="HPS_v2.1_compressed.safetensors"):
        ev.HPSv2Evaluator(None)


# ---- ImageReward with a stand-in for the image-reward package ---------------------------------


class _Tokens(dict):
    def __getattr__(self, name):
        return self[name]

    def to(self, device):
        return _Tokens({k: v.to(device) for k, v in self.items()})


class _FakeBertTokenizer:
    def __init__(self):
        self.calls = []

    def __call__(self, text, padding=False, truncation=False, max_length=None, return_tensors=None):
        texts = [text] if isinstance(text, str) else list(text)
        self.calls.append(dict(padding=padding, truncation=truncation, max_length=max_length))
        rows = [[101] + [1000 + sum(map(ord, w)) % 500 for w in t.split()] + [102] for t in texts]
        if truncation:
            rows = [r[:max_length - 1] + [102] if len(r) > max_length else r for r in rows]
        if return_tensors is None:
            return {"input_ids": rows[0] if isinstance(text, str) else rows}
        length = max_length if padding == "max_length" else max(map(len, rows))
        ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
        return _Tokens(input_ids=ids, attention_mask=(ids != 0).long())


class _FakeTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2000, 8)

    def forward(self, ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                return_dict=True):
        hidden = self.embed(ids) * attention_mask[..., None] + encoder_hidden_states.mean(1, keepdim=True)
        return types.SimpleNamespace(last_hidden_state=hidden)


class _FakeVisualEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, pixels):                      # [b, 3, 16, 16] -> [b, 4 tokens, 8]
        return self.patches(pixels).flatten(2).transpose(1, 2)


class _FakeImageReward(nn.Module):
    """The attributes of ImageReward.ImageReward.ImageReward that the adapter uses, at toy size."""

    def __init__(self, med_config, device="cpu"):
        super().__init__()
        assert os.path.isfile(med_config)
        self.device = device
        self.blip = nn.Module()
        self.blip.tokenizer = _FakeBertTokenizer()
        self.blip.visual_encoder = _FakeVisualEncoder()
        self.blip.text_encoder = _FakeTextEncoder()
        self.mlp = nn.Linear(8, 1)
        self.mean, self.std = 0.25, 2.0

    def preprocess(self, pil):
        return torch.from_numpy(np.array(pil.resize((16, 16)))).permute(2, 0, 1).float() / 255

    def reward_alone(self, pil, prompt):
        """The package's ImageReward.score(prompt, image) for one image."""
        text = self.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        emb = self.blip.visual_encoder(self.preprocess(pil)[None])
        out = self.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=emb)
        return float((self.mlp(out.last_hidden_state[:, 0, :]) - self.mean) / self.std)


@pytest.fixture
def fake_imagereward(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    package, module = types.ModuleType("ImageReward"), types.ModuleType("ImageReward.ImageReward")
    module.ImageReward = _FakeImageReward
    package.ImageReward = module
    monkeypatch.setitem(sys.modules, "ImageReward", package)
    monkeypatch.setitem(sys.modules, "ImageReward.ImageReward", module)
    (tmp_path / "med_config.json").write_text(json.dumps({"hidden_size": 8}))
    torch.manual_seed(5)
    reference = _FakeImageReward(str(tmp_path / "med_config.json")).eval()
    path = tmp_path / "ImageReward.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, path


def test_imagereward_adapter(fake_imagereward, tmp_path, caplog):
    reference, path = fake_imagereward
    torch.manual_seed(99)
    ir = ev.ImageRewardEvaluator(str(path))
    assert ir.name == "imagereward" and ir.max_prompt_tokens == 35
    images = smooth_images(3, h=32, w=48, seed=6)
    prompts = [PROMPT, OTHER, PROMPT]
    out = ir.score(images, prompts)
    with torch.no_grad():
        expected = [reference.reward_alone(p, t) for p, t in zip(to_pil(images), prompts)]
    assert torch.allclose(out.scores, torch.tensor(expected), atol=1e-5)
    assert ir.model.blip.tokenizer.calls[-1] == dict(padding="max_length", truncation=True, max_length=35)

    long_prompt = " ".join(f"w{i}" for i in range(40))
    with caplog.at_level(logging.WARNING):
        ir.score(images[:1], long_prompt)
    assert any("35" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)

    (tmp_path / "med_config.json").unlink()
    with pytest.raises(ev.EvaluatorUnavailable, match="med_config.json"):
        ev.ImageRewardEvaluator(str(path))


def test_imagereward_refuses_pickles_and_foreign_files(fake_imagereward, tmp_path):
    from safetensors.torch import save_file

    reference, path = fake_imagereward
    pt = tmp_path / "ImageReward.pt"
    pt.write_bytes(b"never unpickled")
    with pytest.raises(ev.EvaluatorUnavailable, match="weights_only=True"):
        ev.ImageRewardEvaluator(str(pt))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items() if k.startswith("mlp.")}, str(partial))
    with pytest.raises(ev.EvaluatorUnavailable, match="not an ImageReward checkpoint"):
        ev.ImageRewardEvaluator(str(partial))


# ---- PickScore with a tiny transformers CLIP saved locally -------------------------------------


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    root = tmp_path_factory.mktemp("pickscore")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in bytes_to_unicode().values():
            vocab[ch + suffix] = len(vocab)
    (root / "tok").mkdir()
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tok"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(root / "processor"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(3)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.save_pretrained(str(root / "model"))
    return root / "model", root / "processor"


def test_pickscore_adapter_is_logit_scale_times_cosine(tiny_pickscore):
    from transformers import AutoModel, AutoProcessor

    model_dir, processor_dir = tiny_pickscore
    pick = ev.PickScoreEvaluator(str(model_dir), str(processor_dir))
    assert pick.name == "pickscore" and pick.max_prompt_tokens == 77
    images = smooth_images(4, h=40, w=48, seed=7)
    out = pick.score(images, PROMPT)

    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).float().eval()
    processor = AutoProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    inputs = processor(images=[np.array(p) for p in to_pil(images)], text=[PROMPT], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image[:, 0]          # logit_scale * cosine, before any softmax
    assert torch.allclose(out.scores, logits, atol=1e-4)
    assert not torch.allclose(out.scores.softmax(0), out.scores)
    assert torch.allclose(pick.score(images[2:3], PROMPT).scores, logits[2:3], atol=1e-4)

    with pytest.raises(ev.EvaluatorUnavailable, match="PickScore_v1"):
        ev.PickScoreEvaluator(str(model_dir.parent / "missing"), str(processor_dir))


# ---- scores from other scorers --------------------------------------------------------------


def test_scores_from_floats():
    s = ev.scores_from_floats([0.1, [0.5, 2]], "aesthetic", "a cat")
    assert torch.allclose(s.scores, torch.tensor([0.1, 0.5, 2.0])) and s.scores.dtype == torch.float32
    assert s.evaluator == "aesthetic" and s.prompts == ["a cat"] * 3
    assert s.order().tolist() == [2, 1, 0]
    assert ev.scores_from_floats(torch.tensor([1.0, 2.0]), "x", ["p", "q"]).prompts == ["p", "q"]
    with pytest.raises(ValueError, match="finite"):
        ev.scores_from_floats([0.1, float("nan")], "x", "p")
    with pytest.raises(ValueError, match="name the evaluator"):
        ev.scores_from_floats([0.1], "  ", "p")
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        ev.scores_from_floats([1, 2, 3], "x", ["p", "q"])
    with pytest.raises(ValueError, match="2 scores but 1 prompts"):
        ev.ImageScores(torch.zeros(2), "x", ["p"])


# ---- nodes ----------------------------------------------------------------------------------


def _evaluator_nodes():
    from probe_select.nodes import nodes_evaluators as nodes_ev
    return nodes_ev


def test_node_schemas(pack):
    nodes_ev = _evaluator_nodes()
    ids = set()
    for node in nodes_ev.EVALUATOR_NODES:
        info = node.GET_NODE_INFO_V1()                      # what /object_info serves; validates the schema
        assert info["category"] == "sampling/probe_select/evaluate"
        ids.add(node.define_schema().node_id)
    assert ids == {"ProbeSelectCLIPScore", "ProbeSelectImageReward", "ProbeSelectHPSv2", "ProbeSelectPickScore",
                   "ProbeSelectEvaluateImages", "ProbeSelectScoresFromFloats"}
    clip_info = nodes_ev.ProbeSelectCLIPScore.GET_NODE_INFO_V1()
    assert clip_info["output"] == ["PS_EVALUATOR"]
    spec = clip_info["input"]["required"]["weights"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]       # newer / older ComfyUI form
    assert options[0] == "none"
    assert nodes_ev.ProbeSelectEvaluateImages.GET_NODE_INFO_V1()["output"] == ["PS_IMAGE_SCORES"]
    assert nodes_ev.resolve_device("auto") == (torch.device("cpu"), None)      # tests run ComfyUI with --cpu


def test_evaluate_images_node(pack, clip):
    nodes_ev = _evaluator_nodes()
    images = smooth_images(3, seed=8)
    out = nodes_ev.ProbeSelectEvaluateImages.execute(images, PROMPT, clip)
    (scores,) = out.result
    assert len(scores) == 3 and scores.prompts == [PROMPT] * 3 and scores.evaluator == clip.name
    assert torch.allclose(scores.scores, clip.score(images, PROMPT).scores)
    text = out.ui.as_dict()["text"][0]
    lines = text.splitlines()
    assert clip.name in lines[0]
    for i, value in enumerate(scores.tolist()):
        assert f"image {i}: {value:.4f}" in lines[i + 1]
    best = int(torch.argmax(scores.scores))
    assert lines[best + 1].endswith("best")

    from probe_select.nodes.errors import ProbeSelectError

    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectEvaluateImages\]"):
        nodes_ev.ProbeSelectEvaluateImages.execute(images, PROMPT, "not an evaluator")


def test_scores_from_floats_node(pack):
    nodes_ev = _evaluator_nodes()
    assert nodes_ev.ProbeSelectScoresFromFloats.define_schema().is_input_list is True
    # is_input_list: ComfyUI passes every input as a list.
    out = nodes_ev.ProbeSelectScoresFromFloats.execute([0.1, 0.5], ["my_scorer"], ["a cat"])
    (scores,) = out.result
    assert torch.allclose(scores.scores, torch.tensor([0.1, 0.5])) and scores.scores.shape == (2,)
    assert scores.evaluator == "my_scorer" and scores.prompts == ["a cat", "a cat"]
    assert "image 1: 0.5000  best" in out.ui.as_dict()["text"][0]

    from probe_select.nodes.errors import ProbeSelectError

    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectScoresFromFloats\].*finite"):
        nodes_ev.ProbeSelectScoresFromFloats.execute([0.1, float("inf")], ["my_scorer"], ["a cat"])


def test_clipscore_node_without_weights(pack):
    nodes_ev = _evaluator_nodes()
    from probe_select.nodes.errors import ProbeSelectError

    with pytest.raises(ProbeSelectError) as info:
        nodes_ev.ProbeSelectCLIPScore.execute("ViT-B-32", "none", "cpu")
    message = str(info.value)
    assert message.startswith("[ProbeSelectCLIPScore]") and "ComfyUI/models/evaluators" in message
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectCLIPScore\] weights file 'gone.safetensors'"):
        nodes_ev.ProbeSelectCLIPScore.execute("ViT-B-32", "gone.safetensors", "cpu")


def test_evaluators_folder_and_clipscore_node_from_file(pack, small_checkpoint):
    import folder_paths

    nodes_ev = _evaluator_nodes()
    from probe_select.nodes.folders import register_model_folders

    register_model_folders()
    register_model_folders()                                   # idempotent
    paths, extensions = folder_paths.folder_names_and_paths["evaluators"]
    assert os.path.join(folder_paths.models_dir, "evaluators") in paths and paths.count(paths[0]) == 1
    assert {".safetensors", ".pt"} <= extensions

    model, _, path = small_checkpoint
    folder_paths.add_model_folder_path("evaluators", str(path.parent))
    assert path.name in nodes_ev.weight_files((nodes_ev.EVALUATORS_FOLDER, "clip"))
    (evaluator,) = nodes_ev.ProbeSelectCLIPScore.execute(SMALL, path.name, "cpu").result
    assert evaluator.name == f"clipscore:{SMALL}:small_clip" and evaluator.device.type == "cpu"
    assert evaluator.offload_device is None
    images = smooth_images(2, seed=9)
    scores = nodes_ev.ProbeSelectEvaluateImages.execute(images, PROMPT, evaluator).result[0]
    assert scores.scores.shape == (2,) and ((scores.scores >= 0) & (scores.scores <= 100)).all()


def test_adapter_nodes_name_the_node_and_the_fix(pack, monkeypatch):
    nodes_ev = _evaluator_nodes()
    from probe_select.nodes.errors import ProbeSelectError

    monkeypatch.setitem(sys.modules, "hpsv2", None)
    monkeypatch.setitem(sys.modules, "ImageReward", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    cases = [
        (lambda: nodes_ev.ProbeSelectHPSv2.execute("none", "v2.1", "cpu"), "ProbeSelectHPSv2", "pip install hpsv2`"),
        (lambda: nodes_ev.ProbeSelectImageReward.execute("none", "cpu"), "ProbeSelectImageReward",
         "pip install image-reward`"),
        (lambda: nodes_ev.ProbeSelectPickScore.execute("yuvalkirstain/PickScore_v1", "", "cpu"),
         "ProbeSelectPickScore", "pip install transformers`"),
    ]
    for run, node_id, fix in cases:
        with pytest.raises(ProbeSelectError) as info:
            run()
        assert str(info.value).startswith(f"[{node_id}]") and fix in str(info.value)


def test_hpsv2_node_without_weights_names_the_file(pack, fake_hpsv2):
    nodes_ev = _evaluator_nodes()
    from probe_select.nodes.errors import ProbeSelectError

    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectHPSv2\].*HPS_v2_compressed.safetensors"):
        nodes_ev.ProbeSelectHPSv2.execute("none", "v2.0", "cpu")
