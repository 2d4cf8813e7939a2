"""The log-SNR real SD1.5, SDXL, SD3-medium and FLUX.1-dev schedules reach after 20% of their default steps.

    make bench-noise-levels       # or: .venv/bin/python bench/noise_levels.py [--fraction 0.2]

Each family's model_sampling is the object ComfyUI builds for a loaded checkpoint of it (its
`comfy.supported_models` config and model type, no weights; see nodes/engine/noise_levels.py); its
default schedule comes from ComfyUI's own scheduler. Writes bench/results/noise_levels.json (read by
`probe_select.probes.analysis.noise_levels.load_family_levels` for the report) and bench/results/noise_levels.md.
Takes about a second.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))          # last: ComfyUI's `nodes` must win over the pack's nodes/

from devtools import bootstrap_comfy, load_pack  # noqa: E402

bootstrap_comfy()
load_pack()

from probe_select.nodes.engine.noise_levels import real_family_levels  # noqa: E402
from probe_select.probes.atomic import atomic_write  # noqa: E402
from probe_select.probes.analysis.noise_levels import (FAMILY_LEVELS_PATH, REAL_FAMILIES,  # noqa: E402
                                                       family_levels_json)

log = logging.getLogger("bench.noise_levels")


def markdown(levels, fraction: float) -> str:
    sources = {s.family: s.source for s in REAL_FAMILIES}
    lines = [
        f"# Noise level after {fraction:.0%} of the default steps (real model families)",
        "",
        "Written by `bench/noise_levels.py` from ComfyUI's own `comfy.model_sampling` objects (built from",
        "`comfy.supported_models` configs, no weights) and ComfyUI's schedulers. The checkpoint step is",
        f"round({fraction:g} x steps), the split sampler's rule; sigma is the schedule's sigma at that step.",
        "log-SNR = -2 log sigma for eps/v (VP) models, log((1 - t)^2 / t^2) for flow models (sigma = t).",
        "",
        "| family | kind | steps | scheduler | shift | checkpoint step | t | sigma | log-SNR | defaults from |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for level in levels:
        kind = "flow" if level.kind == "flow" else "eps (VP)"
        lines.append(f"| {level.label} | {kind} | {level.steps} | {level.scheduler} | {level.shift or '-'} | "
                     f"{level.step} | {level.t:.3f} | {level.sigma:.4f} | {level.log_snr:.2f} | "
                     f"{sources[level.family]} |")
    flow = [level.log_snr for level in levels if level.kind == "flow"]
    vp = [level.log_snr for level in levels if level.kind != "flow"]
    if flow and vp:
        lines += ["", f"The same fraction of steps lands on different noise levels: the flow families with their "
                      f"real shifts reach log-SNR {min(flow):.2f} to {max(flow):.2f} at {fraction:.0%}, the eps "
                      f"families {min(vp):.2f} to {max(vp):.2f}."]
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=FAMILY_LEVELS_PATH)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    levels = real_family_levels(args.fraction)
    atomic_write(args.out, lambda p: p.write_text(family_levels_json(levels)))
    md_path = args.out.with_suffix(".md")
    atomic_write(md_path, lambda p: p.write_text(markdown(levels, args.fraction)))
    for level in levels:
        log.info("%s: step %d of %d, sigma %.4f, log-SNR %.3f", level.label, level.step, level.steps, level.sigma,
                 level.log_snr)
    log.info("wrote %s and %s", args.out, md_path)


if __name__ == "__main__":
    main()
