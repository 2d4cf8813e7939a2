"""Reading the safetensors files the analysis nodes write (reference statistics, OOD references).

Only safetensors and JSON metadata are read: nothing is unpickled.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

from safetensors import safe_open
from torch import Tensor


def read_format_file(path: Union[str, os.PathLike], file_format: str, missing: str, kind: str, fix: str,
                     error: Callable[[str, str], Exception]) -> tuple[Path, dict[str, str], dict[str, Tensor]]:
    """(path, metadata, tensors) of a file whose metadata says ``format: file_format``.

    ``error(problem, fix)`` is raised when the file does not exist (``"<missing> '<path>' does not
    exist."``), is not a safetensors file, or is of another format (``"... is not a Probe-Select
    <kind> ..."``); version checks stay with the caller, which knows its versions.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{missing} '{path}' does not exist.", fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:      # safetensors raises its own error types for foreign files
        raise error(f"'{path.name}' is not a safetensors file ({type(e).__name__}: {e}).", fix) from None
    if metadata.get("format") != file_format:
        raise error(f"'{path.name}' is not a Probe-Select {kind} (format {metadata.get('format')!r}).", fix)
    return path, metadata, tensors
