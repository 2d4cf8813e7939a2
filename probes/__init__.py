"""Probe-Select library: early quality probes for diffusion candidates, in pure PyTorch.

A probe reads pooled denoiser activations of each candidate at an early checkpoint t and predicts
the score an evaluator would give the finished image, so that only the best candidates are
finished. This package never imports ComfyUI; the nodes in ``nodes/`` call into it.

- :mod:`.features`: activations -> fixed-size fp16 feature maps; :class:`ActivationSet`.
- :mod:`.reduction`: :class:`ChannelReduction` (per-sample PCA or a fixed projection of the channels,
  recorded in datasets and probe files and applied again when scoring).
- :mod:`.model`: :class:`ProbeConfig`, :class:`Probe`, :func:`build_probe`.
- :mod:`.io`: self-describing safetensors probe files.
- :mod:`.scoring`: compatibility checks and :func:`score_candidates`.
- :mod:`.atomic`: :func:`atomic_write` (and :func:`atomic_write_text`) for any file the pack writes.
- :mod:`.checkpoints`: the one rule from a requested fraction of the sampling to a stored checkpoint.
- :mod:`.evaluators`: image evaluators (the scores probes learn to predict).
- :mod:`.training`: datasets, losses, metrics, the trainer and evaluation (see its ``__init__``).
"""
from .atomic import atomic_write, atomic_write_text
from .features import FEATURE_DTYPE, ActivationSeries, ActivationSet, pool_feature_map, tokens_to_grid
from .io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ProbeFileError,
    ProbeMetadata,
    load_probe,
    read_probe_metadata,
    save_probe,
)
from .model import Probe, ProbeConfig, build_probe
from .reduction import NO_REDUCTION, ChannelReduction
from .scoring import CandidateScores, ProbeCompatibilityError, check_compatible, score_candidates

__all__ = [
    "FEATURE_DTYPE",
    "ActivationSet",
    "ActivationSeries",
    "pool_feature_map",
    "tokens_to_grid",
    "ChannelReduction",
    "NO_REDUCTION",
    "ProbeConfig",
    "Probe",
    "build_probe",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ProbeFileError",
    "ProbeMetadata",
    "save_probe",
    "load_probe",
    "read_probe_metadata",
    "atomic_write",
    "atomic_write_text",
    "ProbeCompatibilityError",
    "CandidateScores",
    "check_compatible",
    "score_candidates",
]
