"""Probe architecture: shapes, determinism, batch independence, config round trip."""
import json
import logging

import pytest
import torch
from torch import nn

from probe_select.probes.model import Probe, ProbeConfig, build_probe, spatial_soft_argmax, timestep_embedding

logger = logging.getLogger(__name__)

TINY = dict(in_channels=8, feature_size=8, stem_width=16, widths=(16, 32), pooled_size=2,
            embed_dim=32, time_embed_dim=16, head_hidden=(32, 16), mlp_hidden=64)


def tiny_config(**overrides) -> ProbeConfig:
    return ProbeConfig(**{**TINY, **overrides})


def features(batch: int, config: ProbeConfig, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.feature_size, config.feature_size)
    return (3.0 * torch.randn(shape, generator=generator)).half()


def test_output_shapes_without_text():
    config = tiny_config()
    probe = build_probe(config)
    x = features(3, config)
    assert probe.encode(x, 0.2).shape == (3, config.embed_dim)
    scores = probe(x, 0.2)
    assert scores.shape == (3,)
    assert scores.dtype == torch.float32
    assert probe.text_mlp is None
    assert probe.head[0].in_features == config.embed_dim


def test_output_shapes_with_text():
    config = tiny_config(text_dim=12)
    probe = build_probe(config)
    x = features(3, config)
    text = torch.randn(3, 12)
    assert probe.project_text(text).shape == (3, config.embed_dim)
    assert probe(x, 0.2, text).shape == (3,)
    # The head reads concat[u, e, u*e, |u-e|].
    assert probe.head[0].in_features == 4 * config.embed_dim
    # One text row is shared by every candidate.
    shared = probe(x, 0.2, text[:1])
    repeated = probe(x, 0.2, text[:1].expand(3, -1))
    torch.testing.assert_close(shared, repeated)


def test_text_argument_must_match_branch():
    with_text = build_probe(tiny_config(text_dim=12))
    without_text = build_probe(tiny_config())
    x = features(2, with_text.config)
    with pytest.raises(ValueError, match="text branch"):
        with_text(x, 0.2)
    with pytest.raises(ValueError, match="no text branch"):
        without_text(x, 0.2, torch.randn(2, 12))
    with pytest.raises(ValueError, match="8"):
        without_text(torch.randn(2, 5, 8, 8), 0.2)


def test_t_as_float_or_per_row_tensor_and_it_matters():
    probe = build_probe(tiny_config())
    x = features(4, probe.config)
    with torch.no_grad():
        as_float = probe(x, 0.2)
        as_tensor = probe(x, torch.full((4,), 0.2))
        later = probe(x, 0.8)
    torch.testing.assert_close(as_float, as_tensor)
    assert (as_float - later).abs().max() > 1e-5, "time conditioning has no effect"


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 0.5]), 8)
    assert emb.shape == (2, 8)
    # t=0: cos(0)=1 for the first half, sin(0)=0 for the second.
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    # Lowest frequency is 1: cos(500), sin(500).
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(500.0)).item(), abs=1e-5)


def test_same_seed_same_weights_and_outputs():
    config = tiny_config(text_dim=12)
    a, b, c = build_probe(config, seed=3), build_probe(config, seed=3), build_probe(config, seed=4)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.stem.weight, c.stem.weight)
    x, text = features(2, config), torch.randn(2, 12)
    assert torch.equal(a(x, 0.2, text), b(x, 0.2, text))


def test_build_probe_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_probe(tiny_config(), seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("text_dim", [0, 12])
def test_batch_independence(text_dim, train_mode):
    config = tiny_config(text_dim=text_dim)
    probe = build_probe(config, seed=1).train(train_mode)
    x = features(5, config, seed=2)
    text = torch.randn(5, text_dim) if text_dim else None
    with torch.no_grad():
        batch = probe(x, 0.2, text)
        for i in range(3):
            alone = probe(x[i : i + 1], 0.2, None if text is None else text[i : i + 1])
            assert abs(alone.item() - batch[i].item()) < 1e-5
    # Rows genuinely differ, so equality above is not trivial.
    assert batch.std() > 0


def test_no_batch_statistics_layers():
    probe = build_probe(ProbeConfig(in_channels=320, text_dim=768))
    for module in probe.modules():
        assert not isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm))


def test_default_parameter_count():
    probe = build_probe(ProbeConfig(in_channels=320))
    count = sum(p.numel() for p in probe.parameters())
    logger.info("default probe (in_channels=320, no text): %d parameters", count)
    assert count == 4_796_481
    assert 1_000_000 < count < 10_000_000
    with_text = sum(p.numel() for p in build_probe(ProbeConfig(in_channels=320, text_dim=768)).parameters())
    assert count < with_text < 10_000_000


def test_default_grid_sizes():
    config = ProbeConfig(in_channels=320)
    probe = build_probe(config)
    assert len(probe.down_blocks) == len(config.widths) == 2
    assert probe.image_mlp[0].in_features == 256 * 4 * 4
    assert probe(torch.randn(2, 320, 16, 16).half(), 0.2).shape == (2,)


def test_config_round_trip():
    config = ProbeConfig(in_channels=640, widths=(32, 64, 128), text_dim=768, attention=False)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["widths"] == [32, 64, 128]
    restored = ProbeConfig.from_dict(data)
    assert restored == config
    assert isinstance(restored.widths, tuple) and isinstance(restored.head_hidden, tuple)


def test_config_from_dict_rejects_unknown_key():
    data = ProbeConfig(in_channels=4).to_dict()
    data["num_experts"] = 8
    with pytest.raises(ValueError, match="num_experts"):
        ProbeConfig.from_dict(data)


def test_config_validation():
    with pytest.raises(ValueError, match="in_channels"):
        ProbeConfig.from_dict({"feature_size": 16})
    with pytest.raises(ValueError, match="stem_width"):
        ProbeConfig(in_channels=4, stem_width=0)
    with pytest.raises(ValueError, match="time_embed_dim"):
        ProbeConfig(in_channels=4, time_embed_dim=15)


def test_probe_in_half_precision_reads_fp16_features():
    probe = build_probe(tiny_config()).to(torch.bfloat16)
    scores = probe(features(2, probe.config), 0.2)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert isinstance(probe, Probe)


def test_spatial_soft_argmax_finds_where_each_map_peaks():
    logits = torch.full((2, 3, 4, 8), -50.0)
    logits[0, 0, 0, 0] = 50.0            # top left cell
    logits[0, 1, 3, 7] = 50.0            # bottom right cell
    logits[0, 2, 1, 2] = logits[0, 2, 1, 5] = 50.0    # two equal peaks on one row: halfway between them
    logits[1] = 0.0                      # flat: the centre
    points = spatial_soft_argmax(logits)
    assert points.shape == (2, 6)
    expected = torch.tensor([[-7 / 8, -3 / 4, 7 / 8, 3 / 4, (-3 / 8 + 3 / 8) / 2, -1 / 4], [0.0] * 6])
    assert torch.allclose(points, expected, atol=1e-5)


def test_keypoints_give_the_x0_branch_positions_and_keep_older_configs_as_they_were():
    from probe_select.probes.model import _OPTIONAL_FIELDS
    plain = ProbeConfig(in_channels=4, inputs=("x0",), x0_size=8, x0_stem_width=8, x0_widths=(16, 16), embed_dim=16,
                        mlp_hidden=16, head_hidden=(8,), pooled_size=2, attention=False)
    assert "x0_keypoints" in _OPTIONAL_FIELDS and "x0_keypoints" not in plain.to_dict()
    with_points = ProbeConfig.from_dict({**plain.to_dict(), "x0_keypoints": 3})
    assert with_points.to_dict()["x0_keypoints"] == 3 and ProbeConfig.from_dict(with_points.to_dict()) == with_points
    with pytest.raises(ValueError, match="x0_keypoints"):
        ProbeConfig(in_channels=4, x0_keypoints=-1)

    before, after = build_probe(plain), build_probe(with_points)
    assert not hasattr(before, "x0_keypoint_maps") or before.x0_keypoint_maps is None
    assert after.x0_keypoint_maps.out_channels == 3 and after.x0_keypoint_maps.in_channels == 16
    # the MLP reads 2 more numbers per keypoint; the layers before it start from the same weights for a seed
    assert after.x0_mlp[0].in_features == before.x0_mlp[0].in_features + 6
    earlier = [k for k in before.state_dict() if k.startswith(("time_mlp.", "x0_norm.", "x0_stem.", "x0_blocks."))]
    assert len(earlier) > 10 and all(torch.equal(after.state_dict()[k], before.state_dict()[k]) for k in earlier)

    # moving the latent's one bright blob moves the probe's reading of it, as the keypoints see it
    x0 = torch.zeros(1, 4, 8, 8)
    x0[0, :, 1, 1] = 5.0
    moved = torch.roll(x0, shifts=(5, 5), dims=(2, 3))
    with torch.no_grad():
        assert after(None, 0.2, x0=x0).shape == (1,)
        maps = after.x0_keypoint_maps
        grid = lambda latent: after.x0_blocks[0].res(after.x0_stem(after.x0_norm(latent)),
                                                     after._conditioning(0.2, 1, None))
        here, there = spatial_soft_argmax(maps(grid(x0))), spatial_soft_argmax(maps(grid(moved)))
    assert not torch.allclose(here, there)
