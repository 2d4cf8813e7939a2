"""ComfyUI nodes of Probe-Select: thin node classes over `probes/` and the split-sampling helpers."""
from comfy_api.latest import ComfyExtension, io

from .dataset import ProbeSelectDatasetWriter
from .evaluators import EVALUATOR_NODES
from .nodes_pick import ProbeSelectPickCandidates
from .preview_score import ProbeSelectPreviewScore
from .sampling import ProbeSelectCollectSampler, ProbeSelectEarlySampler, ProbeSelectResume, ProbeSelectSampler
from .selection import ProbeSelectLoadProbe, ProbeSelectScore, ProbeSelectTopK
from .tap import ProbeSelectTap
from .training import ProbeSelectEvaluateProbe, ProbeSelectTrain

NODES: list[type[io.ComfyNode]] = [
    ProbeSelectTap,
    ProbeSelectEarlySampler,
    ProbeSelectLoadProbe,
    ProbeSelectScore,
    ProbeSelectPreviewScore,
    ProbeSelectTopK,
    ProbeSelectPickCandidates,
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
