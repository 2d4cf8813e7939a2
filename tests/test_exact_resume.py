"""A kept candidate, resumed, equals a plain batch-1 KSampler run of its seed, for every sampler ComfyUI lists.

The resume replays the early phase's recorded model outputs through the sampler (see
nodes/split_sampling.py), so multistep, SDE and multi-evaluation samplers rebuild their history; the
model is evaluated only for the steps after the checkpoint.
"""
import comfy.samplers
import pytest
import torch

from helpers import ApplyModelRecorder, max_rel_diff, with_recorder
from devtools.tiny_models import build_tiny

# Samplers that choose their own steps can't stop at one; every other sampler ComfyUI lists is tested.
OWN_STEPS = ("dpm_fast", "dpm_adaptive")
SAMPLERS = [name for name in comfy.samplers.KSampler.SAMPLERS if name not in OWN_STEPS]
STEPS, CHECKPOINT, STOP = 6, 0.34, 2
SEED, CANDIDATES, KEPT = 10, 3, [2, 0]
# SD1 with CFG (cond and uncond evaluated); Flux as it is run, CFG 1 (ComfyUI skips the uncond).
CFG = {"sd1": 3.0, "flux": 1.0}
# Samplers whose own update contracts the batch's history with torch.tensordot (sa_solver's Adams sums): a BLAS
# matrix-vector product whose blocking follows the batch size, so on some CPUs (AVX-512) row 0 of a batch of two
# rounds differently from a batch of one (within 1e-6 relative). Their resumed candidate is exact alone.
BATCH_ROUNDED_UPDATE = ("sa_solver", "sa_solver_pece")


@pytest.fixture(scope="module")
def split(pack):
    from probe_select.nodes.engine import split_sampling

    return split_sampling


def _setup(family):
    tiny = build_tiny(family)
    latent = tiny.empty_latent(1, 16 if tiny.latent_channels == 16 else 8)
    return tiny, latent, tiny.conditioning(1), tiny.conditioning(2)


def _plain(model, seed, sampler, cfg, pos, neg, latent):
    import nodes

    (out,) = nodes.common_ksampler(model, seed, STEPS, cfg, sampler, "normal", pos, neg, latent)
    return out["samples"]


def _row_by_row(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """APPLY_MODEL wrapper: evaluate every row as a batch of one.

    Batched matrix products round differently from batch-1 ones (~2e-7 relative per evaluation on
    these models), and the random tiny models amplify that to ~1e-6..1.5e-5 over 6 steps. Evaluating
    row by row takes that out, so what is left is the split itself, which must then be exact.
    """
    rows = x.shape[0]

    def row(value, i):
        return value[i:i + 1] if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows else value
    return torch.cat([executor(x[i:i + 1], row(t, i), row(c_concat, i), row(c_crossattn, i), control,
                               transformer_options, **{k: row(v, i) for k, v in kwargs.items()}) for i in range(rows)])


def _batch_invariant(model, recorder):
    """The model with an evaluation counter outside and row-by-row evaluation inside."""
    import comfy.patcher_extension

    counted = with_recorder(model, recorder)
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_row_by_row", _row_by_row)
    return counted


@pytest.mark.parametrize("family", ["sd1", "flux"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_resumed_candidate_equals_plain_ksampler(split, family, sampler):
    """N=3 candidates, the best 2 kept (reordered), resumed: the first equals the plain run of its seed."""
    tiny, latent, pos, neg = _setup(family)
    cfg = CFG[family]
    recorder = ApplyModelRecorder()
    model = _batch_invariant(tiny.patcher, recorder)
    early = split.run_early(model, pos, neg, latent, SEED, CANDIDATES, STEPS, cfg, sampler, "normal", CHECKPOINT)
    assert early.latent["probe_select"]["stop_step"] == STOP
    early_evaluations = recorder.evaluations
    kept = split.select_rows(early.latent, KEPT)
    finished = split.resume(model, pos, neg, kept, cfg)["samples"]
    resume_evaluations = recorder.evaluations - early_evaluations

    plain_recorder = ApplyModelRecorder()
    reference = _plain(_batch_invariant(tiny.patcher, plain_recorder), SEED + KEPT[0], sampler, cfg, pos, neg,
                       latent)
    assert finished.shape[0] == len(KEPT) and finished.shape[1:] == reference.shape[1:]
    assert max_rel_diff(finished[:1], reference) <= 1e-5
    if sampler not in BATCH_ROUNDED_UPDATE:
        assert torch.equal(finished[:1], reference)

    # Evaluations per candidate: the early phase's calls for N, the rest of the plain run's for K, and
    # nothing for the replayed early steps.
    per_candidate_total = plain_recorder.evaluations
    assert early_evaluations % CANDIDATES == 0
    per_candidate_early = early_evaluations // CANDIDATES
    assert STOP <= per_candidate_early < per_candidate_total
    assert resume_evaluations == len(KEPT) * (per_candidate_total - per_candidate_early)
    if per_candidate_total == STEPS:         # one evaluation per step: N*s + K*(T-s)
        assert early_evaluations + resume_evaluations == CANDIDATES * STOP + len(KEPT) * (STEPS - STOP)

    # A lone kept candidate: the sampler's own arithmetic runs at batch 1 too, so it is exact for every sampler.
    alone = split.resume(model, pos, neg, split.select_rows(early.latent, KEPT[:1]), cfg)["samples"]
    assert torch.equal(alone, reference)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batched_candidates_on_flux_stay_within_1e5(split, sampler):
    """As ComfyUI runs it, candidates batched: on the tiny Flux model the batch rounding stays below 1e-5."""
    tiny, latent, pos, neg = _setup("flux")
    early = split.run_early(tiny.patcher, pos, neg, latent, SEED, CANDIDATES, STEPS, 1.0, sampler, "normal",
                            CHECKPOINT)
    finished = split.resume(tiny.patcher, pos, neg, split.select_rows(early.latent, KEPT), 1.0)["samples"]
    reference = _plain(tiny.patcher, SEED + KEPT[0], sampler, 1.0, pos, neg, latent)
    assert max_rel_diff(finished[:1], reference) <= 1e-5


@pytest.mark.parametrize("family", ["sd1", "flux"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m_sde", "uni_pc", "sa_solver_pece", "res_multistep_cfg_pp"])
def test_single_candidate_resume_is_bit_identical(split, family, sampler):
    """With N=1 nothing is batched differently, so the split run is exactly one KSampler run."""
    tiny, latent, pos, neg = _setup(family)
    cfg = CFG[family]
    early = split.run_early(tiny.patcher, pos, neg, latent, SEED, 1, STEPS, cfg, sampler, "normal", CHECKPOINT)
    finished = split.resume(tiny.patcher, pos, neg, early.latent, cfg)["samples"]
    assert torch.equal(finished, _plain(tiny.patcher, SEED, sampler, cfg, pos, neg, latent))


def test_top_k_carries_the_recorded_model_outputs_of_its_rows(split):
    tiny, latent, pos, neg = _setup("sd1")
    early = split.run_early(tiny.patcher, pos, neg, latent, SEED, CANDIDATES, STEPS, 1.0, "heun", "normal",
                            CHECKPOINT)
    meta = early.latent["probe_select"]
    assert len(meta["calls"]) == len(meta["call_sigmas"]) == 2 * STOP            # heun: two calls a step
    assert all(call[0].shape[0] == CANDIDATES and call[1] is None for call in meta["calls"])   # CFG 1: no uncond
    kept = split.select_rows(early.latent, KEPT)["probe_select"]
    for before, after in zip(meta["calls"], kept["calls"]):
        assert torch.equal(after[0], before[0][KEPT]) and after[1] is None
    assert torch.equal(kept["start"], meta["start"][KEPT]) and torch.equal(kept["state"], meta["state"][KEPT])


def test_resume_with_another_cfg_continues_from_the_early_latent(split):
    """The early outputs were combined with the early cfg; another cfg can't replay them, so the
    candidates continue from their early latents (steps s..T-1 only), as a changed latent does."""
    tiny, latent, pos, neg = _setup("sd1")
    recorder = ApplyModelRecorder()
    model = with_recorder(tiny.patcher, recorder)
    early = split.run_early(model, pos, neg, latent, SEED, 2, STEPS, 3.0, "dpmpp_2m", "normal", CHECKPOINT)
    same = split.resume(model, pos, neg, early.latent, 3.0)["samples"]
    before = recorder.evaluations
    other = split.resume(model, pos, neg, early.latent, 5.0)["samples"]
    assert recorder.evaluations - before == 2 * (STEPS - STOP)
    assert max_rel_diff(other, same) > 1e-3
