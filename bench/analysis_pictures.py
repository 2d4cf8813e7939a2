"""`make pictures`: the README's pictures of every analysis node's output, made by the nodes themselves.

    .venv/bin/python bench/analysis_pictures.py [--out docs/images] [--only attention_unet,pca]

Runs the pack's V3 node classes (``execute``) in-process, with ComfyUI bootstrapped by devtools, on
the trained proxy-world models (``bench/proxy_world``: an SD1.x-family UNet and an SD3-family MMDiT,
32 x 32 pixels, committed weights), so attention and PCA maps show what a trained model does; the
schedules come from ComfyUI's own model_sampling objects of SD1.5, SDXL, SD3 and Flux (no weights
needed). Deterministic (fixed seeds, one thread): a second run writes the same files. Writes
``<name>.png`` per analysis into ``--out`` (docs/images; not in the registry archive, see
.comfyignore) and ``cards/<name>.png``, the part of it that stays readable on a template card. The analysis templates' thumbnails are drawn from these pictures by
``scripts/build_workflows.py --thumbnails`` (``make pictures`` runs both).

The image-set metrics need the FID Inception weights, which can't be downloaded where this runs: the
metrics picture uses the same InceptionV3 with seeded random weights, so its numbers show the
report's form and the ordering of a good and a bad set, not values comparable with published ones.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))          # last: ComfyUI's `nodes` must win over the pack's nodes/

from devtools import load_pack  # noqa: E402

load_pack()

import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from bench.proxy_world import models as proxy  # noqa: E402
from bench.proxy_world.grammar import all_prompts, parse_prompt  # noqa: E402
from bench.proxy_world.render import render_batch  # noqa: E402
from bench.proxy_world.tokens import PAD_ID, VOCAB, tokenize  # noqa: E402
from probe_select.nodes import (nodes_activation_pca, nodes_attention, nodes_image_metrics,  # noqa: E402
                                nodes_latent_probing, nodes_ood, nodes_sampling, nodes_schedules, nodes_tap)
from probe_select.nodes.engine.analysis import image_to_pil  # noqa: E402
from probe_select.probes.analysis import features as feat  # noqa: E402

log = logging.getLogger("analysis_pictures")

PROMPT = "a red circle left of a blue square"
STEPS, SCHEDULER = 20, "normal"
# family -> sampler / CFG: each proxy model samples as the proxy-world bench samples it (models.py says why).
SAMPLER, CFG = proxy.DEFAULT_SAMPLER, proxy.DEFAULT_CFG
# The latent slerp and the conditioning direction compare the rows of one batch that differ only in their
# starting noise (slerp) or conditioning (direction). An ancestral or SDE sampler draws fresh noise at every
# step over the whole batch from one seed, so each row would also get its own step noise: the slerp's ends
# would no longer be what seed_a and seed_b give alone, and a direction row would no longer equal a single
# run at that strength. Those two pictures (and their templates) sample with a sampler that adds no noise.
DETERMINISTIC_SAMPLER = "euler"
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110)


# ---------------------------------------------------------------------------------------------- drawing

def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's bundled font: the same glyphs on every machine, so the pictures are reproducible."""
    return ImageFont.load_default(size=size)


def upscale(image: Image.Image, side: int) -> Image.Image:
    """Nearest-neighbour enlargement of a 32 px proxy-world image (its pixels stay visible as pixels)."""
    return image.resize((side, side * image.height // image.width), Image.NEAREST)


def text_block(lines: Sequence[str], width: int, size: int = 13, color=BLACK) -> Image.Image:
    """Lines of text on white, wrapped at ``width`` pixels."""
    face = font(size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[str] = []
    for line in lines:
        words, current = line.split(" "), ""
        for word in words:
            trial = f"{current} {word}" if current else word
            if current and draw.textlength(trial, font=face) > width - 16:
                wrapped.append(current)
                current = "    " + word
            else:
                current = trial
        wrapped.append(current)
    height = 10 + len(wrapped) * (size + 5)
    block = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(wrapped):
        draw.text((8, 5 + i * (size + 5)), line, fill=color, font=face)
    return block


def stack(parts: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    """Parts one below the other on white, left-aligned."""
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts) + gap * (len(parts) - 1)), WHITE)
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height + gap
    return out


def titled(title: str, body: Image.Image, caption: Sequence[str] = ()) -> Image.Image:
    """A picture with a bold-ish title above and an optional caption below, framed by a margin."""
    width = body.width
    parts = [text_block([title], width, size=16), body]
    if caption:
        parts.append(text_block(caption, width, size=12, color=(60, 60, 60)))
    inner = stack(parts)
    framed = Image.new("RGB", (inner.width + 16, inner.height + 16), WHITE)
    framed.paste(inner, (8, 8))
    return framed


def image_grid(rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], column_labels: Sequence[str],
               cell: int, label_width: int = 120, gap: int = 4) -> Image.Image:
    """Cells of equal size with labels on the left and on top."""
    face = font(13)
    top = 22
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_width + columns * (cell + gap), top + len(rows) * (cell + gap)), WHITE)
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels):
        draw.text((label_width + j * (cell + gap) + 2, 4), label, fill=BLACK, font=face)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (cell + gap)
        draw.text((4, y + cell // 2 - 8), label, fill=BLACK, font=face)
        for j, image in enumerate(row):
            grid.paste(upscale(image, cell), (label_width + j * (cell + gap), y))
    return grid


class Picture(NamedTuple):
    """The README's picture and its card: the part that stays readable on a 320 x 240 template thumbnail."""
    full: Image.Image
    card: Image.Image


def save_png(image: Image.Image, path: Path) -> None:
    """Palette-quantised PNG: 256 colours keep the plots exact and the heat maps smooth enough, at a
    third of the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    log.info("wrote %s (%d x %d, %.0f KB)", path, image.width, image.height, path.stat().st_size / 1024)


CARD_SIZE = (640, 336)      # twice a template card's picture area (scripts/thumbnails.py): no more is needed


def save_picture(picture: Picture, out: Path, name: str) -> None:
    """``out/<name>.png`` and ``out/cards/<name>.png`` (the card no larger than CARD_SIZE)."""
    save_png(picture.full, out / f"{name}.png")
    card = picture.card.copy()
    card.thumbnail(CARD_SIZE, Image.LANCZOS)
    save_png(card, out / "cards" / f"{name}.png")


# ---------------------------------------------------------------------------------------------- stand-ins

class WeightlessModel(torch.nn.Module):
    """A MODEL that is only a ComfyUI model_sampling object: what the schedule inspector reads."""

    def __init__(self, model_sampling: torch.nn.Module):
        super().__init__()
        self.model_sampling = model_sampling


def real_schedule_model(config_class, model_type) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher whose model_sampling is built exactly as ComfyUI builds it for that model
    family (``comfy.model_base.model_sampling`` with the family's sampling settings), without weights."""
    config = config_class(dict(config_class.unet_config))
    sampling = comfy.model_base.model_sampling(config, model_type)
    return comfy.model_patcher.ModelPatcher(WeightlessModel(sampling), torch.device("cpu"), torch.device("cpu"))


class ProxyClip:
    """The proxy world's word tokenizer in the shape the attention node reads from a ComfyUI CLIP
    (``tokenize(text, return_word_ids=True)`` and ``tokenizer.clip_l.tokenizer.convert_ids_to_tokens``),
    so words are chosen by text. One token per word, no start/end tokens; padding has word id 0."""

    class _Vocabulary:
        @staticmethod
        def convert_ids_to_tokens(token_id: int) -> str:
            return VOCAB[token_id] + "</w>"        # a whole word, as CLIP's BPE marks a word's last piece

    def __init__(self, text_encoder):
        self.length = text_encoder.length
        self.tokenizer = type("Tokenizers", (), {"clip_l": type("Stream", (), {"tokenizer": self._Vocabulary})})

    def tokenize(self, text: str, return_word_ids: bool = False):
        ids = tokenize(text, self.length).tolist()
        tokens = [(int(t), 1.0, 0 if t == PAD_ID else i + 1) for i, t in enumerate(ids)]
        return {"l": [tokens]}


class ProxyVAE:
    """Decodes proxy-world latents (pixel space) as a ComfyUI VAE does: ``decode(samples) -> [B, H, W, 3]``."""

    def __init__(self, family: str):
        self.family = family

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return proxy.latent_to_image(samples, self.family).permute(0, 2, 3, 1).contiguous()


def decode(latent: torch.Tensor, family: str) -> list[Image.Image]:
    return [image_to_pil(row) for row in ProxyVAE(family).decode(latent)]


def sample(model, family: str, positive, negative, latent: dict, seed: int, steps: int = STEPS,
           cfg: Optional[float] = None, sampler: Optional[str] = None) -> torch.Tensor:
    """A plain KSampler run (ComfyUI's common_ksampler); CFG and sampler default to the family's."""
    cfg = CFG[family] if cfg is None else cfg
    sampler = SAMPLER[family] if sampler is None else sampler
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, SCHEDULER, positive, negative, latent)[0][
        "samples"]


# ---------------------------------------------------------------------------------------------- pictures

def schedule_panel(title: str, model, schedulers: str, steps: int, model_2=None) -> tuple[Image.Image, Image.Image]:
    """One inspector run: (its plot with the summary, the node's plot alone)."""
    image, summary = nodes_schedules.ProbeSelectScheduleInspector.execute(
        model, schedulers, steps, 0.2, model_2=model_2).result
    body = image_to_pil(image[0])
    return stack([text_block([title], body.width, size=14), body,
                  text_block(summary.splitlines(), body.width, size=11)]), body


def schedules_picture() -> Picture:
    """SD1.5 (eps) with three schedulers; SD3 (flow, shift 3) against Flux (flow, exp(1.15)) with two.

    Two inspector runs side by side: a VP sigma (up to 14.6) and a flow sigma (up to 1) on one axis
    would flatten the flow curves."""
    sd15 = real_schedule_model(comfy.supported_models.SD15, comfy.model_base.ModelType.EPS)
    sd3 = real_schedule_model(comfy.supported_models.SD3, comfy.model_base.ModelType.FLOW)
    flux = real_schedule_model(comfy.supported_models.Flux, comfy.model_base.ModelType.FLUX)
    left, _ = schedule_panel("SD1.5 (eps): normal, karras, exponential", sd15, "normal,karras,exponential", 20)
    right, flow_plot = schedule_panel("SD3 (model 1, shift 3) vs Flux (model 2, 1024 px: shift exp(1.15)): normal, karras",
                           sd3, "normal,karras", 20, model_2=flux)
    body = Image.new("RGB", (left.width + right.width + 12, max(left.height, right.height)), WHITE)
    body.paste(left, (0, 0))
    body.paste(right, (left.width + 12, 0))
    # card: the flow models' log-SNR panel (the node stacks sigma, signal fraction, log-SNR in equal thirds)
    log_snr = flow_plot.crop((0, flow_plot.height * 2 // 3 - 8, flow_plot.width, flow_plot.height))
    return Picture(titled("Schedule inspector: 20 steps, the Probe-Select checkpoint at 20% (vertical line)", body),
                   log_snr)


# A seed per family whose image gets the prompt right (red circle left of the blue square), so the
# maps can be read against a correct picture: with the family's sampler, by the proxy-world evaluator's
# score and by eye among seeds 0..15 (UNet: only 10 and 11 place the two shapes right; DiT: most do).
ATTENTION_SEEDS = {"unet": 11, "dit": 6}


def attention_picture(family: str) -> Picture:
    """Per-word maps over the steps and the sharpness curves, on the trained proxy model."""
    model, text = proxy.load(family)
    positive, negative = text.conditioning(PROMPT), text.conditioning("")
    latent = proxy.empty_latent(family, 1)
    result = nodes_attention.ProbeSelectAttentionMaps.execute(
        model, positive, negative, latent, seed=ATTENTION_SEEDS[family], steps=STEPS, cfg=CFG[family],
        sampler_name=SAMPLER[family], scheduler=SCHEDULER,
        words="red circle, blue square, left of", show_steps="1, 4, 8, 14, 20", resolutions="all", cell_size=96,
        clip=ProxyClip(text), prompt=PROMPT, vae=ProxyVAE(family)).result
    maps, sharpness, _masks, _latent, summary = result
    what = {"unet": "SD1.x-family UNet (cross-attention at its 16 x 16 and 8 x 8 levels)",
            "dit": "SD3-family MMDiT (image-to-text part of the joint attention, 8 x 8 tokens)"}[family]
    maps_pil, sharp_pil = image_to_pil(maps[0]), image_to_pil(sharpness[0])
    sharp_pil = sharp_pil.resize((maps_pil.width, maps_pil.width * sharp_pil.height // sharp_pil.width), Image.LANCZOS) \
        if sharp_pil.width > maps_pil.width else sharp_pil
    return Picture(titled(f"Attention maps: \"{PROMPT}\", proxy {what}, seed {ATTENTION_SEEDS[family]}",
                          stack([maps_pil, sharp_pil, text_block(summary.splitlines(), maps_pil.width, 11)])),
                   maps_pil)


def pca_picture() -> Picture:
    """Four candidates of one prompt, tapped at four checkpoints, PCA over all of them."""
    model, text = proxy.load("unet")
    tapped = nodes_tap.ProbeSelectTap.execute(model, "auto", 16).result[0]
    positive, negative = text.conditioning(PROMPT), text.conditioning("")
    latent = proxy.empty_latent("unet", 1)
    finished, activations = nodes_sampling.ProbeSelectCollectSampler.execute(
        tapped, positive, negative, latent, seed=10, candidates=4, steps=STEPS, cfg=CFG["unet"],
        sampler_name=SAMPLER["unet"], scheduler=SCHEDULER, checkpoint_percents="0.1,0.2,0.4,0.8").result
    grid, summary = nodes_activation_pca.ProbeSelectActivationPCA.execute(activations, 96).result
    grid_pil = image_to_pil(grid[0])
    finals = decode(finished["samples"], "unet")
    final_column = image_grid([[im] for im in finals], [""] * len(finals), ["finished"], 96, label_width=0)
    row = Image.new("RGB", (grid_pil.width + final_column.width + 8, max(grid_pil.height, final_column.height)), WHITE)
    row.paste(grid_pil, (0, 0))
    # the grids' label rows differ (the PCA node's 18 px, image_grid's 22 px): align the cells
    row.paste(final_column, (grid_pil.width + 8, nodes_activation_pca.LABEL_TOP - 22))
    return Picture(titled(f"Activation PCA: \"{PROMPT}\", proxy UNet, tap output_blocks.3.0 (16 x 16)",
                          stack([row, text_block([summary], row.width, 11)])), row)


def slerp_picture() -> Picture:
    """seed 1's noise -> seed 2's noise in 8 points, each sampled (SamplerCustomAdvanced's path)."""
    model, text = proxy.load("unet")
    positive, negative = text.conditioning(PROMPT), text.conditioning("")
    empty = proxy.empty_latent("unet", 1)
    count = 8
    latent, noise = nodes_latent_probing.ProbeSelectLatentSlerp.execute(
        "seed noises", empty, count, seed_a=1, seed_b=2).result
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG["unet"])
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), SCHEDULER, STEPS).cpu()
    samples = guider.sample(noise.generate_noise(latent), latent["samples"],
                            comfy.samplers.sampler_object(DETERMINISTIC_SAMPLER), sigmas, disable_pbar=True,
                            seed=noise.seed)
    images = decode(samples, "unet")
    labels = [f"t={i / (count - 1):.2f}" for i in range(count)]
    grid = image_grid([images], [""], labels, 88, label_width=0)
    card = image_grid([images[:4], images[4:]], ["", ""], [], 88, label_width=0)
    return Picture(titled(f"Latent slerp: seed 1's noise -> seed 2's noise, 8 points, \"{PROMPT}\", proxy UNet", grid,
                  ["The ends are exactly what seed 1 and seed 2 give alone; in between, the layout changes in jumps "
                   "where the model switches between the two solutions."]), card)


def direction_picture() -> Picture:
    """'a red circle ...' moved toward 'green' (away from 'red'), at three seeds."""
    model, text = proxy.load("unet")
    base = "a red circle above a blue square"
    conditioning = text.conditioning(base)
    toward, away = text.conditioning("a green circle"), text.conditioning("a red circle")
    negative = text.conditioning("")
    strengths = "0, 0.25, 0.5, 1, 2"
    rows, seeds = [], (4, 5, 6)
    for seed in seeds:
        moved, latent = nodes_latent_probing.ProbeSelectConditioningDirection.execute(
            conditioning, toward, away, strengths, "per_token", proxy.empty_latent("unet", 1)).result
        rows.append(decode(sample(model, "unet", moved, negative, latent, seed, sampler=DETERMINISTIC_SAMPLER), "unet"))
    labels = [f"strength {s.strip()}" for s in strengths.split(",")]
    grid = image_grid(rows, [f"seed {s}" for s in seeds], labels, 88, label_width=64)
    return Picture(titled(f"Conditioning direction: \"{base}\" + strength x (\"a green circle\" - \"a red circle\")",
                          grid, ["One KSampler run per seed (one row per strength, one shared noise), proxy UNet, "
                                 "per_token mode."]), grid)


def ood_picture() -> Picture:
    """Reference: 128 proxy-UNet samples of grammar prompts (latents); scored: fresh samples and odd ones."""
    model, text = proxy.load("unet")
    negative = text.conditioning("")
    prompts = all_prompts(limit=32, seed=5)

    def samples_of(prompt_list: Sequence[str], seed: int, steps: int = STEPS, cfg: Optional[float] = None,
                   per_prompt: int = 1):
        out = []
        for k, prompt in enumerate(prompt_list):
            latent = proxy.empty_latent("unet", per_prompt)
            out.append(sample(model, "unet", text.conditioning(prompt), negative, latent, seed + k, steps, cfg))
        return torch.cat(out)

    reference = samples_of(prompts, seed=100, per_prompt=4)                    # 128 samples
    fresh = samples_of(all_prompts(limit=40, seed=6)[-3:], seed=900)
    few_steps = samples_of([PROMPT], seed=901, steps=3)
    high_cfg = samples_of([PROMPT], seed=902, cfg=25.0)
    noise_only = proxy.image_to_latent(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "unet")
    candidates = torch.cat([fresh, few_steps, high_cfg, noise_only])
    kinds = ["fresh sample", "fresh sample", "fresh sample", "3 steps", "cfg 25", "uniform noise"]
    fitted, fit_report = nodes_ood.ProbeSelectOODFit.execute("proxy_unet_samples", "clean",
                                                             latent={"samples": reference}).result
    report, scores, percentiles, _ = nodes_ood.ProbeSelectOODScore.execute(
        latent={"samples": candidates}, reference=fitted).result
    images = decode(candidates, "unet")
    labels = [f"{k}" for k in kinds]
    grid = image_grid([images], [""], labels, 96, label_width=0, gap=8)
    draw = ImageDraw.Draw(grid)
    for j, (s, p) in enumerate(zip(scores, percentiles)):
        draw.text((j * 104 + 2, 22 + 96 - 32), f"d {s:.1f}\np {p:.1f}", fill=(255, 255, 0), font=font(12),
                  stroke_width=2, stroke_fill=BLACK)
    fit_lines = [line for line in fit_report.splitlines() if not line.startswith("saved ")]
    full = titled("OOD score: 128 proxy-UNet samples as the reference (latents, pooled 4 x 4 per channel)", stack(
        [grid, text_block(fit_lines + report.splitlines(), grid.width, 11)]),
        ["d = Mahalanobis distance to the reference, p = its percentile among the reference's own (cross-fitted) "
         "scores: 99 = more unusual than 99% of the reference."])
    card = image_grid([images[:3], images[3:]], ["", ""], [], 96, label_width=0, gap=8)
    card_draw = ImageDraw.Draw(card)
    for j, (kind, p) in enumerate(zip(kinds, percentiles)):
        x, y = (j % 3) * 104, 22 + (j // 3) * 104
        card_draw.text((x + 3, y + 2), kind, fill=WHITE, font=font(13), stroke_width=2, stroke_fill=BLACK)
        card_draw.text((x + 3, y + 74), f"p {p:.0f}", fill=(255, 255, 0), font=font(16), stroke_width=2,
                       stroke_fill=BLACK)
    return Picture(full, card.crop((0, 22, card.width, card.height)))


class RandomConvFeatures(torch.nn.Module):
    """Stands in for the FID Inception where its weights can't be had: three seeded random conv layers
    (He initialisation, ReLU) on 64 px images, mean- and max-pooled (256 features); random features
    of this kind still separate image distributions, though on no published scale."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = torch.nn.ModuleList(
            [torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in ((3, 32), (32, 64), (64, 128))])
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = pixels * 2 - 1
        for conv in self.convs:
            x = torch.relu(conv(x))
        return {"pool": torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)}


def metrics_picture(workdir: Path) -> Picture:
    """A good and a bad set of proxy-UNet images against rendered references, one report each."""
    import folder_paths

    model, text = proxy.load("unet")
    negative = text.conditioning("")
    prompts = all_prompts(limit=48, seed=7)
    references = render_batch([parse_prompt(p) for p in prompts], rng=np.random.default_rng(0))
    # relative to ComfyUI's input folder, as a user would type it (and so the report names no temp path)
    folder_paths.set_input_directory(str(workdir))
    ref_folder = workdir / "proxy_world_reference"
    ref_folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(references):
        image_to_pil(image.permute(1, 2, 0)).save(ref_folder / f"{i:03d}.png")

    def images_of(steps: int) -> torch.Tensor:
        out = [sample(model, "unet", text.conditioning(p), negative, proxy.empty_latent("unet", 1), 50 + k, steps)
               for k, p in enumerate(prompts)]
        return proxy.latent_to_image(torch.cat(out), "unet").permute(0, 2, 3, 1).contiguous()

    extractor = feat.ModuleExtractor(RandomConvFeatures(0), kind="inception", input_size=64,
                                     extractor_id="random-conv-stand-in:seed0")
    width, columns, cards = 560, [], []
    for label, steps in (("20 steps", STEPS), ("2 steps", 2)):
        images = images_of(steps)
        report = nodes_image_metrics.ProbeSelectImageMetrics.execute(
            images=images, inception=extractor, reference_folder=ref_folder.name, fid=True, kid=True,
            inception_score=False, precision_recall=True, density_coverage=True, resize_mode="clean", batch_size=16,
            kid_subset_size=1000).result[0]
        thumbs = image_grid([[image_to_pil(im) for im in images[:7]]], [""], [], 64, label_width=0)
        columns.append(stack([text_block([f"generated: proxy UNet, {label}, {len(images)} images"], width, 13),
                              thumbs, text_block(report.splitlines(), width, 11)]))
        numbers = [line.split(" (")[0] for line in report.splitlines()
                   if line.startswith(("fid:", "precision:", "recall:", "density:", "coverage:"))]
        cards.append(stack([text_block([label], 200, 18), image_grid([[image_to_pil(im) for im in images[:3]]], [""],
                                                                     [], 64, label_width=0).crop((0, 22, 200, 86)),
                            text_block(numbers, 200, 16)]))
    body = Image.new("RGB", (2 * width + 8, max(c.height for c in columns)), WHITE)
    for i, column in enumerate(columns):
        body.paste(column, (i * (width + 8), 0))
    card = Image.new("RGB", (2 * 200 + 16, max(c.height for c in cards)), WHITE)
    for i, part in enumerate(cards):
        card.paste(part, (i * 216, 0))
    return Picture(titled(f"Image-set metrics: two generated sets vs {len(prompts)} rendered reference images "
                          "(same prompts)", body,
                  ["The extractor here is a seeded random conv net standing in for the FID Inception (its weights "
                   "can't be downloaded where this picture is made): the report's form and the ordering of the two "
                   "sets, not values on the published scale. With the real weights, use >= 2,048 images per set."]),
                   card)


# name -> what makes it (the metrics picture also needs a work folder). The analysis templates
# (scripts/templates_analysis.py) show the cards as their thumbnails.
PICTURES: dict[str, Callable] = {
    "schedule_inspector": schedules_picture,
    "attention_maps_unet": lambda: attention_picture("unet"),
    "attention_maps_mmdit": lambda: attention_picture("dit"),
    "activation_pca": pca_picture,
    "latent_slerp": slerp_picture,
    "conditioning_direction": direction_picture,
    "ood_scores": ood_picture,
    "image_metrics": metrics_picture,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--only", default="", help="comma-separated picture names (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)   # ComfyUI set up its own
    torch.set_num_threads(1)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in PICTURES]
    if unknown:
        raise SystemExit(f"unknown picture(s) {unknown}; known: {', '.join(PICTURES)}")
    with tempfile.TemporaryDirectory() as work:
        import folder_paths

        folder_paths.set_output_directory(work)        # the OOD fit saves its file there, not in ComfyUI/output
        for name, maker in PICTURES.items():
            if only and name not in only:
                continue
            started = time.perf_counter()
            torch.manual_seed(0)
            picture = maker(Path(work)) if maker is metrics_picture else maker()
            save_picture(picture, args.out, name)
            log.info("%s: %.1f s", name, time.perf_counter() - started)


if __name__ == "__main__":
    main()
