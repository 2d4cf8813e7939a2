"""ProbeSelectTap: MODEL -> MODEL that records one block's activations during early sampling."""
from __future__ import annotations

import comfy.patcher_extension
from comfy_api.latest import io

from .engine.capture import WRAPPER_KEY, ActivationTap
from .errors import ProbeSelectError
from .engine.families import auto_tap_path, model_family, resolve_module
from .types import CATEGORY

DEFAULT_FEATURE_SIZE = 16


TAP_NODE_ID = "ProbeSelectTap"
BLOCK_FIX = "use 'auto' or one of the listed paths."


def apply_tap(model, block: str, feature_size: int, node_id: str = TAP_NODE_ID, fix: str = BLOCK_FIX):
    """A clone of `model` with an ActivationTap on `block` ("auto" = the family's default).

    `node_id` and `fix` are those of the calling node: the one-box sampler has no block input, so
    it offers another fix than the tap node."""

    try:
        path = auto_tap_path(model) if block.strip() in ("", "auto") else block.strip()
        module_path, _ = resolve_module(model, path)
    except LookupError as e:
        raise ProbeSelectError(node_id, str(e), fix) from None
    tapped = model.clone()
    tapped.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    tap = ActivationTap(model_family(model), module_path, feature_size)
    tapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, tap)
    return tapped


class ProbeSelectTap(io.ComfyNode):
    NODE_ID = TAP_NODE_ID

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Activation Tap",
            category=CATEGORY,
            description="Records the output of one denoiser block (UNet or DiT) at the checkpoint step of "
                        "ProbeSelectEarlySampler, pooled to a small feature map for a probe.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("block", default="auto",
                                tooltip="'auto' picks the tested default of the model family (SD1.x/SD2 output_blocks.7.0, "
                                        "SDXL output_blocks.4.0, SD3 joint_blocks.20, Flux the middle single block), "
                                        "or a module path such as output_blocks.7.0 or double_blocks.12."),
                io.Int.Input("feature_size", default=DEFAULT_FEATURE_SIZE, min=1, max=128,
                             tooltip="Side of the pooled feature map kept per candidate (fp16). Must match the probe."),
            ],
            outputs=[io.Model.Output(display_name="tapped model")],
        )

    @classmethod
    def execute(cls, model, block, feature_size) -> io.NodeOutput:
        return io.NodeOutput(apply_tap(model, block, feature_size))
