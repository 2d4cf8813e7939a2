"""ProbeSelectDatasetWriter: append candidates' activations and their final scores to a dataset."""
from __future__ import annotations

import logging
import os
import re

from comfy_api.latest import io, ui

from ..probes.training.dataset import CandidateRows, DatasetError, DatasetManifest, DatasetWriter, rows_from_activations
from ..probes.features import ActivationSeries
from .errors import ProbeSelectError, problem_or_true
from .folders import datasets_root
from .types import CATEGORY, Activations, ImageScoresType

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def dataset_path(node_id: str, name: str) -> str:
    name = name.strip()
    if not _NAME.match(name) or ".." in name:
        raise ProbeSelectError(node_id, f"dataset name '{name}' is not a plain folder name.",
                               "use letters, digits, '.', '_' or '-' (no slashes).")
    return os.path.join(datasets_root(), name)


def list_datasets() -> list[str]:
    root = datasets_root()
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "manifest.json")))


def rows_from(node_id: str, activations, image_scores: list, prompt: str) -> tuple[DatasetManifest, CandidateRows]:
    """One dataset row per candidate: its activations at every checkpoint and each evaluator's score."""
    if activations is None:
        raise ProbeSelectError(node_id, "no activations: the sampler's model has no activation tap.",
                               "insert ProbeSelectTap before ProbeSelectCollectSampler.")
    n = len(activations.sets[0]) if isinstance(activations, ActivationSeries) else len(activations)
    names = [s.evaluator for s in image_scores]
    if len(set(names)) != len(names):
        raise ProbeSelectError(node_id, f"two score inputs come from the same evaluator ({names}).",
                               "connect each evaluator once.")
    for scores in image_scores:
        if len(scores.scores) != n:
            raise ProbeSelectError(node_id, f"{len(scores.scores)} '{scores.evaluator}' scores for {n} candidates.",
                                   "score the finished images of the same sampler run (one image per candidate).")
    return rows_from_activations(activations, {s.evaluator: s.scores for s in image_scores}, prompt)


class ProbeSelectDatasetWriter(io.ComfyNode):
    NODE_ID = "ProbeSelectDatasetWriter"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Dataset Writer",
            category=CATEGORY + "/train",
            description="Appends one shard to a dataset under output/probe_select_datasets/<name>: every "
                        "candidate's activations with the evaluator scores of its finished image. Safe to use from "
                        "several ComfyUI instances at once; an interrupted write never damages earlier shards.",
            inputs=[
                Activations.Input("activations", tooltip="From ProbeSelectCollectSampler (several checkpoints) or "
                                                         "ProbeSelectEarlySampler."),
                ImageScoresType.Input("scores", tooltip="Per-image scores of the finished candidates."),
                ImageScoresType.Input("scores_2", optional=True),
                ImageScoresType.Input("scores_3", optional=True),
                io.String.Input("prompt", multiline=True, tooltip="The prompt the candidates were made from; "
                                                                  "datasets are split by prompt."),
                io.String.Input("dataset_name", default="probe_dataset"),
            ],
            outputs=[io.Int.Output(display_name="rows")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dataset_name: str | None = None) -> bool | str:
        return problem_or_true(dataset_path, cls.NODE_ID, dataset_name)

    @classmethod
    def execute(cls, activations, scores, prompt: str, dataset_name: str, scores_2=None,
                scores_3=None) -> io.NodeOutput:
        node_id = cls.NODE_ID
        path = dataset_path(node_id, dataset_name)
        image_scores = [s for s in (scores, scores_2, scores_3) if s is not None]
        manifest, rows = rows_from(node_id, activations, image_scores, prompt)
        try:
            total = DatasetWriter(path, manifest).append(rows)
        except DatasetError as e:
            raise ProbeSelectError(node_id, str(e), "write to a new dataset name, or collect with the same model, "
                                                    "tap, checkpoints and evaluators.") from None
        log.info("Probe-Select: dataset %s has %d rows", dataset_name, total)
        return io.NodeOutput(total, ui=ui.PreviewText(f"{dataset_name}: {total} rows ({len(rows)} added)"))
