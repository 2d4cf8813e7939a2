"""Shard files on disk: their names, listing them in row order, their safetensors headers, and the
stale temporaries that killed writers leave behind."""
from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
from pathlib import Path

from .manifest import PathLike

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
# A safetensors header larger than this is certainly damage, not data.
MAX_HEADER_BYTES = 256 * 1024 * 1024


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
        if is_shard_name(entry.name) and entry.is_file()
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


def is_shard_name(name: str) -> bool:
    return name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)


def stray_files(root: PathLike) -> list[str]:
    """Visible entries of ``<root>/shards`` that are not shards (hidden ones are unfinished writes)."""
    try:
        entries = list(os.scandir(Path(root) / SHARD_DIR))
    except FileNotFoundError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and not (is_shard_name(e.name) and e.is_file()))


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
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} is implausible")
        header = json.loads(handle.read(length))
        size = os.fstat(handle.fileno()).st_size
    return header, length, size


def header_row_count(path: Path) -> int:
    """Rows of a shard from its safetensors header alone (a few hundred bytes read, no mmap)."""
    header, length, size = read_shard_header(path)
    # Truncation (the usual damage) shows as a file shorter than the header's last tensor end.
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + length + end:
        raise ValueError(f"file size {size} does not match its header ({8 + length + end} bytes); truncated?")
    return int(header["seeds"]["shape"][0])
