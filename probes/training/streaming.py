"""Streaming a dataset larger than memory: rows read from the shards, batches of whole prompts, a plan.

:class:`ProbeDataset` concatenates every shard's features into one tensor; at paper scale (20,000
prompts x 5 seeds at 328 KB a row is 33 GB per checkpoint) that does not fit. This module reads the
same shards without ever holding more than a few batches of features:

* :class:`StreamIndex` opens a dataset and keeps only what is small per row (prompt id, seed,
  scores, where the row lives); features and text embeddings stay on disk. Repeated
  ``(prompt_id, seed)`` rows are dropped exactly as :class:`ProbeDataset` drops them (the first by
  shard name wins), so both readers see the same rows.
* Rows are grouped by prompt (:class:`PromptGroup`): the listwise ranking loss compares the seeds
  of one prompt, so a batch always holds whole prompts.
* :func:`epoch_plan` says, before an epoch starts, which prompt groups each batch will hold: shard
  order shuffled by ``(seed, epoch)``, then a seeded shuffle buffer of ``buffer_groups`` prompt
  groups. It is a function of the seed, the epoch and the index only, so a run is reproducible,
  resuming mid-epoch is skipping the batches already done, and a test can compare the plan with
  what the trainer visited. The buffer holds group *ids*; reads stay close to the shard order, so
  only a few shards are touched at a time.
* :class:`PlannedBatches` is a ``torch.utils.data.IterableDataset`` that reads the plan's batches
  (worker ``w`` of ``W`` reads batches ``w, w + W, ...``; the DataLoader's round-robin hands them
  back in plan order). :class:`FeatureReader` reads rows through ``safetensors.safe_open`` (a
  memory map: only the requested rows' bytes are copied) and keeps at most ``max_open`` shards
  mapped, so the resident memory does not grow with the dataset.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .dataset import (
    DATASET_FORMAT,
    SPLIT_NAMES,
    DatasetError,
    DatasetManifest,
    list_shards,
    read_manifest,
    read_shard_header,
    split_by_prompt,
)

__all__ = [
    "StreamConfig",
    "ShardInfo",
    "PromptGroup",
    "StreamIndex",
    "FeatureReader",
    "epoch_plan",
    "PlannedBatches",
    "make_loader",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


@dataclass
class StreamConfig:
    """How a streamed run reads its data (the optimisation settings stay in ``TrainConfig``).

    Attributes:
        buffer_groups: prompt groups in the shuffle buffer. Larger = closer to a full shuffle;
            it holds ids only, so it costs almost no memory. At least the number of prompt groups
            gives a full random permutation.
        num_workers: ``torch.utils.data`` worker processes reading shards (0 = read in the
            training process).
        prefetch_batches: batches each worker reads ahead (with ``num_workers > 0``).
        max_open_shards: shards each reader keeps open (mapped, with ``io="mmap"``) at once.
        max_mapped_mb: MiB of rows read from the mapped shards after which a reader unmaps the least
            recently used ones: the bound on resident memory of reading (per reader process).
        io: how readers read rows: ``"pread"`` (positional reads, default) or ``"mmap"`` (memory
            maps); see :class:`FeatureReader`.
        state_every_batches: with a ``state_dir``, also save the training state every this many
            batches inside an epoch (0 = only at the end of epochs); a resume continues from there.
        amp: ``"auto"`` (bf16 autocast on a GPU that supports it, else fp16; off on CPU), ``"off"``,
            ``"bf16"`` or ``"fp16"``.
        dist_timeout_s: how long a rank waits for the others in a collective before it reports
            the job as broken (several-process training only).
    """

    buffer_groups: int = 1024
    num_workers: int = 0
    prefetch_batches: int = 2
    max_open_shards: int = 4
    max_mapped_mb: int = 512
    io: str = "pread"
    state_every_batches: int = 0
    amp: str = "auto"
    dist_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("buffer_groups", "prefetch_batches", "max_open_shards", "max_mapped_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StreamConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("num_workers", "state_every_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StreamConfig.{name} must be an integer >= 0, got {value!r}")
        if self.io not in ("pread", "mmap"):
            raise ValueError(f"StreamConfig.io must be 'pread' or 'mmap', got {self.io!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"StreamConfig.amp must be 'auto', 'off', 'bf16' or 'fp16', got {self.amp!r}")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"StreamConfig.dist_timeout_s must be > 0, got {self.dist_timeout_s}")


# --------------------------------------------------------------------------------------------
# Index


@dataclass
class ShardInfo:
    """The small part of one shard: everything but features and text embeddings."""

    path: Path
    rows: int
    size: int
    mtime_ns: int
    seeds: Tensor                  # [R] int64
    prompt_ids: list[str]
    scores: dict[str, Tensor]      # evaluator -> [R] float32
    data_offsets: dict[str, int] = field(default_factory=dict)   # tensor name -> first byte in the file


@dataclass(frozen=True)
class PromptGroup:
    """The kept rows of one prompt, as ``(shard index, row in shard)``, in row order."""

    prompt_id: str
    rows: tuple[tuple[int, int], ...]

    @property
    def home(self) -> int:
        """The shard holding the group's first row (the group is streamed with that shard)."""
        return self.rows[0][0]


class StreamIndex:
    """A dataset opened for streaming: per-row metadata in memory, features on disk.

    Opening reads the manifest and, per shard, its header, seeds, prompt ids and scores (a few
    dozen bytes per row). Shards written after opening are not seen.

    Raises:
        DatasetError: missing or invalid manifest, or a damaged shard (naming the file).
    """

    def __init__(self, root: PathLike):
        self.root = Path(root)
        self.manifest: DatasetManifest = read_manifest(self.root)
        self.shards: list[ShardInfo] = [_index_shard(path, self.manifest) for path in list_shards(self.root)]
        groups: dict[str, list[tuple[int, int]]] = {}
        seen: set[tuple[str, int]] = set()
        self.duplicates_dropped = 0
        for shard_index, shard in enumerate(self.shards):
            for row, (pid, seed) in enumerate(zip(shard.prompt_ids, shard.seeds.tolist())):
                if (pid, seed) in seen:
                    self.duplicates_dropped += 1
                    continue
                seen.add((pid, seed))
                groups.setdefault(pid, []).append((shard_index, row))
        # Group order: by home shard, then first row (dict order is first appearance).
        self.groups: list[PromptGroup] = [PromptGroup(pid, tuple(rows)) for pid, rows in groups.items()]
        self.rows = sum(len(g.rows) for g in self.groups)
        logger.info("indexed dataset %s for streaming: %d rows, %d prompts, %d shards (%d duplicates dropped)",
                    self.root, self.rows, len(self.groups), len(self.shards), self.duplicates_dropped)

    def __len__(self) -> int:
        return self.rows

    def split_groups(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list[int]]:
        """Group ids of the train / val / test splits: the same prompts as
        :func:`~.dataset.split_by_prompt` puts there (the assignment is a hash of the prompt id)."""
        rows = split_by_prompt([g.prompt_id for g in self.groups], fractions, seed=seed)
        return {name: rows[name].tolist() for name in SPLIT_NAMES}

    def scores(self, group_ids: Sequence[int], evaluator: str) -> Tensor:
        """``[n]`` float32 scores of ``evaluator`` for every row of the groups, in group order."""
        if evaluator not in self.manifest.evaluators:
            raise DatasetError(f"dataset {self.root} has no scores for evaluator {evaluator!r}; it has "
                               f"{self.manifest.evaluators}.")
        values = [float(self.shards[s].scores[evaluator][r]) for g in group_ids for s, r in self.groups[g].rows]
        return torch.tensor(values, dtype=torch.float32)

    def group_rows(self, group_ids: Sequence[int]) -> list[tuple[int, int]]:
        return [row for g in group_ids for row in self.groups[g].rows]


def _index_shard(path: Path, manifest: DatasetManifest) -> ShardInfo:
    def bad(problem: str) -> DatasetError:
        return DatasetError(f"shard {path} is inconsistent: {problem}. Delete or move that file.")

    try:
        stat = path.stat()
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if metadata.get("format") != DATASET_FORMAT:
                raise bad(f"format {metadata.get('format')!r} is not {DATASET_FORMAT!r}")
            features = handle.get_slice("features")
            shape = list(features.get_shape())
            rows = shape[0]
            expected = [rows, len(manifest.checkpoints), *manifest.feature_shape]
            if shape != expected or features.get_dtype() != "F16":
                raise bad(f"features are {features.get_dtype()} {shape}, expected F16 {expected}")
            seeds = handle.get_tensor("seeds")
            prompt_ids = json.loads(metadata["prompt_ids"])
            scores = {name: handle.get_tensor(f"score.{name}").float() for name in manifest.evaluators}
            if manifest.text_dim and "text_embedding" not in set(handle.keys()):
                raise bad("tensor 'text_embedding' missing")
            if manifest.x0_shape is not None:
                x0 = handle.get_slice("x0") if "x0" in set(handle.keys()) else None
                expected_x0 = [rows, len(manifest.checkpoints), *manifest.x0_shape]
                if x0 is None or list(x0.get_shape()) != expected_x0 or x0.get_dtype() != "F16":
                    found = "missing" if x0 is None else f"{x0.get_dtype()} {list(x0.get_shape())}"
                    raise bad(f"tensor 'x0' is {found}, expected F16 {expected_x0}")
    except DatasetError:
        raise
    except Exception as error:  # safetensors' own error type, JSON errors, missing keys
        raise DatasetError(f"shard {path} is not a readable dataset shard ({error}); it is truncated or "
                           f"corrupt. Delete or move that file.") from None
    if len(prompt_ids) != rows or list(seeds.shape) != [rows] or any(list(v.shape) != [rows] for v in scores.values()):
        raise bad("row counts of features, seeds, prompt ids and scores differ")
    try:
        header, header_length, _ = read_shard_header(path)
        offsets = {name: 8 + header_length + int(header[name]["data_offsets"][0])
                   for name in ("features", "text_embedding", "x0") if name in header}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise bad(f"unreadable header ({error})") from None
    return ShardInfo(path=path, rows=rows, size=stat.st_size, mtime_ns=stat.st_mtime_ns, seeds=seeds,
                     prompt_ids=prompt_ids, scores=scores, data_offsets=offsets)


# --------------------------------------------------------------------------------------------
# Plan


def _rng_seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def epoch_plan(index: StreamIndex, group_ids: Sequence[int], *, seed: int, epoch: int, batch_prompts: int,
               buffer_groups: int, shuffle: bool = True) -> list[list[int]]:
    """The batches (lists of prompt-group ids) of one epoch, in the order they are trained on.

    Shards are visited in an order drawn from ``(seed, epoch)``; each shard's groups (in row order)
    enter a buffer of ``buffer_groups``, from which a seeded draw picks the next group once the
    buffer is full. Without ``shuffle`` the groups come in index order (validation, evaluation).
    """
    if batch_prompts < 1 or buffer_groups < 1:
        raise ValueError("epoch_plan: batch_prompts and buffer_groups must be >= 1")
    ordered = list(group_ids)
    if shuffle:
        rng = random.Random(_rng_seed("plan", int(seed), int(epoch)))
        by_shard: dict[int, list[int]] = {}
        for g in ordered:
            by_shard.setdefault(index.groups[g].home, []).append(g)
        shard_order = sorted(by_shard)
        rng.shuffle(shard_order)
        buffer: list[int] = []
        emitted: list[int] = []
        for shard in shard_order:
            for g in by_shard[shard]:
                buffer.append(g)
                if len(buffer) >= buffer_groups:
                    pick = rng.randrange(len(buffer))
                    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
                    emitted.append(buffer.pop())
        rng.shuffle(buffer)
        emitted.extend(buffer)
        ordered = emitted
    return [ordered[start:start + batch_prompts] for start in range(0, len(ordered), batch_prompts)]


# --------------------------------------------------------------------------------------------
# Reading rows


class FeatureReader:
    """Reads rows' features (one checkpoint) and text embeddings from the shards, never a whole shard.

    Two ways to read (``io``):

    * ``"pread"`` (default): positional reads of exactly the rows' bytes, at the offsets the shard's
      safetensors header gives, into a fresh tensor; one read per contiguous run of rows. Nothing is
      mapped, so reading adds only the batch to the resident memory.
    * ``"mmap"``: ``safetensors.safe_open`` maps a shard; a read copies only the requested rows out
      of the map. Pages read stay resident while mapped, hence the budget below.

    Both read cold data at about the same speed on this machine's disk (bench/results/streaming.md).

    With ``"mmap"``, pages read through a map stay in the process's resident memory while the map
    lives, so the reader bounds what it keeps mapped: at most ``max_open`` shards, and once the rows read from
    the open shards exceed ``max_mapped_bytes``, the least recently used shards are unmapped. The
    resident memory of reading is therefore bounded by that budget plus the batch, whatever the
    dataset's or the shards' size.

    Shards are checked against the index (size and modification time) when mapped: a shard
    replaced or removed since the index was built (e.g. by compaction) raises a
    :class:`DatasetError` saying to reopen. A shard already mapped keeps reading (POSIX keeps an
    unlinked file's data while it is mapped).

    ``rows_read`` counts rows copied out so far and ``max_rows_per_read`` the largest single read.
    """

    def __init__(self, index: StreamIndex, checkpoint_k: int, max_open: int = 4, max_mapped_bytes: int = 512 * 2**20,
                 io: str = "pread"):
        if io not in ("pread", "mmap"):
            raise ValueError(f"FeatureReader: io must be 'pread' or 'mmap', got {io!r}")
        self.io = io
        self.index = index
        self.checkpoint_k = checkpoint_k
        self.max_open = max_open
        self.max_mapped_bytes = max_mapped_bytes
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._touched: dict[int, int] = {}
        c, p, q = index.manifest.feature_shape
        self._row_bytes = c * p * q * 2
        self.rows_read = 0
        self.max_rows_per_read = 0

    def _handle(self, shard_index: int):
        handle = self._handles.get(shard_index)
        if handle is not None:
            self._handles.move_to_end(shard_index)
            return handle
        shard = self.index.shards[shard_index]
        try:
            stat = shard.path.stat()
            if stat.st_size != shard.size or stat.st_mtime_ns != shard.mtime_ns:
                raise FileNotFoundError("replaced since the dataset was opened")
            handle = safe_open(str(shard.path), framework="pt") if self.io == "mmap" else _File(shard.path)
        except (OSError, FileNotFoundError) as error:
            raise DatasetError(
                f"shard {shard.path} could not be read again ({error}); the dataset changed after it was "
                f"opened (compacted or edited). Reopen the dataset (start the training or evaluation again)."
            ) from None
        self._handles[shard_index] = handle
        self._touched[shard_index] = 0
        while len(self._handles) > self.max_open:
            self._unmap_oldest()
        return handle

    def _unmap_oldest(self) -> None:
        shard_index, _ = self._handles.popitem(last=False)
        self._touched.pop(shard_index, None)

    def _account(self, shard_index: int, rows: int) -> None:
        if shard_index not in self._handles:
            return                      # already unmapped within this read (more shards than max_open)
        self._touched[shard_index] += rows * self._row_bytes
        while self._handles and sum(self._touched.values()) > self.max_mapped_bytes:
            self._unmap_oldest()

    @property
    def mapped_bytes(self) -> int:
        """Bytes of rows read from the shards mapped now (an upper bound of their resident pages)."""
        return sum(self._touched.values())

    def close(self) -> None:
        self._handles.clear()
        self._touched.clear()

    def _read(self, rows: Sequence[tuple[int, int]], key: str, pick_k: bool) -> Tensor:
        # Contiguous runs within a shard are one slice each (a prompt's seeds are usually adjacent).
        order = sorted(range(len(rows)), key=lambda i: rows[i])
        parts: list[Tensor] = []
        positions: list[int] = []
        runs: list[tuple[int, int]] = []
        i = 0
        while i < len(order):
            shard, first = rows[order[i]]
            j = i + 1
            while j < len(order) and rows[order[j]] == (shard, first + (j - i)):
                j += 1
            if self.io == "pread":
                parts.append(self._pread(shard, key, first, j - i, pick_k))
            else:
                piece = self._handle(shard).get_slice(key)
                parts.append(piece[first:first + (j - i), self.checkpoint_k] if pick_k else piece[first:first + (j - i)])
            positions.extend(order[i:j])
            runs.append((shard, j - i))
            i = j
        if self.io == "mmap":
            for shard, count in runs:
                self._account(shard, count)
        stacked = torch.cat(parts)
        out = torch.empty_like(stacked)
        out[torch.tensor(positions, dtype=torch.long)] = stacked
        return out

    def _pread(self, shard_index: int, key: str, first: int, count: int, pick_k: bool) -> Tensor:
        manifest = self.index.manifest
        handle = self._handle(shard_index)
        start = self.index.shards[shard_index].data_offsets[key]
        if pick_k:      # [R, K, ...] tensors: features and x0
            shape = manifest.feature_shape if key == "features" else manifest.x0_shape
            row_bytes = math.prod(shape) * 2
            out = torch.empty(count, *shape, dtype=torch.float16)
            k, checkpoints = self.checkpoint_k, len(manifest.checkpoints)
            if checkpoints == 1:
                handle.read_into(out, start + first * row_bytes)
            else:   # rows of one checkpoint are strided by K: one read per row
                for i in range(count):
                    handle.read_into(out[i], start + ((first + i) * checkpoints + k) * row_bytes)
            return out
        out = torch.empty(count, manifest.text_dim, dtype=torch.float16)
        handle.read_into(out, start + first * manifest.text_dim * 2)
        return out

    def features(self, rows: Sequence[tuple[int, int]]) -> Tensor:
        """``[n, C, P, P]`` float16 features of ``rows`` at the reader's checkpoint, in that order."""
        self.rows_read += len(rows)
        self.max_rows_per_read = max(self.max_rows_per_read, len(rows))
        return self._read(rows, "features", pick_k=True)

    def text(self, rows: Sequence[tuple[int, int]]) -> Tensor:
        """``[n, D]`` float16 text embeddings of ``rows``."""
        return self._read(rows, "text_embedding", pick_k=False)

    def x0(self, rows: Sequence[tuple[int, int]]) -> Tensor:
        """``[n, c, S, S]`` float16 pooled x0 latents of ``rows`` at the reader's checkpoint."""
        if self.index.manifest.x0_shape is None:
            raise DatasetError(f"dataset {self.index.root} stores no x0 latents (no x0_shape in its manifest)")
        return self._read(rows, "x0", pick_k=True)


class _File:
    """An open shard for positional reads (closed when dropped from the reader's LRU)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def read_into(self, tensor: Tensor, offset: int) -> None:
        view = memoryview(tensor.numpy()).cast("B")
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise DatasetError(f"shard {self.path} ended early (truncated after the dataset was opened?); "
                                   f"reopen the dataset.")
            done += got

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


@dataclass
class BatchSpec:
    """What :class:`PlannedBatches` yields from: the index, the data to read and the target scale."""

    index: StreamIndex
    checkpoint_k: int
    evaluator: str
    use_text: bool
    score_mean: float = 0.0
    score_std: float = 1.0
    max_open_shards: int = 4
    max_mapped_bytes: int = 512 * 2**20
    io: str = "pread"
    use_x0: bool = False


def read_batch(reader: FeatureReader, spec: BatchSpec, group_ids: Sequence[int]) -> dict[str, Tensor]:
    """One batch as tensors: features, t, group (dense per batch), z (scaled target), raw, text, x0, group_ids."""
    index = spec.index
    rows = index.group_rows(group_ids)
    sizes = [len(index.groups[g].rows) for g in group_ids]
    raw = index.scores(group_ids, spec.evaluator)
    t = index.manifest.checkpoints[spec.checkpoint_k]
    batch = {
        "features": reader.features(rows),
        "t": torch.full((len(rows),), float(t)),
        "group": torch.repeat_interleave(torch.arange(len(group_ids)), torch.tensor(sizes)),
        "z": (raw - spec.score_mean) / spec.score_std,
        "raw": raw,
        "group_ids": torch.tensor(list(group_ids), dtype=torch.long),
    }
    if spec.use_text:
        batch["text"] = reader.text(rows).float()
    if spec.use_x0:
        batch["x0"] = reader.x0(rows)
    return batch


class PlannedBatches(IterableDataset):
    """The batches of a plan, from ``start`` on, read by the process or its DataLoader workers.

    Yields ``(position in plan, batch dict)``. With W workers, worker w reads positions
    ``start + w, start + w + W, ...``; the DataLoader returns workers' items round-robin, which is
    plan order.
    """

    def __init__(self, spec: BatchSpec, plan: Sequence[Sequence[int]], start: int = 0):
        self.spec = spec
        self.plan = [list(b) for b in plan]
        self.start = start

    def __len__(self) -> int:
        return max(0, len(self.plan) - self.start)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = FeatureReader(self.spec.index, self.spec.checkpoint_k, self.spec.max_open_shards,
                               self.spec.max_mapped_bytes, self.spec.io)
        try:
            for position in range(self.start + worker, len(self.plan), workers):
                yield position, read_batch(reader, self.spec, self.plan[position])
        finally:
            reader.close()


def make_loader(spec: BatchSpec, plan: Sequence[Sequence[int]], *, start: int = 0, num_workers: int = 0,
                prefetch_batches: int = 2, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the plan's batches from ``start`` (already batched: ``batch_size=None``)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_batches
    return DataLoader(PlannedBatches(spec, plan, start), batch_size=None, num_workers=num_workers,
                      pin_memory=pin_memory, **kwargs)
