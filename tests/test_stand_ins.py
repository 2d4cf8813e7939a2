"""The stand-in checkpoints (devtools/stand_ins.py) load through ComfyUI as the families they stand for.

Each file is loaded in-process with `comfy.sd.load_checkpoint_guess_config`, what stock
CheckpointLoaderSimple calls, and checked: the family ComfyUI detects, the VAE decoding a latent of the
family's channels, the text encoder's conditioning shapes, a few sampler steps through ComfyUI's
`common_ksampler`, and the pack's auto tap on the loaded model. Flux's file has no text encoder; the test
node ProbeSelectTestFluxTextEncoder (tests/custom_nodes/probe_select_test_nodes) stands in for it.

The files are written once into the cache (PROBE_SELECT_TEST_CACHE, default bench/cache, git-ignored):
about 5 GB and 2 minutes the first time, then only loading and sampling.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from devtools import stand_ins

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("PROBE_SELECT_TEST_CACHE", ROOT / "bench" / "cache"))
TEST_NODES = Path(__file__).resolve().parent / "custom_nodes" / "probe_select_test_nodes" / "__init__.py"

MODEL_BASE = {"sd15": "BaseModel", "sdxl": "SDXL", "sd35": "SD3", "flux": "Flux"}
MODEL_TYPE = {"sd15": "EPS", "sdxl": "EPS", "sd35": "FLOW", "flux": "FLUX"}
PACK_FAMILY = {"sd15": "sd1", "sdxl": "sdxl", "sd35": "sd3", "flux": "flux"}
AUTO_TAP = {"sd15": "output_blocks.1.0", "sdxl": "output_blocks.4.0", "sd35": "joint_blocks.1",
            "flux": "single_blocks.0"}
# (context, pooled_output) of CLIPTextEncode on a short prompt.
CONDITIONING = {"sd15": ((1, 77, 768), (1, 768)), "sdxl": ((1, 77, 2048), (1, 1280)),
                "sd35": ((1, 77, 4096), (1, 2048)), "flux": ((1, 16, 4096), (1, 768))}   # the test Flux T5 pads to 16, not 256
PROMPT, OTHER = "a photo of a red fox in the snow", "an oil painting of a lighthouse"
SIZE = 64   # pixels; latents are SIZE // 8


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _free_models() -> None:
    import comfy.model_management

    comfy.model_management.cleanup_models()
    gc.collect()


@pytest.fixture(scope="module")
def test_nodes():
    """The test node pack, imported from its file (ComfyUI's own `custom_nodes` would shadow the name)."""
    spec = importlib.util.spec_from_file_location("probe_select_test_nodes", TEST_NODES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flux_clip(test_nodes):
    (clip,) = test_nodes.ProbeSelectTestFluxTextEncoder().build(seed=0)
    yield clip
    del clip
    _free_models()


@pytest.fixture(scope="module", params=stand_ins.FAMILIES)
def loaded(request, pack):
    """One family's cached stand-in, loaded as CheckpointLoaderSimple loads it (one family at a time)."""
    import comfy.sd

    family = request.param
    path = stand_ins.cached_checkpoint_stand_in(family, CACHE_DIR)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    yield SimpleNamespace(family=family, path=path, model=model, clip=clip, vae=vae)
    del model, clip, vae
    _free_models()


def _encode(clip, text: str):
    import nodes

    (cond,) = nodes.CLIPTextEncode().encode(clip, text)
    return cond


@pytest.fixture(scope="module")
def encoded(loaded, request):
    """CLIPTextEncode of PROMPT, OTHER and "" with the family's text encoder (Flux: the test node's)."""
    clip = request.getfixturevalue("flux_clip") if loaded.family == "flux" else loaded.clip
    return {text: _encode(clip, text) for text in (PROMPT, OTHER, "")}


def test_public_names_and_cache_layout(tmp_path):
    assert stand_ins.FAMILIES == ("sd15", "sdxl", "sd35", "flux")
    assert set(stand_ins.CHECKPOINT_NAMES) == set(stand_ins.FAMILIES)
    for family in stand_ins.FAMILIES:
        path = stand_ins.cached_file_path(family, tmp_path)
        assert path.name == stand_ins.CHECKPOINT_NAMES[family]
        assert f"v{stand_ins.RECIPE_VERSIONS[family]}" in path.parent.name and family in path.parent.name
    assert stand_ins.cached_file_path("sd15", tmp_path, seed=1) != stand_ins.cached_file_path("sd15", tmp_path)
    with pytest.raises(ValueError, match="unknown family 'sd2'"):
        stand_ins.write_checkpoint_stand_in("sd2", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_detected_as_the_family(loaded):
    from probe_select.nodes.engine.families import model_family

    config = loaded.model.model.model_config
    assert type(loaded.model.model).__name__ == MODEL_BASE[loaded.family]
    assert type(config).__name__ == stand_ins.DETECTED_CONFIG[loaded.family]
    assert loaded.model.model.model_type.name == MODEL_TYPE[loaded.family]
    assert model_family(loaded.model) == PACK_FAMILY[loaded.family]
    assert loaded.path.name == stand_ins.CHECKPOINT_NAMES[loaded.family]
    # fp16 on disk: the smallest file ComfyUI's fixed configs allow.
    from safetensors import safe_open

    with safe_open(str(loaded.path), framework="pt") as f:
        slices = [f.get_slice(k) for k in f.keys()]
        dtypes = {s.get_dtype() for s in slices if len(s.get_shape()) > 0}
    assert dtypes <= {"F16", "I64"}, dtypes      # I64: CLIP's position_ids; scalars (logit_scale) as ComfyUI saves them
    if loaded.family == "flux":   # the public file's norm names (0.3.75 detects by them; 0.33.0 saves `weight`)
        with safe_open(str(loaded.path), framework="pt") as f:
            norms = sorted(k for k in f.keys() if "_norm." in k)
        assert norms and all(k.endswith("_norm.scale") for k in norms), norms
        assert "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale" in norms


def test_saved_keys_are_renamed_to_the_public_names(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    saved = {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.weight": torch.ones(2),
             "model.diffusion_model.single_blocks.0.norm.query_norm.weight": torch.full((2,), 2.0),
             "model.diffusion_model.single_blocks.0.linear1.weight": torch.zeros(2, 2)}
    metadata = stand_ins.stand_in_metadata("flux")
    for family in ("flux", "sd35"):
        path = tmp_path / f"{family}.safetensors"
        save_file(saved, str(path), metadata=metadata)
        stand_ins._public_key_names(path, family, metadata)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            assert f.metadata() == metadata
        if family == "sd35":          # no renames for the other families
            assert set(tensors) == set(saved)
            continue
        assert set(tensors) == {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
                                "model.diffusion_model.single_blocks.0.norm.query_norm.scale",
                                "model.diffusion_model.single_blocks.0.linear1.weight"}
        renamed = tensors["model.diffusion_model.single_blocks.0.norm.query_norm.scale"]
        assert torch.equal(renamed, torch.full((2,), 2.0))


def test_vae_decodes_the_family_latent(loaded):
    channels = stand_ins.LATENT_CHANNELS[loaded.family]
    assert loaded.vae.latent_channels == channels
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(2, channels, SIZE // 8, SIZE // 8, generator=gen)
    with torch.inference_mode():      # as ComfyUI's executor runs nodes
        images = loaded.vae.decode(latent)
    images = images.reshape(-1, *images.shape[-3:])
    assert images.shape == (2, SIZE, SIZE, 3)
    assert torch.isfinite(images).all()
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert float(images.std()) > 1e-3
    assert not torch.equal(images[0], images[1])


def test_text_encoder(loaded, encoded):
    # ComfyUI's Flux encoder needs a full T5-XXL: none in the file, the test node stands in.
    assert (loaded.clip is None) == (loaded.family == "flux")
    context_shape, pooled_shape = CONDITIONING[loaded.family]
    (cond, extras), = encoded[PROMPT]
    assert tuple(cond.shape) == context_shape
    assert tuple(extras["pooled_output"].shape) == pooled_shape
    assert torch.isfinite(cond).all() and torch.isfinite(extras["pooled_output"]).all()
    assert float(cond.std()) > 1e-3
    (other, other_extras), = encoded[OTHER]
    assert not torch.allclose(cond, other) and not torch.allclose(extras["pooled_output"], other_extras["pooled_output"])
    if loaded.family == "sd35":
        # CLIP-L (768) and CLIP-G (1280) features side by side, zero-padded to T5's 4096; both pooled halves set.
        assert float(cond[..., :2048].abs().sum()) > 0 and float(cond[..., 2048:].abs().max()) == 0.0
        assert float(extras["pooled_output"][:, :768].abs().sum()) > 0
        assert float(extras["pooled_output"][:, 768:].abs().sum()) > 0


def test_sampler_steps(loaded, encoded):
    import nodes

    positive, negative = encoded[PROMPT], encoded[""]
    channels = stand_ins.LATENT_CHANNELS[loaded.family]
    latent = {"samples": torch.zeros(1, channels, SIZE // 8, SIZE // 8)}
    # Flux runs without CFG (its guidance is an input); 3072 wide, so two steps.
    cfg, steps = (1.0, 2) if loaded.family == "flux" else (4.0, 3)
    (out,) = nodes.common_ksampler(loaded.model, 7, steps, cfg, "euler", "simple", positive, negative, latent)
    samples = out["samples"]
    assert samples.shape == (1, channels, SIZE // 8, SIZE // 8)
    assert torch.isfinite(samples).all()
    assert float(samples.std()) > 1e-3


def test_auto_tap_resolves(loaded):
    from probe_select.nodes.engine.families import auto_tap_path, resolve_module

    path = auto_tap_path(loaded.model)
    assert path == AUTO_TAP[loaded.family]
    resolved, module = resolve_module(loaded.model, path)
    assert isinstance(module, torch.nn.Module) and resolved.startswith(path)


def test_same_seed_same_bytes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    first = stand_ins.write_checkpoint_stand_in("sd15", tmp_path / "first.safetensors")
    again = stand_ins.write_checkpoint_stand_in("sd15", tmp_path / "again.safetensors")
    assert _sha256(again) == _sha256(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "first.safetensors"]  # no temp files
    with safe_open(str(first), framework="pt") as f:
        assert f.metadata() == stand_ins.stand_in_metadata("sd15")
    # The cached file (whichever ComfyUI version wrote it) holds the same tensors.
    cached = load_file(str(stand_ins.cached_checkpoint_stand_in("sd15", CACHE_DIR)))
    fresh = load_file(str(first))
    assert set(cached) == set(fresh) and all(torch.equal(cached[k], fresh[k]) for k in fresh)


def test_flux_text_encoder_node_is_seeded(test_nodes, flux_clip):
    schema = test_nodes.ProbeSelectTestFluxTextEncoder.INPUT_TYPES()
    assert list(schema["required"]) == ["seed"]
    assert test_nodes.NODE_CLASS_MAPPINGS["ProbeSelectTestFluxTextEncoder"] is test_nodes.ProbeSelectTestFluxTextEncoder
    t5 = flux_clip.cond_stage_model.t5xxl.transformer
    assert t5.shared.weight.shape == (32128, 4096) and len(t5.encoder.block) == 1
    # The node's weights come from random_init(seed): same seed, same weights; another seed, others.
    def weights(seed):
        module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(10, 4))
        test_nodes.random_init(module, seed)
        return module.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["0.weight"], other["0.weight"]) and not torch.equal(first["2.weight"], other["2.weight"])
    assert torch.equal(first["1.weight"], torch.ones(4)) and torch.equal(first["0.bias"], torch.zeros(4))
    assert abs(float(first["2.weight"].std()) - 0.5) < 0.2       # N(0, 1/fan_in), fan_in 4


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory):
    """Written into a cache that already holds a stale recipe version (removed by the write) and another
    seed's folder (kept): `test_a_new_recipe_version_removes_the_stale_cache` checks both."""
    cache = tmp_path_factory.mktemp("cache")
    for name in ("open_clip_ViT-B-32_v1_s0", "open_clip_ViT-B-32_v1_s1"):
        (cache / name).mkdir()
        (cache / name / "ViT-B-32.safetensors").write_bytes(b"old")
    return stand_ins.cached_open_clip_stand_in("ViT-B-32", cache, seed=0)


def test_a_new_recipe_version_removes_the_stale_cache(open_clip_file):
    assert stand_ins.OPEN_CLIP_RECIPE_VERSION > 1
    assert sorted(p.name for p in open_clip_file.parents[1].iterdir()) == sorted([
        f"open_clip_ViT-B-32_v{stand_ins.OPEN_CLIP_RECIPE_VERSION}_s0", "open_clip_ViT-B-32_v1_s1"])


def test_remove_stale_versions_keeps_other_stems_seeds_and_files(tmp_path):
    names = ["stand_in_flux_v1_s0", "stand_in_flux_v2_s0", "stand_in_flux_v3_s0", "stand_in_flux_v1_s1",
             "stand_in_flux2_v1_s0", "stand_in_sd15_v1_s0"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "stand_in_flux_v9_s0.safetensors").write_bytes(b"a file, not a cache folder")
    removed = stand_ins.remove_stale_versions(tmp_path / "stand_in_flux_v2_s0")
    assert sorted(p.name for p in removed) == ["stand_in_flux_v1_s0", "stand_in_flux_v3_s0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stand_in_flux2_v1_s0", "stand_in_flux_v1_s1", "stand_in_flux_v2_s0", "stand_in_flux_v9_s0.safetensors",
        "stand_in_sd15_v1_s0"]
    with pytest.raises(ValueError, match="not a cache folder"):
        stand_ins.remove_stale_versions(tmp_path / "models")


def test_open_clip_stand_in_loads_in_the_clipscore_node(open_clip_file, monkeypatch):
    import folder_paths

    from probe_select.nodes.nodes_evaluators import ProbeSelectCLIPScore

    paths, extensions = folder_paths.folder_names_and_paths["evaluators"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "evaluators",
                        ([str(open_clip_file.parent), *paths], extensions))
    evaluator = ProbeSelectCLIPScore.execute("ViT-B-32", open_clip_file.name, "cpu").result[0]
    assert evaluator.name == "clipscore:ViT-B-32:ViT-B-32"     # label: the file's stem
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(3, 64, 64, 3, generator=gen)
    scores = evaluator.score(images, PROMPT).scores
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 100)).all()
    # Aligned towers: the scores are positive and differ between images (random towers give 0s).
    assert (scores > 0).all() and len(set(scores.tolist())) == 3, scores
    # The file's weights are the ones in use (not open_clip's fresh random init).
    from safetensors.torch import load_file

    saved = load_file(str(open_clip_file))
    for key in ("visual.conv1.weight", "token_embedding.weight"):
        assert torch.equal(evaluator.model.state_dict()[key].to(torch.float16), saved[key])


def test_open_clip_stand_in_is_deterministic(open_clip_file, tmp_path):
    state = torch.get_rng_state()
    again = stand_ins.write_open_clip_stand_in("ViT-B-32", tmp_path / "again.safetensors", seed=0)
    assert torch.equal(torch.get_rng_state(), state)   # the caller's global RNG is left alone
    assert _sha256(again) == _sha256(open_clip_file)
    # The cache hands back the written file without writing it again.
    written = open_clip_file.stat().st_mtime_ns
    assert stand_ins.cached_open_clip_stand_in("ViT-B-32", open_clip_file.parents[1], seed=0) == open_clip_file
    assert open_clip_file.stat().st_mtime_ns == written and open_clip_file.name == "ViT-B-32.safetensors"
