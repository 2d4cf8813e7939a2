"""Dataset maintenance: compact many small shards into a few large ones, report, checksum.

Collecting with many writers (several ComfyUI servers, restarts) leaves thousands of small shards
and, after re-run jobs, repeated ``(prompt_id, seed)`` rows. :func:`compact_dataset` rewrites the
unique rows into shards of about ``target_shard_bytes`` and then removes the old shards.

Why this is safe under ``kill -9`` at any moment without a lock or a directory swap: every reader
(:class:`~.dataset.ProbeDataset`, :class:`~.streaming.StreamIndex`) drops repeated
``(prompt_id, seed)`` rows. New shards are written next to the old ones, each atomically (the
dataset writer's temporary file + rename), and old shards are deleted only once every new shard is
on disk. So at every instant the visible shards hold every row at least once, readers see each
exactly once, and a killed compaction leaves a readable dataset with all its rows (the leftover
copies are dropped by readers and removed by the next compaction). Writers appending while it
runs are not disturbed: their new shards are not in the list compacted and deleted.

Readers opened before a compaction keep what they already mapped (POSIX keeps an unlinked
file's data for open handles); reading a shard that compaction removed raises a
:class:`~.dataset.DatasetError` saying to reopen the dataset.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import safe_open

from .dataset import CandidateRows, DatasetWriter, list_shards, read_manifest
from .streaming import StreamIndex

__all__ = ["CompactionResult", "compact_dataset", "dataset_report", "format_dataset_report", "dataset_checksum"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
DEFAULT_SHARD_BYTES = 512 * 1024 * 1024


@dataclass
class CompactionResult:
    shards_before: int
    shards_after: int
    rows_before: int            # stored rows, duplicates included
    rows_after: int
    duplicates_dropped: int
    bytes_before: int
    bytes_after: int
    seconds: float


def _shard_rows(path: Path, rows: list[int], text: bool, x0: bool = False
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[str], list[str], Optional[torch.Tensor]]:
    """Features, text embedding, prompts, prompt ids and x0 latents (None unless ``x0``) of ``rows`` of
    one shard (contiguous runs sliced)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        prompts, prompt_ids = json.loads(metadata["prompts"]), json.loads(metadata["prompt_ids"])
        features, texts, x0s = [], [], []
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[start] + (end - start):
                end += 1
            features.append(handle.get_slice("features")[rows[start]:rows[end - 1] + 1])
            if text:
                texts.append(handle.get_slice("text_embedding")[rows[start]:rows[end - 1] + 1])
            if x0:
                x0s.append(handle.get_slice("x0")[rows[start]:rows[end - 1] + 1])
            start = end
    return (torch.cat(features), torch.cat(texts) if text else None,
            [prompts[r] for r in rows], [prompt_ids[r] for r in rows], torch.cat(x0s) if x0 else None)


def compact_dataset(root: PathLike, target_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    on_shard_written: Optional[Callable[[Path], None]] = None) -> CompactionResult:
    """Rewrite the dataset at ``root`` into shards of about ``target_shard_bytes``, duplicates dropped.

    Holds at most one new shard's rows in memory. ``on_shard_written(path)`` is called after each
    new shard is visible (progress; the crash tests use it to kill the process mid-way).

    Raises:
        DatasetError: the dataset is missing or has a damaged shard (nothing is changed then).
    """
    started = time.perf_counter()
    root = Path(root)
    index = StreamIndex(root)
    manifest = index.manifest
    old = [shard.path for shard in index.shards]
    bytes_before = sum(shard.size for shard in index.shards)
    rows_before = sum(shard.rows for shard in index.shards)
    kept: dict[int, list[int]] = {}
    for group in index.groups:
        for shard, row in group.rows:
            kept.setdefault(shard, []).append(row)
    row_bytes = max(1, bytes_before // max(1, rows_before))
    rows_per_shard = max(1, target_shard_bytes // row_bytes)
    writer = DatasetWriter(root, manifest, writer_id=f"compact-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}")
    new: list[Path] = []
    pending: list[CandidateRows] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        rows = CandidateRows(
            features=torch.cat([p.features for p in pending]),
            seeds=torch.cat([p.seeds for p in pending]),
            prompts=[x for p in pending for x in p.prompts],
            prompt_ids=[x for p in pending for x in p.prompt_ids],
            text_embedding=torch.cat([p.text_embedding for p in pending]) if manifest.text_dim else None,
            scores={name: torch.cat([p.scores[name] for p in pending]) for name in manifest.evaluators},
            x0=torch.cat([p.x0 for p in pending]) if manifest.x0_shape is not None else None,
        )
        path = writer.shard_path(len(new))   # a fresh writer id: its shards are numbered from 0
        writer.append(rows)
        new.append(path)
        pending, pending_rows = [], 0
        if on_shard_written is not None:
            on_shard_written(path)

    for shard_index, shard in enumerate(index.shards):
        rows = sorted(kept.get(shard_index, []))
        position = 0
        while position < len(rows):
            chunk = rows[position:position + rows_per_shard - pending_rows]
            features, text, prompts, prompt_ids, x0 = _shard_rows(shard.path, chunk, bool(manifest.text_dim),
                                                                  manifest.x0_shape is not None)
            picked = torch.tensor(chunk, dtype=torch.long)
            pending.append(CandidateRows(
                features=features, seeds=shard.seeds[picked], prompts=prompts, prompt_ids=prompt_ids,
                text_embedding=text, scores={name: shard.scores[name][picked] for name in manifest.evaluators},
                x0=x0))
            pending_rows += len(chunk)
            position += len(chunk)
            if pending_rows >= rows_per_shard:
                flush()
    flush()
    # Every new shard is visible and fsynced (atomic_write): only now can the old ones go.
    for path in old:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.warning("compaction: could not remove old shard %s (%s); readers drop its rows as duplicates",
                           path, error)
    after = list_shards(root)
    result = CompactionResult(
        shards_before=len(old), shards_after=len(after), rows_before=rows_before, rows_after=index.rows,
        duplicates_dropped=index.duplicates_dropped, bytes_before=bytes_before,
        bytes_after=sum(p.stat().st_size for p in after), seconds=time.perf_counter() - started)
    logger.info("compacted %s: %d shards -> %d, %d rows -> %d (%d duplicates dropped) in %.1f s", root,
                result.shards_before, result.shards_after, rows_before, index.rows, index.duplicates_dropped,
                result.seconds)
    return result


def dataset_report(root: PathLike) -> dict:
    """Size on disk, shards, rows (stored and unique), prompts, evaluators and what a row holds (with
    its channel reduction)."""
    index = StreamIndex(root)
    manifest = read_manifest(root)
    size = sum(shard.size for shard in index.shards)
    stored = sum(shard.rows for shard in index.shards)
    return {
        "root": str(index.root), "bytes": size, "shards": len(index.shards), "rows_stored": stored,
        "rows": index.rows, "duplicates": index.duplicates_dropped, "prompts": len(index.groups),
        "evaluators": list(manifest.evaluators), "checkpoints": list(manifest.checkpoints),
        "backbone_family": manifest.backbone_family, "tap": manifest.tap,
        "feature_shape": list(manifest.feature_shape), "pooling": manifest.pooling, "text_dim": manifest.text_dim,
        "reduction": manifest.reduction.to_dict(), "reduction_text": manifest.reduction.describe(),
        "bytes_per_row": size // stored if stored else 0,
        "x0_shape": list(manifest.x0_shape) if manifest.x0_shape is not None else None,
    }


def format_dataset_report(report: dict) -> str:
    gib = report["bytes"] / 2**30
    return "\n".join([
        f"dataset {report['root']}",
        f"  {report['backbone_family']}, tap {report['tap']}, features {tuple(report['feature_shape'])} "
        f"({report['pooling']}), checkpoints {report['checkpoints']}, text_dim {report['text_dim']}",
        f"  channel reduction: {report['reduction_text']}",
        f"  x0 latent: {tuple(report['x0_shape']) if report.get('x0_shape') else 'none'}",
        f"  {gib:.3f} GiB in {report['shards']} shards ({report['bytes_per_row']} bytes a row)",
        f"  {report['rows']} rows ({report['rows_stored']} stored, {report['duplicates']} duplicates) "
        f"of {report['prompts']} prompts",
        f"  evaluators: {', '.join(report['evaluators'])}",
    ])


def dataset_checksum(root: PathLike) -> tuple[int, str]:
    """``(rows, hex digest)`` of the dataset's unique rows, independent of shard layout and row order.

    Each row's prompt id, seed, features, text embedding, x0 latent and scores are hashed; the sorted row
    hashes are hashed again. Equal before and after compaction iff every row survived exactly once.
    """
    index = StreamIndex(root)
    text = bool(index.manifest.text_dim)
    digests = []
    by_shard: dict[int, list[int]] = {}
    for group in index.groups:
        for shard, row in group.rows:
            by_shard.setdefault(shard, []).append(row)
    for shard_index, rows in by_shard.items():
        shard = index.shards[shard_index]
        rows = sorted(rows)
        features, embedding, _, prompt_ids, x0 = _shard_rows(shard.path, rows, text, index.manifest.x0_shape is not None)
        for i, row in enumerate(rows):
            digest = hashlib.sha256(f"{prompt_ids[i]}\x00{int(shard.seeds[row])}".encode())
            digest.update(features[i].contiguous().numpy().tobytes())
            if embedding is not None:
                digest.update(embedding[i].contiguous().numpy().tobytes())
            if x0 is not None:
                digest.update(x0[i].contiguous().numpy().tobytes())
            for name in index.manifest.evaluators:
                digest.update(shard.scores[name][row].numpy().tobytes())
            digests.append(digest.digest())
    return len(digests), hashlib.sha256(b"".join(sorted(digests))).hexdigest()
