"""Test bootstrap: ComfyUI importable in-process and the pack loaded as ComfyUI loads it (devtools/).

The repository root goes last on sys.path (ComfyUI's folder first, so that `import nodes` is
ComfyUI's nodes.py). The pack is executed as the package `probe_select`; every test imports the
library as `probe_select.probes...` (one name per process) and the shared tools from `devtools`.
"""
import os
import sys
from pathlib import Path

# One thread per torch process: on a 2-core machine with any other load, more threads make tiny
# models slower by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from devtools import load_pack  # noqa: E402

load_pack()
if str(TESTS) not in sys.path:
    sys.path.insert(1, str(TESTS))


class _PackRootIsADirectory:
    """Collect the repository root as a plain directory, not as a Python package.

    The root is a ComfyUI custom node pack with an ``__init__.py`` full of relative imports. pytest
    makes such a folder a Package and imports that file under the folder's name, which fails
    whenever the checkout's name is not an identifier (``probe-select``, as the README clones it);
    the tests load the pack as ComfyUI does instead (:func:`devtools.load_pack`). pytest asks for the
    root's collector through the hooks of the folder above it, where no conftest hook applies,
    hence a plugin registered at configure time.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path) == ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_PackRootIsADirectory(), "probe_select_pack_root")


@pytest.fixture(scope="session")
def pack():
    """The pack, imported as ComfyUI imports a custom node folder."""
    return load_pack()
