"""Probe-Select for ComfyUI: score N candidate seeds early from the denoiser's activations, finish the best K.

ComfyUI imports this folder as a custom node pack. Registration uses the V3 schema
(`comfy_entrypoint`); the pack defines no NODE_CLASS_MAPPINGS on purpose (ComfyUI would then never
look at comfy_entrypoint). The `probes` and `evaluators` model folders are registered at import
time (nodes/folders.py) because ComfyExtension.on_load() is not called on every supported ComfyUI version.
"""
from .nodes import ProbeSelectExtension
from .nodes.folders import register_model_folders
from .nodes.engine.pick_server import register_routes

WEB_DIRECTORY = "./js"

register_model_folders()
register_routes()      # pause-and-pick: the server adds custom routes only before it starts


async def comfy_entrypoint() -> ProbeSelectExtension:
    return ProbeSelectExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
