"""Test bootstrap: make ComfyUI importable in-process and load this pack the way ComfyUI does.

sys.path order matters: ComfyUI's folder comes first so that `import nodes` is ComfyUI's nodes.py,
and the repository root comes last so that `import probes` (the pure-PyTorch library) works without
shadowing anything. The pack itself is loaded as the package `probe_select` from its __init__.py,
exactly like ComfyUI's custom node loader does, so its relative imports resolve.
"""
import importlib.util
import os
import sys
from pathlib import Path

# One thread per torch process: on a 2-core machine with any other load, more threads make tiny
# models slower by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def comfyui_dir() -> Path:
    """$COMFYUI_DIR, else the ComfyUI recorded by scripts/setup_env.sh in the running environment
    (.venv for 0.3.75, .venv-0.33 for 0.33.0, ...), else in .venv, else .comfyui/ComfyUI."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env)
    for marker in (Path(sys.prefix) / "comfyui_dir", ROOT / ".venv" / "comfyui_dir"):
        if marker.exists():
            return Path(marker.read_text().strip())
    return ROOT / ".comfyui" / "ComfyUI"


COMFY_DIR = comfyui_dir()


def _bootstrap_comfy() -> None:
    if "comfy.cli_args" in sys.modules:
        return
    sys.path.insert(0, str(COMFY_DIR))
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu", "--disable-api-nodes"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above)
    finally:
        sys.argv = argv
    # ComfyUI's top-level `utils` package must win over comfy/utils.py (main.py does the same).
    import utils.extra_config  # noqa: F401
    import torch

    torch.set_num_threads(1)


def _load_pack():
    if "probe_select" in sys.modules:
        return sys.modules["probe_select"]
    spec = importlib.util.spec_from_file_location(
        "probe_select", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_select"] = module
    spec.loader.exec_module(module)
    return module


_bootstrap_comfy()
if str(TESTS) not in sys.path:
    sys.path.insert(1, str(TESTS))


class _PackRootIsADirectory:
    """Collect the repository root as a plain directory, not as a Python package.

    The root is a ComfyUI custom node pack with an ``__init__.py`` full of relative imports. pytest
    makes such a folder a Package and imports that file under the folder's name, which fails
    whenever the checkout's name is not an identifier (``probe-select``, as the README clones it);
    the tests load the pack as ComfyUI does instead (:func:`_load_pack`). pytest asks for the
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
    return _load_pack()
