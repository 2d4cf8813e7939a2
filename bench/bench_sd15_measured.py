"""The pack's nodes end to end on a real-size SD1.5 UNet and VAE (random weights, CPU), profiled.

    make bench-sd15        # or: .venv/bin/python bench/bench_sd15_measured.py [--candidates 5 --keep 1]

Two runs of the same job, 256x256 (a 32x32 latent), 20 euler steps, "normal" scheduler, CFG 7 (ComfyUI
evaluates cond and uncond in one batch of 2N rows):

- generate-all: ComfyUI's own KSampler node (`nodes.KSampler().sample`) on a batch of N, then
  `nodes.VAEDecode` of the N latents;
- Probe-Select: the pack's nodes as a graph runs them (their V3 `execute`): ProbeSelectTap ->
  ProbeSelectLoadProbe (a random probe of the right shape, written with the pack's `save_probe`) ->
  ProbeSelectEarlySampler (N candidates to 20%) -> ProbeSelectScore -> ProbeSelectTopK (K) ->
  ProbeSelectResume (K to the end) -> VAEDecode of the K.

The models: ComfyUI's `comfy.supported_models.SD15` with the unet_config `comfy/model_detection.py`
reads from a real SD1.5 checkpoint (model_channels 320, channel_mult [1, 2, 4, 4], 859.5 M
parameters), and `comfy.sd.VAE` loaded from the state dict of the standard SD1 AutoencoderKL (ch 128,
ch_mult [1, 2, 4, 4]), both fp32 on the CPU. No weights can be downloaded here: both get seeded random
weights (ComfyUI's layers skip initialisation), N(0, 1/fan_in), norms 1, biases 0, and the UNet's
output layer is rescaled to an output std of 1, so every activation stays finite. Timing does not
depend on the values. The conditioning is random [1, 77, 768] tensors (the shape SD1.5's CLIP-L text
encoder gives; the text encoder runs once per prompt for both methods alike and is left out).

Profile: every denoiser call is timed by a DIFFUSION_MODEL wrapper (added with `ModelPatcher.clone()`
and `comfy.patcher_extension`, so it sees every UNet forward of both runs: batch size and seconds), and
every VAEDecode call around the node. "The pack's own work" is the Probe-Select run's wall time less its
denoiser and decode time (it also holds ComfyUI's sampler loop, which the plain run pays too; that
remainder of the plain run is reported beside it). The tap's pooling runs inside the tapped denoiser
call (a forward hook); it is timed on its own and added to the pack's share.

Step model (bench/step_model.py): S(b), the seconds of one denoiser call on b rows, and D(n), one decode
of n latents, predict generate-all = T*S(2N) + D(N) and Probe-Select = c*S(2N) + (T-c)*S(2K) + D(K).
S(b) is the mean of the runs' own calls at that batch size (a wall time is the sum of its calls, slow ones
included; the median and calls timed on their own before the runs are reported beside it), D(n) likewise.
The FLOP model is bench/flops_model.py with this run's components counted by `torch.utils.flop_counter`
(a denoiser call at batch 2, one decode at 256 px, the probe; no evaluator: neither run has one).

A call's cost drifts with the machine (2 cores, whatever else runs): each method runs --repeats times (2 by
default) in ABBA order (GA PS PS GA), so that a steady drift weighs on both alike, and the figures add the
repeats up; the load average is recorded beside each run, and torch runs on --threads threads (1 by
default, OMP_NUM_THREADS=1).

Writes bench/results/sd15_measured.json and bench/results/sd15_measured.md (--output-stem to change).
`--tiny` runs the same code on the tiny test models in seconds (for the smoke test; no report unless
--output-stem is given).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))          # last: ComfyUI's `nodes` must win over the pack's nodes/

from devtools import load_pack  # noqa: E402  (bootstraps ComfyUI in-process, exactly as the tests do)

load_pack()

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402  (ComfyUI's nodes.py: KSampler, VAEDecode, EmptyLatentImage)
import torch  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench import flops_model, step_model  # noqa: E402
from probe_select.nodes import nodes_sampling, nodes_selection, nodes_tap  # noqa: E402
from probe_select.nodes.engine.capture import find_tap  # noqa: E402
from probe_select.probes.atomic import atomic_write_text  # noqa: E402
from probe_select.probes.checkpoints import checkpoint_step  # noqa: E402
from probe_select.probes.features import pool_feature_map  # noqa: E402
from probe_select.probes.io import ProbeMetadata, save_probe  # noqa: E402
from probe_select.probes.model import ProbeConfig, build_probe  # noqa: E402

log = logging.getLogger("bench_sd15")
RESULTS = ROOT / "bench" / "results"
STEPS, CFG, CHECKPOINT, SAMPLER, SCHEDULER = 20, 7.0, 0.2, "euler", "normal"
TIMER_KEY = "bench_sd15_timer"

# The unet_config comfy/model_detection.py reads from a real SD1.5 checkpoint (as bench/flops.py; not imported
# from there because importing it switches ComfyUI to PyTorch attention, and a CPU launch uses sub-quadratic).
SD15_UNET = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, out_channels=4, use_linear_in_transformer=False,
                 context_dim=768, use_temporal_resblock=False, use_temporal_attention=False, model_channels=320,
                 num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
# comfy/sd.py's default SD1.x/SD2.x VAE.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
TINY_UNET = dict(SD15_UNET, model_channels=32, context_dim=64)
TINY_VAE = dict(SD_VAE, ch=32, num_res_blocks=1)


@dataclass(frozen=True)
class Setup:
    """What is built: the real sizes, or the tiny ones for the smoke test."""

    unet: dict
    vae: dict
    latent_side: int
    tokens: int


REAL = Setup(SD15_UNET, SD_VAE, 32, 77)
TINY = Setup(TINY_UNET, TINY_VAE, 16, 8)


def init_random(module: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 1/fan_in) weights, norms 1, biases 0 (ComfyUI's layers leave parameters uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)


def build_unet(setup: Setup, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    config = comfy.supported_models.SD15(dict(setup.unet))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    init_random(model, seed)
    dm = model.diffusion_model
    # Rescale the output layer so that eps has std 1 (random weights give any scale).
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 4, setup.latent_side, setup.latent_side, generator=gen)
    context = torch.randn(1, setup.tokens, setup.unet["context_dim"], generator=gen)
    with torch.no_grad():
        std = float(dm(x, torch.tensor([500.0]), context=context).std())
        if not math.isfinite(std) or std == 0.0:
            raise RuntimeError(f"random UNet gives output std {std}")
        dm.out[-1].weight.mul_(1.0 / std)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_vae(setup: Setup, seed: int = 1) -> comfy.sd.VAE:
    """comfy.sd.VAE loaded, as from a file, from the state dict of a random SD1 AutoencoderKL."""
    source = AutoencoderKL(ddconfig=dict(setup.vae), embed_dim=4)
    init_random(source, seed)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    del source
    # The real config is what comfy.sd.VAE detects from the keys (the loading path of a real file); the tiny
    # one has to be named.
    config = None if setup.vae == SD_VAE else {"params": {"ddconfig": dict(setup.vae), "embed_dim": 4}}
    vae = comfy.sd.VAE(sd=state, config=config)
    if not isinstance(vae.first_stage_model, AutoencoderKL):
        raise RuntimeError(f"comfy.sd.VAE built {type(vae.first_stage_model).__name__}, not the SD1 AutoencoderKL")
    return vae


def conditioning(setup: Setup, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, setup.tokens, setup.unet["context_dim"], generator=gen), {}]]


class CallTimer:
    """DIFFUSION_MODEL wrapper: (rows, seconds) of every UNet forward."""

    def __init__(self):
        self.calls: list[tuple[int, float]] = []

    def __call__(self, executor, x, *args, **kwargs):
        start = time.perf_counter()
        out = executor(x, *args, **kwargs)
        self.calls.append((int(x.shape[0]), time.perf_counter() - start))
        return out


@dataclass
class Profile:
    """One run: wall time, its denoiser calls and decodes, and per-node figures."""

    name: str
    wall_s: float = 0.0
    calls: list = field(default_factory=list)          # (rows, seconds) per denoiser call
    decodes: list = field(default_factory=list)        # (images, seconds) per decode call
    nodes: list = field(default_factory=list)          # {node, wall_s, denoiser_s, calls, decode_s}
    load_before: tuple = ()
    load_after: tuple = ()

    @property
    def denoiser_s(self) -> float:
        return sum(s for _, s in self.calls)

    @property
    def decode_s(self) -> float:
        return sum(s for _, s in self.decodes)

    @property
    def remainder_s(self) -> float:
        return self.wall_s - self.denoiser_s - self.decode_s


def merge_runs(runs: list[Profile]) -> Profile:
    """Repeats of one method as one run: wall times, calls and decodes added up, nodes by label (a run's
    ratio over repeats is then the ratio of summed wall times, and the pack's share the summed remainder)."""
    merged = Profile(runs[0].name, wall_s=sum(r.wall_s for r in runs), load_before=runs[0].load_before,
                     load_after=runs[-1].load_after)
    by_label: dict[str, dict] = {}
    for run in runs:
        merged.calls += run.calls
        merged.decodes += run.decodes
        for node in run.nodes:
            total = by_label.setdefault(node["node"], {"node": node["node"], "wall_s": 0.0, "denoiser_s": 0.0,
                                                        "calls": 0, "rows": [], "decode_s": 0.0})
            for key in ("wall_s", "denoiser_s", "calls", "decode_s"):
                total[key] += node[key]
            total["rows"] = sorted(set(total["rows"]) | set(node["rows"]))
    merged.nodes = list(by_label.values())
    return merged


def run_order(repeats: int) -> list[str]:
    """The runs in the order they are measured: generate-all and Probe-Select in ABBA blocks (GA PS PS GA ...),
    so that a cost drifting steadily over the measurement weighs on both methods alike."""
    pair = ("generate_all", "probe_select")
    return [name for i in range(repeats) for name in (pair if i % 2 == 0 else pair[::-1])]


class Runner:
    """Runs nodes one after the other as a graph would, attributing denoiser and decode time to each."""

    def __init__(self, name: str, timer: CallTimer):
        self.profile = Profile(name)
        self.timer = timer

    def node(self, label: str, call: Callable[[], object]):
        first = len(self.timer.calls)
        decodes_before = len(self.profile.decodes)
        start = time.perf_counter()
        result = call()
        wall = time.perf_counter() - start
        calls = self.timer.calls[first:]
        self.profile.calls += calls
        self.profile.nodes.append({"node": label, "wall_s": wall, "denoiser_s": sum(s for _, s in calls),
                                   "calls": len(calls), "rows": sorted({r for r, _ in calls}),
                                   "decode_s": sum(s for _, s in self.profile.decodes[decodes_before:])})
        log.info("  %-28s %8.2f s  (%d denoiser calls, %.2f s)", label, wall, len(calls), sum(s for _, s in calls))
        return result

    def decode(self, vae, latent: dict):
        def run():
            start = time.perf_counter()
            (images,) = nodes.VAEDecode().decode(vae, latent)
            self.profile.decodes.append((int(latent["samples"].shape[0]), time.perf_counter() - start))
            if not torch.isfinite(images).all():
                raise RuntimeError("the decode gave non-finite pixels")
            return images
        return self.node("VAEDecode", run)

    def __enter__(self):
        self.profile.load_before = os.getloadavg()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.profile.wall_s = time.perf_counter() - self._start
        self.profile.load_after = os.getloadavg()
        return False


def run_generate_all(model, vae, pos, neg, setup: Setup, candidates: int, seed: int, timer: CallTimer,
                     steps: int) -> Profile:
    side = setup.latent_side * 8
    with Runner("generate-all", timer) as run:
        (latent,) = run.node("EmptyLatentImage", lambda: nodes.EmptyLatentImage().generate(side, side, candidates))
        (samples,) = run.node("KSampler", lambda: nodes.KSampler().sample(model, seed, steps, CFG, SAMPLER, SCHEDULER,
                                                                          pos, neg, latent, denoise=1.0))
        run.decode(vae, samples)
    return run.profile


def run_probe_select(model, vae, pos, neg, setup: Setup, candidates: int, keep: int, seed: int, probe_name: str,
                     timer: CallTimer, steps: int) -> Profile:
    side = setup.latent_side * 8
    with Runner("Probe-Select", timer) as run:
        (latent,) = run.node("EmptyLatentImage", lambda: nodes.EmptyLatentImage().generate(side, side, 1))
        tapped = run.node("ProbeSelectTap", lambda: nodes_tap.ProbeSelectTap.execute(model, "auto", 16).result[0])
        probe = run.node("ProbeSelectLoadProbe",
                         lambda: nodes_selection.ProbeSelectLoadProbe.execute(probe_name).result[0])
        early, _x0, acts = run.node("ProbeSelectEarlySampler", lambda: nodes_sampling.ProbeSelectEarlySampler.execute(
            tapped, pos, neg, latent, seed, candidates, steps, CFG, SAMPLER, SCHEDULER, CHECKPOINT).result)
        scores = run.node("ProbeSelectScore", lambda: nodes_selection.ProbeSelectScore.execute(probe, acts).result[0])
        kept = run.node("ProbeSelectTopK",
                        lambda: nodes_selection.ProbeSelectTopK.execute(early, scores, keep).result[0])
        finished = run.node("ProbeSelectResume", lambda: nodes_sampling.ProbeSelectResume.execute(
            model, pos, neg, kept, CFG).result[0])
        run.decode(vae, finished)
    if finished["samples"].shape[0] != keep:
        raise RuntimeError(f"the resume finished {finished['samples'].shape[0]} candidates, not {keep}")
    return run.profile


def write_probe(folder: Path, tapped, setup: Setup) -> str:
    """A random probe for the tapped block, written with the pack's writer into a registered probes folder."""
    tap = find_tap(tapped)
    channels = tapped.model.diffusion_model.get_submodule(tap.path).out_channels
    config = ProbeConfig(in_channels=channels, feature_size=tap.feature_size, text_dim=setup.unet["context_dim"])
    meta = ProbeMetadata(backbone_family="sd1", tap=tap.path, checkpoint_t=CHECKPOINT,
                         feature_shape=(channels, tap.feature_size, tap.feature_size), pooling="adaptive_avg",
                         evaluator="random", config=config)
    save_probe(folder / "sd15_random.safetensors", build_probe(config, seed=0), meta)
    return "sd15_random.safetensors"


def time_calls(dm: torch.nn.Module, setup: Setup, rows: list[int], repeats: int) -> dict[int, list[float]]:
    """Denoiser forwards timed on their own, the batch sizes alternated so that load drift hits all alike."""
    times: dict[int, list[float]] = {r: [] for r in rows}
    gen = torch.Generator().manual_seed(7)
    for repeat in range(repeats):
        for r in (rows if repeat % 2 == 0 else rows[::-1]):
            x = torch.randn(r, 4, setup.latent_side, setup.latent_side, generator=gen)
            context = torch.randn(r, setup.tokens, setup.unet["context_dim"], generator=gen)
            start = time.perf_counter()
            with torch.no_grad():
                dm(x, torch.full((r,), 500.0), context=context)
            times[r].append(time.perf_counter() - start)
            log.info("  standalone call, %d rows: %.2f s", r, times[r][-1])
    return times


def time_tap_pooling(channels: int, side: int, candidates: int, feature_size: int, repeats: int = 20) -> float:
    """Median seconds of the tap's work inside its denoiser call: pool the cond rows to fp16 on the CPU."""
    fmap = torch.randn(2 * candidates, channels, side, side)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pool_feature_map(fmap.chunk(2)[0], feature_size).to("cpu")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(model, vae, probe_config: ProbeConfig, setup: Setup) -> dict:
    """This run's FLOP components, counted on the real modules (ComfyUI's CPU attention is bmm/baddbmm,
    which the counter sees)."""
    dm = model.model.diffusion_model
    x = torch.randn(2, 4, setup.latent_side, setup.latent_side)
    context = torch.randn(2, setup.tokens, setup.unet["context_dim"])
    latent = torch.randn(1, 4, setup.latent_side, setup.latent_side)
    probe = build_probe(probe_config, seed=0).eval()
    features = torch.randn(1, probe_config.in_channels, probe_config.feature_size, probe_config.feature_size)
    text = torch.randn(1, probe_config.text_dim)
    out = {}
    for name, call in (("step_cfg_batch2", lambda: dm(x, torch.full((2,), 500.0), context=context)),
                       ("decode_1_image", lambda: vae.first_stage_model.decode(latent)),
                       ("probe_1_candidate", lambda: probe(features, CHECKPOINT, text))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        out[name] = int(counter.get_total_flops())
    return out


def analyse(generate_all: Profile, probe_select: Profile, standalone: dict[int, list[float]], flops: dict,
            tap_pool_s: float, candidates: int, keep: int, steps: int) -> dict:
    """Ratios, the step models (in-run and standalone costs), the FLOP model and the pack's own share."""
    by_rows: dict[int, list[float]] = {}
    for rows, seconds in generate_all.calls + probe_select.calls:
        by_rows.setdefault(rows, []).append(seconds)
    by_images: dict[int, list[float]] = {}
    for images, seconds in generate_all.decodes + probe_select.decodes:
        by_images.setdefault(images, []).append(seconds)
    decodes = {n: statistics.fmean(v) for n, v in by_images.items()}
    measured_ratio = probe_select.wall_s / generate_all.wall_s
    # The headline prices a call at the mean of its batch size's calls: a wall time is the sum of its calls,
    # slow ones included, and the mean is what predicts a sum. The median (robust, but it drops the slow
    # calls that the wall time keeps) is reported beside it.
    in_run_mean = step_model.CallCosts(step={r: statistics.fmean(v) for r, v in by_rows.items()}, decode=decodes)
    prediction_mean = step_model.predict(in_run_mean, candidates, keep, steps, CHECKPOINT)
    in_run = step_model.CallCosts(step={r: statistics.median(v) for r, v in by_rows.items()}, decode=decodes)
    prediction = step_model.predict(in_run, candidates, keep, steps, CHECKPOINT)
    linear = step_model.predict(step_model.linear_costs(in_run_mean, candidates, keep), candidates, keep, steps,
                                CHECKPOINT)
    # Each run priced with its own calls' medians: blind to the load's drift between the runs, so it checks
    # the structure alone (the calls are those the formulas count, nothing else costs).
    own_costs = {}
    for run in (generate_all, probe_select):
        rows: dict[int, list[float]] = {}
        for r, seconds in run.calls:
            rows.setdefault(r, []).append(seconds)
        own_costs[run.name] = {r: statistics.median(v) for r, v in rows.items()}
    ga_own = step_model.predict(step_model.CallCosts(own_costs[generate_all.name], decodes), candidates, candidates,
                                steps, CHECKPOINT).generate_all
    ps_own = step_model.predict(step_model.CallCosts(own_costs[probe_select.name], decodes), candidates, keep, steps,
                                CHECKPOINT).probe_select
    result = {
        "measured": {"generate_all_s": generate_all.wall_s, "probe_select_s": probe_select.wall_s,
                     "ratio": measured_ratio},
        "step_costs_in_run": {"step_mean_s": in_run_mean.step, "step_median_s": in_run.step,
                              "step_calls": {r: len(v) for r, v in by_rows.items()},
                              "step_min_s": {r: min(v) for r, v in by_rows.items()},
                              "step_max_s": {r: max(v) for r, v in by_rows.items()}, "decode_s": decodes},
        "step_model": {**asdict(prediction_mean), "step_mean_s": in_run_mean.step, "ratio": prediction_mean.ratio,
                       "relative_error": step_model.relative_error(measured_ratio, prediction_mean.ratio)},
        "step_model_median": {"step_median_s": in_run.step, "ratio": prediction.ratio,
                              "relative_error": step_model.relative_error(measured_ratio, prediction.ratio)},
        "linear_step_model": {"ratio": linear.ratio},
        "each_run_own_costs": {"step_median_s": own_costs, "generate_all_s": ga_own, "probe_select_s": ps_own,
                               "ratio": ps_own / ga_own,
                               "relative_error": step_model.relative_error(measured_ratio, ps_own / ga_own)},
        "per_candidate_step_s": {f"N={candidates}": step_model.per_candidate_step(in_run_mean, candidates),
                                 f"K={keep}": step_model.per_candidate_step(in_run_mean, keep)},
    }
    if standalone:
        alone = step_model.CallCosts(step={r: statistics.median(v) for r, v in standalone.items()}, decode=decodes)
        alone_prediction = step_model.predict(alone, candidates, keep, steps, CHECKPOINT)
        result["standalone_step_model"] = {
            "step_s": {r: v for r, v in standalone.items()}, "step_median_s": alone.step,
            "ratio": alone_prediction.ratio,
            "relative_error": step_model.relative_error(measured_ratio, alone_prediction.ratio)}
    components = flops_model.Components(step=flops["step_cfg_batch2"], decode=flops["decode_1_image"],
                                        preview_decode=0.0, probe=flops["probe_1_candidate"], evaluator=0.0)
    ratios = flops_model.method_ratios(components, candidates, keep, steps, CHECKPOINT)
    result["flop_model"] = {"flops": flops, "decode_in_steps": flops["decode_1_image"] / flops["step_cfg_batch2"],
                            "ratio": ratios["probe_select"], "steps_only": ratios["steps_only"]}
    per_image = decodes[candidates] / candidates
    result["measured_decode_in_steps"] = per_image / (in_run_mean.step_seconds(2 * candidates) / candidates)
    own = probe_select.remainder_s + tap_pool_s
    result["own_work"] = {"remainder_s": probe_select.remainder_s, "tap_pooling_s": tap_pool_s, "own_s": own,
                          "own_pct": 100 * own / probe_select.wall_s,
                          "generate_all_remainder_s": generate_all.remainder_s,
                          "generate_all_remainder_pct": 100 * generate_all.remainder_s / generate_all.wall_s}
    return result


def _fmt_rows(d: dict) -> str:
    return ", ".join(f"{k}: {v:.3f} s" for k, v in sorted(d.items(), key=lambda kv: int(kv[0])))


def report(data: dict) -> str:
    s, a = data["settings"], data["analysis"]
    n, k = s["candidates"], s["keep"]
    m, sm, fm, own = a["measured"], a["step_model"], a["flop_model"], a["own_work"]
    ps, ga = data["runs"]["probe_select"], data["runs"]["generate_all"]
    stop = checkpoint_step(s["steps"], CHECKPOINT)
    lines = [
        "# Probe-Select measured on SD1.5 with random weights (CPU)", "",
        f"Written by `make bench-sd15` (`bench/bench_sd15_measured.py --candidates {n} --keep {k} "
        f"--repeats {s.get('repeats', 1)}`). "
        f"Machine: {data['machine']['cores']} cores ({data['machine']['cpu']}; its load average before and after "
        f"each run is below), torch {data['machine']['torch']} on the CPU with {data['machine']['torch_threads']} thread(s) "
        f"(OMP_NUM_THREADS={data['machine']['omp_num_threads']}), ComfyUI {data['machine']['comfyui']}.", "",
        f"SD1.5 UNet: ComfyUI's `comfy.supported_models.SD15` with the real unet_config (model_channels 320, "
        f"channel_mult [1, 2, 4, 4], {data['models']['unet_params_M']:.1f} M parameters); VAE: `comfy.sd.VAE` "
        f"loaded from a standard SD1 AutoencoderKL state dict ({data['models']['vae_params_M']:.1f} M parameters). "
        "Seeded random weights (no weights can be downloaded here), fp32. Conditioning: random [1, 77, 768] "
        "tensors in place of CLIP-L's output (no text encoder; it runs once per prompt for both methods). "
        f"{s['side']}x{s['side']} px ({s['side'] // 8}x{s['side'] // 8} latent), {s['steps']} {SAMPLER} steps, "
        f"{SCHEDULER} scheduler, CFG {CFG} (cond + uncond in one batch of 2 rows per candidate), "
        f"checkpoint {CHECKPOINT} (step {stop}), N={n}, K={k}.", "",
        "- **generate-all**: ComfyUI's `KSampler` node on a batch of N, then `VAEDecode` of the N latents.",
        "- **Probe-Select**: the pack's nodes called as ComfyUI calls them (V3 `execute`): `ProbeSelectTap` -> "
        "`ProbeSelectLoadProbe` (a random probe of the right shape written with the pack's `save_probe`) -> "
        "`ProbeSelectEarlySampler` (N to the checkpoint) -> `ProbeSelectScore` -> `ProbeSelectTopK` -> "
        "`ProbeSelectResume` (K to the end) -> `VAEDecode` of the K.", "",
        "Every UNet forward is timed by a DIFFUSION_MODEL wrapper (`ModelPatcher.clone()` + "
        "`comfy.patcher_extension`), every decode around the `VAEDecode` node.", "",
        "## Result", "",
        "| figure | value |", "|---|---:|",
        f"| generate-all, wall ({s.get('repeats', 1)} run(s) added up) | {m['generate_all_s']:.1f} s |",
        f"| Probe-Select, wall ({s.get('repeats', 1)} run(s) added up) | {m['probe_select_s']:.1f} s |",
        f"| **measured ratio** Probe-Select / generate-all | **{m['ratio']:.3f}** |",
        f"| step model (the runs' per-batch call costs: mean call at each batch size) | {sm['ratio']:.3f} |",
        f"| **measured vs step model** (bar: within 3%) | **{100 * sm['relative_error']:.2f}%** |",
        f"| step model from the runs' median call costs | {a['step_model_median']['ratio']:.3f} "
        f"({100 * a['step_model_median']['relative_error']:.2f}% from measured) |",
    ]
    if "standalone_step_model" in a:
        st = a["standalone_step_model"]
        lines.append(f"| step model from calls timed on their own before the runs | {st['ratio']:.3f} "
                     f"({100 * st['relative_error']:.2f}% from measured) |")
    if "each_run_own_costs" in a:
        e = a["each_run_own_costs"]
        lines.append(f"| each run priced with its own calls' medians (blind to drift between the runs) | "
                     f"{e['ratio']:.3f} ({100 * e['relative_error']:.2f}% from measured) |")
    lines += [
        f"| step model with batch-independent costs (per row and per image at batch N) | "
        f"{a['linear_step_model']['ratio']:.3f} |",
        f"| FLOP model of this run ({s['side']} px, no evaluator) | {fm['ratio']:.3f} |",
        f"| FLOP model, steps only | {fm['steps_only']:.3f} |",
        f"| **the pack's own work** (Probe-Select run less its denoiser and decode calls) | "
        f"**{own['own_s']:.2f} s = {own['own_pct']:.3f}%** of the run (bar: < 1%) |",
        f"| of which the tap's pooling inside its denoiser call (timed on its own) | "
        f"{own['tap_pooling_s'] * 1e3:.2f} ms |",
        f"| the same remainder in the plain KSampler run (ComfyUI's own sampler work) | "
        f"{own['generate_all_remainder_s']:.2f} s = {own['generate_all_remainder_pct']:.3f}% |",
        "",
        "## Per-call costs", "",
        f"Denoiser call means by rows (2 per candidate): {_fmt_rows(a['step_costs_in_run']['step_mean_s'])}; "
        f"medians {_fmt_rows(a['step_costs_in_run']['step_median_s'])} "
        f"(calls: {a['step_costs_in_run']['step_calls']}; min {_fmt_rows(a['step_costs_in_run']['step_min_s'])}; "
        f"max {_fmt_rows(a['step_costs_in_run']['step_max_s'])}).", "",
        f"Per candidate: {', '.join(f'{key} {v:.3f} s' for key, v in a['per_candidate_step_s'].items())} per step; "
        f"finishing K={k} at batch {2 * k} costs "
        f"{a['per_candidate_step_s'][f'K={k}'] / a['per_candidate_step_s'][f'N={n}']:.2f}x per candidate what "
        f"batch {2 * n} does.", "",
        "Every denoiser call in order (rows: seconds), which shows the load's drift: "
        + "; ".join(f"{run['name']} " + ", ".join(f"{r}: {t:.0f}" for r, t in run["calls"])
                    for run in measured_runs(data)) + ".", "",
        f"Decode calls: {_fmt_rows(a['step_costs_in_run']['decode_s'])}; one decoded image = "
        f"{a['measured_decode_in_steps']:.2f} candidate-steps measured (at batch N) against "
        f"{fm['decode_in_steps']:.2f} by FLOPs.", "",
    ]
    if "standalone_step_model" in a:
        st = a["standalone_step_model"]
        lines += [f"Calls timed on their own before the runs (rows: seconds): "
                  f"{ {r: [round(x, 2) for x in v] for r, v in st['step_s'].items()} }.", ""]
    lines += [
        "## Profile of the Probe-Select runs (added up)", "",
        "| node | wall (s) | denoiser calls | denoiser (s) | decode (s) | rest (s) |", "|---|---:|---:|---:|---:|---:|",
    ]
    for node in ps["nodes"]:
        rest = node["wall_s"] - node["denoiser_s"] - node["decode_s"]
        lines.append(f"| {node['node']} | {node['wall_s']:.3f} | {node['calls']} | {node['denoiser_s']:.2f} "
                     f"| {node['decode_s']:.2f} | {rest:.3f} |")
    lines += ["", "Plain run:", "", "| node | wall (s) | denoiser calls | denoiser (s) | decode (s) | rest (s) |",
              "|---|---:|---:|---:|---:|---:|"]
    for node in ga["nodes"]:
        rest = node["wall_s"] - node["denoiser_s"] - node["decode_s"]
        lines.append(f"| {node['node']} | {node['wall_s']:.3f} | {node['calls']} | {node['denoiser_s']:.2f} "
                     f"| {node['decode_s']:.2f} | {rest:.3f} |")
    def load(values) -> str:
        return "/".join(f"{v:.1f}" for v in values)

    lines += ["", "## The runs, in the order they ran", "",
              "| # | method | wall (s) | load average before -> after (1, 5, 15 min) |", "|---:|---|---:|---|"]
    for i, run in enumerate(measured_runs(data), 1):
        lines.append(f"| {i} | {run['name']} | {run['wall_s']:.1f} | {load(run['load_before'])} -> "
                     f"{load(run['load_after'])} |")
    pairs = [p / g for p, g in zip(*([r["wall_s"] for r in data.get("repeats", {}).get(name, [])]
                                     for name in ("probe_select", "generate_all")))]
    lines += ["", f"On {data['machine']['cores']} cores. " + (
        "The figures above add the repeats of each method up (ABBA order: a cost that drifts steadily weighs on "
        f"both methods alike); the ratio of each repeat on its own: {', '.join(f'{r:.3f}' for r in pairs)}."
        if len(pairs) > 1 else "One run of each method."), ""]
    lines += reading(data)
    if data.get("other_run"):
        e = data["other_run"]
        lines += ["## The other run", "",
                  f"The full measurement ran twice; the other run is [{e['file']}.md]({e['file']}.md), under a load "
                  f"average of {e['load']:.1f} on {data['machine']['cores']} cores: measured ratio {e['ratio']:.3f}, "
                  f"step model {e['step_model']:.3f} ({100 * e['relative_error']:.2f}% apart; "
                  f"{e['each_run']:.3f} priced with each run's own calls), the pack's own work {e['own_s']:.2f} s = "
                  f"{e['own_pct']:.3f}% of its Probe-Select run.", ""]
    return "\n".join(lines) + "\n"


def measured_runs(data: dict) -> list[dict]:
    """Every measured run in the order it ran (a JSON from before repeats has one run of each method)."""
    repeats = data.get("repeats")
    if not repeats:
        return [data["runs"]["generate_all"], data["runs"]["probe_select"]]
    queues = {name: list(runs) for name, runs in repeats.items()}
    return [queues[name].pop(0) for name in data["settings"]["order"]]


def summary(path: Path) -> dict:
    """The headline figures of another run's JSON, for its mention in this run's report."""
    data = reanalyse(json.loads(path.read_text()))
    a, runs = data["analysis"], data["runs"]
    loads = [v[0] for run in runs.values() for v in (run["load_before"], run["load_after"])]
    return {"file": path.with_suffix("").name, "ratio": a["measured"]["ratio"], "step_model": a["step_model"]["ratio"],
            "relative_error": a["step_model"]["relative_error"], "each_run": a["each_run_own_costs"]["ratio"],
            "own_s": a["own_work"]["own_s"], "own_pct": a["own_work"]["own_pct"], "load": statistics.fmean(loads)}


def reading(data: dict) -> list[str]:
    """What the figures say, computed from them (the ratio from FLOPs to measured, step by step)."""
    s, a = data["settings"], data["analysis"]
    n, k = s["candidates"], s["keep"]
    m, sm, fm, own = a["measured"], a["step_model"], a["flop_model"], a["own_work"]
    linear = a["linear_step_model"]["ratio"]
    factor = a["per_candidate_step_s"][f"K={k}"] / a["per_candidate_step_s"][f"N={n}"]
    # The same factor from the Probe-Select run's own calls alone (both batch sizes minutes apart, under one load).
    ps_own = {int(r): v for r, v in a["each_run_own_costs"]["step_median_s"]["Probe-Select"].items()}
    local_factor = (ps_own[2 * k] / k) / (ps_own[2 * n] / n)
    ps_nodes = data["runs"]["probe_select"]["nodes"]
    ga_calls = data["runs"]["generate_all"]["calls"]
    rests = sorted(((node["wall_s"] - node["denoiser_s"] - node["decode_s"], node["node"]) for node in ps_nodes),
                   reverse=True)
    within = "within" if sm["relative_error"] <= 0.03 else "outside"
    under = "under" if own["own_pct"] < 1.0 else "over"
    return [
        "## Reading", "",
        f"- **Measured against the step model**: {m['ratio']:.3f} against {sm['ratio']:.3f}, "
        f"{100 * sm['relative_error']:.2f}% apart, {within} the 3% bar. The step model prices each call at the mean "
        f"of the calls at its batch size over every run ({s.get('repeats', 1)} of each method, in the order of the "
        "table above), and each decode likewise. A denoiser call's cost drifts with the machine "
        f"(generate-all's calls on {2 * n} rows took {min(t for r, t in ga_calls if r == 2 * n):.0f} to "
        f"{max(t for r, t in ga_calls if r == 2 * n):.0f} s); what drifts differently in the two methods' runs is "
        "what separates the two figures. Priced with each run's own calls' medians (blind to drift between the "
        f"runs, and to the slow calls a median drops), the model gives {a['each_run_own_costs']['ratio']:.3f} "
        f"({100 * a['each_run_own_costs']['relative_error']:.2f}% from measured); with the medians over all runs, "
        f"{a['step_model_median']['ratio']:.3f}. The calls themselves are the ones the formulas count, at the batch "
        "sizes they say (the tables below).",
        f"- **From FLOPs to measured**, one assumption at a time: the FLOP model of this run gives {fm['ratio']:.3f}. "
        f"Pricing a candidate-step and a decoded image at what they cost measured in the batch of N (one decoded "
        f"image = {a['measured_decode_in_steps']:.2f} candidate-steps, against {fm['decode_in_steps']:.2f} by "
        f"FLOPs) gives {linear:.3f}: the decode's share, which generate-all pays N times and Probe-Select K times. "
        f"Pricing each call at its own batch size gives {sm['ratio']:.3f}: finishing K={k} at a batch of {2 * k} "
        f"rows costs {factor:.2f}x per candidate what the batch of {2 * n} does over both runs' calls "
        f"({local_factor:.2f}x within the Probe-Select run alone, where both batch sizes ran minutes apart), and the "
        f"{s['steps'] - checkpoint_step(s['steps'], CHECKPOINT)} finishing steps run at that batch. What is left to "
        "the measured ratio is the calls' drift with the machine's load between and within the runs, and the "
        "non-model work below.",
        f"- **The pack's own work** is {own['own_s']:.2f} s of the Probe-Select runs' {m['probe_select_s']:.0f} s "
        f"({own['own_pct']:.3f}%, {under} the 1% bar); the plain KSampler run has "
        f"{own['generate_all_remainder_s']:.2f} s "
        "of non-model work of its own (ComfyUI's sampler loop, noise, progress bar). Where the Probe-Select "
        "remainder goes, largest first: " + ", ".join(f"{name} {rest:.3f} s" for rest, name in rests[:4]) + ".",
        "",
    ]


def reanalyse(data: dict) -> dict:
    """`data` (a written JSON) with its analysis recomputed from the recorded calls (to change the report's
    arithmetic or text without measuring again)."""
    def profile(raw: dict) -> Profile:
        return Profile(**{**raw, "calls": [tuple(c) for c in raw["calls"]],
                          "decodes": [tuple(d) for d in raw["decodes"]]})

    a, s = data["analysis"], data["settings"]
    standalone = {int(r): v for r, v in a.get("standalone_step_model", {}).get("step_s", {}).items()}
    analysis = analyse(profile(data["runs"]["generate_all"]), profile(data["runs"]["probe_select"]), standalone,
                       a["flop_model"]["flops"], a["own_work"]["tap_pooling_s"], s["candidates"], s["keep"],
                       s["steps"])
    return {**data, "analysis": analysis}


def _measure(args, setup: Setup, model, vae, pos, neg, timer: CallTimer, probes_dir: Path):
    """Warm-up, FLOP count, standalone calls, then the two measured runs."""
    n, k = args.candidates, args.keep
    tapped = nodes_tap.ProbeSelectTap.execute(model, "auto", 16).result[0]
    probe_name = write_probe(probes_dir, tapped, setup)
    tap = find_tap(tapped)
    channels = tapped.model.diffusion_model.get_submodule(tap.path).out_channels

    # Warm-up: both paths once at N=1 (2 steps; 5 for Probe-Select, whose probe wants t = 0.2), so that
    # first-call work (imports, model load, allocator) is not timed.
    log.info("warm-up (N=1, both paths)...")
    run_generate_all(model, vae, pos, neg, setup, 1, 0, timer, steps=2)
    run_probe_select(model, vae, pos, neg, setup, 1, 1, 0, probe_name, timer, steps=5)

    log.info("counting FLOPs...")
    flops = count_flops(model, vae, ProbeConfig(in_channels=channels, feature_size=16,
                                                text_dim=setup.unet["context_dim"]), setup)
    log.info("%s", flops)
    standalone = {}
    if args.standalone_repeats:
        log.info("timing denoiser calls on their own...")
        standalone = time_calls(model.model.diffusion_model, setup, sorted({2 * n, 2 * k}),
                                args.standalone_repeats)
    # The tap reads output_blocks.7.0, at half the latent's side.
    tap_pool_s = time_tap_pooling(channels, setup.latent_side // 2, n, 16)

    runs: dict[str, list[Profile]] = {"generate_all": [], "probe_select": []}
    for name in run_order(args.repeats):
        log.info("%s, N=%d, K=%d (load %s)...", name, n, k, os.getloadavg())
        if name == "generate_all":
            run = run_generate_all(model, vae, pos, neg, setup, n, 42, timer, args.steps)
        else:
            run = run_probe_select(model, vae, pos, neg, setup, n, k, 42, probe_name, timer, args.steps)
        log.info("%s: %.1f s", run.name, run.wall_s)
        runs[name].append(run)
    return runs, standalone, flops, tap_pool_s


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--standalone-repeats", type=int, default=2,
                        help="denoiser calls per batch size timed on their own before the runs (0: none)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each method, in ABBA order (GA PS PS GA ...); the figures add them up")
    parser.add_argument("--tiny", action="store_true", help="the tiny test models (smoke test)")
    parser.add_argument("--output-stem", default=None,
                        help="write <stem>.json and <stem>.md (default bench/results/sd15_measured; none with --tiny)")
    parser.add_argument("--from-json", default=None,
                        help="no measuring: recompute the analysis and the report from this JSON "
                             "(writes to --output-stem, default: beside it)")
    parser.add_argument("--other-run", default=None,
                        help="the JSON of the other run of the same measurement, summarised at the report's end")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.from_json:
        data = reanalyse(json.loads(Path(args.from_json).read_text()))
        if args.other_run:
            data["other_run"] = summary(Path(args.other_run))
        stem = args.output_stem or str(Path(args.from_json).with_suffix(""))
        atomic_write_text(Path(stem + ".json"), json.dumps(data, indent=1, default=str) + "\n")
        atomic_write_text(Path(stem + ".md"), report(data))
        return data
    torch.set_num_threads(args.threads)
    setup = TINY if args.tiny else REAL
    n, k = args.candidates, args.keep

    log.info("building the %s UNet and VAE...", "tiny" if args.tiny else "SD1.5")
    base = build_unet(setup)
    vae = build_vae(setup)
    timer = CallTimer()
    model = base.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, TIMER_KEY, timer)
    pos, neg = conditioning(setup, 1), conditioning(setup, 2)

    with tempfile.TemporaryDirectory() as probes_dir:
        folder_paths.add_model_folder_path("probes", probes_dir, is_default=True)
        try:
            runs = _measure(args, setup, model, vae, pos, neg, timer, Path(probes_dir))
        finally:
            folder_paths.folder_names_and_paths["probes"][0].remove(probes_dir)
    repeats, standalone, flops, tap_pool_s = runs
    generate_all, probe_select = merge_runs(repeats["generate_all"]), merge_runs(repeats["probe_select"])

    analysis = analyse(generate_all, probe_select, standalone, flops, tap_pool_s, n, k, args.steps)
    data = {
        "settings": {"candidates": n, "keep": k, "steps": args.steps, "cfg": CFG, "checkpoint": CHECKPOINT,
                     "sampler": SAMPLER, "scheduler": SCHEDULER, "side": setup.latent_side * 8, "tiny": args.tiny,
                     "repeats": args.repeats, "order": run_order(args.repeats)},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "comfyui": _comfyui_version()},
        "models": {"unet_params_M": sum(p.numel() for p in base.model.diffusion_model.parameters()) / 1e6,
                   "vae_params_M": sum(p.numel() for p in vae.first_stage_model.parameters()) / 1e6},
        "runs": {"generate_all": asdict(generate_all), "probe_select": asdict(probe_select)},
        "repeats": {name: [asdict(run) for run in runs] for name, runs in repeats.items()},
        "analysis": analysis,
    }
    log.info("measured ratio %.4f, step model %.4f (%.2f%%), FLOP model %.4f; own work %.3f s = %.3f%%",
             analysis["measured"]["ratio"], analysis["step_model"]["ratio"],
             100 * analysis["step_model"]["relative_error"], analysis["flop_model"]["ratio"],
             analysis["own_work"]["own_s"], analysis["own_work"]["own_pct"])
    stem = args.output_stem or (None if args.tiny else str(RESULTS / "sd15_measured"))
    if stem:
        Path(stem).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(stem + ".json"), json.dumps(data, indent=1, default=str) + "\n")
        atomic_write_text(Path(stem + ".md"), report(data))
        log.info("wrote %s.md", stem)
    return data


def _comfyui_version() -> str:
    try:
        import comfyui_version
        return comfyui_version.__version__
    except ImportError:          # older ComfyUI releases have no version module
        return "unknown"


if __name__ == "__main__":
    # force: importing ComfyUI has configured the root logger already, which would drop these lines.
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    main()
