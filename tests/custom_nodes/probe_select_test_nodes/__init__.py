"""Test-only ComfyUI nodes for Probe-Select's end-to-end tests; never shipped with the pack.

The real-server tests symlink this folder into a test server's `custom_nodes` next to the pack
(see tests/test_cli.py). It registers, classic NODE_CLASS_MAPPINGS style:

- `ProbeSelectTestBrightness`: IMAGE -> FLOAT list, the mean brightness (0..1) of each image of the
  batch, in batch order. A cheap, deterministic stand-in for an image evaluator, so that a collect
  workflow runs without evaluator weights (connect it to ProbeSelectScoresFromFloats).
"""


class ProbeSelectTestBrightness:
    CATEGORY = "sampling/probe_select/testing"
    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("brightness",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "measure"
    DESCRIPTION = "Test only: mean brightness of every image of the batch, one FLOAT per image."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def measure(self, images):
        # images: [B, H, W, C] float in 0..1
        values = images.float().mean(dim=tuple(range(1, images.ndim))).tolist()
        return (values,)


NODE_CLASS_MAPPINGS = {"ProbeSelectTestBrightness": ProbeSelectTestBrightness}
NODE_DISPLAY_NAME_MAPPINGS = {"ProbeSelectTestBrightness": "Probe-Select Test Brightness"}
