"""Command-line tools of Probe-Select (``python -m tools.cli``): collect datasets through running
ComfyUI servers over HTTP, train and evaluate probes. Standard library + the pack's library only.

The library has one import name in every process: ``probe_select.probes``. ComfyUI loads the pack
folder as a package from its ``__init__.py`` (which imports ComfyUI); a command-line process has no
ComfyUI, so :func:`library_package` registers the pack folder as the package ``probe_select``
without executing that ``__init__.py``: ``probe_select.probes`` (pure torch) then imports, and the
nodes stay unloaded. ``devtools.load_pack`` executes the same module object when the nodes are
needed (tests, bench).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE = "probe_select"
PACK_ROOT = Path(__file__).resolve().parents[1]


def library_package() -> ModuleType:
    """The package ``probe_select`` (the pack folder), registered once per process, not executed."""
    module = sys.modules.get(PACKAGE)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
    return module


library_package()
