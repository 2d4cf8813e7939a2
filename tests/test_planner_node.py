"""Planning ProbeSelectSampler's schedule from a dataset: the score tables (probes.training.planning) and
the node ProbeSelectPlanSchedule.

The data: synthetic rows written with the pack's DatasetWriter, at checkpoints 0.2, 0.5 and 0.8 of
10 steps, whose final score is a tiny random probe's score of the row's activations at t=0.2. That
probe ranks the candidates perfectly at 0.2; the same probe with its last layer negated ranks them
backwards.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from probe_select.probes.io import ProbeMetadata
from probe_select.probes.model import ProbeConfig, build_probe
from probe_select.probes.pruning import (
    PlannerGrid,
    ScoreTable,
    StageCosts,
    full_generation_cost,
    mean_kept_reward,
    parse_schedule,
    plan_schedule,
    schedule_cost,
)
from probe_select.probes.training.dataset import (
    CandidateRows,
    DatasetError,
    DatasetManifest,
    DatasetWriter,
    ProbeDataset,
    split_by_prompt,
)
from probe_select.probes.training.planning import probe_score_tables, split_rows

FEATURE_SHAPE = (4, 2, 2)
X0_SHAPE = (4, 4, 4)
CHECKPOINTS = [0.2, 0.5, 0.8]
STEPS = 10
PROMPTS = 48
CANDIDATES = 12
EVALUATOR = "reward"
FAMILY, TAP = "sd1", "output_blocks.1.0"


def tiny_config(**changes) -> ProbeConfig:
    base = ProbeConfig(in_channels=FEATURE_SHAPE[0], feature_size=FEATURE_SHAPE[1], stem_width=8, widths=(8,),
                       attention=False, pooled_size=2, embed_dim=8, time_embed_dim=8, head_hidden=(16,),
                       mlp_hidden=16, x0_channels=X0_SHAPE[0], x0_size=X0_SHAPE[1], x0_stem_width=8, x0_widths=(8,))
    return dataclasses.replace(base, **changes)


def make_probe(t: float, seed: int = 1, config: ProbeConfig | None = None, training: dict | None = None,
               feature_shape=FEATURE_SHAPE):
    config = config or tiny_config()
    probe = build_probe(config, seed=seed).eval()
    meta = ProbeMetadata(backbone_family=FAMILY, tap=TAP, checkpoint_t=t, feature_shape=feature_shape,
                         pooling="adaptive_avg", evaluator=EVALUATOR, score_mean=0.5, score_std=2.0,
                         training=training or {}, config=config)
    return probe, meta


def backwards(probe):
    """The same probe with its last layer negated: it ranks every set of candidates in reverse."""
    flipped = build_probe(probe.config, seed=0).eval()
    flipped.load_state_dict(probe.state_dict())
    last = [m for m in flipped.head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.neg_()
        last.bias.neg_()
    return flipped


def direct_scores(probe, meta, features: torch.Tensor, t: float, x0: torch.Tensor | None = None) -> torch.Tensor:
    """The probe's evaluator-unit scores computed here, without the library's batching."""
    with torch.no_grad():
        pred = probe(features.float(), torch.full((features.shape[0],), t), None,
                     None if x0 is None else x0.float())
    return pred.double() * meta.score_std + meta.score_mean


def write_dataset(root, scorer=None, prompts: int = PROMPTS, candidates: int = CANDIDATES, x0: bool = False,
                  seed: int = 0) -> dict:
    """Rows of ``prompts`` prompts x ``candidates`` seeds; the final score is ``scorer``'s score at t=0.2
    (random when None). Returns the tensors written (as stored: float16)."""
    generator = torch.Generator().manual_seed(seed)
    n = prompts * candidates
    features = torch.randn(n, len(CHECKPOINTS), *FEATURE_SHAPE, generator=generator).half()
    latents = torch.randn(n, len(CHECKPOINTS), *X0_SHAPE, generator=generator).half() if x0 else None
    if scorer is None:
        final = torch.randn(n, generator=generator)
    else:
        probe, meta = scorer
        final = direct_scores(probe, meta, features[:, 0], CHECKPOINTS[0]).float()
    manifest = DatasetManifest(backbone_family=FAMILY, tap=TAP, feature_shape=FEATURE_SHAPE,
                               checkpoints=CHECKPOINTS, evaluators=[EVALUATOR], x0_shape=X0_SHAPE if x0 else None)
    writer = DatasetWriter(root, manifest, writer_id="test")
    half = n // 2 // candidates * candidates         # two shards: rows come back in shard order
    for rows in (slice(0, half), slice(half, n)):
        writer.append(CandidateRows(
            features=features[rows], seeds=[1000 + i % candidates for i in range(rows.start, rows.stop)],
            prompts=[f"prompt {i // candidates}" for i in range(rows.start, rows.stop)],
            scores={EVALUATOR: final[rows]}, x0=None if latents is None else latents[rows]))
    return {"features": features, "x0": latents, "final": final}


@pytest.fixture(scope="module")
def predictive():
    return make_probe(0.2, seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, predictive):
    root = tmp_path_factory.mktemp("planner") / "ds"
    written = write_dataset(root, predictive)
    return ProbeDataset(root), written


# ---- the score tables ------------------------------------------------------------------------------


def test_tables_hold_the_probe_scores_and_the_stored_finals(dataset, predictive):
    data_set, written = dataset
    probe, meta = predictive
    later, later_meta = make_probe(0.5, seed=2)
    data = probe_score_tables(data_set, [(probe, meta), (later, later_meta)], STEPS, split="val+test")

    # Columns: 0.2 by the probe, 0.5 by the later probe; 0.8 is 0.3 from both, so no stage can go there.
    assert data.checkpoints == (0.2, 0.5) and data.recorded == (0.2, 0.5) and data.probe_index == (0, 1)
    assert data.uncovered == (0.8,) and data.off_grid == () and data.evaluator == EVALUATOR
    rows = split_rows(data_set.prompt_ids, "val+test", 0)
    parts = split_by_prompt(data_set.prompt_ids, (0.8, 0.1, 0.1), seed=0)
    assert sorted(rows.tolist()) == sorted(parts["val"].tolist() + parts["test"].tolist())
    held = sorted({data_set.prompt_ids[i] for i in rows.tolist()})
    assert sorted(data.prompt_ids) == held and 0 < len(held) < PROMPTS
    assert data.rows == len(rows) == len(held) * CANDIDATES and data.candidate_counts == (CANDIDATES,) * len(held)

    first_row = {pid: data_set.prompt_ids.index(pid) for pid in data.prompt_ids}
    for pid, table in zip(data.prompt_ids, data.tables):
        assert isinstance(table, ScoreTable) and table.scores.shape == (CANDIDATES, 2) and len(table) == CANDIDATES
        index = torch.arange(first_row[pid], first_row[pid] + CANDIDATES)
        assert all(data_set.prompt_ids[i] == pid for i in index.tolist())
        torch.testing.assert_close(table.final, written["final"][index].double())
        torch.testing.assert_close(table.scores[:, 0], direct_scores(probe, meta, written["features"][index, 0], 0.2),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(table.scores[:, 1],
                                   direct_scores(later, later_meta, written["features"][index, 1], 0.5),
                                   rtol=1e-5, atol=1e-5)
        # The final score is the probe's score at 0.2: it ranks every prompt's candidates exactly.
        assert torch.equal(torch.argsort(table.scores[:, 0]), torch.argsort(table.final))


def test_stages_are_labelled_with_the_step_the_sampler_stops_at(dataset, predictive):
    data_set, _ = dataset
    # 6 steps: 0.2 lands on step 1 (t = 1/6), 0.5 on step 3; the probe at 0.2 covers only the first.
    data = probe_score_tables(data_set, [predictive], 6, split="all")
    assert data.checkpoints == (1 / 6,) and data.recorded == (0.2,) and data.off_grid == (0.2,)
    assert data.uncovered == (0.5, 0.8) and len(data.tables) == PROMPTS
    plan = plan_schedule(data.tables, 3, 6, grid=PlannerGrid(max_stages=1))
    assert parse_schedule(str(plan.schedule)).checkpoint_steps(6) == [1]


def test_probes_that_read_x0_score_the_stored_x0(tmp_path):
    config = tiny_config(inputs=("activations", "x0"))
    probe, meta = make_probe(0.5, seed=3, config=config)
    written = write_dataset(tmp_path / "x0ds", prompts=4, candidates=3, x0=True)
    data = probe_score_tables(ProbeDataset(tmp_path / "x0ds"), [(probe, meta)], STEPS, split="all")
    assert data.checkpoints == (0.5,)
    expected = direct_scores(probe, meta, written["features"][:, 1], 0.5, written["x0"][:, 1])
    got = torch.cat([table.scores[:, 0] for table in data.tables])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    only_x0, only_meta = make_probe(0.5, seed=4, config=tiny_config(inputs=("x0",)))
    data = probe_score_tables(ProbeDataset(tmp_path / "x0ds"), [(only_x0, only_meta)], STEPS, split="all")
    with torch.no_grad():
        pred = only_x0(None, torch.full((12,), 0.5), None, written["x0"][:, 1].float()).double() * 2.0 + 0.5
    torch.testing.assert_close(torch.cat([table.scores[:, 0] for table in data.tables]), pred, rtol=1e-5, atol=1e-5)


def test_probes_and_datasets_that_do_not_fit_are_refused(tmp_path, dataset, predictive):
    data_set, _ = dataset
    wide = tiny_config(in_channels=8)
    with pytest.raises(DatasetError, match=r"feature shape"):
        probe_score_tables(data_set, [make_probe(0.2, config=wide, feature_shape=(8, 2, 2))], STEPS)
    with pytest.raises(DatasetError, match=r"x0 latent"):
        probe_score_tables(data_set, [make_probe(0.2, config=tiny_config(inputs=("x0",)))], STEPS)
    with pytest.raises(DatasetError, match=r"no checkpoint .* within 0.1"):
        probe_score_tables(data_set, [make_probe(0.65)], STEPS)
    other = dataclasses.replace(make_probe(0.5)[1], evaluator="other")
    with pytest.raises(DatasetError, match=r"different evaluators"):
        probe_score_tables(data_set, [predictive, (make_probe(0.5)[0], other)], STEPS)

    write_dataset(tmp_path / "single", prompts=6, candidates=1)
    with pytest.raises(DatasetError, match=r"no prompt of the all split .* 2 candidates or more \(the most is 1\)"):
        probe_score_tables(ProbeDataset(tmp_path / "single"), [predictive], STEPS, split="all")
    with pytest.raises(ValueError, match="split"):
        probe_score_tables(data_set, [predictive], STEPS, split="train")


def test_what_the_probe_file_says_about_its_training_prompts(dataset, predictive):
    data_set, _ = dataset
    probe, meta = predictive
    parts = split_by_prompt(data_set.prompt_ids, (0.8, 0.1, 0.1), seed=0)
    count = lambda rows: len({data_set.prompt_ids[i] for i in rows.tolist()})  # noqa: E731
    trained = {"data": {"train_prompts": count(parts["train"]), "val_prompts": count(parts["val"])}}

    unknown = probe_score_tables(data_set, [(probe, meta)], STEPS)
    assert unknown.held_out is None and "does not record" in unknown.split_note
    consistent = probe_score_tables(data_set, [(probe, dataclasses.replace(meta, training=trained))], STEPS)
    assert consistent.held_out is True and "match" in consistent.split_note
    other = {"data": {"train_prompts": count(parts["train"]) + 5, "val_prompts": count(parts["val"])}}
    mismatch = probe_score_tables(data_set, [(probe, dataclasses.replace(meta, training=other))], STEPS)
    assert mismatch.held_out is False and "optimistic" in mismatch.split_note
    everything = probe_score_tables(data_set, [(probe, meta)], STEPS, split="all")
    assert everything.held_out is None and "optimistic" in everything.split_note and len(everything.tables) == PROMPTS


def test_a_probe_trained_by_the_pack_is_known_to_have_held_out_the_split(dataset, tmp_path):
    from probe_select.probes.io import load_probe
    from probe_select.probes.training.pipeline import train_from_dataset
    from probe_select.probes.training.train import TrainConfig

    data_set, _ = dataset
    out = tmp_path / "trained.safetensors"
    train_from_dataset(data_set, 0.2, EVALUATOR, out, train_config=TrainConfig(epochs=1, batch_prompts=8, seed=0),
                       use_text=False, split_seed=0, probe_config=tiny_config(), streaming="off")
    probe, meta = load_probe(out)
    data = probe_score_tables(data_set, [(probe, meta)], STEPS, split="test", split_seed=0)
    assert data.held_out is True and "were held out" in data.split_note
    test_prompts = {data_set.prompt_ids[i] for i in split_rows(data_set.prompt_ids, "test", 0).tolist()}
    assert set(data.prompt_ids) == test_prompts


# ---- the node --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_output(pack, tmp_path_factory, predictive):
    """ComfyUI's output folder with two datasets: 'planner_ds' (finals = the predictive probe's score at
    0.2) and 'single_ds' (one candidate per prompt)."""
    import folder_paths

    from probe_select.nodes.folders import datasets_root

    out = tmp_path_factory.mktemp("output")
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    write_dataset(os.path.join(datasets_root(), "planner_ds"), predictive)
    write_dataset(os.path.join(datasets_root(), "single_ds"), prompts=8, candidates=1)
    yield out
    folder_paths.set_output_directory(old)


def loaded(probe_and_meta, name: str):
    from probe_select.nodes.engine.selection import LoadedProbe

    probe, meta = probe_and_meta
    return LoadedProbe(probe, meta, name)


def plan_node():
    from probe_select.nodes.nodes_planner import ProbeSelectPlanSchedule

    return ProbeSelectPlanSchedule


def planner_draws() -> int:
    """The random N-subsets per prompt the node judges each schedule on."""
    from probe_select.nodes.nodes_planner import PLANNER_DRAWS

    return PLANNER_DRAWS


def test_the_node_plans_what_plan_schedule_plans_on_the_held_out_prompts(comfy_output, predictive):
    node = plan_node()
    budget = 3.0
    schedule_text, candidates, summary = node.execute(loaded(predictive, "good.safetensors"), "planner_ds", budget,
                                                      STEPS, split="all").result
    schedule = parse_schedule(schedule_text)
    assert schedule.stages and candidates == schedule.candidates
    assert schedule_cost(schedule, STEPS) <= budget * full_generation_cost(STEPS)

    data = probe_score_tables(ProbeDataset(os.path.join(comfy_output, "probe_select_datasets", "planner_ds")),
                              [predictive], STEPS, split="all")
    plan = plan_schedule(data.tables, budget, STEPS, StageCosts(), PlannerGrid(max_stages=2),
                         draws=planner_draws())
    assert str(plan.schedule) == schedule_text
    # A perfect probe at 0.2 and 30 steps of budget: 8 candidates to step 2 (16 steps), the best finished
    # (8 more) is the most candidates a stage at 0.2 affords (12 would cost 32).
    assert schedule_text == "8: 0.2->1"
    best_of_3 = mean_kept_reward(data.tables, parse_schedule("3"), STEPS, draws=planner_draws())
    assert plan.mean_reward > best_of_3
    assert summary.splitlines()[0].startswith(f"schedule: {schedule_text}")
    assert f"{plan.mean_reward:.4f} vs {best_of_3:.4f} for best-of-3" in summary
    assert f"{PROMPTS} prompts of dataset 'planner_ds' (split all" in summary
    assert f"each on {planner_draws()} random N-subsets of every prompt's candidates" in summary
    assert "not covered by a probe (no stage there): t = 0.5, 0.8" in summary and "optimistic" in summary

    # ProbeSelectSampler takes it as it is (its schedule and candidates inputs; same probe, same steps).
    from probe_select.nodes.nodes_sampling import ProbeSelectSampler

    assert ProbeSelectSampler.validate_inputs(seed=0, candidates=candidates, steps=STEPS, checkpoint_percent=0.2,
                                              schedule=schedule_text) is True


def test_a_probe_that_ranks_backwards_loses_to_best_of_n(comfy_output, predictive):
    node = plan_node()
    probe, meta = predictive
    bad = (backwards(probe), meta)
    schedule_text, candidates, summary = node.execute(loaded(bad, "bad.safetensors"), "planner_ds", 3.0, STEPS,
                                                      split="all").result
    data = probe_score_tables(ProbeDataset(os.path.join(comfy_output, "probe_select_datasets", "planner_ds")),
                              [bad], STEPS, split="all")
    plan = plan_schedule(data.tables, 3.0, STEPS, top=10**6, draws=planner_draws())
    assert str(plan.schedule) == "3" and not plan.schedule.stages
    assert summary.startswith("Best-of-3")
    # The output is the best schedule with a stage (ProbeSelectSampler needs one), worse than best-of-3.
    staged = next(entry for entry in plan.ranking if entry[0].stages)
    assert schedule_text == str(staged[0]) and candidates == staged[0].candidates and staged[1] < plan.mean_reward
    # The perfect probe, on the same prompts and budget, prunes from more candidates than best-of-3 starts.
    good = node.execute(loaded(predictive, "good.safetensors"), "planner_ds", 3.0, STEPS, split="all").result[0]
    assert parse_schedule(good).candidates > plan.schedule.candidates


def test_the_node_plans_on_held_out_prompts_by_default(comfy_output, predictive):
    node = plan_node()
    later = make_probe(0.5, seed=2)
    schedule_text, _, summary = node.execute(loaded(predictive, "good.safetensors"), "planner_ds", 4.0, STEPS,
                                             later_probe=loaded(later, "later.safetensors")).result
    data_set = ProbeDataset(os.path.join(comfy_output, "probe_select_datasets", "planner_ds"))
    held = len({data_set.prompt_ids[i] for i in split_rows(data_set.prompt_ids, "val+test", 0).tolist()})
    assert 0 < held < PROMPTS
    assert f"{held} prompts of dataset 'planner_ds' (split val+test, split seed 0)" in summary
    assert "stages possible at: 0.2 (probe 'good.safetensors'), 0.5 (later_probe 'later.safetensors')" in summary
    assert "does not record its training prompts" in summary
    assert parse_schedule(schedule_text).stages

    # A dataset that grows under the same name is planned again (ComfyUI's cache key changes).
    growing = os.path.join(comfy_output, "probe_select_datasets", "growing_ds")
    write_dataset(growing, prompts=2, candidates=2)
    before = node.fingerprint_inputs(dataset="growing_ds", steps=STEPS)
    assert before.count("shard-") == 2
    write_dataset(growing, prompts=2, candidates=2, seed=5)
    assert node.fingerprint_inputs(dataset="growing_ds", steps=STEPS).count("shard-") == 4


def test_bad_input_names_the_node(comfy_output, predictive):
    from probe_select.nodes.errors import ProbeSelectError

    node = plan_node()
    probe = loaded(predictive, "good.safetensors")
    message = node.validate_inputs(budget_generations=0.5, steps=STEPS)
    assert isinstance(message, str) and message.startswith("[ProbeSelectPlanSchedule] budget_generations is 0.5")
    assert node.validate_inputs(budget_generations=3.0, steps=STEPS) is True
    assert node.validate_inputs(budget_generations=None, steps=1).startswith("[ProbeSelectPlanSchedule] steps is 1")
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectPlanSchedule\] budget_generations is 0.5"):
        node.execute(probe, "planner_ds", 0.5, STEPS)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectPlanSchedule\] no pruning schedule fits a budget of 1 "):
        node.execute(probe, "planner_ds", 1.0, STEPS, split="all")
    wide = make_probe(0.2, config=tiny_config(in_channels=8), feature_shape=(8, 2, 2))
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectPlanSchedule\] probe 'wide' on dataset 'planner_ds'.*"
                                               r"feature shape"):
        node.execute(loaded(wide, "wide"), "planner_ds", 3.0, STEPS)
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectPlanSchedule\] .*the most is 1"):
        node.execute(probe, "single_ds", 3.0, STEPS, split="all")
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectPlanSchedule\] dataset 'missing' does not exist"):
        node.execute(probe, "missing", 3.0, STEPS)
    assert node.fingerprint_inputs(dataset="../x") == "../x" and node.fingerprint_inputs(dataset="missing") == ""
    other_tap = (predictive[0], dataclasses.replace(predictive[1], tap="output_blocks.2.0"))
    with pytest.raises(ProbeSelectError, match=r"^\[ProbeSelectPlanSchedule\] later_probe 'other'"):
        node.execute(probe, "planner_ds", 3.0, STEPS, later_probe=loaded(other_tap, "other"))


def test_the_schedule_output_links_to_the_samplers_inputs(pack):
    from probe_select.nodes import NODES
    from probe_select.nodes.nodes_sampling import ProbeSelectSampler

    planner = plan_node()
    assert planner in NODES
    schema = planner.define_schema()
    sampler = ProbeSelectSampler.define_schema()
    assert schema.node_id == "ProbeSelectPlanSchedule" and schema.display_name == "Probe-Select Plan Schedule"
    assert schema.category == sampler.category
    outputs = {output.display_name: output for output in schema.outputs}
    inputs = {item.id: item for item in sampler.inputs}
    for output_name, input_name in (("schedule", "schedule"), ("candidates", "candidates")):
        target = inputs[input_name]
        # A widget input takes a link of its own type unless it is socketless.
        assert outputs[output_name].get_io_type() == target.get_io_type()
        assert not target.socketless


def test_comfyui_accepts_the_links_into_the_sampler(pack, monkeypatch):
    """ComfyUI's own prompt validation (`execution.validate_inputs`) of a ProbeSelectSampler whose schedule and
    candidates come from ProbeSelectPlanSchedule: the links type-check (and a wrong link is refused)."""
    import asyncio

    import execution
    import nodes

    from probe_select.nodes.nodes_sampling import ProbeSelectSampler
    from probe_select.nodes.nodes_selection import ProbeSelectLoadProbe

    planner = plan_node()
    for node in (planner, ProbeSelectSampler, ProbeSelectLoadProbe):
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, node.NODE_ID, node)
    upstream = {"2": planner.NODE_ID, "3": "CheckpointLoaderSimple", "4": "CLIPTextEncode", "5": "EmptyLatentImage",
                "6": ProbeSelectLoadProbe.NODE_ID}

    def errors(schedule_link, candidates_link):
        prompt = {key: {"class_type": class_type, "inputs": {}} for key, class_type in upstream.items()}
        prompt["1"] = {"class_type": ProbeSelectSampler.NODE_ID, "inputs": {
            "model": ["3", 0], "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "probe": ["6", 0],
            "seed": 0, "candidates": candidates_link, "keep": 1, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "checkpoint_percent": 0.2, "schedule": schedule_link}}
        validated = {key: (True, [], key) for key in upstream}      # the upstream nodes are checked elsewhere
        ok, found, _ = asyncio.run(execution.validate_inputs("p", prompt, "1", validated))
        return ok, found

    assert errors(["2", 0], ["2", 1]) == (True, [])
    ok, found = errors(["2", 1], ["2", 0])          # crossed: INT into schedule, STRING into candidates
    assert not ok and {e["type"] for e in found} == {"return_type_mismatch"} and len(found) == 2
