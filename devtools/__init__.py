"""Developer tools shared by the tests, the benchmarks and the scripts (never by the pack itself).

- :func:`bootstrap_comfy`: make ComfyUI importable in this process (CPU, no API nodes).
- :func:`load_pack`: the pack, executed as the package ``probe_select`` exactly like ComfyUI's
  custom node loader does (its relative imports resolve, the nodes register).
- :mod:`devtools.tiny_models`: tiny random models built with ComfyUI's own classes.
- :mod:`devtools.make_checkpoint`: the smallest SD1.x checkpoint file ComfyUI's loader detects.
- :mod:`devtools.stand_ins`: stand-in checkpoints (SD1.5, SDXL, SD3.5, Flux) under the public file
  names, and random open_clip weights, for workflows run through a real server.

sys.path order matters: ComfyUI's folder comes first so that ``import nodes`` is ComfyUI's nodes.py;
the repository root comes last (``devtools``, ``tools`` and ``bench`` import from there). The
library is imported as ``probe_select.probes`` only (see ``tools/__init__.py``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

from tools import PACK_ROOT, library_package

ROOT = PACK_ROOT


def comfyui_dir() -> Path:
    """The ComfyUI checkout: $COMFYUI_DIR, else the one scripts/setup_env.sh recorded in the running
    environment (.venv for 0.3.75, .venv-0.33 for 0.33.0, ...) or in .venv, else .comfyui/ComfyUI."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env)
    for marker in (Path(sys.prefix) / "comfyui_dir", ROOT / ".venv" / "comfyui_dir"):
        if marker.exists():
            return Path(marker.read_text().strip())
    return ROOT / ".comfyui" / "ComfyUI"


COMFY_DIR = comfyui_dir()


def bootstrap_comfy(pytorch_attention: bool = False) -> None:
    """Import ComfyUI's argument parsing with ``--cpu --disable-api-nodes``; idempotent (the first call's
    arguments stay).

    ``pytorch_attention``: add ``--use-pytorch-cross-attention``, as a CPU user who wants speed starts ComfyUI.
    On CPU ComfyUI otherwise attends with its sub-quadratic kernel; PyTorch's fused attention gives the same
    sampling to float rounding (proxy-world scores within 2e-6) and samples the proxy UNet 1.6x faster, which
    the long benchmark collections use. The tests keep ComfyUI's default."""
    if "comfy.cli_args" in sys.modules:
        return
    sys.path.insert(0, str(COMFY_DIR))
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu", "--disable-api-nodes"] + (
        ["--use-pytorch-cross-attention"] if pytorch_attention else [])
    try:
        # Imported here, not at the top: ComfyUI is importable only once its folder is on sys.path.
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above)
    finally:
        sys.argv = argv
    # ComfyUI's top-level `utils` package must win over comfy/utils.py (main.py does the same).
    import utils.extra_config  # noqa: F401
    import torch

    torch.set_num_threads(1)


def load_pack() -> ModuleType:
    """The pack as ComfyUI loads it: package ``probe_select``, its ``__init__.py`` executed once."""
    bootstrap_comfy()
    module = library_package()
    if not hasattr(module, "comfy_entrypoint"):
        module.__spec__.loader.exec_module(module)
    return module
