"""Training from datasets larger than memory: throughput (rows/s) and peak resident memory.

    .venv/bin/python bench/bench_streaming.py [--sizes-gb 1 25] [--steps 30] [--workdir DIR] [--keep]

For each size a synthetic dataset (default SD1.5/SDXL row: 640 x 16 x 16 fp16 = 328 KB at one
checkpoint, 5 seeds per prompt, 256 MB shards) is written to a temporary folder (deleted after), and
each configuration trains the default probe for ``--steps`` optimisation steps in its own process:

- ``in-memory``: ``ProbeDataset.arrays`` + ``train_probe`` (the whole split in RAM; only where it
  fits: sizes up to ``--in-memory-max-gb``);
- ``streamed, W workers``: ``StreamIndex`` + ``train_streamed`` reading memory-mapped shards in
  ``W`` DataLoader worker processes (0 = in the training process).

Throughput is rows trained per second from the median step time of the steps after the first
(loading the data, the first batch and the validation at the end are not in it; loading time is
listed separately); each configuration runs ``--repeats`` times in alternating order, because the
machine is shared. Memory: the trainer process's own peak resident set (VmHWM; it includes file
pages read through memory maps) and the peak proportional set size (PSS) summed over the trainer
and its DataLoader workers, sampled every 50 ms. Results merge into bench/results/streaming.json (by size and configuration) and
bench/results/streaming.md is regenerated from it, so a run of one size keeps the other's figures.
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tools  # noqa: E402,F401  (registers the package probe_select, the library's one import name)
from probe_select.probes.atomic import atomic_write_text  # noqa: E402

from probe_select.probes.model import ProbeConfig  # noqa: E402
from probe_select.probes.training.dataset import CandidateRows, DatasetManifest, DatasetWriter, ProbeDataset, split_by_prompt  # noqa: E402
from probe_select.probes.training.pipeline import train_arrays  # noqa: E402
from probe_select.probes.training.streaming import StreamConfig, StreamIndex  # noqa: E402
from probe_select.probes.training.streamed_train import StreamSource, train_streamed  # noqa: E402
from probe_select.probes.training.train import TrainConfig, train_probe  # noqa: E402

log = logging.getLogger("bench_streaming")
RESULTS = ROOT / "bench" / "results"
FEATURE_SHAPE = (640, 16, 16)
SEEDS = 5
SHARD_BYTES = 256 * 2**20
BATCH_PROMPTS = 16
VAL_PROMPTS = 32   # validation only ends the bounded run; kept small and equal for every size
META = {"backbone_family": "sd1", "tap": "output_blocks.7.0", "evaluator": "clipscore"}


def row_bytes() -> int:
    c, p, q = FEATURE_SHAPE
    return c * p * q * 2


def write_dataset(root: Path, gigabytes: float) -> dict:
    """Synthetic rows (one checkpoint): a random block reused with a per-shard roll (writing dominates)."""
    rows_total = int(gigabytes * 1e9 / row_bytes()) // SEEDS * SEEDS
    rows_per_shard = max(SEEDS, SHARD_BYTES // row_bytes() // SEEDS * SEEDS)
    manifest = DatasetManifest(backbone_family="sd1", tap="output_blocks.7.0", feature_shape=FEATURE_SHAPE,
                               checkpoints=[0.2], evaluators=["clipscore"])
    writer = DatasetWriter(root, manifest, writer_id="bench")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(rows_per_shard, 1, *FEATURE_SHAPE, generator=generator).to(torch.float16)
    started = time.perf_counter()
    written = 0
    shard = 0
    while written < rows_total:
        n = min(rows_per_shard, rows_total - written)
        features = base[:n].roll(shard % n, dims=0)
        features[:, 0, 0, 0, 0] = torch.randn(n, generator=generator).to(torch.float16)
        first_prompt = written // SEEDS
        rows = CandidateRows(features=features, seeds=[i % SEEDS for i in range(n)],
                             prompts=[f"prompt {first_prompt + i // SEEDS}" for i in range(n)],
                             scores={"clipscore": torch.randn(n, generator=generator)})
        writer.append(rows)
        written += n
        shard += 1
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in (root / "shards").iterdir())
    log.info("wrote %d rows (%.2f GB) in %d shards to %s in %.0f s", written, size / 1e9, shard, root, seconds)
    return {"rows": written, "bytes": size, "shards": shard, "write_seconds": seconds}


# ---- one measurement (child process) -----------------------------------------------------------

def measure(mode: str, dataset: Path, steps: int, workers: int, out: Path, io: str) -> None:
    probe_config = ProbeConfig(in_channels=FEATURE_SHAPE[0], feature_size=FEATURE_SHAPE[1])
    config = TrainConfig(epochs=1, batch_prompts=BATCH_PROMPTS, patience=0, eval_batch_size=64)
    stamps: list[float] = []

    def should_stop() -> bool:          # called before every batch: stamps[i] = start of batch i
        stamps.append(time.perf_counter())
        return len(stamps) > steps

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "in-memory":
            data = ProbeDataset(dataset)
            arrays = data.arrays(0.2, "clipscore")
            splits = split_by_prompt(arrays.prompt_ids, (0.9, 0.1, 0.0))
            val_prompts = list(dict.fromkeys(arrays.prompt_ids[i] for i in splits["val"].tolist()))[:VAL_PROMPTS]
            val_rows = [i for i in splits["val"].tolist() if arrays.prompt_ids[i] in set(val_prompts)]
            train = train_arrays(arrays.select(splits["train"]), False)
            val = train_arrays(arrays.select(val_rows), False)
            del arrays
            load_seconds = time.perf_counter() - started
            train_probe(train, val, probe_config, config, META, Path(tmp) / "p.safetensors", should_stop=should_stop)
        else:
            index = StreamIndex(dataset)
            splits = index.split_groups((0.9, 0.1, 0.0))
            source = StreamSource(index, splits["train"], splits["val"][:VAL_PROMPTS], 0.2, "clipscore")
            load_seconds = time.perf_counter() - started
            train_streamed(source, probe_config, config, META, Path(tmp) / "p.safetensors",
                           stream_config=StreamConfig(num_workers=workers, io=io), should_stop=should_stop)
    step_seconds = [b - a for a, b in zip(stamps[1:], stamps[2:])]   # batch 0 (warm-up) is left out
    atomic_write_text(out, json.dumps({"load_seconds": load_seconds, "step_seconds": step_seconds,
                               "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over exec
    from the parent, so a child of a big parent would report the parent's peak."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- orchestration ------------------------------------------------------------------------------

def tree_pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants: shared pages split between the processes
    that share them (a forked DataLoader worker shares the trainer's libraries), so the sum is fair."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{current}/task/{current}/children") as handle:
                pending.extend(int(x) for x in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run_child(mode: str, dataset: Path, steps: int, workers: int, io: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, __file__, "--measure", mode, "--dataset", str(dataset), "--steps", str(steps),
               "--workers", str(workers), "--out", str(out), "--io", io]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_pss_bytes(proc.pid))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    out.unlink()
    result["peak_pss_tree_mb"] = peak / 2**20
    return result


def render(results: dict) -> str:
    lines = [
        "# Streaming training: throughput and peak memory",
        "",
        f"Generated by `bench/bench_streaming.py` ({results['machine']}). Default probe (in_channels 640, "
        f"feature_size 16), batch {BATCH_PROMPTS} prompts x {SEEDS} seeds = {BATCH_PROMPTS * SEEDS} rows, synthetic "
        f"rows of 640x16x16 fp16 ({row_bytes() // 1024} KB) at one checkpoint in 256 MB shards. Each configuration "
        f"is its own process trained for a bounded number of steps (not whole epochs); rows/s is over the steps "
        f"after the first (median step time over all repeats; the machine is shared, so the median resists "
        f"other jobs' bursts), repeats run in alternating order. Peak PSS (tree) is the proportional set size "
        f"summed over the trainer and its DataLoader workers, sampled every 50 ms; peak RSS is the trainer "
        f"process's own peak resident set (VmHWM) (it includes file pages read through memory maps).",
        "",
        "| dataset | rows | configuration | steps timed | rows/s (median step) | rows/s (mean step) | load s | "
        "peak PSS tree MB | trainer peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(results["runs"], key=lambda k: (results["runs"][k]["gb"], k)):
        r = results["runs"][key]
        lines.append(f"| {r['gb']:.1f} GB | {r['dataset_rows']} | {r['config']} | {r['steps_timed']} | "
                     f"{r['rows_per_s']:.1f} | {r['rows_per_s_mean']:.1f} | {r['load_seconds']:.1f} | "
                     f"{r['peak_pss_tree_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "## Acceptance (issue 10)", ""]
    runs = results["runs"]
    small = {k: v for k, v in runs.items() if v["gb"] < 5}
    large = {k: v for k, v in runs.items() if v["gb"] > 24}
    mem = next((v for v in small.values() if v["config"] == "in-memory"), None)
    streamed_small = [v for v in small.values() if v["config"].startswith("streamed")]
    if mem and streamed_small:
        for v in sorted(streamed_small, key=lambda v: v["config"]):
            lines.append(f"- Streamed throughput on {mem['gb']:.1f} GB, {v['config']}: {v['rows_per_s']:.1f} rows/s vs "
                         f"in-memory {mem['rows_per_s']:.1f}: {100 * v['rows_per_s'] / mem['rows_per_s']:.0f}% "
                         f"(bar: >= 80%).")
    if large:
        for v in sorted(large.values(), key=lambda v: v["config"]):
            same = next((s for s in streamed_small if s["config"] == v["config"]), None)
            for key, label in (("peak_rss_mb", "trainer RSS"), ("peak_pss_tree_mb", "PSS with workers")):
                ratio = f", {100 * v[key] / same[key]:.0f}% of its {same['gb']:.1f} GB value ({same[key]:.0f} MB; " \
                        f"bar: within 20%)" if same else ""
                lines.append(f"- Peak {label} on {v['gb']:.1f} GB, {v['config']}: {v[key]:.0f} MB (bar: < 3072 MB)"
                             f"{ratio}.")
    else:
        lines.append("- The > 24 GB dataset has not been measured in this report (see the table).")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    lines += ["", "Datasets written: " + "; ".join(f"{d['gb']:.1f} GB = {d['rows']} rows, {d['shards']} shards in "
                                                     f"{d['write_seconds']:.0f} s" for d in results["datasets"].values()), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 25.0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, in alternating order")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--large-workers", type=int, nargs="+", default=[0, 2],
                        help="worker counts measured on datasets above --in-memory-max-gb")
    parser.add_argument("--in-memory-max-gb", type=float, default=8.0)
    parser.add_argument("--workdir", default=None, help="where the temporary datasets go (default: the system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the datasets (for reruns with --reuse)")
    parser.add_argument("--reuse", nargs="+", default=[], metavar="GB=DIR",
                        help="use a dataset kept by an earlier run (--keep) for that size instead of writing one")
    parser.add_argument("--io", choices=["pread", "mmap"], default="pread", help="how the streaming reader reads rows")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.measure:
        measure(args.measure, Path(args.dataset), args.steps, args.workers[0], Path(args.out), args.io)
        return 0

    results_path = RESULTS / "streaming.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}, "datasets": {}}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
                         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    reuse = {float(item.split("=", 1)[0]): Path(item.split("=", 1)[1]) for item in args.reuse}
    for gb in args.sizes_gb:
        free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
        if gb not in reuse and free < gb * 1e9 * 1.2:
            log.error("not enough disk space for %.1f GB (%.1f GB free); skipped", gb, free / 1e9)
            continue
        work = reuse[gb].parent if gb in reuse else Path(tempfile.mkdtemp(prefix=f"bench-streaming-{gb:g}gb-", dir=args.workdir))
        try:
            if gb not in reuse:
                results["datasets"][f"{gb:g}"] = {"gb": gb, **write_dataset(work / "ds", gb)}
            configs = [("in-memory", 0)] if gb <= args.in_memory_max_gb else []
            workers = args.workers if gb <= args.in_memory_max_gb else args.large_workers
            configs += [(f"streamed ({args.io}), {w} workers", w) for w in workers]
            order = [c for repeat in range(args.repeats) for c in (configs if repeat % 2 == 0 else configs[::-1])]
            measured: dict[str, list[dict]] = {}
            for name, w in order:
                log.info("%.1f GB, %s: %d steps", gb, name, args.steps)
                one = run_child("in-memory" if name == "in-memory" else "streamed", work / "ds", args.steps, w, args.io)
                measured.setdefault(name, []).append(one)
                steps = [x for m in measured[name] for x in m["step_seconds"]]
                run = {"gb": gb, "config": name, "dataset_rows": results["datasets"][f"{gb:g}"]["rows"],
                       "repeats": len(measured[name]), "steps_timed": len(steps),
                       "rows_per_s": BATCH_PROMPTS * SEEDS / statistics.median(steps),
                       "rows_per_s_mean": BATCH_PROMPTS * SEEDS / statistics.fmean(steps),
                       "load_seconds": statistics.median(m["load_seconds"] for m in measured[name]),
                       "peak_pss_tree_mb": max(m["peak_pss_tree_mb"] for m in measured[name]),
                       "peak_rss_mb": max(m["peak_rss_mb"] for m in measured[name])}
                results["runs"][f"{gb:g}/{name}"] = run
                log.info("  %.1f rows/s (median step), peak PSS %.0f MB (tree), %.0f MB (trainer VmHWM)",
                         BATCH_PROMPTS * SEEDS / statistics.median(one["step_seconds"]), one["peak_pss_tree_mb"],
                         one["peak_rss_mb"])
                RESULTS.mkdir(parents=True, exist_ok=True)
                atomic_write_text(results_path, json.dumps(results, indent=1))
                atomic_write_text(RESULTS / "streaming.md", render(results))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
