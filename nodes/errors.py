"""The pack's error type, for the node files (defined beside the engine, which raises it too)."""
from .engine.errors import ProbeSelectError, problem_or_true

__all__ = ["ProbeSelectError", "problem_or_true"]
