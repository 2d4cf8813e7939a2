"""ProbeSelectTrain and ProbeSelectEvaluateProbe: fit a probe on a collected dataset and measure it."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..probes.training.dataset import DatasetError, ProbeDataset
from ..probes.training.evaluation import format_report
from ..probes.io import load_probe
from ..probes.model import PROBE_INPUT_CHOICES, ProbeConfig, parse_probe_inputs
from ..probes.training.pipeline import evaluate_on_dataset, train_from_dataset
from ..probes.plots import line_plot, scatter_plot
from ..probes.training.train import TrainConfig
from .nodes_dataset import dataset_path, list_datasets
from .errors import ProbeSelectError, problem_or_true
from .engine.selection import LoadedProbe
from .folders import PROBES_FOLDER
from .types import CATEGORY, Probe

log = logging.getLogger(__name__)


def _image(pil_image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def open_dataset(node_id: str, name: str) -> ProbeDataset:
    """Dataset ``name`` of output/probe_select_datasets, opened; ProbeSelectError naming ``node_id`` if it is
    missing or damaged."""
    path = dataset_path(node_id, name)
    if not os.path.isfile(os.path.join(path, "manifest.json")):
        raise ProbeSelectError(node_id, f"dataset '{name}' does not exist under output/probe_select_datasets.",
                               "collect one with ProbeSelectDatasetWriter first (example_workflows/<family>_collect_probe_dataset.json, e.g. SD1.5_collect_probe_dataset.json).")
    try:
        return ProbeDataset(path)
    except DatasetError as e:
        raise ProbeSelectError(node_id, str(e)) from None


def _probe_path(node_id: str, name: str) -> str:
    name = name.strip()
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise ProbeSelectError(node_id, f"probe name '{name}' is not a plain file name.", "e.g. sd15_clipscore_t02.")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return os.path.join(folder_paths.get_folder_paths(PROBES_FOLDER)[0], name)


class ProbeSelectTrain(io.ComfyNode):
    NODE_ID = "ProbeSelectTrain"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Train Probe",
            category=CATEGORY + "/train",
            description="Trains a probe on a dataset (listwise ranking within prompt + InfoNCE text alignment), "
                        "keeps the best epoch by validation within-prompt Spearman, and saves it to models/probes. "
                        "Cancel stops training and keeps the best probe so far.",
            inputs=[
                io.Combo.Input("dataset", options=list_datasets()),
                io.Float.Input("checkpoint_percent", default=0.2, min=0.01, max=0.99, step=0.01,
                               tooltip="Which recorded checkpoint the probe reads: the stored one nearest this "
                                       "fraction (0.2 of 6 steps was stored as 1/6)."),
                io.String.Input("evaluator", default="", tooltip="Score to predict; empty = the dataset's first."),
                io.String.Input("probe_name", default="my_probe"),
                io.Int.Input("epochs", default=30, min=1, max=10000),
                io.Int.Input("batch_prompts", default=16, min=1, max=4096),
                io.Float.Input("lr", default=3e-4, min=1e-7, max=1.0, step=1e-5, round=1e-7),
                io.Float.Input("alpha_max", default=0.2, min=0.0, max=2.0, step=0.01,
                               tooltip="Ranking margin at the first epoch (z units), annealed to 0."),
                io.Float.Input("lambda_align", default=10.0, min=0.0, max=100.0, step=0.1),
                io.Boolean.Input("use_text", default=True, tooltip="Text branch + InfoNCE alignment when the "
                                                                    "dataset has text embeddings."),
                io.Int.Input("patience", default=10, min=0, max=10000, tooltip="Early stopping; 0 = off."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Combo.Input("probe_inputs", options=list(PROBE_INPUT_CHOICES), default="activations", optional=True,
                               tooltip="What the probe reads: the tapped activations, the sampler's x0 prediction "
                                       "latent (free at the checkpoint; the dataset must be collected with x0_size "
                                       "> 0), or both."),
                io.Boolean.Input("condition_on_prompt", default=False, optional=True,
                                 tooltip="Condition the probe's encoders on the prompt (its text embedding scales "
                                         "and shifts their features), not only its head: for scores that depend on "
                                         "where the prompt's objects are. Needs use_text."),
            ],
            outputs=[Probe.Output(display_name="probe"), io.Image.Output(display_name="curves"),
                     io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, probe_name: str | None = None) -> bool | str:
        return problem_or_true(_probe_path, cls.NODE_ID, probe_name)

    @classmethod
    def execute(cls, dataset: str, checkpoint_percent: float, evaluator: str, probe_name: str, epochs: int,
                batch_prompts: int, lr: float, alpha_max: float, lambda_align: float, use_text: bool, patience: int,
                seed: int, probe_inputs: str = "activations", condition_on_prompt: bool = False) -> io.NodeOutput:

        node_id = cls.NODE_ID
        try:
            inputs = parse_probe_inputs(probe_inputs or "activations")
        except ValueError as e:
            raise ProbeSelectError(node_id, str(e)) from None
        data = open_dataset(node_id, dataset)
        channels, size = data.manifest.feature_shape[0], data.manifest.feature_shape[-1]
        probe_config = ProbeConfig(in_channels=channels, feature_size=size, inputs=inputs,
                                   text_film=bool(condition_on_prompt))
        out_path = _probe_path(node_id, probe_name)
        state_dir = os.path.join(folder_paths.get_output_directory(), "probe_select_training",
                                 os.path.basename(out_path)[: -len(".safetensors")])
        bar = comfy.utils.ProgressBar(epochs)
        config = TrainConfig(epochs=epochs, batch_prompts=batch_prompts, lr=lr, alpha_max=alpha_max,
                             lambda_align=lambda_align, patience=patience, seed=seed)
        try:
            result, sizes = train_from_dataset(
                data, checkpoint_percent, evaluator, out_path, train_config=config, use_text=use_text, split_seed=seed,
                probe_config=probe_config, state_dir=state_dir, on_epoch=lambda epoch, _m: bar.update_absolute(epoch + 1, epochs),
                should_stop=mm.processing_interrupted)
        except (ValueError, DatasetError) as e:
            raise ProbeSelectError(node_id, str(e)) from None
        mm.throw_exception_if_processing_interrupted()     # Cancel: the best probe so far is on disk

        history = result.history
        curves = line_plot(
            [{"train loss": [h["train_loss"] for h in history]},
             {"val within-prompt Spearman": [h["val_within_spearman"] for h in history],
              "val global Spearman": [h["val_global_spearman"] for h in history],
              "val top-1": [h["val_top1"] for h in history]}],
            ["training loss", "validation (by epoch)"])
        best = result.best_metrics
        model, metadata = load_probe(out_path)
        report = "\n".join([
            f"probe {os.path.basename(out_path)}: {data.manifest.backbone_family} {data.manifest.tap} "
            f"t={metadata.checkpoint_t:.4f}, reads {'+'.join(metadata.inputs)}",
            f"rows train/val/test: {sizes['train']}/{sizes['val']}/{sizes['test']}  "
            f"epochs run: {len(history)} ({result.stopped}), best epoch {result.best_epoch + 1}",
            "best validation: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()}),
        ])
        loaded = LoadedProbe(model.eval(), metadata, os.path.basename(out_path))
        return io.NodeOutput(loaded, _image(curves), report, ui=ui.PreviewText(report))


class ProbeSelectEvaluateProbe(io.ComfyNode):
    NODE_ID = "ProbeSelectEvaluateProbe"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Evaluate Probe",
            category=CATEGORY + "/train",
            description="Measures a probe on held-out prompts of a dataset: within-prompt and global Spearman, "
                        "Kendall tau, top-1 hit rate among each prompt's seeds, selected vs mean and best score.",
            inputs=[
                Probe.Input("probe"),
                io.Combo.Input("dataset", options=list_datasets()),
                io.Combo.Input("split", options=["test", "val", "train", "all"], default="test",
                               tooltip="Prompt split (the same split ProbeSelectTrain uses with the same seed)."),
                io.Int.Input("split_seed", default=0, min=0, max=2**31 - 1),
            ],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="scatter")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, probe, dataset, split, split_seed) -> io.NodeOutput:
        node_id = cls.NODE_ID
        data = open_dataset(node_id, dataset)
        try:
            evaluation = evaluate_on_dataset(probe.model, probe.metadata, data, split, split_seed)
        except (ValueError, DatasetError) as e:
            raise ProbeSelectError(node_id, f"probe '{probe.name}' can't be evaluated on '{dataset}': {e}") from None
        report = format_report(evaluation.metrics, probe.metadata.evaluator, f"{probe.name} on {dataset} ({split})")
        plot = scatter_plot(evaluation.predicted, evaluation.actual, "predicted vs actual (colour = prompt)",
                            "predicted", "actual", evaluation.group)
        return io.NodeOutput(report, _image(plot), ui=ui.PreviewText(report))
