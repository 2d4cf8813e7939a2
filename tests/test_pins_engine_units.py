"""Pins on the engine's pure helpers (issue 11): fast, no model runs. The schedule-sigma test, tuple
block outputs and grid sizes of the tap; the early/preview LATENT metadata, the text embedding taken
from CONDITIONING and the replay tolerance of split sampling; the per-row noise sources."""
import pytest
import torch


@pytest.fixture(scope="module")
def engine(pack):
    from probe_select.nodes.engine import capture, noise, split_sampling
    from probe_select.probes import features

    class Engine:
        pass
    e = Engine()
    e.capture, e.noise, e.split, e.features = capture, noise, split_sampling, features
    return e


# ---- capture -------------------------------------------------------------------------------------


def test_at_schedule_sigma(engine):
    at = engine.capture.at_schedule_sigma
    sigmas = torch.tensor([14.6, 7.0, 3.0, 0.0])
    assert at(torch.tensor([14.6, 14.6]), sigmas, 0)          # step 0 is a step like any other
    assert at(torch.tensor([3.0]), sigmas, 2) and not at(torch.tensor([7.0]), sigmas, 2)
    assert not at(torch.tensor([3.0]), sigmas, 4) and not at(torch.tensor([14.6]), sigmas, -1)
    assert not at(None, sigmas, 0) and not at(torch.tensor([]), sigmas, 0) and not at(torch.tensor([14.6]), None, 0)


def test_first_tensor_and_grid_sizes(engine):
    capture = engine.capture
    t = torch.zeros(2, 3)
    assert capture._first_tensor(t) is t
    assert capture._first_tensor((None, t, torch.ones(1))) is t
    with pytest.raises(TypeError, match="holds no tensor"):
        capture._first_tensor((None, 1))
    # SD3 pads to a multiple of the patch (ceil); Flux rounds to the nearest (h + p/2) // p.
    assert capture._grid_sizes((8, 6), 2) == [(4, 3)]
    assert capture._grid_sizes((5, 8), 4) == [(2, 2), (1, 2)]
    assert capture._grid_sizes((7, 5), 2) == [(4, 3)]


def test_sd3_joint_block_reads_the_image_stream(engine):
    """SD3 joint blocks return (context, x): the map comes from x, the second element."""
    generator = torch.Generator().manual_seed(0)
    context, image = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 16, 8, generator=generator)
    fmap = engine.capture.block_output_to_map((context, image), "sd3", "joint_blocks.3", (8, 8), 2, 5)
    assert torch.equal(fmap, engine.features.tokens_to_grid(image, 4, 4))
    # Other tuples (Flux double blocks: (img, txt)) give their first tensor.
    fmap = engine.capture.block_output_to_map((image, context), "flux", "double_blocks.1", (8, 8), 2, 5)
    assert torch.equal(fmap, engine.features.tokens_to_grid(image, 4, 4))


# ---- split sampling ------------------------------------------------------------------------------


def test_early_and_preview_run_read_their_own_keys(engine):
    split = engine.split
    assert split.preview_run({"samples": torch.zeros(1), split.X0_KEY: {"run_id": "r", "seeds": (4, 5)}}) == split.EarlyRun("r", [4, 5])
    assert split.preview_run({"samples": torch.zeros(1)}) is None and split.early_run({"samples": torch.zeros(1)}) is None
    early = split.early_run({split.PACK_KEY: {"run_id": "r", "seeds": [1], "version": 2, "steps": 9, "stop_step": 3}})
    assert early == split.EarlyRun("r", [1], 2, 9, 3)


def test_text_embedding_from_conditioning(engine):
    read = engine.split.text_embedding_from_conditioning
    generator = torch.Generator().manual_seed(0)
    tokens, pooled = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 6, generator=generator)
    assert read([]) is None and read(None) is None
    assert torch.equal(read([[tokens, {"pooled_output": pooled}]]), pooled[:1])
    assert torch.equal(read([[tokens, {}]]), tokens.mean(dim=1)[:1])
    assert read([["not a tensor", {}]]) is None


def test_replay_checks_each_calls_sigma(engine):
    """Replayed calls must ask for the recorded sigma; the tolerance has a floor so a recorded 0 matches ~0."""
    recorded = [torch.full((1, 2), 7.0)]
    replay = engine.split._ModelOutputReplay([recorded, recorded], [3.0, 0.0])
    x = torch.zeros(1, 2)

    def executor(*args):
        raise AssertionError("the model is not evaluated while replaying")
    out = replay(executor, None, None, x, torch.tensor([3.0]), {})     # one row: its timestep is read at index 0
    assert torch.equal(out[0], recorded[0]) and out[0] is not recorded[0]
    replay(executor, None, None, x, torch.tensor([1e-9]), {})
    assert replay.replayed == 2
    with pytest.raises(ValueError, match="replay out of step"):
        engine.split._ModelOutputReplay([recorded], [3.0])(executor, None, None, x, torch.tensor([3.1]), {})


# ---- noise ---------------------------------------------------------------------------------------


def test_per_row_gaussian_noise_resumes_from_its_draw_count(engine):
    from comfy.k_diffusion.sampling import default_noise_sampler

    x, seeds = torch.zeros(3, 4, 2, 2), [7, 8, 9]
    fresh = engine.noise.PerRowGaussianNoise(x, seeds)
    draws = [fresh(None, None) for _ in range(3)]
    assert fresh.states() == [3, 3, 3]
    own = [default_noise_sampler(x[i:i + 1], seed=seed) for i, seed in enumerate(seeds)]
    expected = [torch.cat([source(None, None) for source in own]) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(draws, expected))
    resumed = engine.noise.PerRowGaussianNoise(x, seeds, states=[2, 2, 2])
    assert resumed.states() == [2, 2, 2]
    assert torch.equal(resumed(None, None), draws[2])
    with pytest.raises(ValueError, match=r"different numbers of noise draws: \[1, 2\]"):
        engine.noise.PerRowGaussianNoise(x, seeds, states=[1, 2, 2])


def test_noise_source_per_sampler(engine):
    from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler

    x, seeds = torch.zeros(2, 4, 2, 2), [3, 4]
    sigmas = torch.tensor([14.6, 5.0, 1.0, 0.1, 0.0])
    build = engine.noise.build_noise_sampler
    for name in ("euler", "ddim", "uni_pc", "heun"):
        assert build(name, x, seeds, sigmas) is None
    assert isinstance(build("euler_ancestral", x, seeds, sigmas), engine.noise.PerRowGaussianNoise)
    brownian = build("dpmpp_sde", x, seeds, sigmas)
    assert isinstance(brownian, engine.noise.PerRowBrownianNoise)
    # The tree of each row spans the schedule's positive sigmas, as a batch-1 run builds it.
    cpu = engine.noise.BROWNIAN_SAMPLERS["dpmpp_sde"]
    expected = torch.cat([BrownianTreeNoiseSampler(x[i:i + 1], torch.tensor(0.1), torch.tensor(14.6), seed=seed, cpu=cpu)(
        torch.tensor(5.0), torch.tensor(1.0)) for i, seed in enumerate(seeds)])
    torch.testing.assert_close(brownian(torch.tensor(5.0), torch.tensor(1.0)), expected, rtol=0, atol=0)


def test_initial_noise_is_comfyuis_per_seed(engine):
    import comfy.sample

    rows = torch.zeros(3, 4, 2, 2)
    expected = torch.cat([comfy.sample.prepare_noise(rows[i:i + 1], seed) for i, seed in enumerate([5, 6, 7])])
    assert torch.equal(engine.noise.initial_noise(rows, [5, 6, 7]), expected)
    assert not torch.equal(expected[0], expected[1])
