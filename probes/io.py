"""Self-describing probe files: safetensors weights plus string metadata in the header.

The header says what the probe reads (backbone family, tap, checkpoint t, feature shape, pooling),
what it predicts (evaluator and the fixed score normalisation), how it was trained, and its
:class:`~.model.ProbeConfig`, so a file rebuilds its own model and can be checked against
activations before use. Files are only ever read with safetensors: nothing is unpickled.

Header keys (all values are strings; structured ones are JSON)::

    format          "probe-select"
    format_version  "1"
    backbone_family e.g. "sd2"
    tap             e.g. "output_blocks.7.0"
    checkpoint_t    e.g. "0.2"
    feature_shape   e.g. "[640, 16, 16]"
    pooling         e.g. "adaptive_avg"
    evaluator       e.g. "imagereward"
    score_norm      e.g. '{"mean": 0.3594, "std": 0.9424}'
    training        free-form JSON summary
    probe_config    JSON of ProbeConfig.to_dict()
    channel_reduction  (only for probes trained on channel-reduced data) JSON of
                    ChannelReduction.to_dict(); feature_shape is then the reduced (k, P, P), and
                    scoring reduces the live activations the same way. Such files are version 2,
                    so that a version-1 reader refuses them instead of scoring unreduced features.

What the probe reads is its config's ``inputs`` (``["activations"]`` when absent: every file written
before x0 inputs existed): a probe that reads the sampler's x0 prediction latent also records
``x0_channels`` and ``x0_size`` there, and its file is version 3, so that an older reader says to
update the pack instead of failing on the unknown config fields. A probe whose encoders are
conditioned on the text (``text_film`` in its config) is version 4, for the same reason.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .model import Probe, ProbeConfig
from .reduction import NO_REDUCTION, ChannelReduction

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ProbeFileError",
    "ProbeMetadata",
    "save_probe",
    "load_probe",
    "read_probe_metadata",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "probe-select"
# Bump when a reader of the previous version could misread a new file. Readers accept any version
# up to their own and refuse newer ones. A file records the lowest version that reads it: 1, 2
# for a probe that reads channel-reduced features, 3 for one that reads the x0 latent, 4 for one
# whose encoders are conditioned on the text (see the module docstring).
FORMAT_VERSION = 4
REDUCED_FORMAT_VERSION = 2
X0_FORMAT_VERSION = 3
TEXT_FILM_FORMAT_VERSION = 4

REQUIRED_KEYS = (
    "format",
    "format_version",
    "backbone_family",
    "tap",
    "checkpoint_t",
    "feature_shape",
    "pooling",
    "evaluator",
    "score_norm",
    "training",
    "probe_config",
)

PathLike = Union[str, os.PathLike]


class ProbeFileError(ValueError):
    """A probe file is missing, unreadable, not a Probe-Select probe, or inconsistent."""


@dataclass(kw_only=True)
class ProbeMetadata:
    """Everything a probe file says about its probe, besides the weights.

    Attributes:
        backbone_family: backbone family of the activations it was trained on (e.g. ``"sd2"``).
        tap: path of the tapped block (e.g. ``"output_blocks.7.0"``).
        checkpoint_t: checkpoint (fraction of steps done) of its training activations.
        feature_shape: ``(C, P, P)`` of one candidate's pooled activations.
        pooling: how activations were reduced to ``P x P`` (e.g. ``"adaptive_avg"``).
        evaluator: the evaluator whose score it predicts (e.g. ``"imagereward"``).
        score_mean, score_std: fixed normalisation of the evaluator score; the probe predicts
            ``(score - score_mean) / score_std``.
        training: free-form JSON-serialisable summary of training (data, epochs, metrics...).
        config: architecture of the probe.
        reduction: how its training data's channels were reduced (``feature_shape`` is the
            reduced shape); scoring applies it to live activations before the probe.
    """

    backbone_family: str
    tap: str
    checkpoint_t: float
    feature_shape: tuple[int, int, int]
    pooling: str
    evaluator: str
    score_mean: float = 0.0
    score_std: float = 1.0
    training: dict = field(default_factory=dict)
    config: ProbeConfig
    reduction: ChannelReduction = NO_REDUCTION

    def __post_init__(self) -> None:
        for name in ("backbone_family", "tap", "pooling", "evaluator"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"ProbeMetadata.{name} must be a non-empty string, got {value!r}")
        shape = tuple(self.feature_shape)
        if len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
            raise ValueError(f"ProbeMetadata.feature_shape must be three positive ints (C, P, P), got {self.feature_shape!r}")
        self.feature_shape = shape
        self.checkpoint_t = float(self.checkpoint_t)
        if not 0.0 <= self.checkpoint_t <= 1.0:
            raise ValueError(f"ProbeMetadata.checkpoint_t must be in [0, 1], got {self.checkpoint_t}")
        self.score_mean = float(self.score_mean)
        self.score_std = float(self.score_std)
        if not math.isfinite(self.score_mean) or not (math.isfinite(self.score_std) and self.score_std > 0):
            raise ValueError(
                f"ProbeMetadata score normalisation must be finite with std > 0, "
                f"got mean={self.score_mean}, std={self.score_std}"
            )
        if not isinstance(self.training, dict):
            raise ValueError(f"ProbeMetadata.training must be a dict, got {type(self.training).__name__}")
        if not isinstance(self.config, ProbeConfig):
            raise ValueError(f"ProbeMetadata.config must be a ProbeConfig, got {type(self.config).__name__}")
        self.reduction = ChannelReduction.from_dict(self.reduction)
        if self.reduction.active and shape[0] != self.reduction.channels:
            raise ValueError(f"ProbeMetadata.feature_shape {shape} does not hold the {self.reduction.channels} channels "
                             f"of its reduction ({self.reduction.describe()})")

    @property
    def inputs(self) -> tuple[str, ...]:
        """What the probe reads (``config.inputs``): ``("activations",)``, ``("x0",)`` or both."""
        return self.config.inputs

    @property
    def x0_shape(self) -> Optional[tuple[int, int, int]]:
        """``(c, S, S)`` of the pooled x0 latent the probe reads; None when it reads no x0."""
        return self.config.x0_shape if self.config.reads_x0 else None

    @property
    def activation_shape(self) -> tuple[int, int, int]:
        """``(C, P, P)`` of the live activations the probe scores (before its reduction)."""
        return self.reduction.input_shape(self.feature_shape)


def _lowest_version(metadata: ProbeMetadata) -> int:
    """The oldest format version whose readers read this probe correctly."""
    if metadata.config.text_film:
        return TEXT_FILM_FORMAT_VERSION
    if metadata.config.reads_x0:
        return X0_FORMAT_VERSION
    return REDUCED_FORMAT_VERSION if metadata.reduction.active else 1


def _metadata_to_header(metadata: ProbeMetadata) -> dict[str, str]:
    try:
        training = json.dumps(metadata.training, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"ProbeMetadata.training must be JSON-serialisable: {error}") from error
    header = {
        "format": FORMAT_NAME,
        "format_version": str(_lowest_version(metadata)),
        "backbone_family": metadata.backbone_family,
        "tap": metadata.tap,
        "checkpoint_t": json.dumps(metadata.checkpoint_t),
        "feature_shape": json.dumps(list(metadata.feature_shape)),
        "pooling": metadata.pooling,
        "evaluator": metadata.evaluator,
        "score_norm": json.dumps({"mean": metadata.score_mean, "std": metadata.score_std}),
        "training": training,
        "probe_config": json.dumps(metadata.config.to_dict(), sort_keys=True),
    }
    if metadata.reduction.active:
        header["channel_reduction"] = json.dumps(metadata.reduction.to_dict(), sort_keys=True)
    return header


def _metadata_from_header(header: dict[str, str], path: Path) -> ProbeMetadata:
    """Parse and validate a header; every problem becomes a :class:`ProbeFileError` naming ``path``."""
    fmt = header.get("format")
    if fmt != FORMAT_NAME:
        found = "no 'format' key" if fmt is None else f"format {fmt!r}"
        raise ProbeFileError(
            f"{path} is not a Probe-Select probe ({found} in its safetensors metadata, expected "
            f"format {FORMAT_NAME!r}). Select a probe file trained with Probe-Select; model or LoRA "
            f"weights cannot be used as probes."
        )
    raw_version = header.get("format_version")
    try:
        version = int(raw_version)
    except (TypeError, ValueError):
        raise ProbeFileError(
            f"{path} has an unreadable format_version {raw_version!r}; the file is damaged. "
            f"Re-export or re-download the probe."
        ) from None
    if version > FORMAT_VERSION:
        raise ProbeFileError(
            f"{path} uses probe format version {version}, but this Probe-Select supports up to "
            f"version {FORMAT_VERSION}. Update the pack to load this probe."
        )
    if version < 1:
        raise ProbeFileError(f"{path} has an invalid format_version {version}; re-export the probe.")
    missing = [key for key in REQUIRED_KEYS if key not in header]
    if missing:
        raise ProbeFileError(
            f"{path} is missing probe metadata {missing}; the file is incomplete or was written by "
            f"another tool. Re-export the probe with save_probe."
        )
    try:
        score_norm = json.loads(header["score_norm"])
        config_dict = json.loads(header["probe_config"])
        return ProbeMetadata(
            backbone_family=header["backbone_family"],
            tap=header["tap"],
            checkpoint_t=float(json.loads(header["checkpoint_t"])),
            feature_shape=tuple(json.loads(header["feature_shape"])),
            pooling=header["pooling"],
            evaluator=header["evaluator"],
            score_mean=float(score_norm["mean"]),
            score_std=float(score_norm["std"]),
            training=json.loads(header["training"]),
            config=ProbeConfig.from_dict(config_dict),
            reduction=ChannelReduction.from_dict(json.loads(header.get("channel_reduction", "null"))),
        )
    except (ValueError, TypeError, KeyError) as error:
        raise ProbeFileError(
            f"{path} has invalid probe metadata ({type(error).__name__}: {error}). "
            f"Re-export the probe with save_probe, or update the pack if it is newer."
        ) from None


def _read_header(path: Path) -> dict[str, str]:
    if not path.exists():
        raise ProbeFileError(
            f"probe file {path} not found. Check the path (probes usually live in ComfyUI's "
            f"models/probes folder) or train/download the probe first."
        )
    if not path.is_file():
        raise ProbeFileError(f"probe path {path} is not a file; select a .safetensors probe file.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own SafetensorError (not exported stably)
        raise ProbeFileError(f"{path} is not a readable safetensors file ({error}). {_hint_for_bad_file(path)}") from None


def _hint_for_bad_file(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return (
            "It looks like a pickled PyTorch checkpoint (.pt/.ckpt), which Probe-Select never loads "
            "because unpickling can run arbitrary code; convert it with save_probe."
        )
    return "It is truncated or corrupt: download or export it again."


def read_probe_metadata(path: PathLike) -> ProbeMetadata:
    """Metadata of the probe at ``path``, read from the safetensors header only (no weights)."""
    path = Path(path)
    return _metadata_from_header(_read_header(path), path)


def save_probe(path: PathLike, probe: Probe, metadata: ProbeMetadata, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``probe`` and ``metadata`` to ``path`` (a ``.safetensors`` file) atomically.

    ``dtype`` (e.g. ``torch.float16``) stores the floating-point weights in that precision, half the
    file for fp16 (for probes shipped with a repository or a workflow); :func:`load_probe` always
    returns a float32 probe. None keeps the probe's own dtype.

    Raises:
        ValueError: if the metadata does not describe this probe (config or feature shape differ)
            or ``metadata.training`` is not JSON-serialisable.
    """
    if not isinstance(probe, Probe):
        raise ValueError(f"save_probe expects a Probe, got {type(probe).__name__}")
    config = probe.config
    if metadata.config != config:
        raise ValueError(f"save_probe: metadata.config {metadata.config} does not match the probe's config {config}")
    expected_shape = (config.in_channels, config.feature_size, config.feature_size)
    if metadata.feature_shape != expected_shape:
        raise ValueError(
            f"save_probe: metadata.feature_shape {metadata.feature_shape} does not match the probe, "
            f"which reads (in_channels, feature_size, feature_size) = {expected_shape}"
        )
    header = _metadata_to_header(metadata)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"save_probe: dtype must be a floating-point dtype, got {dtype}")
    tensors = {name: tensor.detach().to("cpu", dtype=dtype if dtype is not None and tensor.is_floating_point() else None)
               .contiguous() for name, tensor in probe.state_dict().items()}
    path = atomic_write(path, lambda temp_path: save_file(tensors, str(temp_path), metadata=header))
    logger.info("saved probe (%s, %s) to %s", metadata.backbone_family, metadata.evaluator, path)
    return path


def load_probe(path: PathLike, device: Union[str, torch.device] = "cpu") -> tuple[Probe, ProbeMetadata]:
    """Load a probe file; returns the probe (float32, eval mode, on ``device``) and its metadata.

    Only safetensors readers are used: nothing is unpickled.

    Raises:
        ProbeFileError: with the file name and what to do, if the file is missing, not a
            safetensors file, not a Probe-Select probe, of a newer format, has incomplete metadata,
            or holds weights that do not fit its config.
    """
    path = Path(path)
    metadata = read_probe_metadata(path)
    config = metadata.config
    config_shape = (config.in_channels, config.feature_size, config.feature_size)
    if metadata.feature_shape != config_shape:
        raise ProbeFileError(
            f"{path} is inconsistent: its feature_shape is {metadata.feature_shape} but its probe "
            f"config reads (in_channels, feature_size, feature_size) = {config_shape}. Re-export the probe."
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as error:
        raise ProbeFileError(f"{path}: could not read the weights ({error}). The file is corrupt: export or download it again.") from None

    # Built on the meta device: no memory and no random init (nor a touch of the global RNG) for
    # weights that are about to be replaced.
    with torch.device("meta"):
        probe = Probe(config)
    expected = {name: tuple(tensor.shape) for name, tensor in probe.state_dict().items()}
    _check_weights(path, expected, tensors)
    tensors = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}
    probe.load_state_dict(tensors, strict=True, assign=True)
    probe.to(device).eval()
    logger.info("loaded probe %s (%s, %s, t=%.3f)", path.name, metadata.backbone_family, metadata.evaluator, metadata.checkpoint_t)
    return probe, metadata


def _check_weights(path: Path, expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> None:
    """Compare the stored tensors to the ones the config builds; one clear error for any mismatch."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{name} {tuple(tensors[name].shape)} (expected {expected[name]})"
        for name in sorted(set(expected) & set(tensors))
        if tuple(tensors[name].shape) != expected[name]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_preview(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors {_preview(misshaped)}")
    if problems:
        raise ProbeFileError(
            f"{path}: the weights do not match the probe_config in its metadata: {'; '.join(problems)}. "
            f"The file was edited or written by an incompatible version; re-export the probe."
        )
    bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise ProbeFileError(f"{path}: non-finite values (NaN/inf) in {_preview(bad)}; the probe diverged in training or the file is corrupt.")


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)} in all)"
