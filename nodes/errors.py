"""The pack's error type, for the node files (defined beside the engine, which raises it too)."""
from .engine.errors import ProbeSelectError

__all__ = ["ProbeSelectError"]
