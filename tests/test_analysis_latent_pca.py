"""Latent probing (slerp, semantic directions) and activation PCA: math and nodes on tiny models."""
import math

import pytest
import torch

from probe_select.probes.analysis.latent import apply_direction, slerp, slerp_path, token_direction
from probe_select.probes.analysis.pca import fit_pca, pca_rgb, rgb_grid


def _angle(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return math.acos(float((a @ b / (a.norm() * b.norm())).clamp(-1, 1)))


def test_slerp_hits_the_ends_exactly_and_keeps_equal_norms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 4, 8, 8, generator=g)
    b = torch.randn(1, 4, 8, 8, generator=g)
    b = b * (a.norm() / b.norm())                           # equal norms
    path = slerp_path(a, b, 9)
    assert path.shape == (9, 4, 8, 8)
    assert torch.equal(path[0], a[0]) and torch.equal(path[-1], b[0])
    norms = path.double().flatten(1).norm(dim=1)
    assert float((norms / norms[0] - 1).abs().max()) < 1e-6
    # constant angular speed along the great circle: omega / 8 between neighbours
    omega = _angle(a, b)
    steps = [_angle(path[i], path[i + 1]) for i in range(8)]
    assert max(abs(s - omega / 8) for s in steps) < 1e-5
    # a straight line would shrink the midpoint (norm * cos(omega / 2)); slerp does not
    linear_mid = 0.5 * (a + b)
    assert float(linear_mid.norm()) < 0.8 * float(norms[4])


def test_slerp_interpolates_unequal_norms_linearly():
    a = torch.tensor([[3.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    mid = slerp(a, b, 0.5)
    assert float(mid.norm()) == pytest.approx(2.0)
    assert _angle(mid, a) == pytest.approx(math.pi / 4)


def test_slerp_is_guarded_for_parallel_and_antiparallel_inputs():
    a = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    parallel = slerp(a, 2 * a, 0.5)
    assert torch.isfinite(parallel).all() and torch.allclose(parallel, 1.5 * a, atol=1e-6)
    anti = slerp_path(a, -a, 5)
    assert torch.isfinite(anti).all()
    norms = anti.flatten(1).norm(dim=1)
    assert torch.allclose(norms, norms[0].expand(5), rtol=1e-6)
    assert _angle(anti[2], a) == pytest.approx(math.pi / 2, abs=1e-6)      # half way round
    assert torch.equal(anti[0], a[0]) and torch.equal(anti[-1], -a[0])
    zero = slerp(torch.zeros(1, 3), torch.ones(1, 3), 0.25)
    assert torch.allclose(zero, torch.full((1, 3), 0.25))


def test_slerp_path_refuses_fewer_than_two_points():
    with pytest.raises(ValueError, match="count >= 2"):
        slerp_path(torch.ones(1, 2), torch.zeros(1, 2), 1)


def test_direction_per_token_and_mean():
    g = torch.Generator().manual_seed(2)
    base, to, away = (torch.randn(1, 5, 8, generator=g) for _ in range(3))
    d = token_direction(to, away, "per_token")
    rows = apply_direction(base, d, [0.0, 1.0, -0.5])
    assert rows.shape == (3, 5, 8)
    assert torch.equal(rows[0], base[0])
    assert torch.allclose(rows[1], base[0] + to[0] - away[0])
    assert torch.allclose(rows[2], base[0] - 0.5 * (to[0] - away[0]))
    assert torch.allclose(apply_direction(away, d, [1.0])[0], to[0], atol=1e-6)
    short = torch.randn(1, 3, 8, generator=g)
    with pytest.raises(ValueError, match="one token count"):
        token_direction(short, away, "per_token")
    mean = token_direction(short, away, "mean")
    assert mean.shape == (1, 1, 8)
    assert torch.allclose(apply_direction(base, mean, [1.0])[0], base[0] + short.mean(1) - away.mean(1))


def test_pca_recovers_a_planted_first_component():
    g = torch.Generator().manual_seed(3)
    n, c, h, w = 3, 32, 8, 8
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    pattern = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy) for k in range(n)])     # [n, h, w]
    direction = torch.randn(c, generator=g)
    direction /= direction.norm()
    features = 5.0 * direction[None, :, None, None] * pattern[:, None] + 0.1 * torch.randn(n, c, h, w, generator=g)
    early, late = features[:, :, :, :], features.flip(-1)
    (rgb_early, rgb_late), pca = pca_rgb([early, late])
    assert rgb_early.shape == (n, 3, h, w) and rgb_late.shape == (n, 3, h, w)
    assert float(rgb_early.min()) >= 0.0 and float(rgb_early.max()) <= 1.0
    assert abs(float(pca.components[0].double() @ direction.double())) > 0.99
    assert float(pca.explained_ratio[0]) > 0.9
    red = rgb_early[:, 0].flatten()
    corr = torch.corrcoef(torch.stack([red, pattern.flatten()]))[0, 1]
    assert abs(float(corr)) > 0.95
    # the sign is fixed by the largest loading, so a negated input gives the same components
    flipped = fit_pca(-features.permute(0, 2, 3, 1).reshape(-1, c))
    assert torch.allclose(flipped.components, fit_pca(features.permute(0, 2, 3, 1).reshape(-1, c)).components,
                          atol=1e-8)


def test_rgb_grid_layout():
    columns = [torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)]
    grid = rgb_grid(columns, cell=10, gap=2)
    assert grid.shape == (2 * 10 + 2, 2 * 10 + 2, 3)
    assert float(grid[:10, :10].max()) == 0.0 and float(grid[:10, 12:].min()) == 1.0
    assert float(grid[10:12].min()) == 1.0                # white gap between rows
    with pytest.raises(ValueError, match="same number of rows"):
        rgb_grid([torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4)])


# ---------------------------------------------------------------------------------------------- nodes

@pytest.fixture(scope="module")
def nodes(pack):
    from probe_select.nodes import nodes_activation_pca, nodes_latent_probing
    return nodes_activation_pca, nodes_latent_probing


def _activation_set(step, seeds, features, tap="output_blocks.7.0"):
    from probe_select.probes.features import ActivationSet
    return ActivationSet(features=features.half(), family="sd1", tap=tap, step=step, steps=10, sigma=1.0,
                         seeds=seeds, run_id="r")


def test_pca_node_grid_has_a_cell_per_candidate_and_checkpoint(nodes):
    pca_nodes, _ = nodes
    g = torch.Generator().manual_seed(4)
    sets = [_activation_set(s, [7, 8, 9], torch.randn(3, 16, 4, 4, generator=g)) for s in (6, 2)]
    cell = 32
    image, summary = pca_nodes.ProbeSelectActivationPCA.execute(sets[0], cell, activations_2=sets[1]).result
    grid_h, grid_w = 3 * cell + 2 * 2, 2 * cell + 2
    assert image.shape == (1, grid_h + pca_nodes.LABEL_TOP, grid_w + pca_nodes.LABEL_LEFT, 3)
    assert "3 candidates x 2 checkpoints (0.20, 0.60)" in summary and "PC1" in summary


def test_pca_node_errors_name_the_node(nodes):
    from probe_select.nodes.errors import ProbeSelectError

    pca_nodes, _ = nodes
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectActivationPCA\] no activations"):
        pca_nodes.ProbeSelectActivationPCA.execute(None, 32)
    a = _activation_set(2, [1, 2], torch.zeros(2, 4, 4, 4))
    b = _activation_set(4, [1, 3], torch.zeros(2, 4, 4, 4))
    with pytest.raises(ProbeSelectError, match="different candidates"):
        pca_nodes.ProbeSelectActivationPCA.execute(a, 32, activations_2=b)


def test_slerp_node_noise_ends_are_the_single_seed_noises(nodes):
    import comfy.sample

    _, latent_nodes = nodes
    empty = {"samples": torch.zeros(1, 4, 8, 8)}
    latent, noise = latent_nodes.ProbeSelectLatentSlerp.execute("seed noises", empty, 5, 11, 12).result
    assert latent["samples"].shape == (5, 4, 8, 8)
    drawn = noise.generate_noise(latent)
    assert drawn.shape == (5, 4, 8, 8)
    assert torch.equal(drawn[0:1], comfy.sample.prepare_noise(empty["samples"], 11))
    assert torch.equal(drawn[4:5], comfy.sample.prepare_noise(empty["samples"], 12))
    assert noise.seed == 11


def test_slerp_node_latents_mode_and_errors(nodes):
    from probe_select.nodes.errors import ProbeSelectError

    _, latent_nodes = nodes
    node = latent_nodes.ProbeSelectLatentSlerp
    a = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    b = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))}
    latent, noise = node.execute("latents", a, 3, 1, 2, latent_b=b).result
    assert torch.equal(latent["samples"][0], a["samples"][0]) and torch.equal(latent["samples"][2], b["samples"][0])
    rows = noise.generate_noise(latent)
    assert torch.equal(rows[0], rows[2])                   # one shared noise in latents mode
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectLatentSlerp\] count is 1"):
        node.execute("seed noises", a, 1, 1, 2)
    with pytest.raises(ProbeSelectError, match="needs latent_b"):
        node.execute("latents", a, 3, 1, 2)
    with pytest.raises(ProbeSelectError, match="batch of 2"):
        node.execute("seed noises", {"samples": torch.zeros(2, 4, 8, 8)}, 3, 1, 2)
    with pytest.raises(ProbeSelectError, match="latent_a is"):
        node.execute("latents", a, 3, 1, 2, latent_b={"samples": torch.zeros(1, 4, 4, 4)})


def test_direction_node_batch_samples_like_single_runs(nodes):
    """Row k of one batched KSampler run equals a batch-1 run with the moved conditioning and the same seed."""
    import nodes as comfy_nodes
    from devtools.tiny_models import build_tiny

    _, latent_nodes = nodes
    tm = build_tiny("sdxl")
    base, toward, away = tm.conditioning(1), tm.conditioning(2), tm.conditioning(3)
    conditioning, latent = latent_nodes.ProbeSelectConditioningDirection.execute(
        base, toward, away, "0, 1", "per_token", tm.empty_latent(1, 8)).result
    cond, extras = conditioning[0]
    assert cond.shape[0] == 2 and extras["pooled_output"].shape[0] == 2
    assert torch.equal(cond[0], base[0][0][0])
    expected_pooled = base[0][1]["pooled_output"][0] + toward[0][1]["pooled_output"][0] - away[0][1]["pooled_output"][0]
    assert torch.allclose(extras["pooled_output"][1], expected_pooled)
    assert latent["batch_index"] == [0, 0]
    negative = tm.conditioning(4)
    (batched,) = comfy_nodes.common_ksampler(tm.patcher, 5, 3, 2.0, "euler", "normal", conditioning, negative, latent)
    for k in range(2):
        single_cond = [[cond[k:k + 1], {**extras, "pooled_output": extras["pooled_output"][k:k + 1]}]]
        (single,) = comfy_nodes.common_ksampler(tm.patcher, 5, 3, 2.0, "euler", "normal", single_cond, negative,
                                                tm.empty_latent(1, 8))
        expected = single["samples"][0]
        # float32 sums taken in another order (a batch of two, not one): equal to ~1e-5 of the latent's scale, which
        # an absolute 1e-4 missed on AMD EPYC (1.2e-4 on values up to 48)
        assert torch.allclose(batched["samples"][k], expected, rtol=0, atol=1e-5 * float(expected.abs().max())), k
    assert not torch.allclose(batched["samples"][0], batched["samples"][1], atol=1e-3)


def test_direction_node_errors(nodes):
    from probe_select.nodes.errors import ProbeSelectError

    _, latent_nodes = nodes
    node = latent_nodes.ProbeSelectConditioningDirection
    c = [[torch.zeros(1, 4, 8), {}]]
    short = [[torch.zeros(1, 3, 8), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ProbeSelectError, match=r"\[ProbeSelectConditioningDirection\] strengths 'a, b'"):
        node.execute(c, c, c, "a, b", "per_token", latent)
    with pytest.raises(ProbeSelectError, match="one token count"):
        node.execute(c, short, c, "1", "per_token", latent)
    assert node.execute(c, short, c, "1", "mean", latent).result[0][0][0].shape == (1, 4, 8)
    with pytest.raises(ProbeSelectError, match="batch of 2"):
        node.execute(c, c, c, "1", "per_token", {"samples": torch.zeros(2, 4, 8, 8)})


def test_pca_rgb_scales_large_inputs_from_a_subsample(monkeypatch):
    import probe_select.probes.analysis.pca as pca_module

    g = torch.Generator().manual_seed(7)
    maps = [torch.randn(4, 8, 16, 16, generator=g)]
    (full,), _ = pca_rgb(maps)
    monkeypatch.setattr(pca_module, "QUANTILE_ROWS", 256)     # 1024 positions -> every 4th
    (sub,), _ = pca_module.pca_rgb(maps)
    assert sub.shape == full.shape
    assert float((sub - full).abs().mean()) < 0.05
