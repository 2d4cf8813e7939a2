"""Training probes (pure PyTorch): activation datasets (:mod:`.dataset`), losses, metrics, the
training loop (:mod:`.train`), evaluation, the dataset -> probe pipeline (:mod:`.pipeline`), the pruning
planner's score tables (:mod:`.planning`), the blend of two scorers with its weight fitted on validation data
(:mod:`.blending`) and a probe distilled from the evaluator's reading of the x0 preview (:mod:`.distillation`)."""
from .dataset import (
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
from .losses import LossTerms, ProbeLoss, anneal, combined_loss, info_nce_loss, listwise_ranking_loss, pearson_loss
from .metrics import (
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
from .train import TrainArrays, TrainConfig, TrainResult, evaluate_probe, predict, train_probe

__all__ = [
    "DatasetError",
    "DatasetManifest",
    "CandidateRows",
    "DatasetWriter",
    "ProbeDataset",
    "DatasetArrays",
    "read_manifest",
    "split_by_prompt",
    "check_probe_matches",
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
