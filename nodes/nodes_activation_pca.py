"""ProbeSelectActivationPCA: the first three principal components of tapped activations as RGB."""
from __future__ import annotations

from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from ..probes.analysis.pca import pca_rgb, rgb_grid
from ..probes.features import ActivationSeries, ActivationSet
from .engine.analysis import ANALYSIS_CATEGORY, image_to_pil, pil_to_image
from .errors import ProbeSelectError
from .types import Activations

NODE_ID = "ProbeSelectActivationPCA"
LABEL_TOP, LABEL_LEFT = 18, 96


def collect_sets(node_id: str, inputs: list) -> list[ActivationSet]:
    """The ActivationSets of every connected input (a set or a series), ordered by checkpoint step."""
    sets = []
    for value in inputs:
        if value is None:
            continue
        if isinstance(value, ActivationSeries):
            sets.extend(value.sets)
        elif isinstance(value, ActivationSet):
            sets.append(value)
        else:
            raise ProbeSelectError(node_id, f"an activations input holds {type(value).__name__}, not activations.",
                                   "connect the 'activations' output of ProbeSelectEarlySampler.")
    if not sets:
        raise ProbeSelectError(node_id, "no activations: the sampler's model had no tap.",
                               "put ProbeSelectTap on the model before ProbeSelectEarlySampler.")
    first = sets[0]
    for other in sets[1:]:
        if other.seeds != first.seeds or other.tap != first.tap:
            raise ProbeSelectError(
                node_id, f"the activations come from different candidates or blocks (seeds {first.seeds[:4]}.. "
                         f"tap {first.tap} vs seeds {other.seeds[:4]}.. tap {other.tap}).",
                "connect checkpoints of one run: the same seeds, candidates and tapped block.")
        if other.features.shape[1] != first.features.shape[1]:
            raise ProbeSelectError(node_id, "the activations have different channel counts.",
                                   "connect activations of one tapped block.")
    return sorted(sets, key=lambda s: s.step)


def labelled_grid(sets: list[ActivationSet], cell: int) -> tuple[Image.Image, str]:
    images, pca = pca_rgb([s.features.float() for s in sets])
    grid = rgb_grid(images, cell=cell)
    body = image_to_pil(grid)
    canvas = Image.new("RGB", (body.width + LABEL_LEFT, body.height + LABEL_TOP), "white")
    canvas.paste(body, (LABEL_LEFT, LABEL_TOP))
    draw = ImageDraw.Draw(canvas)
    for j, s in enumerate(sets):
        draw.text((LABEL_LEFT + j * (cell + 2) + 2, 3), f"step {s.step}/{s.steps}", fill=(0, 0, 0))
    for i, seed in enumerate(sets[0].seeds):
        draw.text((4, LABEL_TOP + i * (cell + 2) + cell // 2 - 6), f"seed {seed}", fill=(0, 0, 0))
    ratios = ", ".join(f"PC{k + 1} {float(r):.1%}" for k, r in enumerate(pca.explained_ratio))
    text = (f"{sets[0].family} {sets[0].tap}: {len(sets[0])} candidates x {len(sets)} checkpoints "
            f"({', '.join(f'{s.t:.2f}' for s in sets)}); shared basis, variance explained: {ratios}")
    return canvas, text


class ProbeSelectActivationPCA(io.ComfyNode):
    NODE_ID = "ProbeSelectActivationPCA"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Activation PCA",
            category=ANALYSIS_CATEGORY,
            description="Shows tapped activations as RGB (R, G, B = first three principal components, fitted on all "
                        "candidates and checkpoints together): one row per candidate, one column per checkpoint. "
                        "Where the colours of a late checkpoint already show at an early one, the layout is settled "
                        "there: a good tap block and checkpoint for a probe.",
            inputs=[
                Activations.Input("activations"),
                Activations.Input("activations_2", optional=True, tooltip="Another checkpoint of the same run."),
                Activations.Input("activations_3", optional=True),
                Activations.Input("activations_4", optional=True),
                io.Int.Input("cell_size", default=96, min=16, max=512, tooltip="Pixels per map in the grid."),
            ],
            outputs=[io.Image.Output(display_name="grid"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, activations, cell_size, activations_2=None, activations_3=None,
                activations_4=None) -> io.NodeOutput:
        sets = collect_sets(NODE_ID, [activations, activations_2, activations_3, activations_4])
        canvas, text = labelled_grid(sets, cell_size)
        return io.NodeOutput(pil_to_image(canvas), text, ui=ui.PreviewText(text))


PCA_NODES: list[type[io.ComfyNode]] = [ProbeSelectActivationPCA]
