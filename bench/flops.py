"""FLOPs of what selection pays for, on the real architectures, and the compute ratio of each method.

    make bench-flops       # or: .venv/bin/python bench/flops.py [--only NAME ...]

Every component is built with its own library's classes on the meta device (structure, no weights,
no memory) and run once under `torch.utils.flop_counter.FlopCounterMode`:

- denoisers: ComfyUI's model classes from `comfy.supported_models` configs, as
  `comfy/model_detection.py` reads the real checkpoints (the same configs as
  tests/test_default_taps.py); SD1.5 at 512 px, SDXL, SD3-medium and FLUX.1-dev at 1024 px; batch 2
  where the family samples with CFG (cond + uncond), batch 1 for guidance-distilled FLUX.1-dev;
- decoders: ComfyUI's `AutoencoderKL` (SD1.5/SDXL, 4 channels, with post_quant_conv) and
  `AutoencodingEngine` with the same decoder at 16 channels (SD3/Flux), and ComfyUI's TAESD;
- evaluator image towers: open_clip ViT-L-14 at 224 px (CLIP/PickScore/HPSv2 size) and a timm
  ViT-L/16 at 384 px standing in for a BLIP-sized tower (BLIP-large's image encoder is a ViT-L/16;
  ImageReward runs it at 224 px, so the 384 figure is an upper bound); the text sides run once per
  prompt for every method alike and are left out;
- the pack's probe: `probe_select.probes.model.ProbeConfig` defaults, fed by each family's default tap (the
  channel count is read from the tap's output during the denoiser count, through the pack's own
  `block_output_to_map`) pooled to 16x16, with the text branch at the family's pooled width.

Attention runs through PyTorch SDPA (ComfyUI's --use-pytorch-cross-attention, what GPU users get),
forced to its math backend so that the counter sees its matmuls. FlopCounterMode counts matmuls,
convolutions and attention at 2 FLOPs per multiply-add; norms, activations and elementwise ops are
not counted (a few percent at most on these models).

Writes bench/results/flops.json and bench/results/flops.md (tables per family and the ratios; the
formulas are in bench/flops_model.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))          # last: ComfyUI's `nodes` must win over the pack's nodes/

from devtools import bootstrap_comfy, load_pack  # noqa: E402

bootstrap_comfy()                   # ComfyUI in-process, exactly as the tests do

# ComfyUI picks its attention function when comfy.model_management is first imported; CPU launches
# get the chunked sub-quadratic kernels, which ask the device for free memory (the meta device has
# none). Setting the flag before that import is what --use-pytorch-cross-attention does.
assert "comfy.model_management" not in sys.modules, "bench/flops.py must set the attention flag first"
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.use_pytorch_cross_attention = True

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench import flops_model  # noqa: E402
from probe_select.probes.atomic import atomic_write_text  # noqa: E402
from probe_select.probes.pruning import checkpoint_step  # noqa: E402

log = logging.getLogger("bench_flops")
RESULTS = ROOT / "bench" / "results"
META = torch.device("meta")
STEPS, CHECKPOINT = 20, 0.2
SETTINGS = ((5, 1), (20, 2))


@dataclass(frozen=True)
class Family:
    """One denoiser family at its native size, and what its probe reads."""

    name: str
    label: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    latent_side: int
    latent_channels: int
    batch: int                  # 2 with CFG, 1 for guidance-distilled models
    tap: str                    # the pack's `auto` tap (tests/test_default_taps.py)
    comfy_family: str           # nodes.families name, for block_output_to_map
    patch: int
    text_tokens: int
    text_dim: int               # width of the pooled text embedding the probe's text branch reads


def _unet_config(**overrides) -> dict:
    config = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                  adm_in_channels=None, in_channels=4, out_channels=4, use_linear_in_transformer=False,
                  context_dim=768, use_temporal_resblock=False, use_temporal_attention=False, model_channels=320,
                  num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
    config.update(overrides)
    return config


def _diffusion_model(config) -> torch.nn.Module:
    """The denoiser network of a supported-model config, built on the meta device in fp32."""
    config.set_inference_dtype(torch.float32, None)
    return config.get_model({}, "", device=META).diffusion_model.eval()


def _sd15() -> torch.nn.Module:
    import comfy.supported_models as sm
    return _diffusion_model(sm.SD15(_unet_config()))


def _sdxl() -> torch.nn.Module:
    import comfy.supported_models as sm
    return _diffusion_model(sm.SDXL(_unet_config(
        context_dim=2048, adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
        num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)))


def _sd3_medium() -> torch.nn.Module:
    import comfy.supported_models as sm
    return _diffusion_model(sm.SD3({
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None,
        "adm_in_channels": 2048, "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
        "x_block_self_attn_layers": []}))


def _flux_dev() -> torch.nn.Module:
    import comfy.supported_models as sm
    return _diffusion_model(sm.Flux({
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
        "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True}))


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device=META)


def _unet_inputs(batch: int, side: int, tokens: int, width: int, adm: Optional[int] = None):
    def make():
        kwargs = {"context": _meta(batch, tokens, width)}
        if adm:
            kwargs["y"] = _meta(batch, adm)
        return (_meta(batch, 4, side, side), _meta(batch)), kwargs
    return make


def _sd3_inputs(batch: int, side: int):
    # Context: 77 CLIP-L/G tokens (padded to 4096 wide) followed by 77 T5 tokens (sd3_clip.py min_length).
    def make():
        return (_meta(batch, 16, side, side), _meta(batch)), {"context": _meta(batch, 154, 4096),
                                                                "y": _meta(batch, 2048)}
    return make


def _flux_inputs(batch: int, side: int):
    # 256 T5 tokens: comfy/text_encoders/flux.py pads every prompt to min_length=256.
    def make():
        return (_meta(batch, 16, side, side), _meta(batch), _meta(batch, 256, 4096)), {
            "y": _meta(batch, 768), "guidance": _meta(batch)}
    return make


FAMILIES = [
    Family("sd15", "SD1.5, 512 px, CFG (batch 2)", _sd15, _unet_inputs(2, 64, 77, 768), 64, 4, 2,
           "output_blocks.7.0", "sd1", 1, 77, 768),
    Family("sdxl", "SDXL, 1024 px, CFG (batch 2)", _sdxl, _unet_inputs(2, 128, 77, 2048, adm=2816), 128, 4, 2,
           "output_blocks.4.0", "sdxl", 1, 77, 1280),
    Family("sd3_medium", "SD3-medium, 1024 px, CFG (batch 2)", _sd3_medium, _sd3_inputs(2, 128), 128, 16, 2,
           "joint_blocks.20", "sd3", 2, 154, 2048),
    Family("flux_dev", "FLUX.1-dev, 1024 px, guidance-distilled (batch 1)", _flux_dev, _flux_inputs(1, 128), 128, 16,
           1, "single_blocks.19", "flux", 2, 256, 768),
]


def _vae_decoder(latent_channels: int) -> torch.nn.Module:
    """ComfyUI's VAE as comfy/sd.py builds it from an SD (4 channels, post_quant_conv) or SD3/Flux (16) file."""
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device(META):
        if latent_channels == 4:
            return AutoencoderKL(ddconfig=ddconfig, embed_dim=4).eval()
        return AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig}).eval()


def _taesd(latent_channels: int) -> torch.nn.Module:
    import comfy.taesd.taesd
    with torch.device(META):
        return comfy.taesd.taesd.TAESD(latent_channels=latent_channels).eval()


def _open_clip_tower(name: str) -> torch.nn.Module:
    import open_clip
    return open_clip.create_model(name, pretrained=None, device=META).visual.eval()


def _timm_vit(name: str, size: int) -> torch.nn.Module:
    import timm
    with torch.device(META):
        return timm.create_model(name, pretrained=False, img_size=size, num_classes=0).eval()


def count(module: torch.nn.Module, call: Callable[[torch.nn.Module], object]) -> int:
    """FLOPs of one call, attention through SDPA's math backend (the one the counter can see)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        call(module)
    return int(counter.get_total_flops())


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_family(family: Family) -> dict:
    """FLOPs of one denoiser step for one candidate, and the channel count at the family's default tap."""
    pack = load_pack()
    model = family.build()
    tapped: dict[str, tuple[int, ...]] = {}

    def record(_module, _inputs, output):
        feature_map = pack.nodes.engine.capture.block_output_to_map(
            output, family.comfy_family, family.tap, (family.latent_side, family.latent_side), family.patch,
            family.text_tokens)
        tapped["shape"] = tuple(feature_map.shape)

    handle = model.get_submodule(family.tap).register_forward_hook(record)
    args, kwargs = family.inputs()
    try:
        flops = count(model, lambda m: m(*args, **kwargs))
    finally:
        handle.remove()
    return {"flops": flops, "params": _params(model), "batch": family.batch, "tap": family.tap,
            "tap_shape": list(tapped["shape"])}


def count_probe(in_channels: int, text_dim: int) -> dict:
    from probe_select.probes.model import Probe, ProbeConfig

    config = ProbeConfig(in_channels=in_channels, text_dim=text_dim)
    with torch.device(META):
        probe = Probe(config).eval()
    features = _meta(1, in_channels, config.feature_size, config.feature_size)
    text = _meta(1, text_dim)
    return {"flops": count(probe, lambda m: m(features, 0.2, text)), "params": _params(probe),
            "config": f"ProbeConfig(in_channels={in_channels}, text_dim={text_dim}), other fields default"}


def count_decoder(module: torch.nn.Module, latent_channels: int, side: int) -> dict:
    """One decode of one latent; params of the decoding half only (the encoders are built but unused)."""
    latent = _meta(1, latent_channels, side, side)
    parts = [getattr(module, name, None) for name in ("post_quant_conv", "decoder", "taesd_decoder")]
    return {"flops": count(module, lambda m: m.decode(latent)),
            "params": sum(_params(part) for part in parts if isinstance(part, torch.nn.Module))}


def count_tower(module: torch.nn.Module, size: int) -> dict:
    image = _meta(1, 3, size, size)
    return {"flops": count(module, lambda m: m(image)), "params": _params(module)}


def measure(only: set[str]) -> dict:
    results: dict[str, dict] = {}

    def run(name: str, job: Callable[[], dict]) -> None:
        if only and name not in only:
            return
        start = time.perf_counter()
        results[name] = job()
        log.info("%-22s %12.1f GFLOP  %8.1f M params  (%.1f s)", name, results[name]["flops"] / 1e9,
                 results[name]["params"] / 1e6, time.perf_counter() - start)

    for family in FAMILIES:
        run(f"{family.name}_step", lambda f=family: count_family(f))
        step = results.get(f"{family.name}_step")
        if step is not None:
            run(f"{family.name}_probe", lambda f=family, s=step: count_probe(s["tap_shape"][1], f.text_dim))
    run("vae4_decode_64", lambda: count_decoder(_vae_decoder(4), 4, 64))
    run("vae4_decode_128", lambda: count_decoder(_vae_decoder(4), 4, 128))
    run("vae16_decode_128", lambda: count_decoder(_vae_decoder(16), 16, 128))
    run("taesd4_decode_64", lambda: count_decoder(_taesd(4), 4, 64))
    run("taesd4_decode_128", lambda: count_decoder(_taesd(4), 4, 128))
    run("taesd16_decode_128", lambda: count_decoder(_taesd(16), 16, 128))
    run("clip_vit_l14_224", lambda: count_tower(_open_clip_tower("ViT-L-14"), 224))
    run("vit_l16_384", lambda: count_tower(_timm_vit("vit_large_patch16_384", 384), 384))
    return results


# The decoders (full VAE, TAESD) each family's latents go through.
DECODERS = {"sd15": ("vae4_decode_64", "taesd4_decode_64"), "sdxl": ("vae4_decode_128", "taesd4_decode_128"),
            "sd3_medium": ("vae16_decode_128", "taesd16_decode_128"),
            "flux_dev": ("vae16_decode_128", "taesd16_decode_128")}


def family_components(results: dict, family: str, evaluator: str) -> flops_model.Components:
    vae, taesd = DECODERS[family]
    return flops_model.Components(step=results[f"{family}_step"]["flops"], decode=results[vae]["flops"],
                                  preview_decode=results[taesd]["flops"], probe=results[f"{family}_probe"]["flops"],
                                  evaluator=results[evaluator]["flops"])


EVALUATORS = (("clip_vit_l14_224", "CLIP ViT-L/14 image tower, 224 px"),
              ("vit_l16_384", "BLIP-sized image tower (ViT-L/16, 384 px)"))


def report(results: dict) -> str:
    lines = [
        "# Cost on real architectures (FLOPs)",
        "",
        "Written by `make bench-flops` (bench/flops.py): every figure counted with",
        "`torch.utils.flop_counter.FlopCounterMode` on the meta device (no weights), torch "
        f"{torch.__version__}. Matmuls, convolutions and attention at 2 FLOPs per multiply-add; norms, "
        "activations and elementwise ops not counted. Denoisers: ComfyUI's own classes from "
        "`comfy.supported_models` configs as read from the real checkpoints; VAE: ComfyUI's "
        "AutoencoderKL / AutoencodingEngine decoder; TAESD: ComfyUI's `comfy.taesd`; CLIP: open_clip "
        "ViT-L-14; BLIP-sized tower: timm `vit_large_patch16_384` (a ViT-L/16 at 384 px standing in for "
        "BLIP-large's image encoder; ImageReward runs it at 224 px, with 197 tokens instead of 577, "
        "so this is an upper bound); probe: `probe_select.probes.model.ProbeConfig` defaults at the family's default tap, pooled "
        "to 16x16, text branch on.",
        "",
        "A *step* is one denoiser evaluation for one candidate: a batch-2 forward (cond + uncond) for "
        "the CFG families, a batch-1 forward for guidance-distilled FLUX.1-dev. Text encoders run once "
        "per prompt for every method and are left out.",
        "",
    ]
    for family in FAMILIES:
        if f"{family.name}_step" not in results:
            continue
        step = results[f"{family.name}_step"]
        vae, taesd = DECODERS[family.name]
        rows = [(f"denoiser step (default tap `{family.tap}` gives {tuple(step['tap_shape'])})", f"{family.name}_step"),
                (f"VAE decode ({vae.split('_')[0]}, 1 image)", vae), (f"TAESD decode ({taesd.split('_')[0]})", taesd),
                ("probe (default config, text branch on)", f"{family.name}_probe")]
        rows += [(f"evaluator: {label}", name) for name, label in EVALUATORS]
        lines += [f"## {family.label}", "",
                  "| component | GFLOP | params (M) | in steps |", "|---|---:|---:|---:|"]
        for label, name in rows:
            value = results[name]["flops"]
            lines.append(f"| {label} | {value / 1e9:.2f} | {results[name]['params'] / 1e6:.1f} "
                         f"| {value / step['flops']:.4g} |")
        lines.append("")
    lines += ["## Compute ratio to generate-all", "",
              f"T = {STEPS} steps, checkpoint t = {CHECKPOINT} (step {checkpoint_step(STEPS, CHECKPOINT)}); "
              "the columns are each method's compute over generate-all's at the same N.", "",
              flops_model.FORMULAS, ""]
    for evaluator, label in EVALUATORS:
        lines += [f"### Evaluator: {label}", "",
                  "| family | N | K | generate-all (TFLOP) | Probe-Select | x0-preview, VAE | x0-preview, TAESD "
                  "| steps only |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for family in FAMILIES:
            if f"{family.name}_step" not in results:
                continue
            c = family_components(results, family.name, evaluator)
            for n, k in SETTINGS:
                r = flops_model.method_ratios(c, n, k, STEPS, CHECKPOINT)
                total = flops_model.method_costs(c, n, k, STEPS, CHECKPOINT)["generate_all"] * c.step
                lines.append(f"| {family.label.split(',')[0]} | {n} | {k} | {total / 1e12:.0f} "
                             f"| {r['probe_select']:.3f} | {r['x0_preview_vae']:.3f} | {r['x0_preview_taesd']:.3f} "
                             f"| {r['steps_only']:.3f} |")
        lines.append("")
    lines += [
        "## Reading",
        "",
        "- Probe-Select at N=5, K=1 costs about 0.35 of generate-all on every family, a little under the "
        "steps-only ratio (0.36): generate-all also pays N decodes and N evaluations, Probe-Select one decode "
        "and a probe whose cost is 1e-4 of a step or less.",
        "- x0-preview scoring with full-VAE previews pays N extra decodes: a full decode is about 1.6 steps on "
        "SD1.5 at 512 px, 0.6-0.8 on SDXL/SD3 at 1024 px and 0.15 on FLUX.1-dev, so it costs 0.42 of "
        "generate-all on SD1.5 (N=5, K=1) but barely more than Probe-Select on FLUX.1-dev.",
        "- With TAESD previews (0.09 of a step on SD1.5, under 0.05 elsewhere) x0-preview scoring is within "
        "0.015 of Probe-Select everywhere: on compute the two are close, and the probe's case rests on ranking "
        "quality, not on cost.",
        "",
    ]
    lines += measured_section(RESULTS / "sd15_measured.json")
    return "\n".join(lines)


def measured_section(path: Path) -> list[str]:
    """Lines on the measured SD1.5 run (bench/bench_sd15_measured.py) beside this FLOP model, from its JSON."""
    lines = ["## Measured on SD1.5 with random weights", ""]
    if not path.exists():
        return lines + ["Not measured yet: `make bench-sd15` runs the pack's nodes end to end on a real-size SD1.5 "
                        "UNet and VAE with random weights and writes sd15_measured.md.", ""]
    data = json.loads(path.read_text())
    s, a = data["settings"], data["analysis"]
    n, k = s["candidates"], s["keep"]
    own, per_candidate = a["own_work"], a["per_candidate_step_s"]
    lines += [
        f"`make bench-sd15` (bench/bench_sd15_measured.py) runs the pack's own nodes end to end on a real-size SD1.5 "
        f"UNet and VAE with random weights at {s['side']} px on the CPU (N={n}, K={k}, {s['steps']} {s['sampler']} "
        f"steps, CFG {s['cfg']}) against a plain KSampler batch of N, and profiles both runs: "
        "[sd15_measured.md](sd15_measured.md).",
        "",
        f"- Measured Probe-Select / generate-all: **{a['measured']['ratio']:.3f}** ({s.get('repeats', 1)} run(s) of "
        "each method); the step model built from the measured per-batch call costs (each call priced at the mean "
        f"of its batch size's calls): {a['step_model']['ratio']:.3f} "
        f"({100 * a['step_model']['relative_error']:.1f}% apart); this FLOP model for the same run ({s['side']} px, "
        f"no evaluator): {a['flop_model']['ratio']:.3f}."
        + ("" if a["step_model"]["relative_error"] <= 0.03 else
           " The 3% agreement the issue asks for is not reached here: one denoiser call's cost drifted between "
           "and within the runs by more than the gap (see the call-by-call times and the load averages in the "
           "report)."),
        f"- The pack's own work (everything but the denoiser and decode calls): {own['own_s']:.2f} s of "
        f"{a['measured']['probe_select_s']:.0f} s ({own['own_pct']:.3f}%).",
        f"- Why the measured ratio differs from FLOPs: the FLOP model prices a candidate-step the same at every "
        f"batch size, while measured, finishing K={k} at batch {2 * k} cost "
        f"{per_candidate[f'K={k}'] / per_candidate[f'N={n}']:.2f}x per candidate what the batch of {2 * n} did "
        "(the load's drift included), "
        f"and a decoded image costs {a['measured_decode_in_steps']:.2f} candidate-steps measured against "
        f"{a['flop_model']['decode_in_steps']:.2f} by FLOPs. With every call priced per candidate at the batch of N "
        f"(the FLOP model's assumption) the measured costs give {a['linear_step_model']['ratio']:.3f}.",
    ]
    other = data.get("other_run")
    if other:
        lines.append(
            f"- The other run of the same measurement ([{other['file']}.md]({other['file']}.md), load average "
            f"{other['load']:.1f} on {data['machine']['cores']} cores): measured {other['ratio']:.3f}, step model "
            f"{other['step_model']:.3f} ({100 * other['relative_error']:.1f}% apart), own work "
            f"{other['own_pct']:.3f}%.")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="count only these components (no report)")
    parser.add_argument("--report-only", action="store_true",
                        help="no counting: rewrite flops.md from flops.json (and the measured run's JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.report_only:
        atomic_write_text(RESULTS / "flops.md", report(json.loads((RESULTS / "flops.json").read_text())) + "\n")
        log.info("wrote %s", RESULTS / "flops.md")
        return
    torch.set_num_threads(1)
    results = measure(set(args.only))
    if args.only:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "flops.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(RESULTS / "flops.md", report(results) + "\n")
    log.info("wrote %s", RESULTS / "flops.md")


if __name__ == "__main__":
    main()
