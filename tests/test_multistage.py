"""Multi-stage pruning in a graph: score, keep K, run the survivors on to a later checkpoint
(ProbeSelectResume / ProbeSelectResumeCustom with until_percent), score and keep again, then finish.

A candidate that survives two stages and is finished equals the plain run of its seed (the recorded
model outputs of every stage are replayed, so multistep samplers rebuild their history), and the model
is evaluated exactly `probes.pruning.denoiser_evaluations` times for the schedule.
"""
import pytest
import torch
from comfy_extras import nodes_custom_sampler as ccs
from comfy_extras.nodes_flux import FluxGuidance

from devtools.tiny_models import build_tiny
from helpers import ApplyModelRecorder, max_rel_diff, with_recorder
from test_exact_resume import SAMPLERS, _batch_invariant

STEPS, SEED, N = 10, 20, 4
SCHEDULE = "4: 0.2->3, 0.5->2"            # stops at steps 2 and 5 of 10
STOPS = (2, 5)


@pytest.fixture(scope="module")
def mods(pack):
    from probe_select.nodes import nodes_custom_sampling, nodes_sampling, nodes_selection, nodes_tap
    from probe_select.probes import pruning
    from probe_select.probes.scoring import CandidateScores

    class Mods:
        sampling, custom, selection, tap = nodes_sampling, nodes_custom_sampling, nodes_selection, nodes_tap
    Mods.pruning, Mods.CandidateScores = pruning, CandidateScores
    return Mods


@pytest.fixture(scope="module")
def sd1(pack):
    return build_tiny("sd1")


def _scores(mods, latent, values):
    """Hand-made scores for the candidates of an early `latent` (so the test knows which ones are kept).

    The exactness tests evaluate the model row by row (see test_exact_resume.py), which a tap can't
    read, so their runs have no activations to score."""
    from probe_select.nodes.engine.split_sampling import early_run

    run = early_run(latent)
    return mods.CandidateScores(torch.tensor(values, dtype=torch.float32), "test", run.run_id, run.seeds)


def _plain_ksampler(model, seed, sampler, cfg, pos, neg, latent):
    import nodes

    return nodes.common_ksampler(model, seed, STEPS, cfg, sampler, "normal", pos, neg, latent)[0]["samples"]


def _expected_evaluations(mods, schedule=SCHEDULE):
    return mods.pruning.denoiser_evaluations(mods.pruning.parse_schedule(schedule), STEPS)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_two_stages_in_a_ksampler_graph_equal_plain_runs(mods, sd1, sampler):
    """Early (N=4, to step 2) -> TopK 3 -> Resume until 0.5 (step 5) -> TopK 2 -> Resume: the two survivors
    are the plain KSampler runs of their seeds, and the model ran 4*2 + 3*3 + 2*5 candidate-steps."""
    pos, neg, latent, cfg = sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8), 3.0
    recorder = ApplyModelRecorder()
    model = _batch_invariant(sd1.patcher, recorder)
    early, x0, acts = mods.sampling.ProbeSelectEarlySampler.execute(
        model, pos, neg, latent, SEED, N, STEPS, cfg, sampler, "normal", 0.2).args
    assert early["probe_select"]["stop_step"] == STOPS[0] and acts is None
    kept, _, _, seeds_1, _ = mods.selection.ProbeSelectTopK.execute(
        early, _scores(mods, early, [0.1, 0.9, 0.5, 0.7]), 3).args
    assert seeds_1 == f"{SEED + 1},{SEED + 3},{SEED + 2}"

    stage_2 = mods.sampling.ProbeSelectResume.execute(model, pos, neg, kept, cfg, 0.5)
    early_2, x0_2, acts_2 = stage_2.args
    meta = early_2["probe_select"]
    assert meta["stop_step"] == STOPS[1] and meta["seeds"] == [SEED + 1, SEED + 3, SEED + 2]
    assert meta["stops"] == list(STOPS) and meta["run_id"] != early["probe_select"]["run_id"]
    assert acts_2 is None and x0_2["samples"].shape == early_2["samples"].shape == (3, 4, 8, 8)
    assert x0_2["probe_select_x0"]["seeds"] == meta["seeds"]
    assert meta["noise_level"]["step"] == STOPS[1] and "step 5 of 10" in stage_2.ui["text"][0]
    kept_2, pruned_2, best, seeds_2, _ = mods.selection.ProbeSelectTopK.execute(
        early_2, _scores(mods, early_2, [0.2, 0.8, 0.6]), 2).args
    assert seeds_2 == f"{SEED + 3},{SEED + 2}" and pruned_2["probe_select"]["seeds"] == [SEED + 1]

    finished, _, no_acts = mods.sampling.ProbeSelectResume.execute(model, pos, neg, kept_2, cfg).args
    assert no_acts is None and "probe_select" not in finished
    assert recorder.evaluations == _expected_evaluations(mods) == 4 * 2 + 3 * 3 + 2 * 5

    for row, seed in enumerate((SEED + 3, SEED + 2)):
        reference = _plain_ksampler(_batch_invariant(sd1.patcher, ApplyModelRecorder()), seed, sampler, cfg, pos,
                                    neg, latent)
        assert max_rel_diff(finished["samples"][row:row + 1], reference) <= 1e-5
    other = _plain_ksampler(sd1.patcher, SEED + 1, sampler, cfg, pos, neg, latent)
    assert max_rel_diff(finished["samples"][:1], other) > 1e-2         # another seed differs: the check can fail


def _save_probe(path, family, tap_path, channels, t):
    from probe_select.probes.io import ProbeMetadata, save_probe
    from probe_select.probes.model import ProbeConfig, build_probe

    config = ProbeConfig(in_channels=channels, feature_size=4, stem_width=16, widths=(16, 32), embed_dim=32,
                         time_embed_dim=16, head_hidden=(32,), mlp_hidden=32)
    meta = ProbeMetadata(backbone_family=family, tap=tap_path, checkpoint_t=t, feature_shape=(channels, 4, 4),
                         pooling="adaptive_avg", evaluator="clipscore", score_mean=0.0, score_std=1.0, config=config)
    save_probe(path, build_probe(config, seed=int(t * 100)), meta)
    return path.name


@pytest.fixture(scope="module")
def probes(mods, sd1, tmp_path_factory):
    """Probes trained (randomly initialised) at t=0.2 and t=0.5 on the tiny SD1's default tap."""
    import folder_paths
    from probe_select.nodes.engine.capture import find_tap

    folder = tmp_path_factory.mktemp("stage_probes")
    folder_paths.add_model_folder_path("probes", str(folder), is_default=True)
    tapped = mods.tap.ProbeSelectTap.execute(sd1.patcher, "auto", 4).result[0]
    path = find_tap(tapped).path
    channels = tapped.model.diffusion_model.get_submodule(path).out_channels
    load = mods.selection.ProbeSelectLoadProbe.execute
    return {t: load(_save_probe(folder / f"tiny_t{int(t * 10)}.safetensors", "sd1", path, channels, t)).result[0]
            for t in (0.2, 0.5)}


def test_one_box_sampler_runs_a_schedule_like_the_graph(mods, sd1, probes):
    """ProbeSelectSampler with schedule '0.2->3, 0.5->2' (probe at 0.2, later_probe at 0.5) keeps what the node
    graph with those probes keeps, finishes them exactly as the plain runs, and evaluates the model as often
    as the schedule costs."""
    pos, neg, latent, cfg, sampler = sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8), 3.0, "dpmpp_2m"
    recorder = ApplyModelRecorder()
    model = with_recorder(mods.tap.ProbeSelectTap.execute(sd1.patcher, "auto", 4).result[0], recorder)
    out = mods.sampling.ProbeSelectSampler.execute(model, pos, neg, latent, probes[0.2], SEED, N, 1, STEPS, cfg,
                                                   sampler, "normal", 0.2, 1.0, "0.2->3, 0.5->2", probes[0.5])
    finished, last_scores, kept_seeds = out.args
    assert recorder.evaluations == _expected_evaluations(mods)
    assert finished["samples"].shape[0] == 2 and len(last_scores) == 3

    # The same stages from nodes, with a probe per checkpoint.
    early, _, acts = mods.sampling.ProbeSelectEarlySampler.execute(model, pos, neg, latent, SEED, N, STEPS, cfg,
                                                                   sampler, "normal", 0.2).args
    scores_1 = mods.selection.ProbeSelectScore.execute(probes[0.2], acts).args[0]
    kept, _, _, seeds_1, _ = mods.selection.ProbeSelectTopK.execute(early, scores_1, 3).args
    early_2, _, acts_2 = mods.sampling.ProbeSelectResume.execute(model, pos, neg, kept, cfg, 0.5).args
    assert acts_2.step == STOPS[1] and acts_2.seeds == list(map(int, seeds_1.split(",")))
    assert acts_2.features.shape[0] == 3 and acts_2.run_id == early_2["probe_select"]["run_id"]
    scores_2 = mods.selection.ProbeSelectScore.execute(probes[0.5], acts_2).args[0]
    torch.testing.assert_close(scores_2.scores, last_scores.scores, rtol=1e-4, atol=1e-5)
    kept_2, _, _, seeds_2, _ = mods.selection.ProbeSelectTopK.execute(early_2, scores_2, 2).args
    assert kept_seeds == seeds_2 and set(map(int, seeds_2.split(","))) <= set(map(int, seeds_1.split(",")))
    graph_finished = mods.sampling.ProbeSelectResume.execute(model, pos, neg, kept_2, cfg).args[0]
    assert max_rel_diff(finished["samples"], graph_finished["samples"]) <= 1e-6

    # Batched as ComfyUI runs it, the survivors are the plain runs of their seeds up to batch rounding.
    for row, seed in enumerate(map(int, kept_seeds.split(","))):
        reference = _plain_ksampler(sd1.patcher, seed, sampler, cfg, pos, neg, latent)
        assert max_rel_diff(finished["samples"][row:row + 1], reference) <= 1e-4
    text = out.ui["text"][0]
    assert "Stage 1 at step 2 of 10" in text and "4 -> 3 kept" in text and "tiny_t2.safetensors" in text
    assert "Stage 2 at step 5 of 10" in text and "3 -> 2 kept" in text and "tiny_t5.safetensors" in text
    assert "log-SNR" in text

    # The gallery shows both stages: stage 1 scored the N candidates and kept 3, stage 2 those 3 and kept 2.
    shown = out.ui["probe_select_gallery"][0]
    stage_1, stage_2 = shown["stages"]
    assert [(s["number"], s["step"], s["steps"], s["t"]) for s in shown["stages"]] == [(1, 2, 10, 0.2), (2, 5, 10, 0.5)]
    assert (stage_1["probe"], stage_2["probe"]) == ("tiny_t2.safetensors", "tiny_t5.safetensors")
    assert stage_1["seeds"] == scores_1.seeds == [SEED + i for i in range(N)]
    assert stage_1["scores"] == pytest.approx(scores_1.scores.tolist(), rel=1e-4, abs=1e-5)
    assert stage_2["seeds"] == last_scores.seeds == [int(s) for s in seeds_1.split(",")]
    assert stage_2["scores"] == last_scores.scores.tolist()           # the last stage's record, as sent
    assert [stage_1["seeds"][i] for i in stage_1["kept"]] == [int(s) for s in seeds_1.split(",")]
    assert [stage_2["seeds"][i] for i in stage_2["kept"]] == [int(s) for s in kept_seeds.split(",")]
    # The fields the single-stage js reads: the N candidates, stage 1's scores, the finished ones kept.
    assert shown["seeds"] == stage_1["seeds"] and shown["scores"] == stage_1["scores"] and shown["mode"] == "top_k"
    assert [shown["seeds"][i] for i in shown["kept"]] == [int(s) for s in kept_seeds.split(",")]
    passed_1, finished = set(map(int, seeds_1.split(","))), set(map(int, kept_seeds.split(",")))
    assert shown["pruned_at"] == [None if s in finished else 2 if s in passed_1 else 1 for s in shown["seeds"]]
    assert sorted(map(str, shown["pruned_at"])) == ["1", "2", "None", "None"]
    assert out.ui["probe_select_previews"][0]["seeds"] == shown["seeds"]


def test_one_box_sampler_with_one_stage_sends_the_gallery_as_before(mods, sd1, probes):
    """Without a schedule the gallery payload has the single-stage fields the js reads (one stage's seeds,
    scores, kept indices best first), plus that one stage."""
    from probe_select.nodes.engine import gallery

    pos, neg, latent = sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8)
    model = mods.tap.ProbeSelectTap.execute(sd1.patcher, "auto", 4).result[0]
    out = mods.sampling.ProbeSelectSampler.execute(model, pos, neg, latent, probes[0.2], SEED, N, 2, STEPS, 3.0,
                                                   "euler", "normal", 0.2)
    _, scores, kept_seeds = out.args
    best = torch.argsort(scores.scores, descending=True, stable=True)[:2].tolist()
    assert kept_seeds == ",".join(str(scores.seeds[i]) for i in best)
    shown = out.ui["probe_select_gallery"][0]
    assert {k: shown[k] for k in ("run_id", "seeds", "scores", "evaluator", "kept", "mode")} == \
        gallery.gallery_payload(scores.run_id, scores.seeds, best, "top_k", scores)
    assert shown["seeds"] == [SEED + i for i in range(N)] and shown["kept"] == best
    assert shown["scores"] == scores.scores.tolist() and shown["evaluator"] == "clipscore"
    assert len(shown["stages"]) == 1 and shown["stages"][0]["kept"] == best
    assert shown["pruned_at"] == [None if i in best else 1 for i in range(N)]


def _flux_guider(model, tiny):
    return ccs.BasicGuider.execute(model, FluxGuidance.execute(tiny.conditioning(1), 3.5)[0])[0]


@pytest.mark.parametrize("family, sampler_name", [("flux", "dpmpp_2m"), ("sd3", "euler_ancestral")])
def test_two_stages_in_a_custom_graph_equal_plain_runs(mods, family, sampler_name):
    """The SamplerCustomAdvanced form: EarlySamplerCustom -> TopK -> ResumeCustom(until 0.5) -> TopK ->
    ResumeCustom: the survivors equal SamplerCustomAdvanced with RandomNoise(their seeds)."""
    tiny = build_tiny(family)
    recorder = ApplyModelRecorder()
    model = _batch_invariant(tiny.patcher, recorder)
    if family == "flux":
        guider = _flux_guider(model, tiny)
    else:
        guider = ccs.CFGGuider.execute(model, tiny.conditioning(1), tiny.conditioning(2), 2.0)[0]
    sampler = ccs.KSamplerSelect.execute(sampler_name)[0]
    (sigmas,) = ccs.BasicScheduler.execute(tiny.patcher, "simple", STEPS, 1.0)
    latent = tiny.empty_latent(1, 16)
    early = mods.custom.ProbeSelectEarlySamplerCustom.execute(ccs.RandomNoise.execute(SEED)[0], guider, sampler,
                                                              sigmas, latent, N, 0.2).args[0]
    kept = mods.selection.ProbeSelectTopK.execute(early, _scores(mods, early, [0.3, 0.1, 0.9, 0.5]), 3).args[0]
    early_2 = mods.custom.ProbeSelectResumeCustom.execute(guider, sampler, kept, sigmas, 0.5).args[0]
    assert early_2["probe_select"]["seeds"] == [SEED + 2, SEED + 3, SEED]
    assert early_2["probe_select"]["stop_step"] == STOPS[1] and early_2["probe_select"]["noise_level"]["kind"] == "flow"
    kept_2, _, _, seeds_2, _ = mods.selection.ProbeSelectTopK.execute(early_2, _scores(mods, early_2, [0.1, 0.4, 0.7]),
                                                                      2).args
    assert seeds_2 == f"{SEED},{SEED + 3}"
    finished = mods.custom.ProbeSelectResumeCustom.execute(guider, sampler, kept_2).args[0]
    assert recorder.evaluations == _expected_evaluations(mods)

    plain_guider = (_flux_guider(_batch_invariant(tiny.patcher, ApplyModelRecorder()), tiny) if family == "flux" else
                    ccs.CFGGuider.execute(_batch_invariant(tiny.patcher, ApplyModelRecorder()), tiny.conditioning(1),
                                          tiny.conditioning(2), 2.0)[0])
    for row, seed in enumerate((SEED, SEED + 3)):
        reference = ccs.SamplerCustomAdvanced.execute(ccs.RandomNoise.execute(seed)[0], plain_guider, sampler, sigmas,
                                                      latent)[0]["samples"]
        assert max_rel_diff(finished["samples"][row:row + 1], reference) <= 1e-5


def test_resume_until_checks_the_later_checkpoint(mods, sd1):
    from probe_select.nodes.errors import ProbeSelectError

    pos, neg = sd1.conditioning(1), sd1.conditioning(2)
    early = mods.sampling.ProbeSelectEarlySampler.execute(sd1.patcher, pos, neg, sd1.empty_latent(1, 8), SEED, 2,
                                                          STEPS, 3.0, "euler", "normal", 0.3).args[0]
    resume = mods.sampling.ProbeSelectResume
    for until, needle in [(0.3, "already at step 3"), (0.2, "already at step 3"), (0.97, "rounds to the last step"),
                          (0.0, "outside (0, 1]")]:
        with pytest.raises(ProbeSelectError) as info:
            resume.execute(sd1.patcher, pos, neg, early, 3.0, until)
        assert str(info.value).startswith("[ProbeSelectResume]") and needle in str(info.value)
        assert "Fix:" in str(info.value)
    assert resume.validate_inputs(until_percent=0.4) is True and resume.validate_inputs(until_percent=None) is True
    answer = resume.validate_inputs(until_percent=1.5)
    assert answer.startswith("[ProbeSelectResume] until_percent 1.5 is outside (0, 1]") and "Fix:" in answer
    custom = mods.custom.ProbeSelectResumeCustom.validate_inputs(until_percent=0.0)
    assert custom.startswith("[ProbeSelectResumeCustom] until_percent 0.0")


def test_resume_until_with_another_cfg_continues_from_the_latent(mods, sd1):
    """Another cfg can't replay the early outputs: the stage continues from the early latent (steps 2..4 only),
    and its latent carries no history to replay, so the finish continues from it too."""
    pos, neg, latent = sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8)
    recorder = ApplyModelRecorder()
    model = _batch_invariant(sd1.patcher, recorder)
    early = mods.sampling.ProbeSelectEarlySampler.execute(model, pos, neg, latent, SEED, 2, STEPS, 3.0, "euler",
                                                          "normal", 0.2).args[0]
    before = recorder.evaluations
    stage_2 = mods.sampling.ProbeSelectResume.execute(model, pos, neg, early, 5.0, 0.5).args[0]
    assert recorder.evaluations - before == 2 * (STOPS[1] - STOPS[0])
    assert stage_2["probe_select"]["calls"] is None and stage_2["probe_select"]["stop_step"] == STOPS[1]
    finished = mods.sampling.ProbeSelectResume.execute(model, pos, neg, stage_2, 5.0).args[0]
    assert recorder.evaluations - before == 2 * (STEPS - STOPS[0])
    same_cfg = mods.sampling.ProbeSelectResume.execute(model, pos, neg, early, 3.0).args[0]
    assert finished["samples"].shape == same_cfg["samples"].shape and max_rel_diff(finished["samples"],
                                                                                   same_cfg["samples"]) > 1e-3


SAMPLER_ARGS = dict(seed=0, candidates=8, steps=20, checkpoint_percent=0.2)


@pytest.mark.parametrize("schedule, needle", [
    ("0.2:8, 0.4:2", "separates checkpoint and K with ':'"),
    ("0.4->4, 0.2->2", "does not come after the previous one"),
    ("0.2->2, 0.4->4", "more than the 2 kept before it"),
    ("0.2->x", "is not a whole number"),
    ("0.2 8", "has no '->'"),
    ("6: 0.2->2", "starts 6 candidates but candidates is 8"),
    ("8:", "has no pruning stage"),
    ("8", "stage 1 '8' has no '->'"),
    ("0.2->4, 0.22->2", "both land on step 4"),
    ("0.01->4", "outside 1..19"),
    ("1.2->4", "outside (0, 1)"),
])
def test_bad_schedules_are_refused_naming_the_node(mods, schedule, needle):
    node = mods.sampling.ProbeSelectSampler
    assert node.validate_inputs(**SAMPLER_ARGS, schedule="0.2->4, 0.4->2") is True
    assert node.validate_inputs(**SAMPLER_ARGS, schedule="8: 20%->4, 40%->2") is True
    answer = node.validate_inputs(**SAMPLER_ARGS, schedule=schedule)
    assert isinstance(answer, str) and answer.startswith("[ProbeSelectSampler] ") and needle in answer, answer
    assert " Fix: " in answer and "Clone" not in answer
    assert node.validate_inputs(**{**SAMPLER_ARGS, "steps": None}, schedule=schedule) is True   # linked: at run


def test_schedule_errors_at_run_time_name_the_node_and_the_probe_fix(mods, sd1, probes):
    from probe_select.nodes.errors import ProbeSelectError

    node = mods.sampling.ProbeSelectSampler
    args = (sd1.patcher, sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8), probes[0.2], SEED, N, 1,
            STEPS, 3.0, "euler", "normal", 0.2, 1.0)
    with pytest.raises(ProbeSelectError) as info:
        node.execute(*args, "0.2:3, 0.5:2")
    assert str(info.value).startswith("[ProbeSelectSampler] schedule '0.2:3, 0.5:2'") and "0.2->8" in str(info.value)
    # Stage 2 at t=0.5 has no probe trained near it: refused before sampling, with the ways out.
    with pytest.raises(ProbeSelectError) as info:
        node.execute(*args, "0.2->3, 0.5->2")
    message = str(info.value)
    assert message.startswith("[ProbeSelectSampler] stage 2 scores at t=0.500") and "later_probe" in message
    assert "until_percent" in message and "'tiny_t2.safetensors' at t=0.20" in message
    # Within the probe's tolerance one probe scores both stages.
    kept_seeds = node.execute(*args, "0.2->3, 0.3->1").args[2]
    assert len(kept_seeds.split(",")) == 1


# Multistep (history across both stage boundaries), two evaluations a step, SDE/Brownian noise, cfg_pp hooks,
# and the plain ones. All 40 splittable samplers passed this test when it was written (about 4 minutes);
# the suite keeps these, which cover every kind of sampler history.
STAGE_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde", "lms",
                  "ipndm_v", "deis", "uni_pc_bh2", "sa_solver_pece", "res_multistep_cfg_pp", "ddim"]


@pytest.mark.parametrize("sampler", STAGE_SAMPLERS)
def test_every_kind_of_sampler_survives_two_stages_exactly(pack, sd1, sampler):
    """Engine level, every kind of sampler ComfyUI lists: N=3 to step 2, keep 2, on to
    step 5, keep 1, finish: the survivor is the plain KSampler run of its seed (model evaluated row by row),
    and first-order samplers evaluate the model N*s1 + K1*(s2 - s1) + K2*(T - s2) times."""
    from probe_select.nodes.engine import split_sampling as split

    pos, neg, latent, cfg = sd1.conditioning(1), sd1.conditioning(2), sd1.empty_latent(1, 8), 3.0
    recorder = ApplyModelRecorder()
    model = _batch_invariant(sd1.patcher, recorder)
    early = split.run_early(model, pos, neg, latent, SEED, 3, STEPS, cfg, sampler, "normal", 0.2)
    stage_2 = split.advance(model, pos, neg, split.select_rows(early.latent, [2, 0]), cfg, STOPS[1])
    assert stage_2.latent["probe_select"]["seeds"] == [SEED + 2, SEED]
    assert len(stage_2.latent["probe_select"]["calls"]) > len(early.latent["probe_select"]["calls"])
    finished = split.resume(model, pos, neg, split.select_rows(stage_2.latent, [1]), cfg)["samples"]
    plain = ApplyModelRecorder()
    reference = _plain_ksampler(_batch_invariant(sd1.patcher, plain), SEED, sampler, cfg, pos, neg, latent)
    assert max_rel_diff(finished, reference) <= 1e-5
    assert sampler in SAMPLERS
    if plain.evaluations == STEPS:
        assert recorder.evaluations == 3 * STOPS[0] + 2 * (STOPS[1] - STOPS[0]) + 1 * (STEPS - STOPS[1])
