"""How good a probe is on held-out data, measured the way it matters for seed selection.

Selection happens among the seeds of one prompt, so the headline figures are within-prompt:
Spearman and Kendall tau averaged over prompts, how often the probe's top-1 is the best seed, and
the score of the seed it selects against the average seed and the best seed. Global Spearman
(across prompts) is reported too, labelled as such: a probe can rank prompts by difficulty and
still not tell seeds apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dataset import DatasetArrays
from ..io import ProbeMetadata
from .metrics import global_spearman, kendall_tau, per_group_spearman, selection_summary, within_prompt_spearman
from ..model import Probe

__all__ = ["ProbeEvaluation", "probe_predictions", "evaluate_probe_on", "evaluation_from_predictions", "format_report"]


@dataclass
class ProbeEvaluation:
    metrics: dict
    predicted: np.ndarray      # evaluator units
    actual: np.ndarray
    group: np.ndarray          # prompt index per row


def _within_prompt_kendall(pred: np.ndarray, target: np.ndarray, group: np.ndarray) -> float:
    taus = []
    for g in np.unique(group):
        rows = group == g
        if rows.sum() >= 2 and np.ptp(target[rows]) > 0:
            taus.append(kendall_tau(pred[rows], target[rows]))
    return float(np.nanmean(taus)) if taus else float("nan")


def probe_predictions(probe: Probe, metadata: ProbeMetadata, arrays: DatasetArrays, batch_size: int = 256) -> torch.Tensor:
    """The probe's score of every row of ``arrays``, ``[N]`` float64 in evaluator units
    (``pred * score_std + score_mean``, scaled in float64 as the streamed path scales it, so the two paths
    order near-ties alike), reading what the probe reads (activations, x0, text)."""
    device = next(probe.parameters()).device
    preds = []
    with torch.no_grad():
        for start in range(0, len(arrays), batch_size):
            rows = slice(start, start + batch_size)
            features = arrays.features[rows].to(device)
            t = torch.full((features.shape[0],), float(arrays.t), device=device)
            text = None
            if probe.config.text_dim and arrays.text_embedding is not None:
                text = arrays.text_embedding[rows].to(device).float()
            x0 = None
            if probe.config.reads_x0:
                if arrays.x0 is None:
                    raise ValueError("the probe reads the x0 latent but these rows carry none; evaluate it on a "
                                     "dataset collected with x0 (x0_size > 0)")
                x0 = arrays.x0[rows].to(device)
            preds.append(probe(features, t, text, x0).float().cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0)
    return pred.double() * metadata.score_std + metadata.score_mean


def evaluate_probe_on(probe: Probe, metadata: ProbeMetadata, arrays: DatasetArrays,
                      batch_size: int = 256) -> ProbeEvaluation:
    """Score every row of `arrays` with the probe and compare with the evaluator's scores."""
    predicted = probe_predictions(probe, metadata, arrays, batch_size).numpy()
    return evaluation_from_predictions(predicted, arrays.scores.double().numpy(), arrays.prompt_groups().numpy())


def evaluation_from_predictions(predicted: np.ndarray, actual: np.ndarray, group: np.ndarray) -> ProbeEvaluation:
    """The evaluation of predictions (evaluator units) against the actual scores, rows grouped by prompt;
    shared by the in-memory path above and the streamed one (:func:`~.streamed_train.predict_on_index`)."""
    summary = selection_summary(predicted, actual, group)
    per_prompt = per_group_spearman(predicted, actual, group)
    metrics = {
        "rows": int(len(actual)),
        "prompts": int(len(np.unique(group))),
        "within_prompt_spearman": within_prompt_spearman(predicted, actual, group),
        "within_prompt_kendall": _within_prompt_kendall(predicted, actual, group),
        "global_spearman": global_spearman(predicted, actual),
        "global_kendall": kendall_tau(predicted, actual),
        "top1_hit_rate": summary["top1_hit_rate"],
        "selected_score": summary["selected"],
        "mean_score": summary["mean"],
        "best_score": summary["best"],
        "oracle_gain_fraction": summary["oracle_gain_fraction"],
        "prompts_ranked": int(np.isfinite(per_prompt).sum()),
    }
    return ProbeEvaluation(metrics, predicted, actual, group)


def format_report(metrics: dict, evaluator: str, title: str = "Probe evaluation") -> str:
    m = metrics
    return "\n".join([
        f"{title}: {m['rows']} candidates of {m['prompts']} prompts ({evaluator})",
        f"within-prompt Spearman   {m['within_prompt_spearman']:.3f}   (headline: ranking seeds of one prompt)",
        f"within-prompt Kendall    {m['within_prompt_kendall']:.3f}",
        f"top-1 hit rate           {m['top1_hit_rate']:.3f}   (probe's pick is the prompt's best seed)",
        f"selected score           {m['selected_score']:.4f}   vs mean seed {m['mean_score']:.4f}, "
        f"best seed {m['best_score']:.4f}",
        f"oracle gain captured     {m['oracle_gain_fraction']:.3f}   ((selected - mean) / (best - mean))",
        f"global Spearman          {m['global_spearman']:.3f}   (across prompts; says little about seed choice)",
        f"global Kendall           {m['global_kendall']:.3f}",
    ])
