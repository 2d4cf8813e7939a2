"""Training throughput of the default probe on this machine's CPU (synthetic data).

    .venv/bin/python bench/bench_train.py [--threads T [T ...]] [--steps S] [--batch-prompts B] [--seeds N]

Writes bench/results/train.md and bench/results/train.json. Every figure comes from this run.

Measured, for the default ProbeConfig (in_channels 320, feature_size 16) with and without a
768-wide text branch:
- one optimisation step (forward + ranking/InfoNCE loss + backward + AdamW + EMA update) on a
  batch of B prompts x N seeds, timed over S steps after warm-up steps (median per step);
- forward + backward alone;
- end to end: train_probe for 2 epochs (includes batching, validation and saving the probe).
Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
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

from probe_select.probes.training.losses import ProbeLoss  # noqa: E402
from probe_select.probes.model import ProbeConfig, build_probe  # noqa: E402
from probe_select.probes.training.train import TrainArrays, TrainConfig, ema_update, make_optimizer, train_probe  # noqa: E402

log = logging.getLogger("bench_train")
RESULTS = ROOT / "bench" / "results"


def synthetic(config: ProbeConfig, prompts: int, seeds: int, seed: int) -> TrainArrays:
    gen = torch.Generator().manual_seed(seed)
    shape = (config.in_channels, config.feature_size, config.feature_size)
    features = torch.randn(prompts, 1, *shape, generator=gen) + 0.5 * torch.randn(prompts, seeds, *shape, generator=gen)
    target = features[:, :, :8].mean(dim=(2, 3, 4)) + torch.randn(prompts, 1, generator=gen)
    text = None
    if config.text_dim:
        text = torch.randn(prompts, config.text_dim, generator=gen).repeat_interleave(seeds, 0)
    return TrainArrays(features=features.reshape(-1, *shape).half(), t=0.2,
                       group=torch.arange(prompts).repeat_interleave(seeds),
                       target=target.reshape(-1).float(), text=text)


def step_times(config: ProbeConfig, batch_prompts: int, seeds: int, steps: int, warmup: int, full_step: bool) -> list[float]:
    data = synthetic(config, batch_prompts, seeds, seed=0)
    model = build_probe(config, seed=0).train()
    ema = build_probe(config, seed=0).eval()
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn = ProbeLoss(lambda_align=10.0)
    z = (data.target - data.target.mean()) / data.target.std()
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        _, terms = loss_fn(model, data.features, 0.2, z, data.group, 0.5, 0.1, data.text)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if full_step:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema_update(ema, model, 0.999)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def end_to_end(config: ProbeConfig, batch_prompts: int, seeds: int) -> dict:
    train = synthetic(config, 4 * batch_prompts, seeds, seed=1)
    val = synthetic(config, batch_prompts, seeds, seed=2)
    tc = TrainConfig(epochs=2, batch_prompts=batch_prompts, patience=0)
    meta = dict(backbone_family="bench", tap="bench", checkpoint_t=0.2, evaluator="synthetic")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        result = train_probe(train, val, config, tc, meta, Path(folder) / "probe.safetensors")
        total = time.perf_counter() - started
    return {
        "train_rows": len(train), "val_rows": len(val), "epochs": 2, "wall_s": total,
        "train_samples_per_s_per_epoch": [entry["samples_per_s"] for entry in result.history],
        "overall_rows_per_s": 2 * len(train) / total,
    }


def _fmt_load(load) -> str:
    return "n/a" if load is None else f"{load[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                        help="torch thread counts to measure (default: 1 and all cores)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("probes").setLevel(logging.WARNING)
    batch = args.batch_prompts * args.seeds
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows = []
    for threads, text_dim in [(n, d) for n in args.threads for d in (0, 768)]:
        torch.set_num_threads(threads)
        config = ProbeConfig(in_channels=320, feature_size=16, text_dim=text_dim)
        params = sum(p.numel() for p in build_probe(config).parameters())
        fwd_bwd_times = step_times(config, args.batch_prompts, args.seeds, args.steps, args.warmup, full_step=False)
        step_times_ = step_times(config, args.batch_prompts, args.seeds, args.steps, args.warmup, full_step=True)
        fwd_bwd, step = statistics.median(fwd_bwd_times), statistics.median(step_times_)
        e2e = end_to_end(config, args.batch_prompts, args.seeds)
        row = {
            "threads": threads, "text_dim": text_dim, "params": params, "batch_rows": batch,
            "fwd_bwd_s": fwd_bwd, "fwd_bwd_samples_per_s": batch / fwd_bwd,
            "step_s": step, "step_samples_per_s": batch / step,
            "step_best_s": min(step_times_), "step_best_samples_per_s": batch / min(step_times_),
            "fwd_bwd_times_s": fwd_bwd_times, "step_times_s": step_times_, "end_to_end": e2e,
        }
        log.info("%d thread(s), text_dim %d: %.1f samples/s (fwd+bwd), %.1f samples/s (full step)", threads, text_dim,
                 row["fwd_bwd_samples_per_s"], row["step_samples_per_s"])
        rows.append(row)

    machine = {
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "torch": torch.__version__, "device": "cpu",
    }
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine["load_average_1m_before_after"] = [load_before and load_before[0], load_after and load_after[0]]
    report = {"machine": machine, "batch_prompts": args.batch_prompts, "seeds": args.seeds,
              "steps": args.steps, "warmup": args.warmup, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "train.json", json.dumps(report, indent=1))

    lines = [
        "# Training throughput",
        "",
        f"Command: `bench/bench_train.py --threads {' '.join(map(str, args.threads))} --steps {args.steps} --batch-prompts "
        f"{args.batch_prompts} --seeds {args.seeds}`. Machine: {machine['cpu_count']} cores "
        f"({machine['machine']}), torch {machine['torch']} on CPU. 1-minute load average before/after: "
        f"{_fmt_load(load_before)} / {_fmt_load(load_after)} (other processes on the machine slow the "
        f"multi-thread figures most).",
        "",
        f"Default ProbeConfig (in_channels 320, feature_size 16), synthetic fp16 features, batch = "
        f"{args.batch_prompts} prompts x {args.seeds} seeds = {batch} rows. Median of {args.steps} steps "
        f"after {args.warmup} warm-up step(s). A full step is forward + ranking loss (+ InfoNCE with a text "
        f"branch) + backward + grad clip + AdamW + EMA update. The train_probe column is one 2-epoch run "
        f"on {4 * args.batch_prompts} prompts (single measurement, so noisier than the medians).",
        "",
        "| threads | probe | params | fwd+bwd per batch | fwd+bwd samples/s | full step per batch | full step samples/s | full step samples/s, fastest step | train_probe rows/s (2 epochs, incl. validation + save) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        name = "image only" if row["text_dim"] == 0 else f"text branch ({row['text_dim']})"
        lines.append(
            f"| {row['threads']} | {name} | {row['params'] / 1e6:.2f} M | {row['fwd_bwd_s']:.3f} s | {row['fwd_bwd_samples_per_s']:.1f} | "
            f"{row['step_s']:.3f} s | {row['step_samples_per_s']:.1f} | {row['step_best_samples_per_s']:.1f} | {row['end_to_end']['overall_rows_per_s']:.1f} |"
        )
    fastest = max(rows, key=lambda row: row["step_samples_per_s"])
    lines += [
        "",
        f"At {fastest['step_samples_per_s']:.0f} samples/s (best above: {fastest['threads']} thread(s)), one "
        f"epoch over 10k prompts x 5 seeds (50k rows) takes about "
        f"{50_000 / fastest['step_samples_per_s'] / 60:.0f} min on this CPU.",
        "",
    ]
    atomic_write_text(RESULTS / "train.md", "\n".join(lines))
    log.info("wrote %s and %s", RESULTS / "train.md", RESULTS / "train.json")


if __name__ == "__main__":
    main()
