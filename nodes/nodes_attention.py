"""ProbeSelectAttentionMaps: per-word cross-attention heatmaps over the steps, and how sharp they get."""
from __future__ import annotations


import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from ..probes.analysis.attention import (TokenSelectionError, Word, overlay, select_tokens, spatial_entropy,
                                         words_from_pieces)
from ..probes.plots import line_plot
from .engine.analysis import ANALYSIS_CATEGORY, image_to_pil, parse_name_list, pil_to_image
from .engine.attention_capture import UNET, AttentionRecorder, AttentionUnsupported, RecordingSpec, attention_kind
from .errors import ProbeSelectError
from .engine.families import model_family
from .nodes_sampling import MAX_SEED


NODE_ID = "ProbeSelectAttentionMaps"
LABEL_TOP, LABEL_LEFT = 18, 110
PREVIEW_SCALE = 8          # pixels per latent pixel of the grey canvas used without a VAE

# Which tokenizer streams make up the conditioning's token axis, in order, per family (SDXL's
# l and g, SD3's l and g share positions: they are concatenated along the channels).
_STREAM_LAYOUTS = {
    "sd1": [["l"]],
    "sd2": [["h"], ["l"]],
    "sdxl": [["l"], ["g"]],
    "sd3": [["l", "t5xxl"], ["g", "t5xxl"], ["l"], ["g"]],
    "flux": [["t5xxl"]],
}


def _sub_tokenizer(clip, key: str):
    tokenizer = getattr(clip, "tokenizer", None)
    return getattr(tokenizer, f"clip_{key}", None) or getattr(tokenizer, key, None)


def _stream_pieces(clip, key: str, chunks: list) -> list:
    """Token strings of one tokenizer stream (None for start/end/padding and embeddings)."""
    sub = _sub_tokenizer(clip, key)
    hf = getattr(sub, "tokenizer", None)
    pieces = []
    for chunk in chunks:
        for token in chunk:
            token_id, word_id = token[0], token[2] if len(token) > 2 else 1
            if word_id == 0 or not isinstance(token_id, int) or hf is None:
                pieces.append(None)
            else:
                pieces.append(hf.convert_ids_to_tokens(int(token_id)))
    return pieces


def prompt_words(clip, prompt: str, family: str, context_tokens: int) -> list[Word]:
    """The prompt's words with their positions on the conditioning's token axis."""
    streams = clip.tokenize(prompt, return_word_ids=True)
    lengths = {key: sum(len(chunk) for chunk in chunks) for key, chunks in streams.items()}
    layouts = _STREAM_LAYOUTS.get(family, []) + [[key] for key in streams]
    for layout in layouts:
        if all(key in streams for key in layout) and sum(lengths[key] for key in layout) == context_tokens:
            pieces = []
            for key in layout:
                pieces.extend(_stream_pieces(clip, key, streams[key]))
            return words_from_pieces(pieces)
    raise ProbeSelectError(
        NODE_ID, f"the prompt tokenizes to {lengths} tokens, but the positive conditioning has {context_tokens}.",
        "give the exact text that was encoded into 'positive', with the same CLIP.")


def parse_steps(text: str, steps: int) -> list[int]:
    """1-based step numbers to show; 'auto' = four evenly spaced, first and last included."""
    if text.strip().lower() in ("", "auto"):
        count = min(4, steps)
        return sorted({round(1 + i * (steps - 1) / max(count - 1, 1)) for i in range(count)})
    try:
        chosen = sorted({int(part) for part in parse_name_list(text)})
    except ValueError:
        raise ProbeSelectError(NODE_ID, f"steps to show '{text}' is not a list of step numbers.",
                               "write e.g. '1, 5, 10, 20' or 'auto'.") from None
    bad = [s for s in chosen if not 1 <= s <= steps]
    if bad:
        raise ProbeSelectError(NODE_ID, f"step(s) {bad} are outside 1..{steps}.", f"pick steps between 1 and {steps}.")
    return chosen


def parse_resolutions(text: str):
    if text.strip().lower() in ("", "all"):
        return None
    try:
        return {int(part) for part in parse_name_list(text)}
    except ValueError:
        raise ProbeSelectError(NODE_ID, f"resolutions '{text}' is not a list of downsampling factors.",
                               "write 'all' or e.g. '2, 4' (latent / attention-map size).") from None


def dit_patch_size(dm) -> int:
    """Side of a DiT patch (MMDiT stores a tuple, Flux an int)."""
    size = getattr(dm, "patch_size", 2)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _canvas(samples: torch.Tensor, vae) -> torch.Tensor:
    """The picture the maps are drawn on: the decoded image, or a grey canvas without a VAE."""
    if vae is not None:
        images = vae.decode(samples[:1])
        if images.ndim == 5:
            images = images[:, 0]
        return images[0, ..., :3].float().cpu()
    h, w = samples.shape[-2:]
    return torch.full((h * PREVIEW_SCALE, w * PREVIEW_SCALE, 3), 0.35)


def overlay_grid(canvas: torch.Tensor, recorder: AttentionRecorder, shown: list[int], cell: int) -> Image.Image:
    labels = [label for label, _ in recorder.spec.labels]
    height = max(1, round(cell * canvas.shape[0] / canvas.shape[1]))
    base = torch.nn.functional.interpolate(canvas.permute(2, 0, 1)[None], size=(height, cell), mode="bilinear",
                                           align_corners=False)[0].permute(1, 2, 0)
    columns = len(shown) + 1
    grid = Image.new("RGB", (LABEL_LEFT + columns * (cell + 2), LABEL_TOP + len(labels) * (height + 2)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((LABEL_LEFT + 2, 3), "image", fill=(0, 0, 0))
    for j, step in enumerate(shown):
        draw.text((LABEL_LEFT + (j + 1) * (cell + 2) + 2, 3), f"step {step}", fill=(0, 0, 0))
    for i, label in enumerate(labels):
        y = LABEL_TOP + i * (height + 2)
        draw.text((4, y + height // 2 - 6), label[:16], fill=(0, 0, 0))
        grid.paste(image_to_pil(base), (LABEL_LEFT, y))
        for j, step in enumerate(shown):
            cell_image = overlay(base, recorder.maps.mean(step - 1)[i])
            grid.paste(image_to_pil(cell_image), (LABEL_LEFT + (j + 1) * (cell + 2), y))
    return grid


class ProbeSelectAttentionMaps(io.ComfyNode):
    NODE_ID = "ProbeSelectAttentionMaps"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name="Probe-Select Attention Maps",
            category=ANALYSIS_CATEGORY,
            description="Samples once and records which image regions each chosen word attends to (text attention "
                        "averaged over heads and layers, positive prompt only), shown over the decoded image at "
                        "chosen steps, plus the spatial entropy of every word's map per step (falls as attention "
                        "localises). SD1.x/SD2/SDXL cross-attention, SD3 joint attention, Flux double blocks. "
                        "Works on a clone: the model outside stays unpatched.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Batch 1."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                io.String.Input("words", default="",
                                tooltip="Comma-separated words or phrases of the prompt (empty: every word), or token "
                                        "indices like #5. Start, end and padding tokens are left out unless named by "
                                        "index."),
                io.String.Input("show_steps", default="auto",
                                tooltip="1-based steps to show, e.g. '1, 5, 10, 20'; 'auto' = four evenly spaced."),
                io.String.Input("resolutions", default="all",
                                tooltip="UNet levels to average, as latent downsampling factors (e.g. '2, 4' = the "
                                        "32x32 and 16x16 maps of a 64x64 latent); 'all'. DiTs have one level (their "
                                        "patch size)."),
                io.Int.Input("cell_size", default=192, min=32, max=1024),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder of 'positive', to find words by text."),
                io.String.Input("prompt", multiline=True, optional=True, default="",
                                tooltip="The exact text encoded into 'positive'."),
                io.Vae.Input("vae", optional=True, tooltip="Decode the result to draw the maps on it."),
            ],
            outputs=[io.Image.Output(display_name="maps"), io.Image.Output(display_name="sharpness"),
                     io.Mask.Output(display_name="word masks",
                                    tooltip="One mask per word at the last shown step, latent size, scaled to max 1."),
                     io.Latent.Output(display_name="latent"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, words,
                show_steps, resolutions, cell_size, clip=None, prompt="", vae=None) -> io.NodeOutput:
        try:
            kind = attention_kind(model)
        except AttentionUnsupported as e:
            raise ProbeSelectError(NODE_ID, f"{e}.", "use an SD1.x, SD2, SDXL, SD3 or Flux model.") from None
        samples = latent_image["samples"]
        if samples.shape[0] != 1:
            raise ProbeSelectError(NODE_ID, f"the latent has a batch of {samples.shape[0]}.",
                                   "give a batch-1 latent (use 'Latent From Batch' to pick one).")
        if not positive:
            raise ProbeSelectError(NODE_ID, "the positive conditioning is empty.", "connect a text encoder's output.")
        context_tokens = int(positive[0][0].shape[1])
        family = model_family(model)
        prompt_word_list = prompt_words(clip, prompt, family, context_tokens) if clip is not None and prompt else None
        try:
            labels = select_tokens(words, prompt_word_list, context_tokens)
        except TokenSelectionError as e:
            raise ProbeSelectError(NODE_ID, str(e), "name words of the prompt, or token indices like #3.") from None
        shown = parse_steps(show_steps, steps)
        dm = model.model.diffusion_model
        patch = 1 if kind == UNET else dit_patch_size(dm)
        latent = comfy.sample.fix_empty_latent_channels(model, samples)
        spec = RecordingSpec(kind=kind, context_tokens=context_tokens, labels=labels, latent_hw=tuple(latent.shape[-2:]),
                             patch=patch, resolutions=parse_resolutions(resolutions),
                             text_offset=int(getattr(dm, "register_length", 0) or 0))
        recorder = AttentionRecorder(spec)
        recording = recorder.install(model)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(step, x0, x, total_steps):
            recorder.on_step(step)
            bar.update_absolute(step + 1, total_steps)

        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        result = comfy.sample.sample(recording, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                     denoise=1.0, noise_mask=latent_image.get("noise_mask"), callback=on_step,
                                     disable_pbar=True, seed=seed)
        if recorder.calls == 0:
            raise ProbeSelectError(NODE_ID, f"no text attention was recorded at resolutions '{resolutions}'.",
                                   "use 'all', or factors the model has (see the tooltip).")
        missing = [s for s in shown if (s - 1) not in recorder.maps.sums]
        if missing:
            raise ProbeSelectError(NODE_ID, f"no attention was recorded at step(s) {missing}.",
                                   "pick steps the sampler runs (some samplers skip the model on the last step).")
        comfy.model_management.throw_exception_if_processing_interrupted()
        canvas = _canvas(result, vae)
        grid = overlay_grid(canvas, recorder, shown, cell_size)
        recorded = recorder.maps.steps
        entropy = torch.stack([spatial_entropy(recorder.maps.mean(s)) for s in recorded])      # [steps, labels]
        curves = {label: entropy[:, i].tolist() for i, (label, _) in enumerate(labels)}
        sharpness = line_plot([curves], ["spatial entropy of each word's map (1 = spread evenly, lower = sharper)"],
                              x_values=[[s + 1 for s in recorded]])
        lines = [f"{family} ({kind}): {recorder.calls} attention calls recorded over {len(recorded)} steps, "
                 f"levels (latent downsampling) {sorted(recorder.factors_seen)}"]
        for i, (label, positions) in enumerate(labels):
            lines.append(f"{label}: tokens {positions}; spatial entropy step {recorded[0] + 1}: "
                         f"{float(entropy[0, i]):.3f} -> step {recorded[-1] + 1}: {float(entropy[-1, i]):.3f}")
        summary = "\n".join(lines)
        last = recorder.maps.mean(shown[-1] - 1)
        masks = last / last.flatten(1).max(dim=1).values.clamp_min(1e-12)[:, None, None]
        out_latent = {k: v for k, v in latent_image.items() if k != "samples"}
        out_latent["samples"] = result
        return io.NodeOutput(pil_to_image(grid), pil_to_image(sharpness), masks, out_latent, summary,
                             ui=ui.PreviewText(summary))


ATTENTION_NODES: list[type[io.ComfyNode]] = [ProbeSelectAttentionMaps]
