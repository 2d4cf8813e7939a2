"""Cheap input checks in ``validate_inputs``: a bad widget value is refused before anything runs, with
a message that names the node id (never ``<Class>Clone``) and the fix; a linked input (None at
validation time) is left to ``execute``; and ComfyUI's own prompt validation calls the check."""
import asyncio

import pytest


@pytest.fixture(scope="module")
def node_modules(pack):
    from probe_select.nodes import (nodes_dataset, nodes_latent_probing, nodes_sampling, nodes_schedules,
                                    nodes_training)

    return nodes_sampling, nodes_schedules, nodes_dataset, nodes_training, nodes_latent_probing


SPLIT_GOOD = dict(seed=0, candidates=4, steps=10, checkpoint_percent=0.2)
SPLIT_BAD = [
    (dict(checkpoint_percent=0.0), "checkpoint_percent 0.0 is outside (0, 1)"),
    (dict(checkpoint_percent=1.0), "checkpoint_percent 1.0 is outside (0, 1)"),
    (dict(checkpoint_percent=0.01), "rounds to step 0"),
    (dict(steps=1), "steps is 1"),
    (dict(steps=10001), "steps is 10001"),
    (dict(candidates=0), "candidates is 0"),
    (dict(candidates=5000), "candidates is 5000"),
    (dict(seed=-1), "seed -1 is outside"),
    (dict(seed=2**64 - 2, candidates=4), "overflows the seed range"),
]


@pytest.mark.parametrize("node_name", ["ProbeSelectEarlySampler", "ProbeSelectSampler"])
@pytest.mark.parametrize("change, expected", SPLIT_BAD)
def test_split_nodes_refuse_bad_numbers_before_running(node_modules, node_name, change, expected):
    nodes_sampling = node_modules[0]
    node = getattr(nodes_sampling, node_name)
    assert node.validate_inputs(**SPLIT_GOOD) is True
    answer = node.validate_inputs(**{**SPLIT_GOOD, **change})
    assert isinstance(answer, str) and answer.startswith(f"[{node_name}] ") and expected in answer
    assert "Clone" not in answer and " Fix: " in answer


def test_split_nodes_leave_linked_inputs_to_execute(node_modules):
    nodes_sampling = node_modules[0]
    for node in (nodes_sampling.ProbeSelectEarlySampler, nodes_sampling.ProbeSelectSampler):
        assert node.validate_inputs(**{**SPLIT_GOOD, "checkpoint_percent": None}) is True
        assert node.validate_inputs(**{**SPLIT_GOOD, "steps": None, "checkpoint_percent": 0.0}) is True


def test_collect_sampler_checks_its_checkpoint_list(node_modules):
    node = node_modules[0].ProbeSelectCollectSampler
    good = dict(seed=0, candidates=2, steps=10, checkpoint_percents="0.1,0.2,0.4")
    assert node.validate_inputs(**good) is True
    for text, expected in [("0.1,abc", "is not a list of numbers"), ("", "no checkpoints given"),
                           ("0.1,0.12", "round to the same step"), ("0.5,1.0", "outside 1..9")]:
        answer = node.validate_inputs(**{**good, "checkpoint_percents": text})
        assert answer.startswith("[ProbeSelectCollectSampler] ") and expected in answer, (text, answer)
    assert node.validate_inputs(**{**good, "candidates": 0}).startswith("[ProbeSelectCollectSampler] candidates is 0")
    assert node.validate_inputs(**{**good, "checkpoint_percents": None}) is True


def test_string_inputs_are_checked_before_running(node_modules):
    _, nodes_schedules, nodes_dataset, nodes_training, nodes_latent_probing = node_modules
    inspector = nodes_schedules.ProbeSelectScheduleInspector
    assert inspector.validate_inputs(schedulers="normal, karras") is True
    answer = inspector.validate_inputs(schedulers="normal, krras")
    assert answer.startswith("[ProbeSelectScheduleInspector] unknown scheduler 'krras'") and "karras" in answer

    writer = nodes_dataset.ProbeSelectDatasetWriter
    assert writer.validate_inputs(dataset_name="coco_5k") is True
    assert writer.validate_inputs(dataset_name="../elsewhere").startswith(
        "[ProbeSelectDatasetWriter] dataset name '../elsewhere' is not a plain folder name.")

    train = nodes_training.ProbeSelectTrain
    assert train.validate_inputs(probe_name="sd15_clipscore_t02") is True
    assert train.validate_inputs(probe_name="sub/probe").startswith("[ProbeSelectTrain] probe name 'sub/probe'")

    direction = nodes_latent_probing.ProbeSelectConditioningDirection
    assert direction.validate_inputs(strengths="0, 0.5, 1") is True
    assert direction.validate_inputs(strengths="0, half").startswith(
        "[ProbeSelectConditioningDirection] strengths '0, half' is not a list of numbers.")
    for node, name in [(inspector, "schedulers"), (writer, "dataset_name"), (train, "probe_name"),
                       (direction, "strengths")]:
        assert node.validate_inputs(**{name: None}) is True


def test_comfyui_prompt_validation_shows_the_message(node_modules, monkeypatch):
    """Through ComfyUI's own `execution.validate_inputs` (what a queued prompt meets): the check runs on
    the class ComfyUI prepares, and its message reaches the error list with the real node id."""
    import execution
    import nodes

    early = node_modules[0].ProbeSelectEarlySampler
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, early.NODE_ID, early)
    widgets = dict(seed=0, candidates=4, steps=10, cfg=7.0, sampler_name="euler", scheduler="normal")

    def validate(checkpoint_percent):
        prompt = {"1": {"class_type": early.NODE_ID, "inputs": {**widgets, "checkpoint_percent": checkpoint_percent}}}
        _ok, errors, _node = asyncio.run(execution.validate_inputs("p", prompt, "1", {}))
        return [e for e in errors if e["type"] == "custom_validation_failed"]

    failed = validate(0.0)
    assert failed and all("[ProbeSelectEarlySampler] checkpoint_percent 0.0 is outside (0, 1)" in e["details"]
                          for e in failed)
    assert not any("Clone" in e["details"] for e in failed)
    assert validate(0.3) == []
