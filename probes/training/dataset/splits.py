"""Splitting a dataset by prompt, and checking that a probe fits a dataset."""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ...checkpoints import CheckpointError, checkpoint_index
from ...io import ProbeMetadata
from ...model import ProbeConfig
from .manifest import DatasetError, DatasetManifest
from .reader import ProbeDataset

SPLIT_NAMES = ("train", "val", "test")


def split_by_prompt(
    prompt_ids: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, Tensor]:
    """Row indices of the train / val / test splits, whole prompts at a time.

    Each prompt goes to a split by a hash of ``(seed, prompt_id)``, not by its position: the split
    is deterministic, no prompt is in two splits (so validation measures generalisation to new
    prompts, not to new seeds of seen prompts), and when the dataset grows existing prompts keep
    their split. Fractions are of prompts, normalised to sum 1, and met up to sampling noise.

    Returns:
        ``{"train": idx, "val": idx, "test": idx}``, each a sorted int64 tensor of row indices.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(SPLIT_NAMES) or not all(math.isfinite(f) and f >= 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split_by_prompt: fractions must be three non-negative numbers (train, val, test) with a positive sum, got {fractions}")
    total = sum(fractions)
    bounds = [sum(fractions[: i + 1]) / total for i in range(len(fractions))]
    assigned: dict[str, int] = {}
    rows: list[list[int]] = [[] for _ in SPLIT_NAMES]
    for row, pid in enumerate(prompt_ids):
        split = assigned.get(pid)
        if split is None:
            digest = hashlib.sha256(f"{int(seed)}\x00{pid}".encode("utf-8")).digest()
            u = int.from_bytes(digest[:8], "big") / 2.0**64
            split = next((i for i, bound in enumerate(bounds) if u < bound and fractions[i] > 0), _last_nonzero(fractions))
            assigned[pid] = split
        rows[split].append(row)
    return {name: torch.tensor(indices, dtype=torch.long) for name, indices in zip(SPLIT_NAMES, rows)}


def _last_nonzero(fractions: list[float]) -> int:
    return max(i for i, f in enumerate(fractions) if f > 0)


def check_probe_matches(
    manifest: Union[DatasetManifest, ProbeDataset],
    probe_metadata: ProbeMetadata,
    *,
    require_checkpoint: bool = True,
    require_evaluator: bool = True,
) -> None:
    """Refuse to train, fine-tune or evaluate a probe on a dataset of other activations.

    Checked: backbone family, tap, feature shape ``(C, P, P)``, channel reduction, pooling, the width of the probe's
    text branch (if any), the x0 latent's shape (for a probe that reads x0); and, unless disabled, that the dataset holds the probe's checkpoint t and
    scores of its evaluator.

    Raises:
        DatasetError: listing every disagreement.
    """
    where = "the dataset"
    if isinstance(manifest, ProbeDataset):
        where = f"dataset {manifest.root}"
        manifest = manifest.manifest
    meta = probe_metadata
    problems = []
    if meta.backbone_family != manifest.backbone_family:
        problems.append(f"backbone family: probe {meta.backbone_family!r}, dataset {manifest.backbone_family!r}")
    if meta.tap != manifest.tap:
        problems.append(f"tap: probe {meta.tap!r}, dataset {manifest.tap!r}")
    if tuple(meta.feature_shape) != tuple(manifest.feature_shape):
        problems.append(f"feature shape (C, P, P): probe {tuple(meta.feature_shape)}, dataset {tuple(manifest.feature_shape)}")
    if meta.reduction != manifest.reduction:
        problems.append(f"channel reduction: probe {meta.reduction.describe()}, dataset {manifest.reduction.describe()}")
    if meta.pooling != manifest.pooling:
        problems.append(f"pooling: probe {meta.pooling!r}, dataset {manifest.pooling!r}")
    text_dim = meta.config.text_dim
    if text_dim and text_dim != manifest.text_dim:
        stored = f"width {manifest.text_dim}" if manifest.text_dim else "none"
        problems.append(f"text embedding: probe reads width {text_dim}, dataset stores {stored}")
    if meta.config.reads_x0 and tuple(meta.config.x0_shape) != tuple(manifest.x0_shape or ()):
        stored = f"(c, S, S) = {tuple(manifest.x0_shape)}" if manifest.x0_shape else "none (collected without x0_size)"
        problems.append(f"x0 latent: probe reads (c, S, S) = {meta.config.x0_shape}, dataset stores {stored}")
    if require_checkpoint and not _stores(manifest.checkpoints, meta.checkpoint_t):
        problems.append(f"checkpoint: probe t={meta.checkpoint_t}, dataset has t in {manifest.checkpoints}")
    if require_evaluator and meta.evaluator not in manifest.evaluators:
        problems.append(f"evaluator: probe {meta.evaluator!r}, dataset scores {manifest.evaluators}")
    if problems:
        raise DatasetError(
            f"the probe ({meta.backbone_family}, tap {meta.tap}, {meta.evaluator}) does not match "
            f"{where}: {'; '.join(problems)}. Use a probe trained on this backbone and tap, or a "
            f"dataset collected with the probe's settings."
        )


def _stores(checkpoints: Sequence[float], checkpoint_t: float) -> bool:
    try:
        checkpoint_index(checkpoints, checkpoint_t)
    except CheckpointError:
        return False
    return True


def probe_config_for(manifest: DatasetManifest, probe_config: Optional[ProbeConfig], use_text: bool,
                     where: str = "the dataset") -> ProbeConfig:
    """``probe_config`` (default: the default architecture) fitted to what the dataset stores: its
    activations' channels and side, its text width (when ``use_text``) and, for a probe that reads
    the x0 latent, the stored x0's channels and side.

    Raises:
        DatasetError: the probe reads the x0 latent but the dataset stores none, or its encoders
            read the text (``text_film``) but the dataset stores none or ``use_text`` is off.
    """
    channels, size = manifest.feature_shape[0], manifest.feature_shape[-1]
    base = probe_config or ProbeConfig(in_channels=channels, feature_size=size)
    if base.text_film and not (use_text and manifest.text_dim > 0):
        reason = (f"{where} stores no text embeddings. Collect with the prompt's conditioning, or train without "
                  "text_film." if manifest.text_dim == 0 else
                  "training was asked not to use the text. Train with the text, or without text_film.")
        raise DatasetError(f"the probe conditions its encoders on the prompt (text_film), but {reason}")
    changes = {"in_channels": channels, "feature_size": size, "text_dim": manifest.text_dim if use_text else 0}
    if base.reads_x0:
        if manifest.x0_shape is None:
            raise DatasetError(
                f"{where} stores no x0 latents, but the probe reads the x0 latent (inputs "
                f"{'+'.join(base.inputs)}). Collect a dataset with x0 (ProbeSelectDatasetWriter x0_size > 0, or "
                f"'collect --x0-size 16'), or train with probe inputs 'activations'."
            )
        changes.update(x0_channels=manifest.x0_shape[0], x0_size=manifest.x0_shape[-1])
    return dataclasses.replace(base, **changes)
