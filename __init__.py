"""Probe-Select for ComfyUI: score N candidate seeds early from the denoiser's activations, finish the best K.

ComfyUI imports this folder as a custom node pack. Registration uses the V3 schema
(`comfy_entrypoint`); the pack defines no NODE_CLASS_MAPPINGS on purpose (ComfyUI would then never
look at comfy_entrypoint). The `probes` models folder is registered at import time because
ComfyExtension.on_load() is not called on every supported ComfyUI version.
"""
import os

import folder_paths

from .nodes import ProbeSelectExtension
from .nodes.evaluators import register_evaluators_folder
from .nodes.pick_server import register_routes

WEB_DIRECTORY = "./js"
PROBES_FOLDER = "probes"


def _register_probes_folder() -> None:
    path = os.path.join(folder_paths.models_dir, PROBES_FOLDER)
    if PROBES_FOLDER in folder_paths.folder_names_and_paths:
        # Keep paths that extra_model_paths.yaml already added.
        folder_paths.add_model_folder_path(PROBES_FOLDER, path)
    else:
        folder_paths.folder_names_and_paths[PROBES_FOLDER] = ([path], {".safetensors"})


_register_probes_folder()
register_evaluators_folder()
register_routes()      # pause-and-pick: the server adds custom routes only before it starts


async def comfy_entrypoint() -> ProbeSelectExtension:
    return ProbeSelectExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
