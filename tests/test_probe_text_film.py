"""Probes whose encoders are conditioned on the text (``ProbeConfig.text_film``).

The config (validation, JSON only when set), the model (the text reaches the encoders, and only with
text_film; a seed keeps the other modules' weights), the file (version 4, scores survive the round
trip) and training (a target that depends on where the prompt's colour is)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from probe_select.probes.io import ProbeMetadata, load_probe, save_probe
from probe_select.probes.model import ProbeConfig, build_probe
from probe_select.probes.training.dataset import DatasetError, DatasetManifest
from probe_select.probes.training.dataset.splits import probe_config_for
from probe_select.probes.training.metrics import per_group_spearman
from probe_select.probes.training.train import TrainArrays, TrainConfig, train_probe

SMALL = dict(in_channels=4, feature_size=8, stem_width=8, widths=(8,), attention=False, pooled_size=1, embed_dim=16,
             time_embed_dim=8, head_hidden=(16,), mlp_hidden=32, x0_channels=3, x0_size=8, x0_stem_width=8,
             x0_widths=(8,), text_dim=6)


def _config(**changes) -> ProbeConfig:
    return ProbeConfig(**{**SMALL, **changes})


def test_text_film_needs_a_text_branch_and_is_written_only_when_set():
    with pytest.raises(ValueError, match="text_film needs a text branch"):
        build_probe(_config(text_dim=0, text_film=True))
    with pytest.raises(ValueError, match="text_film must be a bool"):
        _config(text_film=1)
    assert "text_film" not in _config().to_dict()                     # older readers read these configs
    config = _config(text_film=True, inputs=("x0",))
    assert config.to_dict()["text_film"] is True
    assert ProbeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("inputs", [("activations",), ("x0",)])
def test_the_text_reaches_the_encoder_only_with_text_film(inputs):
    features, x0 = torch.randn(3, 4, 8, 8), torch.randn(3, 3, 8, 8)
    text_a, text_b = torch.randn(1, 6), torch.randn(1, 6)
    film = build_probe(_config(text_film=True, inputs=inputs), seed=1).eval()
    plain = build_probe(_config(inputs=inputs), seed=1).eval()
    with torch.no_grad():
        assert not torch.allclose(film.embed(features, 0.2, x0, text_a), film.embed(features, 0.2, x0, text_b))
        assert torch.equal(plain.embed(features, 0.2, x0, text_a), plain.embed(features, 0.2, x0, text_b))
        # a shared [1, D] text is the same as that text repeated per row
        assert torch.allclose(film(features, 0.2, text_a, x0), film(features, 0.2, text_a.expand(3, 6), x0), atol=1e-6)
    with pytest.raises(ValueError, match="pass a text embedding"):
        film.embed(features, 0.2, x0)
    with pytest.raises(ValueError, match=r"expects text \[B, 6\]"):
        film.embed(features, 0.2, x0, torch.randn(3, 5))


def test_a_seed_gives_the_other_modules_the_same_weights_with_or_without_text_film():
    plain = build_probe(_config(inputs=("activations", "x0")), seed=3).state_dict()
    film = build_probe(_config(inputs=("activations", "x0"), text_film=True), seed=3).state_dict()
    assert set(film) - set(plain) == {name for name in film if name.startswith("text_film.")} != set()
    for name, value in plain.items():
        assert torch.equal(film[name], value), name


def test_text_film_probe_file_is_version_4_and_scores_the_same_after_loading(tmp_path):
    config = _config(text_film=True, inputs=("x0",))
    probe = build_probe(config, seed=2).eval()
    meta = ProbeMetadata(backbone_family="sd3", tap="joint_blocks.3", checkpoint_t=0.2, feature_shape=(4, 8, 8),
                         pooling="adaptive_avg", evaluator="proxy", score_mean=0.0, score_std=1.0, config=config)
    path = save_probe(tmp_path / "film.safetensors", probe, meta)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "4"
    loaded, loaded_meta = load_probe(path)
    assert loaded_meta.config == config
    x0, text = torch.randn(4, 3, 8, 8), torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(loaded(None, 0.2, text, x0), probe(None, 0.2, text, x0))


def _colour_side(seed: int, prompts: int, seeds: int = 8) -> TrainArrays:
    """x0 latents with one red and one blue pixel at random places; the prompt is "red left of blue"
    or "blue left of red", the target how far left of the other the asked colour is. The two prompts
    rank every latent in opposite orders, so a text-blind score ranks at 0 on average."""
    gen = torch.Generator().manual_seed(seed)
    n = prompts * seeds
    x0 = torch.zeros(n, 3, 8, 8)
    cols, rows = torch.randint(0, 8, (n, 2), generator=gen), torch.randint(0, 8, (n, 2), generator=gen)
    index = torch.arange(n)
    x0[index, 0, rows[:, 0], cols[:, 0]] = 3.0            # red
    x0[index, 2, rows[:, 1], cols[:, 1]] = 3.0            # blue
    asked = torch.arange(prompts).repeat_interleave(seeds) % 2          # 0: red, 1: blue
    return TrainArrays(features=torch.zeros(n, 4, 8, 8).half(), t=0.2,
                       group=torch.arange(prompts).repeat_interleave(seeds),
                       target=(cols[index, 1 - asked] - cols[index, asked]).float() + 0.1 * torch.randn(n, generator=gen),
                       text=torch.nn.functional.one_hot(asked, 6).float(), x0=x0.half())


def test_a_text_film_probe_learns_a_ranking_that_depends_on_the_prompt(tmp_path):
    train, val = _colour_side(0, 32), _colour_side(1, 8)
    config = TrainConfig(epochs=12, batch_prompts=4, lr=3e-3, patience=0, ema_decay=0.9, lambda_align=0.0)
    base = {"backbone_family": "sd3", "tap": "t", "evaluator": "score"}
    film = train_probe(train, val, _config(text_film=True, inputs=("x0",)), config, base, tmp_path / "film.safetensors")
    blind = train_probe(dataclasses.replace(train, text=None), dataclasses.replace(val, text=None),
                        _config(text_dim=0, inputs=("x0",)), config, base, tmp_path / "blind.safetensors")
    assert film.best_metrics["within_spearman"] > 0.6
    assert abs(blind.best_metrics["within_spearman"]) < 0.3      # the task needs the prompt
    probe, _ = load_probe(tmp_path / "film.safetensors")
    with torch.no_grad():
        scores = probe(None, 0.2, val.text, val.x0)
    rho = per_group_spearman(scores.numpy(), val.target.numpy(), val.group.numpy())
    assert np.mean(rho) == pytest.approx(film.best_metrics["within_spearman"], abs=1e-3)


def test_a_text_film_setting_is_fitted_to_the_dataset_or_refused_with_the_fix():
    def manifest(text_dim):
        return DatasetManifest(backbone_family="sd3", tap="joint_blocks.3", feature_shape=(4, 8, 8), checkpoints=[0.2],
                               evaluators=["proxy"], text_dim=text_dim, x0_shape=(3, 8, 8))
    setting = ProbeConfig(in_channels=1, feature_size=1, inputs=("x0",), text_film=True)    # text_dim not known yet
    fitted = probe_config_for(manifest(64), setting, use_text=True)
    assert (fitted.text_dim, fitted.in_channels, fitted.x0_shape, fitted.text_film) == (64, 4, (3, 8, 8), True)
    build_probe(fitted)
    with pytest.raises(DatasetError, match="stores no text embeddings"):
        probe_config_for(manifest(0), setting, use_text=True)
    with pytest.raises(DatasetError, match="Train with the text, or without text_film"):
        probe_config_for(manifest(64), setting, use_text=False)
