"""Atomic file replacement: a reader sees either the old file or the complete new one, never a
partial write (a crash, a full disk or an exception half-way leaves the old file in place)."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "atomic_write_text", "fsync_directory"]

logger = logging.getLogger(__name__)


def atomic_write(path: Union[str, os.PathLike], write_fn: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically.

    ``write_fn(temp_path)`` writes the complete content to ``temp_path``, a fresh empty file named
    ``.<name>.<pid>.<random>.tmp`` in the same directory as ``path`` (same directory, so the final
    ``os.replace`` is a rename within one filesystem, which is atomic). The temporary file is then
    fsynced and renamed onto ``path``. If anything raises, the temporary file is removed, the
    exception propagates, and an existing file at ``path`` is untouched.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist")
    # O_EXCL reserves the name, so two writers (threads, processes) never share a temp file.
    while True:
        temp_path = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = os.stat(temp_path).st_mode & 0o777      # 0o666 less the umask
            break
        except FileExistsError:
            continue
    try:
        write_fn(temp_path)
        # A writer may replace the temp file with its own, private one (safetensors writes 0600):
        # give the result the permissions any new file of this user gets.
        os.chmod(temp_path, mode)
        # Flush the data to disk before the rename makes it visible: otherwise a power loss can
        # leave a renamed but empty file.
        fd = os.open(temp_path, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_path, path)
    except BaseException:
        try:
            temp_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:  # keep the original exception; just say what is left behind
            logger.warning("could not remove temporary file %s: %s", temp_path, error)
        raise
    fsync_directory(directory)
    return path


def atomic_write_text(path: Union[str, os.PathLike], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`): a report or a results file that took
    hours to compute is never left half-written by an interrupted run."""
    return atomic_write(path, lambda temp: temp.write_text(text, encoding=encoding))


def fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
