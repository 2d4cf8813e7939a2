"""Probe-Select library: early quality probes for diffusion candidates, in pure PyTorch.

A probe reads pooled denoiser activations of each candidate at an early checkpoint t and predicts
the score an evaluator would give the finished image, so that only the best candidates are
finished. This package never imports ComfyUI; the nodes in ``nodes/`` call into it.

- :mod:`.features`: activations -> fixed-size fp16 feature maps; :class:`ActivationSet`.
- :mod:`.model`: :class:`ProbeConfig`, :class:`Probe`, :func:`build_probe`.
- :mod:`.io`: self-describing safetensors probe files.
- :mod:`.scoring`: compatibility checks and :func:`score_candidates`.
- :mod:`.atomic`: :func:`atomic_write` for any file the pack writes.
- :mod:`.dataset`: activation datasets (manifest + shards), :class:`DatasetWriter`,
  :class:`ProbeDataset`, :func:`split_by_prompt`.
"""
from .atomic import atomic_write
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
from .scoring import CandidateScores, ProbeCompatibilityError, check_compatible, score_candidates
from .training.dataset import (
    CandidateRows,
    DatasetArrays,
    DatasetError,
    DatasetManifest,
    DatasetWriter,
    ProbeDataset,
    check_probe_matches,
    read_manifest,
    split_by_prompt,
)

__all__ = [
    "FEATURE_DTYPE",
    "ActivationSet",
    "ActivationSeries",
    "pool_feature_map",
    "tokens_to_grid",
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
    "ProbeCompatibilityError",
    "CandidateScores",
    "check_compatible",
    "score_candidates",
    "DatasetError",
    "DatasetManifest",
    "CandidateRows",
    "DatasetWriter",
    "ProbeDataset",
    "DatasetArrays",
    "read_manifest",
    "split_by_prompt",
    "check_probe_matches",
]

# Training: losses, metrics and the trainer (see probes/losses.py, probes/metrics.py, probes/train.py).
from .training.losses import LossTerms, ProbeLoss, anneal, combined_loss, info_nce_loss, listwise_ranking_loss, pearson_loss
from .training.metrics import (
    bootstrap_ci,
    global_spearman,
    kendall_tau,
    per_group_spearman,
    rankdata,
    selection_summary,
    spearman,
    top1_hit_rate,
    within_prompt_spearman,
)
from .training.train import TrainArrays, TrainConfig, TrainResult, evaluate_probe, predict, train_probe

__all__ += [
    "listwise_ranking_loss",
    "anneal",
    "info_nce_loss",
    "pearson_loss",
    "LossTerms",
    "combined_loss",
    "ProbeLoss",
    "rankdata",
    "spearman",
    "kendall_tau",
    "per_group_spearman",
    "within_prompt_spearman",
    "global_spearman",
    "top1_hit_rate",
    "selection_summary",
    "bootstrap_ci",
    "TrainConfig",
    "TrainArrays",
    "TrainResult",
    "train_probe",
    "predict",
    "evaluate_probe",
]
