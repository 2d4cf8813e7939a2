"""Appending rows to a dataset: :class:`DatasetWriter`, one new shard per append, written atomically."""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from safetensors.torch import save_file
from torch import Tensor

from ...atomic import atomic_write, fsync_directory
from .manifest import DATASET_FORMAT, MANIFEST_NAME, DatasetError, DatasetManifest, PathLike, read_manifest
from .rows import CandidateRows
from .shards import SHARD_DIR, SHARD_SUFFIX, header_row_count, list_shards, remove_stale_temporaries

logger = logging.getLogger(__name__)

_WRITER_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def default_writer_id() -> str:
    """``<hostname>-<pid>-<8 hex random>``: unique among all processes writing one dataset.

    The host name separates machines sharing a disk, the pid separates ComfyUI instances on one
    machine, and the random part separates writers in one process and pids reused after restarts.
    """
    host = re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname()).strip("_")[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _create_manifest(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; True if this call created it.

    The content is written to a private temporary file first and then hard-linked to ``path``:
    ``os.link`` fails if the target exists, so when several processes create the same new dataset
    exactly one wins and nobody can ever see a partial manifest. (``os.replace`` would let the last
    writer silently overwrite the first one's manifest.)
    """
    temp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    with open(temp, "x", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        try:
            os.link(temp, path)
            created = True
        except FileExistsError:
            created = False
        except OSError:
            # No hard links here (some network or FAT filesystems): exclusive create still lets only
            # one writer win; readers retry a manifest they catch half-written.
            try:
                with open(path, "x", encoding="utf-8") as handle:
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
                created = True
            except FileExistsError:
                created = False
    finally:
        try:
            temp.unlink()
        except OSError as error:
            logger.warning("could not remove temporary file %s: %s", temp, error)
    if created:
        fsync_directory(path.parent)
    return created


class DatasetWriter:
    """Appends rows to a dataset, creating it on first use.

    Several writers (threads, ComfyUI instances, machines on a shared disk) may append to one
    dataset at the same time: each writes only files named after its own ``writer_id``. Give an
    explicit ``writer_id`` only if it is unique among the writers running at once (reusing one
    later is fine: numbering continues after its existing shards).

    Raises:
        DatasetError: if ``root`` already holds a dataset whose manifest differs from ``manifest``
            (every differing field is listed), or holds an unreadable manifest.
    """

    def __init__(self, root: PathLike, manifest: DatasetManifest, writer_id: Optional[str] = None):
        if not isinstance(manifest, DatasetManifest):
            raise TypeError(f"DatasetWriter needs a DatasetManifest, got {type(manifest).__name__}")
        if writer_id is None:
            writer_id = default_writer_id()
        if not isinstance(writer_id, str) or not _WRITER_ID_PATTERN.fullmatch(writer_id):
            raise ValueError(
                f"DatasetWriter: writer_id {writer_id!r} must be 1-100 letters, digits, '_', '-' or '.', "
                f"not starting with '.' or '-' (it becomes part of file names)"
            )
        self.root = Path(root)
        self.writer_id = writer_id
        self.shard_dir = self.root / SHARD_DIR
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.exists() and _create_manifest(manifest_path, manifest.to_json()):
            logger.info("created dataset %s (%s, %s)", self.root, manifest.backbone_family, manifest.tap)
        existing = read_manifest(self.root)
        differences = existing.compatible_with(manifest)
        if differences:
            raise DatasetError(
                f"dataset {self.root} was collected with different settings than this writer's "
                f"(manifest.json vs writer): {'; '.join(differences)}. Write to a new dataset folder, "
                f"or change the collection settings to match {manifest_path}."
            )
        self.manifest = existing
        self._lock = threading.Lock()
        self._next_seq = self._first_free_seq()
        self._row_counts: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"DatasetWriter(root={str(self.root)!r}, writer_id={self.writer_id!r})"

    def _first_free_seq(self) -> int:
        pattern = re.compile(re.escape(f"shard-{self.writer_id}-") + r"(\d+)" + re.escape(SHARD_SUFFIX))
        used = [int(m.group(1)) for path in list_shards(self.root) if (m := pattern.fullmatch(path.name))]
        return max(used) + 1 if used else 0

    def shard_path(self, seq: int) -> Path:
        """Path of this writer's shard number ``seq``."""
        return self.shard_dir / f"shard-{self.writer_id}-{seq:06d}{SHARD_SUFFIX}"

    def append(self, rows: CandidateRows) -> int:
        """Write ``rows`` as one new shard, atomically; returns the dataset's row count so far.

        The count covers every visible shard (all writers), read from shard headers only, and
        includes rows that readers will drop as duplicates. An empty batch writes nothing.

        Raises:
            DatasetError: if the rows do not fit the manifest (checkpoints, feature shape, text
                embedding width, evaluators).
        """
        if not isinstance(rows, CandidateRows):
            raise TypeError(f"DatasetWriter.append expects CandidateRows, got {type(rows).__name__}")
        self._check_rows(rows)
        if len(rows) == 0:
            logger.debug("append of 0 rows to %s: nothing written", self.root)
            return self.count_rows()
        tensors, metadata = self._shard_content(rows)
        with self._lock:
            path = self.shard_path(self._next_seq)
            while path.exists():  # an explicit writer_id reused while this writer ran
                self._next_seq += 1
                path = self.shard_path(self._next_seq)
            self._next_seq += 1
            # save_file is looked up at call time (tests replace it to simulate a crash mid-write).
            atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
            self._row_counts[path.name] = len(rows)
        total = self.count_rows()
        logger.info("appended %d rows to %s as %s (%d rows in the dataset)", len(rows), self.root, path.name, total)
        return total

    def count_rows(self) -> int:
        """Rows in all visible shards (duplicates included), from shard headers only.

        Shards never change once visible, so each header is read once per writer. An unreadable
        shard counts as 0 rows (with a warning); readers report it properly.
        """
        total = 0
        for path in list_shards(self.root):
            count = self._row_counts.get(path.name)
            if count is None:
                try:
                    count = header_row_count(path)
                except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
                    logger.warning("shard %s is unreadable (%s); not counted", path, error)
                    count = 0
                self._row_counts[path.name] = count
            total += count
        return total

    def _check_rows(self, rows: CandidateRows) -> None:
        manifest = self.manifest
        problems = []
        k = len(manifest.checkpoints)
        if rows.features.shape[1] != k:
            problems.append(
                f"features have {rows.features.shape[1]} checkpoints on axis 1 but the dataset stores "
                f"{k} (t = {manifest.checkpoints})"
            )
        if tuple(rows.features.shape[2:]) != manifest.feature_shape:
            reduced = (f" (reduced by {manifest.reduction.describe()}: reduce the rows with "
                       f"rows_from_activations(..., reduction=manifest.reduction))" if manifest.reduction.active else "")
            problems.append(
                f"features are (C, P, P) = {tuple(rows.features.shape[2:])} but the dataset stores "
                f"{manifest.feature_shape}{reduced}"
            )
        if manifest.text_dim:
            if rows.text_embedding is None:
                problems.append(f"rows carry no text_embedding but the dataset stores one of width {manifest.text_dim}")
            elif rows.text_embedding.shape[1] != manifest.text_dim:
                problems.append(f"text_embedding has width {rows.text_embedding.shape[1]} but the dataset stores width {manifest.text_dim}")
        elif rows.text_embedding is not None:
            problems.append("rows carry a text_embedding but the dataset stores none (text_dim 0)")
        if manifest.x0_shape is not None:
            expected_x0 = (len(rows), k, *manifest.x0_shape)
            if rows.x0 is None:
                problems.append(f"rows carry no x0 latent but the dataset stores one of (c, S, S) = {manifest.x0_shape}")
            elif tuple(rows.x0.shape) != expected_x0:
                problems.append(f"x0 is {tuple(rows.x0.shape)} but the dataset stores [R, K, c, S, S] = {expected_x0}")
        elif rows.x0 is not None:
            problems.append("rows carry an x0 latent but the dataset stores none (no x0_shape in its manifest)")
        missing = [name for name in manifest.evaluators if name not in rows.scores]
        extra = sorted(set(rows.scores) - set(manifest.evaluators))
        if missing:
            problems.append(f"scores are missing evaluators {missing}")
        if extra:
            problems.append(f"scores have evaluators {extra} that the dataset does not store")
        if problems:
            raise DatasetError(
                f"cannot append to dataset {self.root}: {'; '.join(problems)}. Collect rows with the "
                f"dataset's settings (see {self.root / MANIFEST_NAME}) or write to a new dataset."
            )

    def _shard_content(self, rows: CandidateRows) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {"features": rows.features, "seeds": rows.seeds}
        if rows.text_embedding is not None:
            tensors["text_embedding"] = rows.text_embedding
        if rows.x0 is not None:
            tensors["x0"] = rows.x0
        for name in self.manifest.evaluators:
            tensors[f"score.{name}"] = rows.scores[name]
        metadata = {
            "format": DATASET_FORMAT,
            "format_version": str(self.manifest.format_version),
            "prompts": json.dumps(rows.prompts, ensure_ascii=False),
            "prompt_ids": json.dumps(rows.prompt_ids),
            "checkpoints": json.dumps(self.manifest.checkpoints),
            "writer": self.writer_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return tensors, metadata
