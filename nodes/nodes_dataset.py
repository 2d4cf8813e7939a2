"""ProbeSelectDatasetWriter: append candidates' activations and their final scores to a dataset (optionally
channel-reduced); ProbeSelectCompactDataset: compact a dataset's shards and report what it holds."""
from __future__ import annotations

import logging
import os
import re

import comfy.model_management as mm
from comfy_api.latest import io, ui

from ..probes.training.compaction import compact_dataset, dataset_report, format_dataset_report
from ..probes.training.dataset import (
    MANIFEST_NAME,
    CandidateRows,
    DatasetError,
    DatasetManifest,
    DatasetWriter,
    rows_from_activations,
)
from ..probes.features import ActivationSeries
from ..probes.reduction import NO_REDUCTION, REDUCTION_KINDS, ChannelReduction
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


def check_reduction_settings(node_id: str, kind: str, channels: int, seed: int) -> None:
    """What can be checked before the activations' width is known."""
    if kind not in REDUCTION_KINDS:
        raise ProbeSelectError(node_id, f"channel_reduction '{kind}' is unknown.", f"pick one of {list(REDUCTION_KINDS)}.")
    if kind != "none" and channels < 1:
        raise ProbeSelectError(node_id, f"reduced_channels is {channels}.", "keep 1 channel or more (the paper keeps 48).")
    if seed < 0:
        raise ProbeSelectError(node_id, f"projection_seed is {seed}.", "use a seed of 0 or more.")


def reduction_for(node_id: str, activations, kind: str, channels: int, seed: int) -> ChannelReduction:
    """The writer's channel reduction for these activations (their width is its input width)."""
    check_reduction_settings(node_id, kind, channels, seed)
    if kind == "none":
        return NO_REDUCTION
    first = activations.sets[0] if isinstance(activations, ActivationSeries) else activations
    shape = first.feature_shape
    try:
        reduction = ChannelReduction.create(kind, channels, shape[0], seed if kind == "projection" else 0)
        reduction.output_shape(shape)
    except ValueError as e:
        raise ProbeSelectError(node_id, f"the activations are (C, P, P) = {shape}: {e}.",
                               "lower reduced_channels, or set channel_reduction to none.") from None
    return reduction


def rows_from(node_id: str, activations, image_scores: list, prompt: str,
              reduction: ChannelReduction = NO_REDUCTION, x0_size: int = 0) -> tuple[DatasetManifest, CandidateRows]:
    """One dataset row per candidate: its activations at every checkpoint and each evaluator's score (and,
    with ``x0_size`` > 0, its x0 prediction latent at every checkpoint, pooled to that side)."""
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
    if x0_size < 0:
        raise ProbeSelectError(node_id, f"x0_size is {x0_size}.", "use 0 (store no x0) or a side such as 16.")
    try:
        return rows_from_activations(activations, {s.evaluator: s.scores for s in image_scores}, prompt, reduction,
                                     x0_size=x0_size)
    except ValueError as e:
        raise ProbeSelectError(node_id, f"cannot store the x0 latent: {e}.",
                               "connect the activations of ProbeSelectCollectSampler or ProbeSelectEarlySampler "
                               "directly, or set x0_size to 0.") from None


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
                        "several ComfyUI instances at once; an interrupted write never damages earlier shards. "
                        "Optionally stores fewer channels (per-sample PCA or a fixed random projection); the dataset "
                        "records it, probes trained on it record it, and scoring applies it to live activations.",
            inputs=[
                Activations.Input("activations", tooltip="From ProbeSelectCollectSampler (several checkpoints) or "
                                                         "ProbeSelectEarlySampler."),
                ImageScoresType.Input("scores", tooltip="Per-image scores of the finished candidates."),
                ImageScoresType.Input("scores_2", optional=True),
                ImageScoresType.Input("scores_3", optional=True),
                io.String.Input("prompt", multiline=True, tooltip="The prompt the candidates were made from; "
                                                                  "datasets are split by prompt."),
                io.String.Input("dataset_name", default="probe_dataset"),
                io.Combo.Input("channel_reduction", options=list(REDUCTION_KINDS), default="none", optional=True,
                               tooltip="Store fewer channels: 'pca' = each candidate's own top principal components "
                                       "(the paper's 48), 'projection' = one fixed random orthonormal projection "
                                       "(from projection_seed). Every row of a dataset uses the same setting."),
                io.Int.Input("reduced_channels", default=48, min=1, max=16384, optional=True,
                             tooltip="Channels kept by the reduction (PCA: at most feature_size^2 - 1)."),
                io.Int.Input("projection_seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="Seed of the 'projection' matrix; it is part of the dataset's identity."),
                io.Int.Input("x0_size", default=0, min=0, max=128, optional=True,
                             tooltip="Also store each candidate's x0 prediction latent at every checkpoint, pooled "
                                     "to x0_size x x0_size (16 is plenty; about 2 KB a row and checkpoint), so that "
                                     "probes reading x0 can be trained. 0 = don't store it. Every row of a dataset "
                                     "uses the same setting."),
            ],
            outputs=[io.Int.Output(display_name="rows")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dataset_name: str | None = None, channel_reduction: str | None = "none",
                        reduced_channels: int | None = 48, projection_seed: int | None = 0) -> bool | str:
        checked = problem_or_true(dataset_path, cls.NODE_ID, dataset_name)
        if checked is not True:
            return checked
        return problem_or_true(check_reduction_settings, cls.NODE_ID, channel_reduction, reduced_channels,
                               projection_seed)

    @classmethod
    def execute(cls, activations, scores, prompt: str, dataset_name: str, scores_2=None, scores_3=None,
                channel_reduction: str = "none", reduced_channels: int = 48, projection_seed: int = 0,
                x0_size: int = 0) -> io.NodeOutput:
        node_id = cls.NODE_ID
        path = dataset_path(node_id, dataset_name)
        image_scores = [s for s in (scores, scores_2, scores_3) if s is not None]
        reduction = reduction_for(node_id, activations, channel_reduction, reduced_channels, projection_seed) \
            if activations is not None else NO_REDUCTION
        manifest, rows = rows_from(node_id, activations, image_scores, prompt, reduction, x0_size or 0)
        try:
            total = DatasetWriter(path, manifest).append(rows)
        except DatasetError as e:
            raise ProbeSelectError(node_id, str(e), "write to a new dataset name, or collect with the same model, "
                                                    "tap, checkpoints, evaluators, channel reduction "
                                                    "(channel_reduction, reduced_channels, projection_seed) and "
                                                    "x0_size.") from None
        log.info("Probe-Select: dataset %s has %d rows", dataset_name, total)
        stored = f", stored as {reduction.describe()}" if reduction.active else ""
        stored += f", with x0 latents {manifest.x0_shape}" if manifest.x0_shape is not None else ""
        return io.NodeOutput(total, ui=ui.PreviewText(f"{dataset_name}: {total} rows ({len(rows)} added{stored})"))


class ProbeSelectCompactDataset(io.ComfyNode):
    NODE_ID = "ProbeSelectCompactDataset"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Compact Dataset",
            category=CATEGORY + "/train",
            description="Rewrites a dataset's many small shards (one per collected prompt) into a few large ones, "
                        "each row exactly once (re-collected duplicates dropped), and reports its size, rows, "
                        "prompts, evaluators and channel reduction. Safe to cancel or kill at any moment and while "
                        "writers append; training started before it must be started again.",
            inputs=[
                io.Combo.Input("dataset", options=list_datasets()),
                io.Combo.Input("action", options=["compact", "report"], default="compact",
                               tooltip="'report' only reads the dataset."),
                io.Int.Input("shard_mb", default=512, min=1, max=65536, tooltip="Target size of each new shard (MiB)."),
            ],
            outputs=[io.String.Output(display_name="report"), io.Int.Output(display_name="rows")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, dataset: str | None = None) -> bool | str:
        return problem_or_true(dataset_path, cls.NODE_ID, dataset)

    @classmethod
    def execute(cls, dataset: str, action: str = "compact", shard_mb: int = 512) -> io.NodeOutput:
        node_id = cls.NODE_ID
        path = dataset_path(node_id, dataset)
        if not os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            raise ProbeSelectError(node_id, f"dataset '{dataset}' does not exist under output/{os.path.basename(datasets_root())}.",
                                   "pick a dataset written by ProbeSelectDatasetWriter (refresh the node list after "
                                   "collecting).")
        if action not in ("compact", "report"):
            raise ProbeSelectError(node_id, f"action '{action}' is unknown.", "pick 'compact' or 'report'.")
        if shard_mb < 1:
            raise ProbeSelectError(node_id, f"shard_mb is {shard_mb}.", "use 1 MiB or more.")
        lines = []
        try:
            if action == "compact":
                # Cancel between new shards: what is written stays (readers drop the duplicate copies and the
                # next compaction removes them), so stopping is as safe as a kill.
                result = compact_dataset(path, shard_mb * 2**20,
                                         on_shard_written=lambda _path: mm.throw_exception_if_processing_interrupted())
                lines.append(
                    f"compacted {dataset}: {result.shards_before} shards -> {result.shards_after}, "
                    f"{result.rows_before} stored rows -> {result.rows_after} ({result.duplicates_dropped} duplicates "
                    f"dropped), {result.bytes_before / 2**20:.1f} MiB -> {result.bytes_after / 2**20:.1f} MiB "
                    f"in {result.seconds:.1f} s")
            report = dataset_report(path)
        except (DatasetError, OSError) as e:
            raise ProbeSelectError(node_id, f"dataset '{dataset}': {e}",
                                   "move the file it names out of the dataset's shards folder and run again; "
                                   "a compaction that failed has left every row readable.") from None
        lines.append(format_dataset_report(report))
        text = "\n".join(lines)
        return io.NodeOutput(text, report["rows"], ui=ui.PreviewText(text))
