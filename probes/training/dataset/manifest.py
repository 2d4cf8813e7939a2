"""The manifest of a dataset (``<root>/manifest.json``): what every row holds, and the dataset's error type."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ...checkpoints import CheckpointError, checkpoint_index
from ...reduction import NO_REDUCTION, ChannelReduction

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DATASET_FORMAT = "probe-select-dataset"
# Bump when a reader of the previous version could misread a new dataset. Readers accept any
# version up to their own and refuse newer ones. A dataset records the lowest version that reads it:
# 1 for features stored as tapped, 2 for channel-reduced ones (a version-1 reader would take the
# reduced channels for tapped ones and train probes that can't score live activations).
DATASET_FORMAT_VERSION = 2
REDUCED_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
# Where the nodes and the command-line collector keep datasets, under ComfyUI's output directory.
DATASETS_SUBFOLDER = "probe_select_datasets"

# Checkpoints are fractions of steps done (s / T); two stored values this close are the same checkpoint.
SAME_CHECKPOINT_TOLERANCE = 1e-6


class DatasetError(ValueError):
    """A dataset is missing, damaged, or does not match the data or probe it is used with.

    Messages name the dataset directory or shard file and say how to fix the problem.
    """


def is_int(value) -> bool:
    """An int that is not a bool (JSON true/false must not pass as 1/0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def same_checkpoints(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two stored checkpoint lists are the same, value by value within :data:`SAME_CHECKPOINT_TOLERANCE`."""
    return len(a) == len(b) and all(abs(x - y) <= SAME_CHECKPOINT_TOLERANCE for x, y in zip(a, b))


@dataclass(kw_only=True)
class DatasetManifest:
    """What every row of a dataset holds; stored as ``<root>/manifest.json``.

    Attributes:
        format, format_version: identify the file; set by this module.
        backbone_family: backbone family of the activations (e.g. ``"sd2"``).
        tap: path of the tapped block (e.g. ``"output_blocks.7.0"``).
        feature_shape: ``(C, P, P)`` of one row's pooled activations at one checkpoint.
        pooling: how activations were reduced to ``P x P`` (e.g. ``"adaptive_avg"``).
        checkpoints: the checkpoints t (fraction of steps done) captured per row, strictly
            increasing; the K axis of the stored features follows this order.
        evaluators: names of the evaluators that scored every row (e.g. ``["clipscore"]``).
        text_dim: width D of the stored text embedding; 0 when rows carry none.
        reduction: how the tapped channels were reduced before storing
            (:class:`~probe_select.probes.reduction.ChannelReduction`); ``feature_shape`` is the
            stored, reduced shape. Absent from the JSON when nothing was reduced.
        x0_shape: ``(c, S, S)`` of the sampler's x0 prediction latent stored per row and checkpoint
            (pooled to ``S x S``, tensor ``x0`` of the shards); None (absent from the JSON) when rows
            carry none. Readers that predate it ignore the key and the tensor and read the rest.
    """

    format: str = DATASET_FORMAT
    format_version: int = 1
    backbone_family: str
    tap: str
    feature_shape: tuple[int, int, int]
    pooling: str = "adaptive_avg"
    checkpoints: list[float]
    evaluators: list[str]
    text_dim: int = 0
    reduction: ChannelReduction = field(default_factory=lambda: NO_REDUCTION)
    x0_shape: Optional[tuple[int, int, int]] = None

    def __post_init__(self) -> None:
        if self.format != DATASET_FORMAT:
            raise ValueError(f"DatasetManifest.format must be {DATASET_FORMAT!r}, got {self.format!r}")
        if not is_int(self.format_version) or not 1 <= self.format_version <= DATASET_FORMAT_VERSION:
            raise ValueError(
                f"DatasetManifest.format_version {self.format_version!r} is not supported (this "
                f"Probe-Select reads versions 1..{DATASET_FORMAT_VERSION}); update the pack."
            )
        for name in ("backbone_family", "tap", "pooling"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"DatasetManifest.{name} must be a non-empty string, got {value!r}")
        shape = tuple(self.feature_shape)
        if len(shape) != 3 or not all(is_int(n) and n > 0 for n in shape):
            raise ValueError(f"DatasetManifest.feature_shape must be three positive ints (C, P, P), got {self.feature_shape!r}")
        self.feature_shape = shape
        checkpoints = [float(t) for t in self.checkpoints]
        if not checkpoints:
            raise ValueError("DatasetManifest.checkpoints must list at least one checkpoint t")
        if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in checkpoints):
            raise ValueError(f"DatasetManifest.checkpoints must be fractions of steps in [0, 1], got {checkpoints}")
        if any(b - a <= SAME_CHECKPOINT_TOLERANCE for a, b in zip(checkpoints, checkpoints[1:])):
            raise ValueError(
                f"DatasetManifest.checkpoints must be strictly increasing, got {checkpoints}; list them "
                f"sorted, and order the K axis of the features the same way."
            )
        self.checkpoints = checkpoints
        evaluators = list(self.evaluators)
        if not evaluators or not all(isinstance(name, str) and name for name in evaluators):
            raise ValueError(f"DatasetManifest.evaluators must be a non-empty list of names, got {self.evaluators!r}")
        if len(set(evaluators)) != len(evaluators):
            raise ValueError(f"DatasetManifest.evaluators has repeated names: {evaluators}")
        self.evaluators = evaluators
        if not is_int(self.text_dim) or self.text_dim < 0:
            raise ValueError(f"DatasetManifest.text_dim must be an int >= 0 (0 = no text embedding), got {self.text_dim!r}")
        if self.x0_shape is not None:
            x0_shape = tuple(self.x0_shape)
            if len(x0_shape) != 3 or not all(is_int(n) and n > 0 for n in x0_shape) or x0_shape[1] != x0_shape[2]:
                raise ValueError(f"DatasetManifest.x0_shape must be three positive ints (c, S, S) or None, got {self.x0_shape!r}")
            self.x0_shape = x0_shape
        self.reduction = ChannelReduction.from_dict(self.reduction)
        if self.reduction.active:
            if shape[0] != self.reduction.channels:
                raise ValueError(f"DatasetManifest.feature_shape {shape} does not hold the {self.reduction.channels} "
                                 f"channels of its reduction ({self.reduction.describe()})")
            self.format_version = max(self.format_version, REDUCED_FORMAT_VERSION)

    def to_json(self) -> str:
        """The manifest as indented JSON text (what ``manifest.json`` holds)."""
        data = dataclasses.asdict(self)
        data["feature_shape"] = list(self.feature_shape)
        if not self.reduction.active:
            del data["reduction"]       # datasets stored as tapped stay readable by format-1 readers
        if self.x0_shape is None:
            del data["x0_shape"]        # datasets without x0 are written exactly as before it existed
        else:
            data["x0_shape"] = list(self.x0_shape)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: Union[str, bytes], source: str = "manifest") -> "DatasetManifest":
        """Parse and validate manifest JSON; every problem is a :class:`DatasetError` naming ``source``."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise DatasetError(f"{source} is not valid JSON ({error}); the file is damaged. Restore it or recreate the dataset.") from None
        if not isinstance(data, dict) or data.get("format") != DATASET_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DatasetError(
                f"{source} is not a Probe-Select dataset manifest (format {found!r}, expected "
                f"{DATASET_FORMAT!r}); point to a folder written by DatasetWriter."
            )
        version = data.get("format_version")
        if is_int(version) and version > DATASET_FORMAT_VERSION:
            raise DatasetError(
                f"{source} uses dataset format version {version}, but this Probe-Select reads up to "
                f"version {DATASET_FORMAT_VERSION}; update the pack to read this dataset."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("%s: ignoring unknown manifest keys %s", source, unknown)
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except (TypeError, ValueError) as error:
            raise DatasetError(f"{source} has an invalid manifest ({error}). Restore it or recreate the dataset.") from None

    def checkpoint_index(self, checkpoint_t: float) -> int:
        """Position on the K axis of the stored checkpoint for ``checkpoint_t`` (one rule:
        :func:`~probe_select.probes.checkpoints.checkpoint_index`); :class:`DatasetError` if none."""
        try:
            return checkpoint_index(self.checkpoints, checkpoint_t)
        except CheckpointError:
            raise DatasetError(
                f"checkpoint t={checkpoint_t} is not in this dataset; it holds checkpoints "
                f"{self.checkpoints}. Pick one of those, or collect a dataset at t={checkpoint_t}."
            ) from None

    def compatible_with(self, other: "DatasetManifest") -> list[str]:
        """Differences that stop rows described by ``other`` from sharing a dataset with ``self``.

        Returns one readable line per differing field (empty list when compatible). The order of
        ``evaluators`` does not matter; checkpoints are compared within a tiny tolerance.
        """
        differences = []
        for name in ("backbone_family", "tap", "feature_shape", "pooling", "text_dim", "x0_shape"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                differences.append(f"{name} differs ({mine!r} vs {theirs!r})")
        if self.reduction != other.reduction:
            differences.append(f"channel reduction differs ({self.reduction.describe()} vs {other.reduction.describe()})")
        if not same_checkpoints(self.checkpoints, other.checkpoints):
            differences.append(f"checkpoints differ ({self.checkpoints} vs {other.checkpoints})")
        if set(self.evaluators) != set(other.evaluators):
            differences.append(f"evaluators differ ({sorted(self.evaluators)} vs {sorted(other.evaluators)})")
        return differences


def read_manifest(root: PathLike) -> DatasetManifest:
    """The manifest of the dataset at ``root``.

    Raises:
        DatasetError: if the folder or its ``manifest.json`` is missing or invalid.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; check the path, or collect data into it with DatasetWriter first.")
    # A manifest is published complete (hard link of a finished temp file), except on filesystems
    # without hard links, where it is created in place; then a reader may briefly see it partial.
    for attempt in range(20):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DatasetError(
                f"{root} has no {MANIFEST_NAME}, so it is not a Probe-Select dataset (or its manifest "
                f"was deleted); point to a folder written by DatasetWriter."
            ) from None
        except OSError as error:
            raise DatasetError(f"cannot read {path}: {error}") from None
        try:
            json.loads(text)
            break
        except ValueError:
            if attempt == 19:
                break
            time.sleep(0.05)
    return DatasetManifest.from_json(text, source=str(path))
