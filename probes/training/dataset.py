"""Activation datasets for training probes: one manifest plus append-only safetensors shards.

Layout of a dataset directory::

    <root>/manifest.json                                 what every row holds (see DatasetManifest)
    <root>/shards/shard-<writer_id>-<seq:06d>.safetensors  one appended batch of rows each

Why shards: collecting data means sampling, finishing and scoring for hours, often from several
ComfyUI instances (or machines on a shared disk) at once, and any job may be killed at any moment.
Each append writes one new file, under a name no other writer uses, atomically (temporary file in
the same folder, then a rename). So a crash never leaves a visible partial shard (only a hidden
``.*.tmp`` file and safetensors' ``.tmpXXXXXX``, which readers ignore and the next writer or
reader deletes once stale: :func:`remove_stale_temporaries`), concurrent writers never touch each other's files, and no
lock is needed. Shards are never modified once visible. Readers list the shards in name order, so
rows come in the same order every time, and drop repeated ``(prompt_id, seed)`` rows, which is what
re-running a crashed collection job produces.

Shard content (all metadata values are strings; structured ones are JSON)::

    tensors   features        [R, K, C, P, P] float16 (K checkpoints, in manifest order)
              seeds           [R] int64
              text_embedding  [R, D] float16 (only when the manifest's text_dim > 0)
              score.<name>    [R] float32, one per evaluator of the manifest
    metadata  format, format_version, prompts, prompt_ids, checkpoints, writer, created

Only safetensors and JSON are ever read: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import fsync_directory, atomic_write
from ..checkpoints import CheckpointError, checkpoint_index
from ..features import FEATURE_DTYPE
from ..io import ProbeMetadata

__all__ = [
    "DATASET_FORMAT",
    "DATASET_FORMAT_VERSION",
    "SPLIT_NAMES",
    "DatasetError",
    "DatasetManifest",
    "CandidateRows",
    "DatasetWriter",
    "ProbeDataset",
    "DatasetArrays",
    "read_manifest",
    "list_shards",
    "prompt_id",
    "default_writer_id",
    "split_by_prompt",
    "check_probe_matches",
]

logger = logging.getLogger(__name__)

DATASET_FORMAT = "probe-select-dataset"
# Bump when a reader of the previous version could misread a new dataset. Readers accept any
# version up to their own and refuse newer ones.
DATASET_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
SPLIT_NAMES = ("train", "val", "test")
# Where the nodes and the command-line collector keep datasets, under ComfyUI's output directory.
DATASETS_SUBFOLDER = "probe_select_datasets"

# Checkpoints are fractions of steps done (s / T); two values this close are the same checkpoint.
_T_TOLERANCE = 1e-6
# A safetensors header larger than this is certainly damage, not data.
_MAX_HEADER_BYTES = 256 * 1024 * 1024
_WRITER_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_SHARD_METADATA_KEYS = ("format", "format_version", "prompts", "prompt_ids", "checkpoints", "writer", "created")

PathLike = Union[str, os.PathLike]


class DatasetError(ValueError):
    """A dataset is missing, damaged, or does not match the data or probe it is used with.

    Messages name the dataset directory or shard file and say how to fix the problem.
    """


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(kw_only=True)
class DatasetManifest:
    """What every row of a dataset holds; stored as ``<root>/manifest.json``.

    Attributes:
        format, format_version: identify the file; set by this module.
        backbone_family: backbone family of the activations (e.g. ``"sd2"``).
        tap: path of the tapped block (e.g. ``"output_blocks.7.0"``).
        feature_shape: ``(C, P, P)`` of one row's pooled activations at one checkpoint.
        pooling: how activations were reduced to ``P x P`` (e.g. ``"adaptive_avg"``).
        checkpoints: the checkpoints t (fraction of steps done) captured per row, strictly
            increasing; the K axis of the stored features follows this order.
        evaluators: names of the evaluators that scored every row (e.g. ``["clipscore"]``).
        text_dim: width D of the stored text embedding; 0 when rows carry none.
    """

    format: str = DATASET_FORMAT
    format_version: int = DATASET_FORMAT_VERSION
    backbone_family: str
    tap: str
    feature_shape: tuple[int, int, int]
    pooling: str = "adaptive_avg"
    checkpoints: list[float]
    evaluators: list[str]
    text_dim: int = 0

    def __post_init__(self) -> None:
        if self.format != DATASET_FORMAT:
            raise ValueError(f"DatasetManifest.format must be {DATASET_FORMAT!r}, got {self.format!r}")
        if not _is_int(self.format_version) or not 1 <= self.format_version <= DATASET_FORMAT_VERSION:
            raise ValueError(
                f"DatasetManifest.format_version {self.format_version!r} is not supported (this "
                f"Probe-Select reads versions 1..{DATASET_FORMAT_VERSION}); update the pack."
            )
        for name in ("backbone_family", "tap", "pooling"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"DatasetManifest.{name} must be a non-empty string, got {value!r}")
        shape = tuple(self.feature_shape)
        if len(shape) != 3 or not all(_is_int(n) and n > 0 for n in shape):
            raise ValueError(f"DatasetManifest.feature_shape must be three positive ints (C, P, P), got {self.feature_shape!r}")
        self.feature_shape = shape
        checkpoints = [float(t) for t in self.checkpoints]
        if not checkpoints:
            raise ValueError("DatasetManifest.checkpoints must list at least one checkpoint t")
        if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in checkpoints):
            raise ValueError(f"DatasetManifest.checkpoints must be fractions of steps in [0, 1], got {checkpoints}")
        if any(b - a <= _T_TOLERANCE for a, b in zip(checkpoints, checkpoints[1:])):
            raise ValueError(
                f"DatasetManifest.checkpoints must be strictly increasing, got {checkpoints}; list them "
                f"sorted, and order the K axis of the features the same way."
            )
        self.checkpoints = checkpoints
        evaluators = list(self.evaluators)
        if not evaluators or not all(isinstance(name, str) and name for name in evaluators):
            raise ValueError(f"DatasetManifest.evaluators must be a non-empty list of names, got {self.evaluators!r}")
        if len(set(evaluators)) != len(evaluators):
            raise ValueError(f"DatasetManifest.evaluators has repeated names: {evaluators}")
        self.evaluators = evaluators
        if not _is_int(self.text_dim) or self.text_dim < 0:
            raise ValueError(f"DatasetManifest.text_dim must be an int >= 0 (0 = no text embedding), got {self.text_dim!r}")

    def to_json(self) -> str:
        """The manifest as indented JSON text (what ``manifest.json`` holds)."""
        data = dataclasses.asdict(self)
        data["feature_shape"] = list(self.feature_shape)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: Union[str, bytes], source: str = "manifest") -> "DatasetManifest":
        """Parse and validate manifest JSON; every problem is a :class:`DatasetError` naming ``source``."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise DatasetError(f"{source} is not valid JSON ({error}); the file is damaged. Restore it or recreate the dataset.") from None
        if not isinstance(data, dict) or data.get("format") != DATASET_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise DatasetError(
                f"{source} is not a Probe-Select dataset manifest (format {found!r}, expected "
                f"{DATASET_FORMAT!r}); point to a folder written by DatasetWriter."
            )
        version = data.get("format_version")
        if _is_int(version) and version > DATASET_FORMAT_VERSION:
            raise DatasetError(
                f"{source} uses dataset format version {version}, but this Probe-Select reads up to "
                f"version {DATASET_FORMAT_VERSION}; update the pack to read this dataset."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("%s: ignoring unknown manifest keys %s", source, unknown)
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except (TypeError, ValueError) as error:
            raise DatasetError(f"{source} has an invalid manifest ({error}). Restore it or recreate the dataset.") from None

    def checkpoint_index(self, checkpoint_t: float) -> int:
        """Position on the K axis of the stored checkpoint for ``checkpoint_t`` (one rule:
        :func:`~probe_select.probes.checkpoints.checkpoint_index`); :class:`DatasetError` if none."""
        try:
            return checkpoint_index(self.checkpoints, checkpoint_t)
        except CheckpointError:
            raise DatasetError(
                f"checkpoint t={checkpoint_t} is not in this dataset; it holds checkpoints "
                f"{self.checkpoints}. Pick one of those, or collect a dataset at t={checkpoint_t}."
            ) from None

    def compatible_with(self, other: "DatasetManifest") -> list[str]:
        """Differences that stop rows described by ``other`` from sharing a dataset with ``self``.

        Returns one readable line per differing field (empty list when compatible). The order of
        ``evaluators`` does not matter; checkpoints are compared within a tiny tolerance.
        """
        differences = []
        for name in ("backbone_family", "tap", "feature_shape", "pooling", "text_dim"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                differences.append(f"{name} differs ({mine!r} vs {theirs!r})")
        if len(self.checkpoints) != len(other.checkpoints) or any(
            abs(a - b) > _T_TOLERANCE for a, b in zip(self.checkpoints, other.checkpoints)
        ):
            differences.append(f"checkpoints differ ({self.checkpoints} vs {other.checkpoints})")
        if set(self.evaluators) != set(other.evaluators):
            differences.append(f"evaluators differ ({sorted(self.evaluators)} vs {sorted(other.evaluators)})")
        return differences


def read_manifest(root: PathLike) -> DatasetManifest:
    """The manifest of the dataset at ``root``.

    Raises:
        DatasetError: if the folder or its ``manifest.json`` is missing or invalid.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; check the path, or collect data into it with DatasetWriter first.")
    # A manifest is published complete (hard link of a finished temp file), except on filesystems
    # without hard links, where it is created in place; then a reader may briefly see it partial.
    for attempt in range(20):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DatasetError(
                f"{root} has no {MANIFEST_NAME}, so it is not a Probe-Select dataset (or its manifest "
                f"was deleted); point to a folder written by DatasetWriter."
            ) from None
        except OSError as error:
            raise DatasetError(f"cannot read {path}: {error}") from None
        try:
            json.loads(text)
            break
        except ValueError:
            if attempt == 19:
                break
            time.sleep(0.05)
    return DatasetManifest.from_json(text, source=str(path))


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


# --------------------------------------------------------------------------------------------
# Rows to append


def prompt_id(prompt: str) -> str:
    """Default id of a prompt: the first 16 hex digits of the SHA-1 of its UTF-8 text.

    A content hash, so the same caption gets the same id in every job and on every machine, which
    is what splitting by prompt and dropping re-collected rows rely on.
    """
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


@dataclass(kw_only=True)
class CandidateRows:
    """A batch of R rows to append: one row per finished candidate.

    Attributes:
        features: ``[R, K, C, P, P]`` pooled activations at the manifest's K checkpoints (in its
            order); stored as float16.
        seeds: ``[R]`` seeds. ComfyUI seeds go from 0 to 2**64 - 1; values of 2**63 and above are
            stored as their two's-complement int64 (``seed - 2**64``), which keeps them distinct.
            Python ints outside that range are refused (2**64 would be stored as 0, -1 as
            2**64 - 1); an int64 tensor is taken as already stored that way.
        prompts: the R prompt texts.
        prompt_ids: R prompt ids; defaults to :func:`prompt_id` of each prompt.
        text_embedding: ``[R, D]`` pooled text embedding, or None; stored as float16.
        scores: evaluator name -> ``[R]`` finished-image scores (float32, finite).
    """

    features: Tensor
    seeds: Union[Tensor, Sequence[int]]
    prompts: list[str]
    prompt_ids: Optional[list[str]] = None
    text_embedding: Optional[Tensor] = None
    scores: dict[str, Tensor]

    def __post_init__(self) -> None:
        features = self.features
        if not isinstance(features, Tensor) or features.ndim != 5 or not features.is_floating_point():
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"CandidateRows.features must be a float [R, K, C, P, P] tensor, got {shape}")
        self.features = features.detach().to("cpu", FEATURE_DTYPE).contiguous()
        if not torch.isfinite(self.features).all():
            raise ValueError("CandidateRows.features has NaN/inf values (after conversion to float16); check the activations' scale")
        rows = self.features.shape[0]
        self.seeds = _seeds_to_int64(self.seeds)
        if self.seeds.shape[0] != rows:
            raise ValueError(f"CandidateRows has {rows} feature rows but {self.seeds.shape[0]} seeds; give one seed per row")
        self.prompts = _string_list("prompts", self.prompts, rows)
        if self.prompt_ids is None:
            self.prompt_ids = [prompt_id(text) for text in self.prompts]
        self.prompt_ids = _string_list("prompt_ids", self.prompt_ids, rows, non_empty=True)
        if self.text_embedding is not None:
            text = self.text_embedding
            if not isinstance(text, Tensor) or text.ndim != 2 or text.shape[0] != rows or not text.is_floating_point():
                shape = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
                raise ValueError(f"CandidateRows.text_embedding must be a float [R, D] tensor with R={rows}, got {shape}")
            self.text_embedding = text.detach().to("cpu", FEATURE_DTYPE).contiguous()
            if not torch.isfinite(self.text_embedding).all():
                raise ValueError("CandidateRows.text_embedding has NaN/inf values (after conversion to float16)")
        if not isinstance(self.scores, dict) or not self.scores:
            raise ValueError("CandidateRows.scores must be a non-empty dict: evaluator name -> [R] scores")
        scores = {}
        for name, values in self.scores.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"CandidateRows.scores keys must be evaluator names, got {name!r}")
            values = torch.as_tensor(values).detach().to("cpu", torch.float32).reshape(-1)
            if values.shape[0] != rows:
                raise ValueError(f"CandidateRows.scores[{name!r}] has {values.shape[0]} values for {rows} rows")
            if not torch.isfinite(values).all():
                raise ValueError(
                    f"CandidateRows.scores[{name!r}] has NaN/inf values; the evaluator failed on some "
                    f"images: drop those rows before appending"
                )
            scores[name] = values.contiguous()
        self.scores = scores

    def __len__(self) -> int:
        return self.features.shape[0]


def _seeds_to_int64(seeds) -> Tensor:
    if isinstance(seeds, Tensor):
        if seeds.is_floating_point() or seeds.is_complex():
            raise ValueError(f"CandidateRows.seeds must be integers, got dtype {seeds.dtype}")
        return seeds.detach().to("cpu", torch.int64).reshape(-1).contiguous()
    values = []
    for seed in seeds:
        seed = int(seed)
        if not 0 <= seed < 2**64:
            raise ValueError(
                f"CandidateRows.seeds: {seed} is outside ComfyUI's seed range 0 .. 2**64 - 1; "
                f"pass the seeds the sampler used"
            )
        values.append(seed - 2**64 if seed >= 2**63 else seed)
    return torch.tensor(values, dtype=torch.int64)


def _string_list(name: str, values, rows: int, non_empty: bool = False) -> list[str]:
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"CandidateRows.{name} must be a list of strings")
    values = list(values)
    if len(values) != rows:
        raise ValueError(f"CandidateRows has {rows} rows but {len(values)} {name}; give one per row")
    if non_empty and not all(values):
        raise ValueError(f"CandidateRows.{name} must not contain empty strings")
    return values


# --------------------------------------------------------------------------------------------
# Writing


def default_writer_id() -> str:
    """``<hostname>-<pid>-<8 hex random>``: unique among all processes writing one dataset.

    The host name separates machines sharing a disk, the pid separates ComfyUI instances on one
    machine, and the random part separates writers in one process and pids reused after restarts.
    """
    host = re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname()).strip("_")[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def list_shards(root: PathLike) -> list[Path]:
    """Visible shard files of the dataset at ``root``, sorted by name (the row order).

    Dot-files and ``*.tmp`` are skipped: they are unfinished writes (a writer killed mid-append
    leaves exactly such a file, which never becomes a shard). So is anything not named
    ``shard-*.safetensors`` (a note, a copied model file): :class:`ProbeDataset` warns about those.
    """
    shard_dir = Path(root) / SHARD_DIR
    try:
        entries = list(os.scandir(shard_dir))
    except FileNotFoundError:
        return []
    names = sorted(
        entry.name
        for entry in entries
        if _is_shard_name(entry.name) and entry.is_file()
    )
    return [shard_dir / name for name in names]


# An unfinished write older than this is a writer's leftover (killed mid-append), not a live
# write: a shard takes seconds to write, and a live writer's files are modified while it writes.
# Age, not pid, because writers on other machines share the folder.
STALE_TEMP_SECONDS = 15 * 60
# Hidden temporaries in the shard folder: atomic_write's ``.<name>.<pid>.<random>.tmp`` and the
# ``.tmpXXXXXX`` file safetensors writes first and renames onto it when complete.
_TEMP_PATTERN = re.compile(r"\.(?:tmp[A-Za-z0-9_]{6}|.+\.tmp)")


def remove_stale_temporaries(root: PathLike, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Delete the unfinished writes of killed writers from the dataset at ``root``.

    A killed writer leaves its hidden ``.tmp`` file and, when it died inside safetensors' save, a
    full-size ``.tmpXXXXXX`` beside it; neither ever becomes a shard. Files not modified for
    ``max_age`` seconds are removed (a live writer's temporaries are younger). Returns the removed
    paths; a file that cannot be removed (read-only dataset) is logged and left.
    """
    shard_dir = Path(root) / SHARD_DIR
    try:
        entries = list(os.scandir(shard_dir))
    except FileNotFoundError:
        return []
    now = time.time()
    removed = []
    for entry in entries:
        if not _TEMP_PATTERN.fullmatch(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or now - entry.stat().st_mtime < max_age:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue                    # another writer or reader removed it first
        except OSError as error:
            logger.warning("could not remove stale temporary file %s: %s", entry.path, error)
            continue
        removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d stale temporary file(s) of killed writers from %s", len(removed), shard_dir)
    return removed


def _is_shard_name(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)


def _stray_files(root: PathLike) -> list[str]:
    """Visible entries of ``<root>/shards`` that are not shards (hidden ones are unfinished writes)."""
    try:
        entries = list(os.scandir(Path(root) / SHARD_DIR))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and not (_is_shard_name(e.name) and e.is_file()))


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
                    count = _header_row_count(path)
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
            problems.append(
                f"features are (C, P, P) = {tuple(rows.features.shape[2:])} but the dataset stores "
                f"{manifest.feature_shape}"
            )
        if manifest.text_dim:
            if rows.text_embedding is None:
                problems.append(f"rows carry no text_embedding but the dataset stores one of width {manifest.text_dim}")
            elif rows.text_embedding.shape[1] != manifest.text_dim:
                problems.append(f"text_embedding has width {rows.text_embedding.shape[1]} but the dataset stores width {manifest.text_dim}")
        elif rows.text_embedding is not None:
            problems.append("rows carry a text_embedding but the dataset stores none (text_dim 0)")
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
        for name in self.manifest.evaluators:
            tensors[f"score.{name}"] = rows.scores[name]
        metadata = {
            "format": DATASET_FORMAT,
            "format_version": str(DATASET_FORMAT_VERSION),
            "prompts": json.dumps(rows.prompts, ensure_ascii=False),
            "prompt_ids": json.dumps(rows.prompt_ids),
            "checkpoints": json.dumps(self.manifest.checkpoints),
            "writer": self.writer_id,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        return tensors, metadata


def read_shard_header(path: PathLike) -> tuple[dict, int, int]:
    """(header, header length, file size) of a shard's safetensors header (no tensor is read).

    Raises:
        ValueError: if the file is too short or its header length is implausible.
    """
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("file shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if not 0 < length <= _MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} is implausible")
        header = json.loads(handle.read(length))
        size = os.fstat(handle.fileno()).st_size
    return header, length, size


def _header_row_count(path: Path) -> int:
    """Rows of a shard from its safetensors header alone (a few hundred bytes read, no mmap)."""
    header, length, size = read_shard_header(path)
    # Truncation (the usual damage) shows as a file shorter than the header's last tensor end.
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + length + end:
        raise ValueError(f"file size {size} does not match its header ({8 + length + end} bytes); truncated?")
    return int(header["seeds"]["shape"][0])


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Shard:
    """What a reader keeps of one shard in memory: everything except the features."""

    path: Path
    rows: int
    seeds: Tensor
    prompts: list[str]
    prompt_ids: list[str]
    text_embedding: Optional[Tensor]
    scores: dict[str, Tensor]
    keep: Optional[Tensor] = None  # kept row indices after dropping duplicates; None = all


def _read_shard(path: Path, manifest: DatasetManifest) -> _Shard:
    """Read and check one shard's small tensors and metadata (features: header only)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return _parse_shard(path, handle, manifest)
    except DatasetError:
        raise
    except Exception as error:  # safetensors raises its own SafetensorError (not exported stably)
        raise DatasetError(f"shard {path} is not a readable safetensors file ({error}); it is truncated or corrupt.") from None


def _parse_shard(path: Path, handle, manifest: DatasetManifest) -> _Shard:
    def bad(problem: str) -> DatasetError:
        return DatasetError(f"shard {path} is inconsistent: {problem}.")

    metadata = dict(handle.metadata() or {})
    if metadata.get("format") != DATASET_FORMAT:
        raise bad(f"format {metadata.get('format')!r} instead of {DATASET_FORMAT!r} (not a Probe-Select dataset shard)")
    missing = [key for key in _SHARD_METADATA_KEYS if key not in metadata]
    if missing:
        raise bad(f"metadata {missing} missing")
    try:
        version = int(metadata["format_version"])
        prompts = json.loads(metadata["prompts"])
        prompt_ids = json.loads(metadata["prompt_ids"])
        checkpoints = [float(t) for t in json.loads(metadata["checkpoints"])]
    except (TypeError, ValueError) as error:
        raise bad(f"unreadable metadata ({error})") from None
    if version > DATASET_FORMAT_VERSION:
        raise DatasetError(
            f"shard {path} uses dataset format version {version}, but this Probe-Select reads up to "
            f"version {DATASET_FORMAT_VERSION}; update the pack."
        )
    if len(checkpoints) != len(manifest.checkpoints) or any(
        abs(a - b) > _T_TOLERANCE for a, b in zip(checkpoints, manifest.checkpoints)
    ):
        raise bad(f"it holds checkpoints {checkpoints} but the manifest says {manifest.checkpoints} (copied from another dataset?)")

    keys = set(handle.keys())
    for name in ["features", "seeds"] + [f"score.{e}" for e in manifest.evaluators]:
        if name not in keys:
            raise bad(f"tensor {name!r} missing")
    features = handle.get_slice("features")
    shape = list(features.get_shape())
    rows = shape[0] if shape else -1
    expected = [rows, len(manifest.checkpoints), *manifest.feature_shape]
    if shape != expected or features.get_dtype() != "F16":
        raise bad(f"features are {features.get_dtype()} {shape}, expected F16 [R, K, C, P, P] = {expected}")
    seeds = handle.get_tensor("seeds")
    if seeds.dtype != torch.int64 or list(seeds.shape) != [rows]:
        raise bad(f"seeds are {seeds.dtype} {list(seeds.shape)}, expected int64 [{rows}]")
    for name, values in (("prompts", prompts), ("prompt_ids", prompt_ids)):
        if not isinstance(values, list) or len(values) != rows or not all(isinstance(v, str) for v in values):
            raise bad(f"metadata {name} is not a list of {rows} strings")
    scores = {}
    for evaluator in manifest.evaluators:
        values = handle.get_tensor(f"score.{evaluator}")
        if not values.is_floating_point() or list(values.shape) != [rows]:
            raise bad(f"score.{evaluator} is {values.dtype} {list(values.shape)}, expected float32 [{rows}]")
        if not torch.isfinite(values).all():
            raise bad(f"score.{evaluator} has NaN/inf values")
        scores[evaluator] = values.float()
    text = None
    if manifest.text_dim:
        if "text_embedding" not in keys:
            raise bad(f"tensor 'text_embedding' missing (the manifest says text_dim {manifest.text_dim})")
        text = handle.get_tensor("text_embedding")
        if not text.is_floating_point() or list(text.shape) != [rows, manifest.text_dim]:
            raise bad(f"text_embedding is {text.dtype} {list(text.shape)}, expected float [{rows}, {manifest.text_dim}]")
        text = text.to(FEATURE_DTYPE)
    elif "text_embedding" in keys:
        raise bad("it has a text_embedding but the manifest says text_dim 0")
    return _Shard(path=path, rows=rows, seeds=seeds, prompts=prompts, prompt_ids=prompt_ids, text_embedding=text, scores=scores)


@dataclass
class DatasetArrays:
    """Plain tensors of N dataset rows at one checkpoint and for one evaluator: a trainer's input.

    Attributes:
        features: ``[N, C, P, P]`` float16 pooled activations at checkpoint ``t``.
        t: the checkpoint.
        seeds: ``[N]`` int64.
        prompt_ids: N prompt ids (rows of one prompt are compared with each other in ranking).
        text_embedding: ``[N, D]`` float16, or None.
        scores: ``[N]`` float32 scores of ``evaluator``.
        evaluator: name of the evaluator.
    """

    features: Tensor
    t: float
    seeds: Tensor
    prompt_ids: list[str]
    text_embedding: Optional[Tensor]
    scores: Tensor
    evaluator: str = ""

    def __post_init__(self) -> None:
        rows = self.features.shape[0]
        lengths = {"seeds": self.seeds.shape[0], "prompt_ids": len(self.prompt_ids), "scores": self.scores.shape[0]}
        if self.text_embedding is not None:
            lengths["text_embedding"] = self.text_embedding.shape[0]
        wrong = {name: n for name, n in lengths.items() if n != rows}
        if wrong:
            raise ValueError(f"DatasetArrays: {rows} feature rows but {wrong}")

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, indices: Union[Sequence[int], Tensor]) -> "DatasetArrays":
        """The rows at ``indices`` (e.g. ``split_by_prompt(...)["train"]``), in that order."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"DatasetArrays.select: indices outside [0, {len(self)})")
        positions = index.tolist()
        return dataclasses.replace(
            self,
            features=self.features[index],
            seeds=self.seeds[index],
            prompt_ids=[self.prompt_ids[i] for i in positions],
            text_embedding=None if self.text_embedding is None else self.text_embedding[index],
            scores=self.scores[index],
        )

    def prompt_groups(self) -> Tensor:
        """``[N]`` int64 dense prompt index per row (0, 1, ... in order of first appearance).

        Ranking losses and within-prompt metrics compare rows of the same group.
        """
        ids: dict[str, int] = {}
        return torch.tensor([ids.setdefault(p, len(ids)) for p in self.prompt_ids], dtype=torch.long)


class ProbeDataset:
    """A dataset read back for training: rows in shard-name order, duplicates dropped.

    Opening reads the manifest, every shard's header and its small tensors (seeds, scores, text
    embedding); features are read per checkpoint on demand by :meth:`features` / :meth:`arrays`,
    only the requested checkpoint's slice of each shard. Shards appended after opening are not
    seen; open the dataset again to include them.

    Args:
        root: the dataset folder.
        skip_corrupt: skip (with a warning, listed in :attr:`skipped`) shards that cannot be read
            or are inconsistent, instead of raising.

    Raises:
        DatasetError: for a missing or invalid manifest, or (without ``skip_corrupt``) a damaged
            shard, naming the file.
    """

    def __init__(self, root: PathLike, skip_corrupt: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        remove_stale_temporaries(self.root)
        self.skipped: list[Path] = []
        stray = _stray_files(self.root)
        if stray:
            logger.warning("dataset %s: ignoring %d files in %s/ that are not shards: %s",
                           self.root, len(stray), SHARD_DIR, ", ".join(stray))
        shards = []
        for path in list_shards(self.root):
            try:
                shards.append(_read_shard(path, self.manifest))
            except DatasetError as error:
                if not skip_corrupt:
                    raise DatasetError(
                        f"{error} Delete or move that file, or open the dataset with "
                        f"skip_corrupt=True to load the other shards."
                    ) from None
                logger.warning("skipping shard: %s", error)
                self.skipped.append(path)
        self._shards = shards
        dropped = _drop_duplicates(shards)
        if dropped:
            logger.info(
                "dataset %s: dropped %d duplicate rows (same prompt_id and seed as an earlier row; "
                "kept the first by shard name)", self.root, dropped,
            )
        self.duplicates_dropped = dropped
        kept = [(s, s.keep if s.keep is not None else slice(None)) for s in shards]
        self._seeds = torch.cat([s.seeds[k] for s, k in kept]) if shards else torch.zeros(0, dtype=torch.int64)
        self._prompts = [s.prompts[i] for s in shards for i in _kept_rows(s)]
        self._prompt_ids = [s.prompt_ids[i] for s in shards for i in _kept_rows(s)]
        self._scores = {
            name: torch.cat([s.scores[name][k] for s, k in kept]) if shards else torch.zeros(0)
            for name in self.manifest.evaluators
        }
        self._text = None
        if self.manifest.text_dim:
            self._text = (
                torch.cat([s.text_embedding[k] for s, k in kept])
                if shards
                else torch.zeros(0, self.manifest.text_dim, dtype=FEATURE_DTYPE)
            )
        logger.info("opened dataset %s: %d rows from %d shards", self.root, len(self), len(shards))

    def __len__(self) -> int:
        return self._seeds.shape[0]

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ProbeDataset(root={str(self.root)!r}, rows={len(self)}, shards={len(self._shards)}, "
            f"family={m.backbone_family!r}, tap={m.tap!r}, checkpoints={m.checkpoints}, evaluators={m.evaluators})"
        )

    @property
    def shards(self) -> list[Path]:
        """The shard files loaded, in row order."""
        return [shard.path for shard in self._shards]

    @property
    def seeds(self) -> Tensor:
        """``[N]`` int64 seed per row."""
        return self._seeds

    @property
    def prompt_ids(self) -> list[str]:
        return self._prompt_ids

    @property
    def prompts(self) -> list[str]:
        return self._prompts

    @property
    def text_embedding(self) -> Optional[Tensor]:
        """``[N, D]`` float16 text embedding per row, or None when the dataset stores none."""
        return self._text

    def scores(self, evaluator: str) -> Tensor:
        """``[N]`` float32 scores of ``evaluator``."""
        if evaluator not in self._scores:
            raise DatasetError(
                f"dataset {self.root} has no scores for evaluator {evaluator!r}; it has "
                f"{self.manifest.evaluators}. Pick one of those or collect data scored by {evaluator!r}."
            )
        return self._scores[evaluator]

    def features(self, checkpoint_t: float) -> Tensor:
        """``[N, C, P, P]`` float16 features at ``checkpoint_t``, read from the shards now.

        A dataset without rows gives an empty ``[0, C, P, P]`` tensor, like its other arrays.

        Raises:
            DatasetError: if ``checkpoint_t`` is not one of the manifest's checkpoints (they are
                listed), or a shard has become unreadable since the dataset was opened.
        """
        try:
            k = self.manifest.checkpoint_index(checkpoint_t)
        except DatasetError as error:
            raise DatasetError(f"dataset {self.root}: {error}") from None
        parts = []
        for shard in self._shards:
            try:
                with safe_open(str(shard.path), framework="pt") as handle:
                    part = handle.get_slice("features")[:, k]
            except Exception as error:
                raise DatasetError(
                    f"shard {shard.path} could not be read again ({error}); it was changed or removed "
                    f"after the dataset was opened. Reopen the dataset."
                ) from None
            if tuple(part.shape) != (shard.rows, *self.manifest.feature_shape):
                raise DatasetError(f"shard {shard.path} changed after the dataset was opened; reopen the dataset.")
            parts.append(part if shard.keep is None else part[shard.keep])
        if not parts:
            return torch.zeros(0, *self.manifest.feature_shape, dtype=FEATURE_DTYPE)
        return torch.cat(parts)

    def arrays(self, checkpoint_t: float, evaluator: str) -> DatasetArrays:
        """All rows as :class:`DatasetArrays` at ``checkpoint_t`` for ``evaluator``.

        Typical use: ``arrays = ds.arrays(0.2, "clipscore")``, then
        ``arrays.select(split_by_prompt(ds.prompt_ids)["train"])``.
        """
        scores = self.scores(evaluator)
        return DatasetArrays(
            features=self.features(checkpoint_t),
            t=self.manifest.checkpoints[self.manifest.checkpoint_index(checkpoint_t)],
            seeds=self._seeds,
            prompt_ids=list(self._prompt_ids),
            text_embedding=self._text,
            scores=scores,
            evaluator=evaluator,
        )

    def subset(self, indices: Union[Sequence[int], Tensor], checkpoint_t: float, evaluator: str) -> DatasetArrays:
        """The rows at ``indices`` as :class:`DatasetArrays` (``arrays(...).select(indices)``)."""
        return self.arrays(checkpoint_t, evaluator).select(indices)


def _kept_rows(shard: _Shard) -> list[int]:
    return list(range(shard.rows)) if shard.keep is None else shard.keep.tolist()


def _drop_duplicates(shards: list[_Shard]) -> int:
    """Set each shard's ``keep`` so that every (prompt_id, seed) appears once; returns rows dropped.

    The first occurrence in row order (shard name, then row) wins, so the result does not depend on
    which copy was written last.
    """
    seen: set[tuple[str, int]] = set()
    dropped = 0
    for shard in shards:
        keep = []
        for row, (pid, seed) in enumerate(zip(shard.prompt_ids, shard.seeds.tolist())):
            key = (pid, seed)
            if key in seen:
                dropped += 1
            else:
                seen.add(key)
                keep.append(row)
        shard.keep = None if len(keep) == shard.rows else torch.tensor(keep, dtype=torch.long)
    return dropped


# --------------------------------------------------------------------------------------------
# Splits and probe checks


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

    Checked: backbone family, tap, feature shape ``(C, P, P)``, pooling, the width of the probe's
    text branch (if any); and, unless disabled, that the dataset holds the probe's checkpoint t and
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
    if meta.pooling != manifest.pooling:
        problems.append(f"pooling: probe {meta.pooling!r}, dataset {manifest.pooling!r}")
    text_dim = meta.config.text_dim
    if text_dim and text_dim != manifest.text_dim:
        stored = f"width {manifest.text_dim}" if manifest.text_dim else "none"
        problems.append(f"text embedding: probe reads width {text_dim}, dataset stores {stored}")
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rows_from_activations(activations, scores: dict[str, Tensor], prompt: str) -> tuple[DatasetManifest, CandidateRows]:
    """One dataset row per candidate of one run: its activations at every checkpoint (an
    ActivationSet or ActivationSeries) and each evaluator's score, with the manifest they imply."""
    sets = list(getattr(activations, "sets", (activations,)))
    first = sets[0]
    n = len(first)
    text = first.text_embedding
    if text is not None and text.shape[0] == 1:
        text = text.expand(n, -1)
    manifest = DatasetManifest(
        backbone_family=first.family, tap=first.tap, feature_shape=first.feature_shape, pooling=first.pooling,
        checkpoints=[s.t for s in sets], evaluators=sorted(scores), text_dim=0 if text is None else text.shape[1])
    rows = CandidateRows(
        features=torch.stack([s.features for s in sets], dim=1), seeds=first.seeds, prompts=[prompt] * n,
        text_embedding=text, scores={name: value.float() for name, value in scores.items()})
    return manifest, rows
