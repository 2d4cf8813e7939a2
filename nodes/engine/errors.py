"""Errors that reach the ComfyUI user: name the node, say what is wrong and how to fix it."""
from __future__ import annotations

from typing import Callable


class ProbeSelectError(ValueError):
    """Bad input to a Probe-Select node. The message is shown as is in the ComfyUI error dialog."""

    def __init__(self, node_id: str, problem: str, fix: str = ""):
        self.node_id = node_id
        self.problem = problem
        self.fix = fix
        message = f"[{node_id}] {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


def problem_or_true(check: Callable[..., object], *args: object) -> bool | str:
    """What a node's ``validate_inputs`` answers for a check that raises :class:`ProbeSelectError`:
    True when the check passes, else the error's message (ComfyUI shows it before anything runs).

    An argument that is None is a linked input, whose value is not known before the run: the check
    is then left to ``execute`` (True)."""
    if any(arg is None for arg in args):
        return True
    try:
        check(*args)
    except ProbeSelectError as error:
        return str(error)
    return True
