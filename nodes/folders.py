"""Where the pack's files live in ComfyUI: its model folders (registered here, once, from the pack's
``__init__.py``) and the datasets folder under ComfyUI's output directory."""
from __future__ import annotations

import os

import folder_paths

from ..probes.training.dataset import DATASETS_SUBFOLDER

PROBES_FOLDER = "probes"
PROBE_EXTENSIONS = {".safetensors"}
EVALUATORS_FOLDER = "evaluators"
EVALUATOR_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".bin"}
# The FID InceptionV3 weights (pt_inception-2015-12-05-*.pth), read only after a hash check.
INCEPTION_FOLDER = "inception"
INCEPTION_EXTENSIONS = {".pth", ".pt"}

__all__ = ["PROBES_FOLDER", "EVALUATORS_FOLDER", "EVALUATOR_EXTENSIONS", "INCEPTION_FOLDER", "DATASETS_SUBFOLDER",
           "register_model_folders", "datasets_root", "model_files"]


def _register(name: str, extensions: set[str]) -> None:
    """models/<name>, keeping paths that extra_model_paths.yaml already added to the folder and
    making sure ``extensions`` are listed."""
    path = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(name, path)
        _paths, listed = folder_paths.folder_names_and_paths[name]
        if listed:                          # an empty set lists every file; keep it that way
            listed.update(extensions)
    else:
        folder_paths.folder_names_and_paths[name] = ([path], set(extensions))


def register_model_folders() -> None:
    """Register ``models/probes``, ``models/evaluators`` and ``models/inception``. Called at import time: ComfyExtension.on_load()
    is not called on every supported ComfyUI version."""
    _register(PROBES_FOLDER, PROBE_EXTENSIONS)
    _register(EVALUATORS_FOLDER, EVALUATOR_EXTENSIONS)
    _register(INCEPTION_FOLDER, INCEPTION_EXTENSIONS)


def model_files(folder: str) -> list[str]:
    """The files ComfyUI lists in a model folder; none while the folder is not registered."""
    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


def datasets_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), DATASETS_SUBFOLDER)
