"""The selection workflows: training-free and probe selection, dataset collection, probe training and
evaluation (registered with `@workflow`, written by scripts/build_workflows.py)."""
from __future__ import annotations

from workflow_graph import Node, Note, Workflow, workflow

# Defaults shared by the examples (the SD1.5 model file of ComfyUI's own default workflow).
MODEL_FILE = "v1-5-pruned-emaonly-fp16.safetensors"
PROBE = "sd15_imagereward.safetensors"
POSITIVE = "a photo of a red fox in the snow"
NEGATIVE = "blurry, low quality"
SAMPLING = {"seed": 42, "candidates": 5, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "checkpoint_percent": 0.2, "denoise": 1.0}


def text_to_image_inputs(width: int = 512, height: int = 512, batch_size: int = 1) -> list:
    """Nodes 1-4: model file loader (MODEL 0, CLIP 1, VAE 2), positive (2), negative (3), empty latent (4)."""
    return [
        Node(1, "CheckpointLoaderSimple", {"ckpt_name": MODEL_FILE}, title="Load Checkpoint"),
        Node(2, "CLIPTextEncode", {"text": POSITIVE, "clip": (1, 1)}, title="Positive prompt", color="green"),
        Node(3, "CLIPTextEncode", {"text": NEGATIVE, "clip": (1, 1)}, title="Negative prompt", color="red"),
        Node(4, "EmptyLatentImage", {"width": width, "height": height, "batch_size": batch_size}),
    ]


@workflow("probe_select_basic")
def basic() -> Workflow:
    # Node ids 1, 5, 6, 7, 8, 9, 12 are used by tests/test_server.py (through the API twin).
    return Workflow([
        *text_to_image_inputs(),
        Node(5, "ProbeSelectTap", {"model": (1, 0), "block": "auto", "feature_size": 16}),
        Node(6, "ProbeSelectEarlySampler", {"model": (5, 0), "positive": (2, 0), "negative": (3, 0),
                                            "latent_image": (4, 0), **SAMPLING}),
        Node(7, "ProbeSelectLoadProbe", {"probe_name": PROBE}),
        Node(8, "ProbeSelectScore", {"probe": (7, 0), "activations": (6, 2)}),
        Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (8, 0), "keep": 1}),
        Node(10, "ProbeSelectResume", {"model": (1, 0), "positive": (2, 0), "negative": (3, 0),
                                       "latent": (9, 0), "cfg": SAMPLING["cfg"]}),
        Node(11, "VAEDecode", {"samples": (10, 0), "vae": (1, 2)}),
        Node(12, "SaveImage", {"images": (11, 0), "filename_prefix": "probe_select"}),
        Node(13, "VAEDecode", {"samples": (6, 1), "vae": (1, 2)}, title="VAE Decode (x0 previews)"),
        Node(14, "PreviewImage", {"images": (13, 0)}, title="All N candidates at the checkpoint"),
        Note(15, "## Probe-Select: N candidates, finish the best K\n\n"
                 "The early sampler runs **N** seeds (seed, seed+1, ...) to 20% of the steps. The probe "
                 "predicts each candidate's final score from the tapped activations, Top-K keeps the best "
                 "**K** and Resume finishes only those: 0.2 + 0.8 K/N of the compute.\n\n"
                 "- Probe files go in `ComfyUI/models/probes/`. The probe must be trained for this model "
                 "family, tap block, feature size (Tap) and checkpoint.\n"
                 "- A kept candidate equals a plain KSampler run with its seed (shown on Top-K).\n"
                 "- The preview shows every candidate's x0 prediction at the checkpoint.",
             title="About this workflow", size=(400, 330)),
    ])


@workflow("probe_select_one_box")
def one_box() -> Workflow:
    return Workflow([
        *text_to_image_inputs(),
        Node(5, "ProbeSelectLoadProbe", {"probe_name": PROBE}),
        Node(6, "ProbeSelectSampler", {"model": (1, 0), "positive": (2, 0), "negative": (3, 0),
                                       "latent_image": (4, 0), "probe": (5, 0), "keep": 1, **SAMPLING}),
        Node(7, "VAEDecode", {"samples": (6, 0), "vae": (1, 2)}),
        Node(8, "SaveImage", {"images": (7, 0), "filename_prefix": "probe_select"}),
        Note(9, "## Probe-Select in one node\n\n"
                "Runs **N** seeds to the checkpoint, scores them with the probe and finishes only the "
                "best **K**. The probe's tap is applied to the model automatically.\n\n"
                "Probe files go in `ComfyUI/models/probes/`; the probe must be trained for this model "
                "family.",
             title="About this workflow", size=(400, 220)),
    ])


COLLECT = {"seed": 0, "candidates": 8, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
           "checkpoint_percents": "0.1,0.2,0.3,0.4,0.6", "denoise": 1.0}


@workflow("collect_dataset")
def collect_dataset() -> Workflow:
    # The command-line collector (python -m tools.cli collect) replaces {prompt} in every string input.
    nodes = text_to_image_inputs()
    nodes[1] = Node(2, "CLIPTextEncode", {"text": (5, 0), "clip": (1, 1)}, title="Positive prompt", color="green")
    return Workflow([
        *nodes,
        Node(5, "PrimitiveStringMultiline", {"value": "{prompt}"}, title="prompt", color="green"),
        Node(6, "ProbeSelectTap", {"model": (1, 0), "block": "auto", "feature_size": 16}),
        Node(7, "ProbeSelectCollectSampler", {"model": (6, 0), "positive": (2, 0), "negative": (3, 0),
                                              "latent_image": (4, 0), **COLLECT}),
        Node(8, "VAEDecode", {"samples": (7, 0), "vae": (1, 2)}),
        Node(9, "ProbeSelectCLIPScore", {"model_name": "ViT-L-14", "weights": "open_clip_vit_l_14.safetensors"}),
        Node(10, "ProbeSelectEvaluateImages", {"images": (8, 0), "prompt": (5, 0), "evaluator": (9, 0)}),
        Node(11, "ProbeSelectDatasetWriter", {"activations": (7, 1), "scores": (10, 0), "prompt": (5, 0),
                                              "dataset_name": "sd15_clipscore"}),
        Node(12, "PreviewImage", {"images": (8, 0)}),
        Note(13, "## Collect a probe-training dataset\n\n"
                 "Every candidate (seed, seed+1, ...) is finished; the tapped block is recorded at each "
                 "checkpoint, the finished images are scored, and one shard is appended to "
                 "`output/probe_select_datasets/<dataset_name>`.\n\n"
                 "- Type the prompt in the **prompt** box (it feeds the text encoder, the evaluator and the "
                 "dataset). Queue once per prompt; use many prompts (hundreds) for a useful probe.\n"
                 "- For big jobs: `python -m tools.cli collect --server http://127.0.0.1:8188 --prompts "
                 "prompts.txt --dataset NAME --output-dir ComfyUI/output` sends this workflow once per "
                 "prompt, to one or several servers, and resumes where it stopped.\n"
                 "- CLIPScore needs open_clip weights in `models/evaluators` (or the open_clip cache).",
             title="About this workflow", size=(420, 330)),
    ])


@workflow("train_probe")
def train_probe() -> Workflow:
    return Workflow([
        Node(1, "ProbeSelectTrain", {"dataset": "sd15_clipscore", "checkpoint_percent": 0.2, "evaluator": "",
                                     "probe_name": "sd15_clipscore_t02", "epochs": 30}),
        Node(2, "PreviewImage", {"images": (1, 1)}, title="Loss and validation curves"),
        Node(3, "ProbeSelectEvaluateProbe", {"probe": (1, 0), "dataset": "sd15_clipscore", "split": "test"}),
        Node(4, "PreviewImage", {"images": (3, 1)}, title="Predicted vs actual (test prompts)"),
        Note(5, "## Train and evaluate a probe\n\n"
                "Trains on the dataset's training prompts (listwise ranking within prompt + InfoNCE text "
                "alignment), keeps the epoch with the best validation within-prompt Spearman, and saves "
                "`models/probes/<probe_name>.safetensors`. Cancel stops and keeps the best probe so far.\n\n"
                "The evaluation uses held-out test prompts: within-prompt Spearman and top-1 hit rate are "
                "what matter for picking seeds.",
             title="About this workflow", size=(400, 260)),
    ])


