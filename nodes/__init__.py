"""ComfyUI nodes of Probe-Select: thin node classes over `probes/` and the split-sampling helpers."""
from comfy_api.latest import ComfyExtension, io

from .nodes_activation_pca import PCA_NODES
from .nodes_attention import ATTENTION_NODES
from .nodes_blend_scores import ProbeSelectBlendScores
from .nodes_custom_sampling import ProbeSelectEarlySamplerCustom, ProbeSelectResumeCustom
from .nodes_dataset import ProbeSelectCompactDataset, ProbeSelectDatasetWriter
from .nodes_evaluators import EVALUATOR_NODES
from .nodes_image_metrics import IMAGE_METRICS_NODES
from .nodes_latent_probing import LATENT_PROBING_NODES
from .nodes_ood import OOD_NODES
from .nodes_pick import ProbeSelectPickCandidates
from .nodes_planner import ProbeSelectPlanSchedule
from .nodes_preview_score import ProbeSelectPreviewScore
from .nodes_sampling import ProbeSelectCollectSampler, ProbeSelectEarlySampler, ProbeSelectResume, ProbeSelectSampler
from .nodes_schedules import SCHEDULE_NODES
from .nodes_selection import ProbeSelectLoadProbe, ProbeSelectScore, ProbeSelectTopK
from .nodes_tap import ProbeSelectTap
from .nodes_training import ProbeSelectEvaluateProbe, ProbeSelectTrain

NODES: list[type[io.ComfyNode]] = [
    ProbeSelectTap,
    ProbeSelectEarlySampler,
    ProbeSelectLoadProbe,
    ProbeSelectScore,
    ProbeSelectPreviewScore,
    ProbeSelectBlendScores,
    ProbeSelectTopK,
    ProbeSelectPickCandidates,
    ProbeSelectResume,
    ProbeSelectEarlySamplerCustom,
    ProbeSelectResumeCustom,
    ProbeSelectSampler,
    ProbeSelectPlanSchedule,
    ProbeSelectCollectSampler,
    *EVALUATOR_NODES,
    ProbeSelectDatasetWriter,
    ProbeSelectCompactDataset,
    ProbeSelectTrain,
    ProbeSelectEvaluateProbe,
    *IMAGE_METRICS_NODES,
    *OOD_NODES,
    *SCHEDULE_NODES,
    *PCA_NODES,
    *LATENT_PROBING_NODES,
    *ATTENTION_NODES,
]


class ProbeSelectExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
