"""The selection templates, per model family: training-free selection on the x0 previews (by hand, or
scored by CLIPScore), probe selection (modular and one-box), dataset collection, probe training and
probe evaluation. Registered with `@workflow` and written by scripts/build_workflows.py.

File names are the template cards' titles and descriptions in ComfyUI's template browser (frontends
1.32 to 1.49 show the file name, `_` as spaces, and read nothing else), so they read as a sentence:
`<family>_<what it does>`. SD1.5 and SDXL graphs use the KSampler-form nodes, SD3.5 and Flux the
custom-sampling form (NOISE, GUIDER, SAMPLER, SIGMAS) the way their own ComfyUI examples are built,
with the sizes, steps and guidance their users use. The pack has no custom-sampling form of the
one-box sampler or the dataset collector: for SD3.5 and Flux those two templates use the KSampler
form with the same settings (Flux: cfg 1, FluxGuidance on the prompt, the negative zeroed out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from workflow_graph import Node, Note, Workflow, public_model, workflow


@dataclass(frozen=True)
class Family:
    key: str                    # file-name stem of its datasets and probes: sd15, sdxl, sd35, flux
    label: str                  # shown in the template names: SD1.5, SDXL, SD3.5, Flux
    checkpoint: str             # public file name in models/checkpoints (registered in PUBLIC_MODELS)
    size: int                   # native width = height
    steps: int
    cfg: float
    sampler: str
    scheduler: str
    custom: bool                # SamplerCustomAdvanced form (RandomNoise, guider, KSamplerSelect, BasicScheduler)
    guidance: Optional[float] = None            # Flux: FluxGuidance on the prompt, cfg 1, no negative
    latent: str = "EmptyLatentImage"

    @property
    def probe(self) -> str:
        return f"{self.key}_clipscore.safetensors"

    @property
    def dataset(self) -> str:
        return f"{self.key}_clipscore"


# The public checkpoints (file name, folder, URL): ComfyUI's own templates use these files.
FAMILIES = {
    "sd15": Family("sd15", "SD1.5", public_model(
        "v1-5-pruned-emaonly-fp16.safetensors", "checkpoints",
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors"),
        size=512, steps=20, cfg=7.0, sampler="euler", scheduler="normal", custom=False),
    "sdxl": Family("sdxl", "SDXL", public_model(
        "sd_xl_base_1.0.safetensors", "checkpoints",
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"),
        size=1024, steps=25, cfg=7.0, sampler="euler", scheduler="normal", custom=False),
    "sd35": Family("sd35", "SD3.5", public_model(
        "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", "checkpoints",
        "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/"
        "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"),
        size=1024, steps=30, cfg=4.5, sampler="euler", scheduler="sgm_uniform", custom=True,
        latent="EmptySD3LatentImage"),
    "flux": Family("flux", "Flux", public_model(
        "flux1-dev-fp8.safetensors", "checkpoints",
        "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors"),
        size=1024, steps=20, cfg=1.0, sampler="euler", scheduler="simple", custom=True, guidance=3.5,
        latent="EmptySD3LatentImage"),
}

# CLIPScore's open_clip weights (ViT-B-32, LAION-2B): the evaluator of the training-free scored
# template and of dataset collection.
CLIP_ARCH = "ViT-B-32"
CLIP_WEIGHTS = public_model(
    "open_clip_vit_b_32_laion2b.safetensors", "evaluators",
    "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_model.safetensors")

POSITIVE = "a photo of a red fox in the snow"
NEGATIVE = "blurry, low quality"
SEED, CANDIDATES, KEEP, CHECKPOINT_PERCENT = 42, 5, 1, 0.2
COLLECT_PERCENTS = "0.1,0.2,0.3,0.4,0.6"
TAP = {"block": "auto", "feature_size": 16}
BLEND_PROBE_WEIGHT = 0.7            # ProbeSelectBlendScores' default: the proxy bench's validation fit
# Two stages, the probe first: it prunes N to FIRST_KEEP at CHECKPOINT_PERCENT (almost free), the x0 preview the
# few left to KEEP at LATER_PERCENT, where a preview ranks far better than at 20% (bench/results/REPORT.md).
FIRST_KEEP, LATER_PERCENT = 3, 0.4
NOTE_SIZE = (440, 420)

# Node ids shared by every selection template (tests/test_server.py and tests/test_browser.py edit
# the SD1.5 probe-selection twin through them): 1 checkpoint, 2 positive, 3 negative (Flux:
# guidance), 4 empty latent, 12 SaveImage; custom form: 20 noise, 21 guider, 22 sampler, 23 sigmas.
CKPT, POS, NEG, LATENT = 1, 2, 3, 4


def _name(family: Family, what: str) -> str:
    return f"{family.label}_{what}"


def inputs(family: Family, prompt_node: Optional[int] = None) -> list:
    """Nodes 1-4: checkpoint (MODEL 0, CLIP 1, VAE 2), prompt encoding, empty latent.

    The positive is node 2; the negative node 3 (Flux: node 3 is FluxGuidance on the positive, and
    the conditioning for a KSampler-form node's negative is `negative_link`). `prompt_node`: a string
    node that feeds the text (collect and CLIPScore templates share the prompt with the evaluator).
    """
    text = (prompt_node, 0) if prompt_node else POSITIVE
    nodes = [
        Node(CKPT, "CheckpointLoaderSimple", {"ckpt_name": family.checkpoint}, title="Load Checkpoint"),
        Node(POS, "CLIPTextEncode", {"text": text, "clip": (CKPT, 1)}, title="Positive prompt", color="green"),
    ]
    if family.guidance is not None:
        nodes.append(Node(NEG, "FluxGuidance", {"conditioning": (POS, 0), "guidance": family.guidance}))
    else:
        nodes.append(Node(NEG, "CLIPTextEncode", {"text": NEGATIVE, "clip": (CKPT, 1)}, title="Negative prompt",
                          color="red"))
    nodes.append(Node(LATENT, family.latent, {"width": family.size, "height": family.size, "batch_size": 1}))
    return nodes


def ksampler_conditioning(family: Family, zero_out_id: int) -> tuple[list, tuple, tuple]:
    """(extra nodes, positive link, negative link) for a KSampler-form node of this family."""
    if family.guidance is None:
        return [], (POS, 0), (NEG, 0)
    zero = Node(zero_out_id, "ConditioningZeroOut", {"conditioning": (POS, 0)}, title="No negative (Flux)")
    return [zero], (NEG, 0), (zero_out_id, 0)


def ksampler_settings(family: Family, seed: int = SEED, candidates: int = CANDIDATES) -> dict:
    return {"seed": seed, "candidates": candidates, "steps": family.steps, "cfg": family.cfg,
            "sampler_name": family.sampler, "scheduler": family.scheduler}


def custom_sampling(family: Family, model: tuple, guider_id: int = 21, seed: int = SEED) -> list:
    """Nodes 20 RandomNoise, guider_id (CFGGuider, Flux: BasicGuider on the guided prompt), 22
    KSamplerSelect, 23 BasicScheduler, as the family's own ComfyUI examples build them."""
    if family.guidance is not None:
        guider = Node(guider_id, "BasicGuider", {"model": model, "conditioning": (NEG, 0)})
    else:
        guider = Node(guider_id, "CFGGuider", {"model": model, "positive": (POS, 0), "negative": (NEG, 0),
                                               "cfg": family.cfg})
    return [
        Node(20, "RandomNoise", {"noise_seed": seed}, title="Seed of candidate 0"),
        guider,
        Node(22, "KSamplerSelect", {"sampler_name": family.sampler}),
        Node(23, "BasicScheduler", {"model": (CKPT, 0), "scheduler": family.scheduler, "steps": family.steps,
                                    "denoise": 1.0}),
    ]


def early_sampler(family: Family, node_id: int, model: tuple, guider_id: int = 21) -> Node:
    """The early sampler in the family's form: N candidates to the checkpoint."""
    if family.custom:
        return Node(node_id, "ProbeSelectEarlySamplerCustom", {
            "noise": (20, 0), "guider": (guider_id, 0), "sampler": (22, 0), "sigmas": (23, 0),
            "latent_image": (LATENT, 0), "candidates": CANDIDATES, "checkpoint_percent": CHECKPOINT_PERCENT})
    _extra, positive, negative = ksampler_conditioning(family, 0)
    return Node(node_id, "ProbeSelectEarlySampler", {
        "model": model, "positive": positive, "negative": negative, "latent_image": (LATENT, 0),
        **ksampler_settings(family), "checkpoint_percent": CHECKPOINT_PERCENT, "denoise": 1.0})


def tapped_early_run(family: Family) -> tuple[list, Node]:
    """(sampling nodes, early sampler 6) of a template whose early run samples the tapped model (node 5). In the
    custom form the early run samples it through guider 17; the finish needs no tap (guider 21)."""
    if not family.custom:
        return [], early_sampler(family, 6, (5, 0))
    tapped_guider = custom_sampling(family, (5, 0), guider_id=17)[1]
    return [*custom_sampling(family, (CKPT, 0)), tapped_guider], early_sampler(family, 6, (5, 0), guider_id=17)


def resume(family: Family, node_id: int, kept: tuple, guider_id: int = 21, until_percent: float = 1.0) -> Node:
    """Resume the kept candidates: to the end, or (until_percent < 1) to a later checkpoint."""
    until = {} if until_percent == 1.0 else {"until_percent": until_percent}
    if family.custom:
        return Node(node_id, "ProbeSelectResumeCustom", {"guider": (guider_id, 0), "sampler": (22, 0),
                                                         "latent": kept, "sigmas": (23, 0), **until})
    return Node(node_id, "ProbeSelectResume", {"model": (CKPT, 0), "positive": (POS, 0), "negative": (NEG, 0),
                                               "latent": kept, "cfg": family.cfg, **until})


def settings_text(family: Family, ksampler_form: bool = False) -> str:
    """The family's settings as the template's nodes hold them (`ksampler_form`: a KSampler-form node
    in a custom-sampling family's template: the one-box sampler, the collector)."""
    if family.custom and not ksampler_form:
        guider = (f"BasicGuider with FluxGuidance {family.guidance}" if family.guidance is not None
                  else f"CFGGuider cfg {family.cfg}")
        return (f"{family.label} settings: {family.size}x{family.size}, {family.steps} steps, {family.sampler} / "
                f"{family.scheduler}, {guider}. The early sampler takes the same NOISE, GUIDER, SAMPLER and "
                "SIGMAS as SamplerCustomAdvanced; candidate i uses the noise seed + i.")
    guidance = f" with FluxGuidance {family.guidance} on the prompt" if family.guidance is not None else ""
    return (f"{family.label} settings: {family.size}x{family.size}, {family.steps} steps, cfg {family.cfg}{guidance}, "
            f"{family.sampler} / {family.scheduler}. Candidate i uses seed + i.")


def checkpoint_line(family: Family) -> str:
    return f"- Checkpoint: `{family.checkpoint}` in `models/checkpoints`."


def probe_lines(family: Family) -> str:
    return (f"- Probe: `{family.probe}` in `models/probes`. No public file exists: collect a dataset with "
            f"**{_name(family, 'collect_probe_dataset')}** (hundreds of prompts) and train it with "
            f"**{_name(family, 'train_probe')}**. A probe is tied to its model family, tap block, feature size "
            "and checkpoint fraction.")


def clip_line() -> str:
    return (f"- CLIPScore evaluator: `{CLIP_WEIGHTS}` ({CLIP_ARCH}, LAION-2B open_clip weights, "
            "`open_clip_model.safetensors` of laion/CLIP-ViT-B-32-laion2B-s34B-b79K renamed) in "
            "`models/evaluators`.")


def note(node_id: int, title: str, description: str, *lines: str, size=NOTE_SIZE) -> Note:
    return Note(node_id, "\n\n".join([f"## {title}", description, "\n".join(lines)]), title="About this workflow",
                size=size)


# ---- the templates -------------------------------------------------------------------------------

def pick_by_hand(family: Family) -> Workflow:
    description = (f"Training-free: {CANDIDATES} candidates (seed, seed+1, ...) run to {CHECKPOINT_PERCENT:.0%} of "
                   "the steps, the run pauses and shows every candidate's x0 preview on the pick node; click the "
                   "ones to finish and press Finish. Needs nothing but the checkpoint.")
    custom = custom_sampling(family, (CKPT, 0)) if family.custom else []
    extra, _pos, _neg = ksampler_conditioning(family, 16)
    return Workflow([
        *inputs(family), *extra, *custom,
        early_sampler(family, 6, (CKPT, 0)),
        Node(9, "ProbeSelectPickCandidates", {"early_latent": (6, 0), "keep": KEEP, "timeout": 600}),
        resume(family, 10, (9, 0)),
        Node(11, "VAEDecode", {"samples": (10, 0), "vae": (CKPT, 2)}),
        Node(12, "SaveImage", {"images": (11, 0), "filename_prefix": f"probe_select_{family.key}_picked"}),
        Node(13, "VAEDecode", {"samples": (6, 1), "vae": (CKPT, 2)}, title="VAE Decode (x0 previews)"),
        Node(14, "PreviewImage", {"images": (13, 0)}, title="All candidates at the checkpoint"),
        note(15, f"{family.label}: pick candidates by hand", description,
             checkpoint_line(family),
             "- The pick node waits `timeout` seconds (Cancel stops the run); without scores connected a "
             "timeout fails the run. A kept candidate equals a plain sampler run of its seed.",
             "- " + settings_text(family)),
    ], description=description)


def clipscore_selection(family: Family) -> Workflow:
    description = (f"Training-free, automatic: {CANDIDATES} candidates run to {CHECKPOINT_PERCENT:.0%} of the steps, "
                   "CLIPScore rates each decoded x0 preview against the prompt and only the best is finished. "
                   "Needs the checkpoint and open_clip weights for CLIPScore.")
    custom = custom_sampling(family, (CKPT, 0)) if family.custom else []
    extra, _pos, _neg = ksampler_conditioning(family, 16)
    return Workflow([
        Node(5, "PrimitiveStringMultiline", {"value": POSITIVE}, title="prompt", color="green"),
        *inputs(family, prompt_node=5), *extra, *custom,
        early_sampler(family, 6, (CKPT, 0)),
        Node(7, "ProbeSelectCLIPScore", {"model_name": CLIP_ARCH, "weights": CLIP_WEIGHTS}),
        Node(8, "ProbeSelectPreviewScore", {"x0_preview": (6, 1), "vae": (CKPT, 2), "evaluator": (7, 0),
                                            "prompt": (5, 0)}),
        Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (8, 0), "keep": KEEP}),
        resume(family, 10, (9, 0)),
        Node(11, "VAEDecode", {"samples": (10, 0), "vae": (CKPT, 2)}),
        Node(12, "SaveImage", {"images": (11, 0), "filename_prefix": f"probe_select_{family.key}_x0_clipscore"}),
        note(15, f"{family.label}: select by CLIPScore of the x0 previews", description,
             checkpoint_line(family), clip_line(),
             "- Type the prompt in the **prompt** box: it feeds the text encoder and the scorer. Top-K keeps "
             "the best `keep`; a kept candidate equals a plain sampler run of its seed (shown on Top-K).",
             "- " + settings_text(family)),
    ], description=description)


def probe_selection(family: Family) -> Workflow:
    description = (f"Probe selection: {CANDIDATES} candidates run to {CHECKPOINT_PERCENT:.0%} of the steps, a trained "
                   "probe predicts each one's final score from the tapped activations and only the best is "
                   f"finished. Needs the checkpoint and a probe trained for {family.label}.")
    sampling, early = tapped_early_run(family)
    return Workflow([
        *inputs(family),
        Node(5, "ProbeSelectTap", {"model": (CKPT, 0), **TAP}),
        *sampling,
        early,
        Node(7, "ProbeSelectLoadProbe", {"probe_name": family.probe}),
        Node(8, "ProbeSelectScore", {"probe": (7, 0), "activations": (6, 2)}),
        Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (8, 0), "keep": KEEP}),
        resume(family, 10, (9, 0)),
        Node(11, "VAEDecode", {"samples": (10, 0), "vae": (CKPT, 2)}),
        Node(12, "SaveImage", {"images": (11, 0), "filename_prefix": f"probe_select_{family.key}"}),
        Node(13, "VAEDecode", {"samples": (6, 1), "vae": (CKPT, 2)}, title="VAE Decode (x0 previews)"),
        Node(14, "PreviewImage", {"images": (13, 0)}, title="All candidates at the checkpoint"),
        note(15, f"{family.label}: N candidates, finish the best K", description,
             checkpoint_line(family), probe_lines(family),
             "- Tap: the block and feature size the probe was trained with (auto = the pack's default block).",
             f"- Compute: {CHECKPOINT_PERCENT} + {1 - CHECKPOINT_PERCENT:.1f} K/N of N full runs. A kept candidate "
             "equals a plain sampler run of its seed (shown on Top-K).",
             "- " + settings_text(family)),
    ], description=description)


def probe_scored_early_run(family: Family) -> list:
    """The head of the templates that score with the probe and CLIPScore: the prompt box (13) feeding the text
    encoder, the tapped early run (6) and the probe's scores (8)."""
    sampling, early = tapped_early_run(family)
    return [
        Node(13, "PrimitiveStringMultiline", {"value": POSITIVE}, title="prompt", color="green"),
        *inputs(family, prompt_node=13),
        Node(5, "ProbeSelectTap", {"model": (CKPT, 0), **TAP}),
        *sampling,
        early,
        Node(7, "ProbeSelectLoadProbe", {"probe_name": family.probe}),
        Node(8, "ProbeSelectScore", {"probe": (7, 0), "activations": (6, 2)}),
    ]


def probe_blend_selection(family: Family) -> Workflow:
    description = (f"Probe and x0 preview together: {CANDIDATES} candidates run to {CHECKPOINT_PERCENT:.0%} of the "
                   "steps; a trained probe predicts each one's final score from the tapped activations, CLIPScore "
                   "rates each decoded x0 preview, the two rankings are blended and only the best is finished. Needs "
                   f"the checkpoint, open_clip weights for CLIPScore and a probe trained for {family.label}.")
    return Workflow([
        *probe_scored_early_run(family),
        Node(14, "ProbeSelectCLIPScore", {"model_name": CLIP_ARCH, "weights": CLIP_WEIGHTS}),
        Node(18, "ProbeSelectPreviewScore", {"x0_preview": (6, 1), "vae": (CKPT, 2), "evaluator": (14, 0),
                                             "prompt": (13, 0)}),
        Node(19, "ProbeSelectBlendScores", {"first_scores": (18, 0), "second_scores": (8, 0),
                                            "second_weight": BLEND_PROBE_WEIGHT}),
        Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (19, 0), "keep": KEEP}),
        resume(family, 10, (9, 0)),
        Node(11, "VAEDecode", {"samples": (10, 0), "vae": (CKPT, 2)}),
        Node(12, "SaveImage", {"images": (11, 0), "filename_prefix": f"probe_select_{family.key}_blend"}),
        note(15, f"{family.label}: probe and x0 preview, blended", description,
             checkpoint_line(family), probe_lines(family), clip_line(),
             "- Blend: each scorer is standardised within the batch, then mixed; `second_weight` is the probe's "
             "share (0 = the preview alone, 1 = the probe alone). Fit it on validation prompts "
             "(probes.training.blending.fit_blend_weight); the proxy bench fitted 0.7-0.85. Costs a decode and a "
             "CLIPScore pass per candidate on top of the probe.",
             "- Type the prompt in the **prompt** box: it feeds the text encoder and CLIPScore.",
             "- " + settings_text(family)),
    ], description=description)


def probe_then_x0_preview(family: Family) -> Workflow:
    description = (f"Two stages, the probe first: {CANDIDATES} candidates run to {CHECKPOINT_PERCENT:.0%} of the "
                   f"steps, the trained probe keeps the best {FIRST_KEEP} (no decode); those run on to "
                   f"{LATER_PERCENT:.0%}, CLIPScore rates their decoded x0 previews and only the best is finished. "
                   f"Needs the checkpoint, open_clip weights for CLIPScore and a probe trained for {family.label}.")
    return Workflow([
        *probe_scored_early_run(family),
        Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (8, 0), "keep": FIRST_KEEP},
             title=f"Top-K at {CHECKPOINT_PERCENT:.0%} (probe)"),
        resume(family, 30, (9, 0), until_percent=LATER_PERCENT),
        Node(14, "ProbeSelectCLIPScore", {"model_name": CLIP_ARCH, "weights": CLIP_WEIGHTS}),
        Node(31, "ProbeSelectPreviewScore", {"x0_preview": (30, 1), "vae": (CKPT, 2), "evaluator": (14, 0),
                                             "prompt": (13, 0)}),
        Node(32, "ProbeSelectTopK", {"early_latent": (30, 0), "scores": (31, 0), "keep": KEEP},
             title=f"Top-K at {LATER_PERCENT:.0%} (x0 preview)"),
        resume(family, 10, (32, 0)),
        Node(11, "VAEDecode", {"samples": (10, 0), "vae": (CKPT, 2)}),
        Node(12, "SaveImage", {"images": (11, 0), "filename_prefix": f"probe_select_{family.key}_two_stages"}),
        note(15, f"{family.label}: the probe at {CHECKPOINT_PERCENT:.0%}, the x0 preview at {LATER_PERCENT:.0%}",
             description, checkpoint_line(family), probe_lines(family), clip_line(),
             f"- Schedule '{CANDIDATES}: {CHECKPOINT_PERCENT:g}->{FIRST_KEEP}, {LATER_PERCENT:g}->{KEEP}'. The "
             "probe's stage costs almost nothing, so many seeds can start; the decode and CLIPScore are paid "
             "only for the few left at the later checkpoint. In the proxy bench this mix matched best-of-8 "
             "with less compute than either scorer in both stages; plan N and the Ks for a budget with "
             "ProbeSelectPlanSchedule.",
             "- Type the prompt in the **prompt** box: it feeds the text encoder and CLIPScore.",
             "- " + settings_text(family)),
    ], description=description)


def probe_one_box(family: Family) -> Workflow:
    description = (f"Probe selection in one node: runs {CANDIDATES} candidates to the checkpoint, scores them with "
                   "the probe and finishes only the best. Needs the checkpoint and a probe trained for "
                   f"{family.label}.")
    extra, positive, negative = ksampler_conditioning(family, 16)
    return Workflow([
        *inputs(family), *extra,
        Node(7, "ProbeSelectLoadProbe", {"probe_name": family.probe}),
        Node(6, "ProbeSelectSampler", {"model": (CKPT, 0), "positive": positive, "negative": negative,
                                       "latent_image": (LATENT, 0), "probe": (7, 0), "keep": KEEP,
                                       **ksampler_settings(family), "checkpoint_percent": CHECKPOINT_PERCENT,
                                       "denoise": 1.0}),
        Node(11, "VAEDecode", {"samples": (6, 0), "vae": (CKPT, 2)}),
        Node(12, "SaveImage", {"images": (11, 0), "filename_prefix": f"probe_select_{family.key}_one_box"}),
        note(15, f"{family.label}: probe selection in one node", description,
             checkpoint_line(family), probe_lines(family),
             "- The probe's tap is applied to the model automatically." + (
                 " The one-box sampler has the KSampler form only: Flux runs in it at cfg 1 with FluxGuidance on "
                 "the prompt and the negative zeroed out." if family.guidance is not None else ""),
             "- " + settings_text(family, ksampler_form=True)),
    ], description=description)


def collect_dataset(family: Family) -> Workflow:
    # The command-line collector (python -m tools.cli collect) replaces {prompt} in every string input.
    description = (f"Collects a probe-training dataset for {family.label}: every candidate is finished and scored "
                   "by CLIPScore, its tapped activations at several checkpoints are recorded, and one shard per "
                   "prompt is appended to the dataset. Needs the checkpoint and open_clip weights.")
    extra, positive, negative = ksampler_conditioning(family, 16)
    return Workflow([
        *inputs(family, prompt_node=5), *extra,
        Node(5, "PrimitiveStringMultiline", {"value": "{prompt}"}, title="prompt", color="green"),
        Node(6, "ProbeSelectTap", {"model": (CKPT, 0), **TAP}),
        Node(7, "ProbeSelectCollectSampler", {"model": (6, 0), "positive": positive, "negative": negative,
                                              "latent_image": (LATENT, 0),
                                              **ksampler_settings(family, seed=0, candidates=8),
                                              "checkpoint_percents": COLLECT_PERCENTS, "denoise": 1.0}),
        Node(8, "VAEDecode", {"samples": (7, 0), "vae": (CKPT, 2)}),
        Node(9, "ProbeSelectCLIPScore", {"model_name": CLIP_ARCH, "weights": CLIP_WEIGHTS}),
        Node(10, "ProbeSelectEvaluateImages", {"images": (8, 0), "prompt": (5, 0), "evaluator": (9, 0)}),
        Node(11, "ProbeSelectDatasetWriter", {"activations": (7, 1), "scores": (10, 0), "prompt": (5, 0),
                                              "dataset_name": family.dataset}),
        Node(12, "PreviewImage", {"images": (8, 0)}),
        note(13, f"{family.label}: collect a probe-training dataset", description,
             checkpoint_line(family), clip_line(),
             f"- Writes `output/probe_select_datasets/{family.dataset}`. Type the prompt in the **prompt** box "
             "(it feeds the text encoder, the evaluator and the dataset); queue once per prompt, hundreds of "
             "prompts for a useful probe.",
             "- For big jobs: `python -m tools.cli collect --server http://127.0.0.1:8188 --prompts prompts.txt "
             f"--dataset {family.dataset} --output-dir ComfyUI/output --workflow <this workflow's API file>` "
             "sends it once per prompt and resumes where it stopped.",
             "- " + settings_text(family, ksampler_form=True)),
    ], description=description)


def train_probe(family: Family) -> Workflow:
    description = (f"Trains the {family.label} probe `{family.probe}` on the dataset `{family.dataset}` and "
                   "measures it on held-out prompts. Needs a dataset collected with "
                   f"{_name(family, 'collect_probe_dataset')}; no model file.")
    return Workflow([
        Node(1, "ProbeSelectTrain", {"dataset": family.dataset, "checkpoint_percent": CHECKPOINT_PERCENT,
                                     "evaluator": "", "probe_name": family.probe.removesuffix(".safetensors"),
                                     "epochs": 30}),
        Node(2, "PreviewImage", {"images": (1, 1)}, title="Loss and validation curves"),
        Node(3, "ProbeSelectEvaluateProbe", {"probe": (1, 0), "dataset": family.dataset, "split": "test"}),
        Node(4, "PreviewImage", {"images": (3, 1)}, title="Predicted vs actual (test prompts)"),
        note(5, f"{family.label}: train and evaluate a probe", description,
             "- Listwise ranking within prompt + InfoNCE text alignment; keeps the epoch with the best validation "
             f"within-prompt Spearman and saves `models/probes/{family.probe}`. Cancel stops and keeps the best "
             "probe so far.",
             f"- checkpoint_percent must be the fraction the selection templates use ({CHECKPOINT_PERCENT}).",
             "- Within-prompt Spearman and top-1 hit rate on the test prompts are what matter for picking seeds."),
    ], description=description)


def evaluate_probe(family: Family) -> Workflow:
    description = (f"Measures the {family.label} probe `{family.probe}` on held-out prompts of `{family.dataset}`: "
                   "within-prompt and global Spearman, top-1 hit rate, selected vs mean score. Needs the probe and "
                   "its dataset; no model file.")
    return Workflow([
        Node(1, "ProbeSelectLoadProbe", {"probe_name": family.probe}),
        Node(2, "ProbeSelectEvaluateProbe", {"probe": (1, 0), "dataset": family.dataset, "split": "test"}),
        Node(3, "PreviewImage", {"images": (2, 1)}, title="Predicted vs actual (test prompts)"),
        note(4, f"{family.label}: evaluate a probe", description,
             "- split: the prompts ProbeSelectTrain held out with the same split_seed (test, val) or all of them.",
             f"- {probe_lines(family)[2:]}"),
    ], description=description)


TEMPLATES = {
    "pick_by_hand_x0_previews": pick_by_hand,
    "x0_preview_CLIPScore_selection": clipscore_selection,
    "probe_selection": probe_selection,
    "probe_selection_one_box": probe_one_box,
    "probe_plus_x0_preview_blend_selection": probe_blend_selection,
    "probe_then_x0_preview_two_stages": probe_then_x0_preview,
    "collect_probe_dataset": collect_dataset,
    "train_probe": train_probe,
    "evaluate_probe": evaluate_probe,
}


def _register(family: Family, what: str, declare) -> None:
    workflow(_name(family, what))(lambda: declare(family))


for _family in FAMILIES.values():
    for _what, _declare in TEMPLATES.items():
        _register(_family, _what, _declare)
