"""Dataset -> probe and probe + dataset -> report: the steps shared by the nodes and the command line."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .dataset import DatasetArrays, ProbeDataset, check_probe_matches, probe_config_for, split_by_prompt
from .evaluation import ProbeEvaluation, evaluate_probe_on, evaluation_from_predictions
from ..io import ProbeMetadata
from ..model import Probe, ProbeConfig
from .streamed_train import predict_on_index, train_from_index, wants_streaming
from .streaming import StreamConfig, StreamIndex
from .train import TrainArrays, TrainConfig, TrainResult, train_probe

log = logging.getLogger(__name__)

__all__ = ["default_evaluator", "train_arrays", "train_from_dataset", "evaluate_on_dataset"]

SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def default_evaluator(dataset: ProbeDataset, evaluator: str = "") -> str:
    names = dataset.manifest.evaluators
    if not evaluator:
        return names[0]
    if evaluator not in names:
        raise ValueError(f"dataset {dataset.root} has no '{evaluator}' scores; it has {names}")
    return evaluator


def train_arrays(arrays: DatasetArrays, use_text: bool) -> TrainArrays:
    return TrainArrays(features=arrays.features, t=float(arrays.t), group=arrays.prompt_ids,
                       target=arrays.scores, text=arrays.text_embedding if use_text else None, x0=arrays.x0)


def first_prompts(rows: torch.Tensor, prompt_ids: Sequence[str], count: int) -> torch.Tensor:
    """The rows (of ``rows``) that belong to the first ``count`` prompts in row order."""
    chosen: dict[str, None] = {}
    for row in rows.tolist():
        if len(chosen) >= count:
            break
        chosen.setdefault(prompt_ids[row], None)
    return torch.tensor([row for row in rows.tolist() if prompt_ids[row] in chosen], dtype=torch.long)


def train_from_dataset(dataset: ProbeDataset, checkpoint_t: float, evaluator: str, out_path, *,
                       train_config: TrainConfig, use_text: bool = True, split_seed: int = 0,
                       probe_config: Optional[ProbeConfig] = None, state_dir=None,
                       on_epoch: Optional[Callable[[int, dict], None]] = None,
                       should_stop: Optional[Callable[[], bool]] = None, streaming: str = "auto",
                       stream_config: Optional[StreamConfig] = None,
                       train_prompts: Optional[int] = None,
                       fractions: Sequence[float] = SPLIT_FRACTIONS) -> tuple[TrainResult, dict]:
    """Train a probe on the dataset's train split (by prompt), validating on its val split.

    ``train_prompts``: train on only the first n prompts of the train split (in dataset order; the
    val split is unchanged), the points of a learning curve. In memory only.

    ``fractions``: of the prompts in the train / val / test splits (:func:`split_by_prompt`); e.g.
    ``(0.9, 0.1, 0.0)`` when the probe is judged on a separate held-out dataset, so that no test split
    is needed.

    ``streaming``: ``"off"`` holds the checkpoint's features in memory (the path small datasets
    always took); ``"on"`` streams them from the shards (:mod:`.streamed_train`, settings in
    ``stream_config``; resumable mid-epoch; DDP under ``torchrun``); ``"auto"`` streams datasets too
    big to hold (see :func:`~.streamed_train.wants_streaming`) and several-process jobs.
    """
    evaluator = default_evaluator(dataset, evaluator)
    # Refused before any data is read: a probe that reads x0, on a dataset collected without it.
    probe_config_for(dataset.manifest, probe_config, use_text, where=f"dataset {dataset.root}")
    if train_prompts is not None and train_prompts < 1:
        raise ValueError(f"train_prompts must be >= 1, got {train_prompts}")
    if wants_streaming(streaming, dataset.manifest, len(dataset)):
        if train_prompts is not None:
            raise ValueError("train_prompts (a learning-curve subset) needs the in-memory path: streaming='off'")
        return train_from_index(StreamIndex(dataset.root), checkpoint_t, evaluator, out_path,
                                train_config=train_config, stream_config=stream_config, use_text=use_text,
                                split_seed=split_seed, fractions=fractions, probe_config=probe_config,
                                state_dir=state_dir, on_epoch=on_epoch, should_stop=should_stop)
    arrays = dataset.arrays(checkpoint_t=checkpoint_t, evaluator=evaluator)
    splits = split_by_prompt(arrays.prompt_ids, fractions, seed=split_seed)
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise ValueError(f"dataset {dataset.root} has too few prompts ({len(set(arrays.prompt_ids))}) for a "
                         "train/val/test split; collect more prompts")
    if train_prompts is not None:
        splits = dict(splits, train=first_prompts(splits["train"], arrays.prompt_ids, train_prompts))
    manifest = dataset.manifest
    use_text = use_text and manifest.text_dim > 0 and arrays.text_embedding is not None
    probe_config = probe_config_for(manifest, probe_config, use_text, where=f"dataset {dataset.root}")
    metadata_base = {"backbone_family": manifest.backbone_family, "tap": manifest.tap,
                     "checkpoint_t": float(arrays.t), "feature_shape": tuple(manifest.feature_shape),
                     "pooling": manifest.pooling, "evaluator": evaluator,
                     "reduction": manifest.reduction}
    result = train_probe(train_arrays(arrays.select(splits["train"]), use_text),
                         train_arrays(arrays.select(splits["val"]), use_text),
                         probe_config, train_config, metadata_base, Path(out_path), state_dir=state_dir,
                         on_epoch=on_epoch, should_stop=should_stop)
    sizes = {name: int(len(rows)) for name, rows in splits.items()}
    return result, sizes


def evaluate_on_dataset(probe: Probe, metadata: ProbeMetadata, dataset: ProbeDataset, split: str = "test",
                        split_seed: int = 0, streaming: str = "auto") -> ProbeEvaluation:
    """Evaluate on one split ("train", "val", "test") or "all" rows; the dataset must fit the probe.

    ``streaming`` as in :func:`train_from_dataset`: streamed, the rows are read a batch at a time
    through the same reader as streamed training and validation (same rows, same metrics).
    """
    check_probe_matches(dataset.manifest, metadata)
    if wants_streaming(streaming, dataset.manifest, len(dataset)):
        index = StreamIndex(dataset.root)
        groups = list(range(len(index.groups))) if split == "all" else \
            index.split_groups(SPLIT_FRACTIONS, seed=split_seed)[split]
        if not groups:
            raise ValueError(f"the {split} split of {dataset.root} is empty; collect more prompts or use 'all'")
        return evaluation_from_predictions(*predict_on_index(probe, metadata, index, groups))
    arrays = dataset.arrays(checkpoint_t=metadata.checkpoint_t, evaluator=metadata.evaluator)
    if split != "all":
        rows = split_by_prompt(arrays.prompt_ids, SPLIT_FRACTIONS, seed=split_seed)[split]
        if len(rows) == 0:
            raise ValueError(f"the {split} split of {dataset.root} is empty; collect more prompts or use 'all'")
        arrays = arrays.select(rows)
    return evaluate_probe_on(probe, metadata, arrays)
