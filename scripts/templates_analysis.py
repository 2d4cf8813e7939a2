"""The analysis templates: one per analysis node family (schedules, attention maps on a UNet and on an
MMDiT, activation PCA, latent slerp, conditioning direction, OOD scores, image-set metrics), registered
with `@workflow` like scripts/templates_selection.py and written by scripts/build_workflows.py.

File names read as the card's title (`<family>_analysis_<what>`). Each card shows the analysis's real
output (`picture`: docs/images/cards/<name>.png, the readable part of the README's picture, made by
`make pictures` on the proxy-world models), and
each graph opens with a note on its settings and on what to put where.
"""
from __future__ import annotations

from workflow_graph import Node, Note, Workflow, workflow
from templates_selection import CLIP_ARCH, CLIP_WEIGHTS, FAMILIES, Family, clip_line, checkpoint_line

SD15, SD35 = FAMILIES["sd15"], FAMILIES["sd35"]
CKPT, POS, NEG, LATENT = 1, 2, 3, 4
NOTE_SIZE = (460, 440)
SEED = 42
PROMPT = "a red fox sitting left of a blue mailbox, photo"
NEGATIVE = "blurry, low quality"
# The FID InceptionV3 (pytorch-fid's release file): checked by its SHA-256 when loaded. The frontend's
# missing-model dialog takes only Hugging Face .safetensors URLs, so it gets no download metadata.
INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def _name(family: Family, what: str) -> str:
    return f"{family.label}_analysis_{what}"


def _picture(name: str) -> str:
    """The card of the analysis's picture (bench/analysis_pictures.py): the readable part of it."""
    return f"docs/images/cards/{name}.png"


def note(node_id: int, title: str, description: str, *lines: str) -> Note:
    return Note(node_id, "\n\n".join([f"## {title}", description, "\n".join(lines)]), title="About this workflow",
                size=NOTE_SIZE)


def inputs(family: Family, positive: object = PROMPT, batch_size: int = 1) -> list:
    """Nodes 1-4: checkpoint (MODEL 0, CLIP 1, VAE 2), positive and negative prompt, empty latent."""
    return [
        Node(CKPT, "CheckpointLoaderSimple", {"ckpt_name": family.checkpoint}, title="Load Checkpoint"),
        Node(POS, "CLIPTextEncode", {"text": positive, "clip": (CKPT, 1)}, title="Positive prompt", color="green"),
        Node(NEG, "CLIPTextEncode", {"text": NEGATIVE, "clip": (CKPT, 1)}, title="Negative prompt", color="red"),
        Node(LATENT, family.latent, {"width": family.size, "height": family.size, "batch_size": batch_size}),
    ]


def sampling(family: Family) -> dict:
    return {"steps": family.steps, "cfg": family.cfg, "sampler_name": family.sampler, "scheduler": family.scheduler}


@workflow(_name(SD15, "schedule_inspector"))
def schedule_inspector() -> Workflow:
    description = ("Schedule inspector: sigma, signal fraction and log-SNR per step of several schedulers of the "
                   "model, overlaid, with the Probe-Select checkpoint (20% of the steps) marked and the log-SNR it "
                   "lands on. Needs only the checkpoint (its model_sampling; nothing is sampled).")
    return Workflow([
        Node(CKPT, "CheckpointLoaderSimple", {"ckpt_name": SD15.checkpoint}, title="Load Checkpoint"),
        Node(5, "ProbeSelectScheduleInspector", {"model": (CKPT, 0), "schedulers": "normal,karras,exponential",
                                                 "steps": 20, "checkpoint_percent": 0.2}),
        Node(6, "PreviewImage", {"images": (5, 0)}, title="sigma, signal fraction, log-SNR"),
        note(7, "SD1.5: compare noise schedules", description, checkpoint_line(SD15),
             "- schedulers: any of ComfyUI's, comma-separated. Connect a second model (e.g. SD3.5 or Flux) to "
             "model_2 to overlay its schedules, or a SIGMAS node to sigmas to add your own.",
             "- The summary (text output, shown on the node) gives per schedule the log-SNR range, whether sigma "
             "strictly decreases, the steps spent in the noise-dominated (log-SNR < -2), mid and signal-dominated "
             "(> 2) bands, and sigma / log-SNR at the checkpoint."),
    ], description=description, picture=_picture("schedule_inspector"))


def attention_maps(family: Family, picture: str, what: str) -> Workflow:
    description = (f"Attention maps ({what}): samples one image and shows, for each chosen word, which image "
                   "regions attend to it at four steps, over the decoded image, with the spatial entropy of each "
                   "map per step (falls as attention localises) and one mask per word. Needs only the checkpoint.")
    return Workflow([
        Node(5, "PrimitiveStringMultiline", {"value": PROMPT}, title="prompt", color="green"),
        *inputs(family, positive=(5, 0)),
        Node(6, "ProbeSelectAttentionMaps", {
            "model": (CKPT, 0), "positive": (POS, 0), "negative": (NEG, 0), "latent_image": (LATENT, 0),
            "seed": SEED, **sampling(family), "words": "red fox, blue mailbox, left of", "show_steps": "auto",
            "resolutions": "all", "cell_size": 192, "clip": (CKPT, 1), "prompt": (5, 0), "vae": (CKPT, 2)}),
        Node(7, "PreviewImage", {"images": (6, 0)}, title="maps: one row per word, one column per step"),
        Node(8, "PreviewImage", {"images": (6, 1)}, title="sharpness (spatial entropy per step)"),
        Node(9, "VAEDecode", {"samples": (6, 3), "vae": (CKPT, 2)}),
        Node(10, "SaveImage", {"images": (9, 0), "filename_prefix": f"probe_select_{family.key}_attention"}),
        note(11, f"{family.label}: cross-attention maps per word", description, checkpoint_line(family),
             "- words: words or phrases of the prompt, comma-separated (empty = every word), or token indices "
             "like #5. The prompt box feeds the text encoder and the node (it must be the exact encoded text).",
             "- show_steps: 1-based steps, or auto (four evenly spaced). resolutions: UNet levels by latent "
             "downsampling factor ('2, 4'), or all; a DiT has one level.",
             f"- The sampled latent equals a KSampler run with the same settings ({family.steps} steps, cfg "
             f"{family.cfg}, {family.sampler} / {family.scheduler}). The model outside the node is not patched."),
    ], description=description, picture=picture)


@workflow(_name(SD15, "attention_maps"))
def attention_maps_unet() -> Workflow:
    return attention_maps(SD15, _picture("attention_maps_unet"), "SD1.5 UNet cross-attention")


@workflow(_name(SD35, "attention_maps"))
def attention_maps_mmdit() -> Workflow:
    return attention_maps(SD35, _picture("attention_maps_mmdit"), "SD3.5 MMDiT joint attention, image-to-text part")


@workflow(_name(SD15, "activation_PCA"))
def activation_pca() -> Workflow:
    description = ("Activation PCA: four candidates of one prompt, the tapped block recorded at four checkpoints, "
                   "shown as RGB = the first three principal components (one basis for the whole grid). Where a "
                   "late checkpoint's colours already show at an early one, the layout is settled: a good tap and "
                   "checkpoint for a probe. Needs only the checkpoint.")
    return Workflow([
        *inputs(SD15),
        Node(5, "ProbeSelectTap", {"model": (CKPT, 0), "block": "auto", "feature_size": 16}),
        Node(6, "ProbeSelectCollectSampler", {
            "model": (5, 0), "positive": (POS, 0), "negative": (NEG, 0), "latent_image": (LATENT, 0), "seed": SEED,
            "candidates": 4, **sampling(SD15), "checkpoint_percents": "0.1,0.2,0.4,0.8", "denoise": 1.0}),
        Node(7, "ProbeSelectActivationPCA", {"activations": (6, 1), "cell_size": 128}),
        Node(8, "PreviewImage", {"images": (7, 0)}, title="PCA grid: candidates x checkpoints"),
        Node(9, "VAEDecode", {"samples": (6, 0), "vae": (CKPT, 2)}),
        Node(10, "PreviewImage", {"images": (9, 0)}, title="the finished candidates"),
        note(11, "SD1.5: where does the layout settle?", description, checkpoint_line(SD15),
             "- ProbeSelectTap: block auto = output_blocks.7.0 on SD1.5; name another block (e.g. "
             "output_blocks.4.0) to compare. feature_size: the side the block's output is pooled to.",
             "- The collect sampler finishes the candidates (seed, seed+1, ...) and records the tap at every "
             "checkpoint_percents entry; the PCA node also takes up to four separate activations inputs.",
             "- The summary gives the share of variance each component explains."),
    ], description=description, picture=_picture("activation_pca"))


@workflow(_name(SD15, "latent_slerp"))
def latent_slerp() -> Workflow:
    description = ("Latent slerp: walks in 8 steps from seed 42's starting noise to seed 43's along the great "
                   "circle (exact at both ends, norm kept) and samples every point in one SamplerCustomAdvanced "
                   "run, so you see how the image changes between two seeds. Needs only the checkpoint.")
    return Workflow([
        *inputs(SD15),
        Node(5, "ProbeSelectLatentSlerp", {"mode": "seed noises", "latent_a": (LATENT, 0), "count": 8,
                                           "seed_a": SEED, "seed_b": SEED + 1}),
        Node(6, "CFGGuider", {"model": (CKPT, 0), "positive": (POS, 0), "negative": (NEG, 0), "cfg": SD15.cfg}),
        Node(7, "KSamplerSelect", {"sampler_name": SD15.sampler}),
        Node(8, "BasicScheduler", {"model": (CKPT, 0), "scheduler": SD15.scheduler, "steps": SD15.steps,
                                   "denoise": 1.0}),
        Node(9, "SamplerCustomAdvanced", {"noise": (5, 1), "guider": (6, 0), "sampler": (7, 0), "sigmas": (8, 0),
                                          "latent_image": (5, 0)}),
        Node(10, "VAEDecode", {"samples": (9, 0), "vae": (CKPT, 2)}),
        Node(11, "SaveImage", {"images": (10, 0), "filename_prefix": "probe_select_sd15_slerp"}),
        note(12, "SD1.5: between two seeds", description, checkpoint_line(SD15),
             "- The first and last images are exactly what seed_a and seed_b give alone (a plain run with "
             "RandomNoise of that seed).",
             "- mode 'latents': connect latent_a and latent_b (e.g. two encoded images) instead; the LATENT output "
             "then walks between them and every row shares seed_a's noise."),
    ], description=description, picture=_picture("latent_slerp"))


@workflow(_name(SD15, "conditioning_direction"))
def conditioning_direction() -> Workflow:
    description = ("Conditioning direction: adds strength x (toward - away_from) to a prompt's conditioning, one "
                   "batch row per strength, all rows with the same noise, so one KSampler run shows the attribute "
                   "change at a fixed seed. Needs only the checkpoint.")
    return Workflow([
        *inputs(SD15, positive="a portrait photo of a woman"),
        Node(5, "CLIPTextEncode", {"text": "a portrait photo of a smiling woman", "clip": (CKPT, 1)}, title="toward"),
        Node(6, "CLIPTextEncode", {"text": "a portrait photo of a woman", "clip": (CKPT, 1)}, title="away from"),
        Node(7, "ProbeSelectConditioningDirection", {"conditioning": (POS, 0), "toward": (5, 0), "away_from": (6, 0),
                                                     "strengths": "0, 0.5, 1, 1.5, 2", "mode": "per_token",
                                                     "latent": (LATENT, 0)}),
        Node(8, "KSampler", {"model": (CKPT, 0), "seed": SEED, **sampling(SD15), "positive": (7, 0),
                             "negative": (NEG, 0), "latent_image": (7, 1), "denoise": 1.0}),
        Node(9, "VAEDecode", {"samples": (8, 0), "vae": (CKPT, 2)}),
        Node(10, "SaveImage", {"images": (9, 0), "filename_prefix": "probe_select_sd15_direction"}),
        note(11, "SD1.5: follow a semantic direction", description, checkpoint_line(SD15),
             "- Row k equals a single run with that strength (same seed). Strengths past 1 extrapolate.",
             "- mode per_token: token-wise difference (CLIP prompts are padded to 77 tokens); mean: the difference "
             "of token means, for prompts of different token counts (T5)."),
    ], description=description, picture=_picture("conditioning_direction"))


@workflow(_name(SD15, "OOD_scores"))
def ood_scores() -> Workflow:
    description = ("OOD scores: fits a reference (mean + Ledoit-Wolf covariance of CLIP image embeddings) on a "
                   "folder of your reference images, then scores four new images by Mahalanobis distance and "
                   "its percentile within the reference (99 = more unusual than 99% of it). Needs the checkpoint, "
                   "open_clip weights and a reference folder.")
    return Workflow([
        *inputs(SD15, batch_size=4),
        Node(5, "KSampler", {"model": (CKPT, 0), "seed": SEED, **sampling(SD15), "positive": (POS, 0),
                             "negative": (NEG, 0), "latent_image": (LATENT, 0), "denoise": 1.0}),
        Node(6, "VAEDecode", {"samples": (5, 0), "vae": (CKPT, 2)}),
        Node(7, "ProbeSelectCLIPScore", {"model_name": CLIP_ARCH, "weights": CLIP_WEIGHTS}),
        Node(8, "ProbeSelectOODFit", {"image_folder": "ood_reference", "clip": (7, 0), "name": "my_reference",
                                      "resize_mode": "clean"}),
        Node(9, "ProbeSelectOODScore", {"images": (6, 0), "clip": (7, 0), "reference": (8, 0),
                                        "resize_mode": "clean"}),
        Node(10, "PreviewImage", {"images": (6, 0)}, title="the scored images"),
        note(11, "SD1.5: how unusual is each image?", description, checkpoint_line(SD15), clip_line(),
             "- Put 100 or more reference images (a style, a product line, your past outputs) in "
             "`ComfyUI/input/ood_reference` (or type an absolute folder). The fit is saved to "
             "`output/probe_select_ood/my_reference.safetensors`; later runs can select it as reference_file.",
             "- Scoring must use the fit's extractor and resize mode. Latents work too: connect a LATENT to both "
             "nodes instead of images (pooled 4x4 per channel)."),
    ], description=description, picture=_picture("ood_scores"))


@workflow(_name(SD15, "image_set_metrics"))
def image_set_metrics() -> Workflow:
    description = ("Image-set metrics: FID, KID, precision/recall, density/coverage (Inception features), CMMD and "
                   "CLIPScore (CLIP) of a batch of generated images against a folder of reference images, each with "
                   "its sample counts and a warning below the counts where it is reliable. Needs the checkpoint, "
                   "the FID Inception, open_clip weights and a reference folder.")
    return Workflow([
        *inputs(SD15, batch_size=16),
        Node(5, "KSampler", {"model": (CKPT, 0), "seed": SEED, **sampling(SD15), "positive": (POS, 0),
                             "negative": (NEG, 0), "latent_image": (LATENT, 0), "denoise": 1.0}),
        Node(6, "VAEDecode", {"samples": (5, 0), "vae": (CKPT, 2)}),
        Node(7, "ProbeSelectLoadInception", {"weights": INCEPTION_WEIGHTS, "device": "auto"}),
        Node(8, "ProbeSelectCLIPScore", {"model_name": CLIP_ARCH, "weights": CLIP_WEIGHTS}),
        Node(9, "ProbeSelectImageMetrics", {
            "images": (6, 0), "inception": (7, 0), "clip": (8, 0), "reference_folder": "metrics_reference",
            "prompts": PROMPT, "fid": True, "kid": True, "inception_score": False, "precision_recall": True,
            "density_coverage": True, "cmmd": True, "clip_score": True, "resize_mode": "clean", "batch_size": 16,
            "kid_subset_size": 1000, "is_splits": 10}),
        note(10, "SD1.5: judge a set of images", description, checkpoint_line(SD15),
             f"- FID Inception: `{INCEPTION_WEIGHTS}` (pytorch-fid's release file, 95,628,359 bytes) in "
             "`models/inception`; its SHA-256 is checked, so numbers are comparable with published ones.",
             clip_line(),
             "- Reference images in `ComfyUI/input/metrics_reference` (or an absolute folder), or statistics "
             "saved once with Probe-Select Save Reference Stats (select them in reference_stats).",
             "- 16 images show the report; real comparisons need thousands (FID >= 2,048 per set): point "
             "image_folder at a folder of saved generations instead of the images input."),
    ], description=description, picture=_picture("image_metrics"))
