"""Training from datasets larger than memory: throughput (rows/s) and peak resident memory.

    .venv/bin/python bench/bench_streaming.py [--sizes-gb 1 25] [--steps 30] [--workdir DIR] [--keep]

For each size a synthetic dataset (default SD1.5/SDXL row: 640 x 16 x 16 fp16 = 328 KB at one
checkpoint, 5 seeds per prompt, 256 MB shards) is written to a temporary folder (deleted after), and
each configuration trains the default probe for ``--steps`` optimisation steps in its own process:

- ``in-memory``: ``ProbeDataset.arrays`` + ``train_probe`` (the whole split in RAM; only where it
  fits: sizes up to ``--in-memory-max-gb``);
- ``streamed, W workers``: ``StreamIndex`` + ``train_streamed`` reading memory-mapped shards in
  ``W`` DataLoader worker processes (0 = in the training process).

Throughput is rows trained per second over the steps after the first (loading the data, the
first batch and the validation at the end are not in it; loading time is listed separately).
Peak resident memory is sampled every 50 ms as the sum of VmRSS over the training process and its
workers (shared pages counted in every process, so an upper bound), plus the training process's own
``ru_maxrss``. Results merge into bench/results/streaming.json (by size and configuration) and
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

def measure(mode: str, dataset: Path, steps: int, workers: int, out: Path) -> None:
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
                           stream_config=StreamConfig(num_workers=workers), should_stop=should_stop)
    import resource  # noqa: PLC0415  (only the child process reports its own peak)
    timed = len(stamps) - 2            # batches between the start of batch 1 and the start of the last stop check
    rows = timed * BATCH_PROMPTS * SEEDS
    seconds = stamps[-1] - stamps[1]
    out.write_text(json.dumps({"load_seconds": load_seconds, "steps_timed": timed, "rows": rows, "seconds": seconds,
                               "rows_per_s": rows / seconds,
                               "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# ---- orchestration ------------------------------------------------------------------------------

def tree_rss_bytes(pid: int) -> int:
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{current}/task/{current}/children") as handle:
                pending.extend(int(x) for x in handle.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run_child(mode: str, dataset: Path, steps: int, workers: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, __file__, "--measure", mode, "--dataset", str(dataset), "--steps", str(steps),
               "--workers", str(workers), "--out", str(out)]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} measurement failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    out.unlink()
    result["peak_rss_tree_mb"] = peak / 2**20
    return result


def render(results: dict) -> str:
    lines = [
        "# Streaming training: throughput and peak memory",
        "",
        f"Generated by `bench/bench_streaming.py` ({results['machine']}). Default probe (in_channels 640, "
        f"feature_size 16), batch {BATCH_PROMPTS} prompts x {SEEDS} seeds = {BATCH_PROMPTS * SEEDS} rows, synthetic "
        f"rows of 640x16x16 fp16 ({row_bytes() // 1024} KB) at one checkpoint in 256 MB shards. Each configuration "
        f"is its own process trained for a bounded number of steps (not whole epochs); rows/s is over the steps "
        f"after the first. Peak RSS (tree) is the sum of VmRSS over the trainer and its DataLoader workers "
        f"sampled every 50 ms (shared pages counted per process); ru_maxrss is the trainer process alone.",
        "",
        "| dataset | rows | configuration | steps timed | rows/s | load s | peak RSS tree MB | ru_maxrss MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(results["runs"], key=lambda k: (results["runs"][k]["gb"], k)):
        r = results["runs"][key]
        lines.append(f"| {r['gb']:.1f} GB | {r['dataset_rows']} | {r['config']} | {r['steps_timed']} | "
                     f"{r['rows_per_s']:.1f} | {r['load_seconds']:.1f} | {r['peak_rss_tree_mb']:.0f} | "
                     f"{r['ru_maxrss_mb']:.0f} |")
    lines += ["", "## Acceptance (issue 10)", ""]
    runs = results["runs"]
    small = {k: v for k, v in runs.items() if v["gb"] < 5}
    large = {k: v for k, v in runs.items() if v["gb"] > 24}
    mem = next((v for v in small.values() if v["config"] == "in-memory"), None)
    streamed_small = [v for v in small.values() if v["config"].startswith("streamed")]
    if mem and streamed_small:
        best = max(streamed_small, key=lambda v: v["rows_per_s"])
        zero = next((v for v in streamed_small if v["config"] == "streamed, 0 workers"), best)
        lines.append(f"- Streamed throughput on {mem['gb']:.1f} GB: {zero['rows_per_s']:.1f} rows/s with 0 workers, "
                     f"best {best['rows_per_s']:.1f} ({best['config']}) vs in-memory {mem['rows_per_s']:.1f}: "
                     f"{100 * best['rows_per_s'] / mem['rows_per_s']:.0f}% (bar: >= 80%).")
    if large:
        for v in sorted(large.values(), key=lambda v: v["config"]):
            same = next((s for s in streamed_small if s["config"] == v["config"]), None)
            ratio = f", {100 * v['peak_rss_tree_mb'] / same['peak_rss_tree_mb']:.0f}% of its {same['gb']:.1f} GB value " \
                    f"({same['peak_rss_tree_mb']:.0f} MB; bar: within 20%)" if same else ""
            lines.append(f"- Peak RSS on {v['gb']:.1f} GB, {v['config']}: {v['peak_rss_tree_mb']:.0f} MB (bar: < 3072 MB)"
                         f"{ratio}.")
    else:
        lines.append("- The > 24 GB dataset has not been measured in this report (see the table).")
    lines += ["", "Datasets written: " + "; ".join(f"{d['gb']:.1f} GB = {d['rows']} rows, {d['shards']} shards in "
                                                     f"{d['write_seconds']:.0f} s" for d in results["datasets"].values()), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 25.0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--large-workers", type=int, nargs="+", default=[0, 2],
                        help="worker counts measured on datasets above --in-memory-max-gb")
    parser.add_argument("--in-memory-max-gb", type=float, default=8.0)
    parser.add_argument("--workdir", default=None, help="where the temporary datasets go (default: the system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the datasets (for reruns)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.measure:
        measure(args.measure, Path(args.dataset), args.steps, args.workers[0], Path(args.out))
        return 0

    results_path = RESULTS / "streaming.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}, "datasets": {}}
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
                         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    for gb in args.sizes_gb:
        free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
        if free < gb * 1e9 * 1.2:
            log.error("not enough disk space for %.1f GB (%.1f GB free); skipped", gb, free / 1e9)
            continue
        work = Path(tempfile.mkdtemp(prefix=f"bench-streaming-{gb:g}gb-", dir=args.workdir))
        try:
            results["datasets"][f"{gb:g}"] = {"gb": gb, **write_dataset(work / "ds", gb)}
            configs = [("in-memory", 0)] if gb <= args.in_memory_max_gb else []
            workers = args.workers if gb <= args.in_memory_max_gb else args.large_workers
            configs += [(f"streamed, {w} workers", w) for w in workers]
            for name, w in configs:
                log.info("%.1f GB, %s: %d steps", gb, name, args.steps)
                run = run_child("in-memory" if name == "in-memory" else "streamed", work / "ds", args.steps, w)
                run.update(gb=gb, config=name, dataset_rows=results["datasets"][f"{gb:g}"]["rows"])
                results["runs"][f"{gb:g}/{name}"] = run
                log.info("  %.1f rows/s, peak RSS %.0f MB (tree), %.0f MB (ru_maxrss)", run["rows_per_s"],
                         run["peak_rss_tree_mb"], run["ru_maxrss_mb"])
                RESULTS.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=1))
                (RESULTS / "streaming.md").write_text(render(results))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
