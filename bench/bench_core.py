"""Core benchmark: tap overhead, probe latency, activation memory, and split/resume exactness.

    make bench                      # or: .venv/bin/python bench/bench_core.py [--repeats R]

Writes bench/results/core.md and bench/results/core.json. Every figure comes from this run.
Timings are medians over repeats, alternating the tapped and untapped runs so that drift in the
machine's load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))          # last: ComfyUI's `nodes` must win over the pack's nodes/

from devtools import load_pack  # noqa: E402  (bootstraps ComfyUI in-process, exactly as the tests do)
from probe_select.probes.atomic import atomic_write_text  # noqa: E402  (devtools registered probe_select)
from probe_select.probes.checkpoints import checkpoint_step  # noqa: E402

import torch  # noqa: E402

log = logging.getLogger("bench_core")
RESULTS = ROOT / "bench" / "results"


def bench_unet(seed: int = 0):
    """An SD1.x-family UNet big enough for timings to mean something on a CPU (~25 M parameters)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 64,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [1, 1, 1, 1, 1, 1],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 256, "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    config = comfy.supported_models.SD15(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    cond = lambda s: [[torch.randn(1, 77, 256, generator=torch.Generator().manual_seed(s)), {}]]  # noqa: E731
    return patcher, cond(1), cond(2)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def tap_overhead(pack, repeats: int) -> dict:
    from probe_select.nodes.engine import split_sampling
    from probe_select.nodes.nodes_tap import apply_tap
    from probe_select.probes.io import ProbeMetadata
    from probe_select.probes.model import ProbeConfig, build_probe
    from probe_select.probes.scoring import score_candidates

    model, pos, neg = bench_unet()
    tapped = apply_tap(model, "auto", 16)
    n, steps, checkpoint, size = 5, 20, 0.2, 32
    latent = {"samples": torch.zeros(1, 4, size, size)}
    run = lambda m: split_sampling.run_early(m, pos, neg, latent, 0, n, steps, 7.0, "euler", "normal", checkpoint)  # noqa: E731
    run(model), run(tapped)                      # warm-up
    plain, tap = [], []
    for r in range(repeats):        # ABBA order: a slow drift of the machine's load hits both alike
        first, second = ((model, plain), (tapped, tap)) if r % 2 == 0 else ((tapped, tap), (model, plain))
        for m, times in (first, second):
            times += timed(lambda: run(m), 1)
    acts = run(tapped).activations
    s = checkpoint_step(steps, checkpoint)

    # One denoiser step for the N candidates under CFG (cond + uncond in one batch).
    x = torch.randn(2 * n, 4, size, size)
    context = torch.cat([pos[0][0], neg[0][0]]).repeat_interleave(n, 0)
    sigma = torch.full((2 * n,), 5.0)
    with torch.no_grad():
        step_times = timed(lambda: model.model.apply_model(x, sigma, c_crossattn=context), repeats * 3)

    c = acts.features.shape[1]
    config = ProbeConfig(in_channels=c, feature_size=16)
    meta = ProbeMetadata(backbone_family=acts.family, tap=acts.tap, checkpoint_t=acts.t,
                         feature_shape=tuple(acts.features.shape[1:]), pooling="adaptive_avg", evaluator="bench",
                         config=config)
    probe = build_probe(config).eval()
    score_candidates(probe, meta, acts)
    probe_times = timed(lambda: score_candidates(probe, meta, acts), repeats * 3)

    plain_med, tap_med = statistics.median(plain), statistics.median(tap)
    step_med = statistics.median(step_times)
    return {
        "model_params_M": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 2),
        "tap": acts.tap, "latent": [4, size, size], "candidates": n, "steps": steps, "stop_step": s,
        "early_phase_s_untapped": round(plain_med, 4), "early_phase_s_tapped": round(tap_med, 4),
        "tap_overhead_pct": round(100 * (tap_med - plain_med) / plain_med, 2),
        "tap_overhead_pct_min": round(100 * (min(tap) - min(plain)) / min(plain), 2),
        "denoiser_step_s_for_N": round(step_med, 4),
        "denoiser_step_s_per_candidate": round(step_med / n, 5),
        "probe_s_per_candidate": round(statistics.median(probe_times) / n, 5),
        "probe_vs_step_per_candidate": round(statistics.median(probe_times) / step_med, 4),
        "probe_params_M": round(sum(p.numel() for p in probe.parameters()) / 1e6, 2),
        "feature_shape": list(acts.features.shape[1:]),
        "activation_bytes_per_candidate": acts.features[0].numel() * acts.features.element_size(),
    }


def reproducibility(pack) -> list[dict]:
    """max relative difference: kept candidate finished by resume vs a batch-1 KSampler with its seed."""
    import nodes
    from probe_select.nodes.engine import split_sampling
    from devtools.tiny_models import build_tiny
    from probe_select.nodes.engine.noise import splittable_samplers

    rows = []
    for family in ("sd1", "flux"):
        tiny = build_tiny(family)
        size = 16 if tiny.latent_channels == 16 else 8
        latent = tiny.empty_latent(1, size)
        pos, neg = tiny.conditioning(1), tiny.conditioning(2)
        for sampler in splittable_samplers():      # every sampler ComfyUI lists, but those that choose their own steps
            early = split_sampling.run_early(tiny.patcher, pos, neg, latent, 50, 3, 10, 4.0, sampler, "normal", 0.2)
            kept = split_sampling.select_rows(early.latent, [2])
            finished = split_sampling.resume(tiny.patcher, pos, neg, kept, 4.0)["samples"]
            (ref,) = nodes.common_ksampler(tiny.patcher, 52, 10, 4.0, sampler, "normal", pos, neg, latent)
            diff = float((finished - ref["samples"]).abs().max() / ref["samples"].abs().max())
            rows.append({"family": family, "sampler": sampler, "max_rel_diff": diff})
    return rows


def write_report(core: dict, repro: list[dict], repeats: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    atomic_write_text(RESULTS / "core.json", json.dumps({"machine": machine, "repeats": repeats, "core": core,
                                                   "reproducibility": repro}, indent=2) + "\n")
    lines = [
        "# Core benchmark", "",
        f"Command: `make bench` (`bench/bench_core.py --repeats {repeats}`). Machine: {machine['cores']} cores "
        f"({machine['cpu']}), torch {machine['torch']} on CPU, {machine['torch_threads']} thread(s).", "",
        "## Tap overhead and probe latency", "",
        f"SD1.x-family UNet with random weights ({core['model_params_M']} M parameters), latent "
        f"{core['latent']}, N={core['candidates']} candidates, {core['steps']} euler steps, checkpoint step "
        f"{core['stop_step']}, CFG 7, tap `{core['tap']}` pooled to {core['feature_shape']}.", "",
        "| figure | value |", "| --- | --- |",
        f"| early phase, untapped (median) | {core['early_phase_s_untapped']} s |",
        f"| early phase, tapped (median) | {core['early_phase_s_tapped']} s |",
        f"| **tap overhead** (goal <= 2%), medians | **{core['tap_overhead_pct']}%** |",
        f"| tap overhead, fastest runs | {core['tap_overhead_pct_min']}% |",
        f"| one denoiser step for N candidates (cond+uncond) | {core['denoiser_step_s_for_N']} s |",
        f"| one denoiser step per candidate | {core['denoiser_step_s_per_candidate']} s |",
        f"| probe scoring per candidate (default probe, {core['probe_params_M']} M params) | "
        f"{core['probe_s_per_candidate']} s |",
        f"| probe time / one denoiser step, per candidate | {core['probe_vs_step_per_candidate']} |",
        f"| captured activations per candidate (fp16) | {core['activation_bytes_per_candidate']} bytes |", "",
        "## Split + resume vs a plain KSampler with the kept candidate's seed", "",
        "Tiny random models, 10 steps, checkpoint 0.2, CFG 4; max |resume - KSampler| / max |KSampler|.", "",
        "| family | sampler | max relative difference |", "| --- | --- | --- |",
    ]
    lines += [f"| {r['family']} | {r['sampler']} | {r['max_rel_diff']:.2e} |" for r in repro]
    atomic_write_text(RESULTS / "core.md", "\n".join(lines) + "\n")
    log.info("wrote %s", RESULTS / "core.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pack = load_pack()
    log.info("measuring tap overhead and probe latency (%d repeats)...", args.repeats)
    core = tap_overhead(pack, args.repeats)
    log.info("%s", json.dumps(core))
    log.info("measuring split/resume exactness...")
    repro = reproducibility(pack)
    write_report(core, repro, args.repeats)


if __name__ == "__main__":
    main()
