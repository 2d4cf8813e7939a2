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


# `make test` runs the suite on three pytest-xdist workers, a file at a time each (--dist loadfile
# --no-loadscope-reorder: files in collection order). The files that take longest go first, so that the
# short ones fill in at the end and the workers finish together. Longest first by each file's seconds on 2
# cores (the sum of its tests' times in a --junitxml report); a file not listed goes after these, in its usual order.
LONGEST_FILES = ("test_templates.py", "test_browser.py", "test_exact_resume.py", "test_cli.py", "test_stand_ins.py",
                 "test_proxy_bench.py", "test_multistage.py", "test_demo.py", "test_proxy_ceiling.py",
                 "test_training_nodes.py", "test_evaluators.py", "test_proxy_models.py", "test_compaction.py",
                 "test_distributed.py", "test_server.py", "test_custom_sampling.py", "test_nodes_x0.py")


def pytest_collection_modifyitems(config, items):
    # Only on xdist workers (they collect; the controller schedules their common order): a plain run
    # keeps pytest's file order.
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))     # stable within a file


@pytest.fixture(scope="session")
def pack():
    """The pack, imported as ComfyUI imports a custom node folder."""
    return load_pack()
