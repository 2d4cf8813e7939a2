"""ComfyUI nodes of Probe-Select: thin node classes over `probes/` and the split-sampling helpers."""
from comfy_api.latest import ComfyExtension, io

from .nodes_dataset import ProbeSelectDatasetWriter
from .nodes_evaluators import EVALUATOR_NODES
from .nodes_preview_score import ProbeSelectPreviewScore
from .nodes_sampling import ProbeSelectCollectSampler, ProbeSelectEarlySampler, ProbeSelectResume, ProbeSelectSampler
from .nodes_selection import ProbeSelectLoadProbe, ProbeSelectScore, ProbeSelectTopK
from .nodes_tap import ProbeSelectTap
from .nodes_training import ProbeSelectEvaluateProbe, ProbeSelectTrain

NODES: list[type[io.ComfyNode]] = [
    ProbeSelectTap,
    ProbeSelectEarlySampler,
    ProbeSelectLoadProbe,
    ProbeSelectScore,
    ProbeSelectPreviewScore,
    ProbeSelectTopK,
    ProbeSelectResume,
    ProbeSelectSampler,
    ProbeSelectCollectSampler,
    *EVALUATOR_NODES,
    ProbeSelectDatasetWriter,
    ProbeSelectTrain,
    ProbeSelectEvaluateProbe,
]


class ProbeSelectExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
