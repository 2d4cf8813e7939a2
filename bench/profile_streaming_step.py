"""Where a streamed training step spends its time when the data is not in the page cache.

    .venv/bin/python bench/profile_streaming_step.py [--gb 0.5] [--steps 10] [--workdir DIR]
    .venv/bin/python bench/profile_streaming_step.py --dataset DIR     # an existing (e.g. 25 GB) dataset

The open item of bench/results/streaming.md: training on 25 GB ran at 6-9 rows/s although reading
alone (69-91 rows/s) and training on cached data (~55 rows/s) predict ~30. A 25 GB run takes an
hour; this reproduces the one thing that differs, cold reads, on a small dataset: before every
batch the shards' pages are dropped from the page cache (``posix_fadvise(DONTNEED)``, no root
needed), so each batch is read from the disk as on a dataset larger than memory. The real trainer
(``train_streamed``, default probe, 16 prompts x 5 seeds, 0 workers) runs ``--steps`` steps per
configuration; per step it records the wall time, the time spent reading the batch (the reader's
``read_batch``), and the process's block reads and major page faults (``getrusage``).
Prints a table (and JSON with ``--json``). Not part of the test suite.

Caveat: the guest's page cache is dropped, not the virtual disk's host's, so on a VM a small
dataset may still be served from the host's memory; ``--dataset`` on a dataset larger than the
host's cache measures true disk reads.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_streaming  # noqa: E402  (its dataset writer and constants: the same rows as the benchmark)

from probe_select.probes.model import ProbeConfig  # noqa: E402
from probe_select.probes.training import streaming  # noqa: E402
from probe_select.probes.training.streamed_train import StreamSource, train_streamed  # noqa: E402
from probe_select.probes.training.streaming import StreamConfig, StreamIndex  # noqa: E402
from probe_select.probes.training.train import TrainConfig  # noqa: E402

log = logging.getLogger("profile_streaming_step")


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def profile(dataset: Path, steps: int, io: str, cold: bool) -> dict:
    index = StreamIndex(dataset)
    shard_paths = [shard.path for shard in index.shards]
    splits = index.split_groups((0.9, 0.1, 0.0))
    source = StreamSource(index, splits["train"], splits["val"][:bench_streaming.VAL_PROMPTS], 0.2, "clipscore")
    reads: list[float] = []
    stamps: list[tuple[float, int, int]] = []
    original = streaming.read_batch

    def timed_read_batch(reader, spec, group_ids):
        if cold:
            drop_from_page_cache(shard_paths)
        started = time.perf_counter()
        batch = original(reader, spec, group_ids)
        reads.append(time.perf_counter() - started)
        return batch

    def should_stop() -> bool:          # before every batch: the start of the batch
        usage = resource.getrusage(resource.RUSAGE_SELF)
        stamps.append((time.perf_counter(), usage.ru_inblock, usage.ru_majflt))
        return len(stamps) > steps

    if cold:
        drop_from_page_cache(shard_paths)
    # read_batch is looked up at call time by PlannedBatches (module global): timed in this process only.
    streaming.read_batch = timed_read_batch
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_streamed(source, ProbeConfig(in_channels=640, feature_size=16),
                           TrainConfig(epochs=1, batch_prompts=bench_streaming.BATCH_PROMPTS, patience=0,
                                       eval_batch_size=64),
                           bench_streaming.META, Path(tmp) / "p.safetensors",
                           stream_config=StreamConfig(num_workers=0, io=io), should_stop=should_stop)
    finally:
        streaming.read_batch = original
    rows = bench_streaming.BATCH_PROMPTS * bench_streaming.SEEDS
    # Step i runs from stamp i to stamp i + 1 and reads batch i + 1 at its end (the loader fetches the next
    # batch before should_stop): pair step i with read i + 1. Step 0 (warm-up) is left out.
    per_step = []
    for i in range(1, len(stamps) - 1):
        (t0, blocks0, faults0), (t1, blocks1, faults1) = stamps[i], stamps[i + 1]
        per_step.append({"wall": t1 - t0, "read": reads[i + 1] if i + 1 < len(reads) else float("nan"),
                         "read_mb": (blocks1 - blocks0) * 512 / 2**20, "major_faults": faults1 - faults0})
    wall = statistics.median(s["wall"] for s in per_step)
    read = statistics.median(s["read"] for s in per_step)
    return {"io": io, "cold": cold, "steps": len(per_step), "wall_s": wall, "read_s": read, "compute_s": wall - read,
            "rows_per_s": rows / wall, "read_rows_per_s": rows / read,
            "disk_mb_per_step": statistics.median(s["read_mb"] for s in per_step),
            "major_faults_per_step": statistics.median(s["major_faults"] for s in per_step), "per_step": per_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--dataset", default=None, help="profile this existing dataset (one checkpoint t=0.2, "
                                                         "evaluator clipscore, 640x16x16 rows) instead of writing one")
    parser.add_argument("--json", default=None, help="also write the results there")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("probe_select").setLevel(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        if args.dataset:
            dataset, written = Path(args.dataset), {"path": args.dataset}
        else:
            dataset = Path(tmp) / "ds"
            written = bench_streaming.write_dataset(dataset, args.gb)
        os.sync()
        log.info("load average before: %s", os.getloadavg())
        for io, cold in (("pread", False), ("pread", True), ("mmap", True), ("pread", False), ("pread", True)):
            result = profile(dataset, args.steps, io, cold)
            result["loadavg"] = os.getloadavg()
            results.append(result)
            log.info("%s %s: %.2f s/step (read %.2f s, compute %.2f s) = %.1f rows/s; disk %.0f MB/step, "
                     "%d major faults/step, load %s", io, "cold" if cold else "warm", result["wall_s"],
                     result["read_s"], result["compute_s"], result["rows_per_s"], result["disk_mb_per_step"],
                     result["major_faults_per_step"], result["loadavg"])
    print("| reader | page cache | s/step | read s | compute s | rows/s | read rows/s | disk MB/step | major faults/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['io']} | {'dropped' if r['cold'] else 'warm'} | {r['wall_s']:.2f} | {r['read_s']:.2f} | "
              f"{r['compute_s']:.2f} | {r['rows_per_s']:.1f} | {r['read_rows_per_s']:.0f} | {r['disk_mb_per_step']:.0f} | "
              f"{r['major_faults_per_step']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": written, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
