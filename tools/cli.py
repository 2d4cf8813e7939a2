"""Command line for jobs too big for a graph: collect a dataset with running ComfyUI servers, train a
probe on it, evaluate a probe. Run from the pack folder (the repository root)::

    python -m tools.cli collect --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 \\
        --coco-captions captions_train2017.json --limit 5000 --dataset coco5k --candidates 8 \\
        --output-dir /path/to/ComfyUI/output
    python -m tools.cli train --dataset /path/to/ComfyUI/output/probe_select_datasets/coco5k \\
        --checkpoint 0.2 --out models/probes/sd15_coco5k_t02.safetensors
    python -m tools.cli evaluate --probe models/probes/sd15_coco5k_t02.safetensors \\
        --dataset /path/to/ComfyUI/output/probe_select_datasets/coco5k --json metrics.json

The work is done by :mod:`tools.collect` and :mod:`probe_select.probes.training.pipeline`; this module only parses
arguments, sets up logging and maps errors to exit codes (0 ok, 1 failed, 2 bad arguments or set-up,
130 stopped with Ctrl-C). Messages go to stderr through logging; ``evaluate --json -`` writes the
metrics to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from probe_select.probes.atomic import atomic_write
from probe_select.probes.checkpoints import stored_checkpoint
from probe_select.probes.io import ProbeFileError, load_probe
from probe_select.probes.model import PROBE_INPUT_CHOICES, ProbeConfig, parse_probe_inputs
from probe_select.probes.training.dataset import DATASETS_SUBFOLDER, DatasetError, ProbeDataset
from probe_select.probes.training.distributed import DistributedError
from probe_select.probes.training.evaluation import format_report
from probe_select.probes.training.pipeline import evaluate_on_dataset, train_from_dataset
from probe_select.probes.training.streaming import StreamConfig
from probe_select.probes.training.train import TrainConfig, json_safe

from . import collect

try:                    # optional: without tqdm, progress is logged line by line
    from tqdm.contrib.logging import logging_redirect_tqdm
except ImportError:
    logging_redirect_tqdm = None

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---- collect --------------------------------------------------------------------------------------

def cmd_collect(args: argparse.Namespace) -> int:
    try:
        if args.prompts:
            prompts = collect.load_prompts(args.prompts, args.limit)
        else:
            prompts = collect.load_coco_captions(args.coco_captions, args.limit)
        workflow_path = args.workflow or collect.DEFAULT_WORKFLOW
        workflow = collect.load_workflow(workflow_path)
    except (collect.CollectError, collect.WorkflowError) as error:
        logger.error("%s", error)
        return EXIT_USAGE
    if not prompts:
        logger.error("no prompts to collect")
        return EXIT_USAGE
    logger.info("%d prompts, %d server(s), workflow %s", len(prompts), len(args.server), workflow_path)
    try:
        with _logging_with_progress_bar(not args.no_progress):
            summary = collect.collect(
                args.server, prompts, workflow, candidates=args.candidates, dataset_name=args.dataset,
                writer_settings=_writer_settings(args), output_dir=args.output_dir, base_seed=args.seed, timeout=args.timeout, poll=args.poll,
                queue_wait_timeout=args.queue_wait_timeout, progress=not args.no_progress)
    except (collect.CollectError, collect.WorkflowError) as error:
        logger.error("%s", error)
        return EXIT_USAGE
    for url, n in summary.per_server.items():
        logger.info("%s: %d prompts", url, n)
    for prompt, message in summary.failed:
        logger.error("failed: %r: %s", prompt, message)
    if summary.dataset is not None:
        logger.info("dataset: %s", summary.dataset)
    logger.info("%s", summary.line())
    return EXIT_OK if summary.ok else EXIT_FAILED


def _writer_settings(args: argparse.Namespace) -> dict:
    """The writer inputs given on the command line (the channel reduction, x0_size); the others keep the workflow's."""
    given = {"channel_reduction": args.channel_reduction, "reduced_channels": args.reduced_channels,
             "projection_seed": args.projection_seed, "x0_size": args.x0_size}
    return {name: value for name, value in given.items() if value is not None}


@contextlib.contextmanager
def _logging_with_progress_bar(enabled: bool):
    """Log lines printed above tqdm's bar instead of through it, when tqdm is there."""
    if enabled:
        if logging_redirect_tqdm is not None:
            with logging_redirect_tqdm():
                yield
            return
    yield


# ---- train ----------------------------------------------------------------------------------------

class _StopOnSigint:
    """First Ctrl-C: stop training after the current batch and keep the best probe; second: abort."""

    def __init__(self):
        self.flag = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.flag.is_set():
            raise KeyboardInterrupt
        self.flag.set()
        logger.warning("stopping after this batch (the best probe so far is kept); Ctrl-C again to abort")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        probe_config = None
        if args.probe_config:
            fields = json.loads(args.probe_config)
            if not isinstance(fields, dict):
                raise ValueError("--probe-config must be a JSON object of ProbeConfig fields")
            probe_config = ProbeConfig(**{"in_channels": 1, **fields})   # channels/size come from the dataset
        if args.inputs is not None:
            probe_config = dataclasses.replace(probe_config or ProbeConfig(in_channels=1),
                                               inputs=parse_probe_inputs(args.inputs))
        config = TrainConfig(epochs=args.epochs, batch_prompts=args.batch_prompts, lr=args.lr, seed=args.seed,
                             patience=args.patience, device=_rank_device(args.device))
        stream_config = StreamConfig(num_workers=args.workers, buffer_groups=args.buffer_groups,
                                     state_every_batches=args.state_every_batches, amp=args.amp)
        dataset = ProbeDataset(args.dataset)
        t = stored_checkpoint(dataset.manifest.checkpoints, args.checkpoint)
    except (ValueError, TypeError, DatasetError) as error:
        logger.error("%s", error)
        return EXIT_USAGE
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = dataset.manifest
    logger.info("dataset %s: %d rows of %d prompts, %s %s, checkpoints %s, evaluators %s", dataset.root,
                len(dataset), len(set(dataset.prompt_ids)), m.backbone_family, m.tap,
                [round(x, 4) for x in m.checkpoints], m.evaluators)

    def on_epoch(epoch: int, metrics: dict) -> None:
        logger.info("epoch %d/%d: loss %s, val within-prompt Spearman %s, global Spearman %s, top-1 %s (%.2f s)",
                    epoch + 1, args.epochs, _fmt(metrics["train_loss"]), _fmt(metrics["val_within_spearman"]),
                    _fmt(metrics["val_global_spearman"]), _fmt(metrics["val_top1"]), metrics.get("seconds", 0.0))

    # The trainer logs its own (longer) epoch line; keep ours only unless -v.
    if not args.verbose:
        logging.getLogger("probe_select.probes.training.train").setLevel(logging.WARNING)
        logging.getLogger("probe_select.probes.training.streamed_train").setLevel(logging.WARNING)
    if _rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)     # one report per torchrun job: rank 0's
    try:
        with _StopOnSigint() as sigint:
            result, sizes = train_from_dataset(
                dataset, t, args.evaluator or "", out, train_config=config, use_text=not args.no_text,
                split_seed=args.split_seed, probe_config=probe_config, state_dir=args.state_dir,
                on_epoch=on_epoch, should_stop=sigint.flag.is_set, streaming=args.stream,
                stream_config=stream_config)
    except (ValueError, DatasetError, DistributedError) as error:
        logger.error("%s", error)
        return EXIT_FAILED
    if _rank() != 0:
        return EXIT_OK                  # rank 0 of a torchrun job reports and writes the files
    best = result.best_metrics
    logger.info("rows train/val/test: %d/%d/%d; epochs run: %d (%s)", sizes["train"], sizes["val"], sizes["test"],
                len(result.history), result.stopped)
    logger.info("best epoch %d: %s", result.best_epoch + 1,
                ", ".join(f"val {k} {_fmt(v)}" for k, v in best.items()))
    logger.info("probe written to %s", result.probe_path)
    if args.json:
        _write_json(args.json, {
            "probe": str(result.probe_path), "dataset": str(dataset.root), "checkpoint_t": t,
            "stopped": result.stopped, "best_epoch": result.best_epoch, "best": best, "splits": sizes,
            "history": result.history,
        })
    return EXIT_OK


def _rank() -> int:
    """This process's rank in a ``torchrun`` job (0 when run alone)."""
    return int(os.environ.get("RANK", "0"))


def _rank_device(device: str) -> str:
    """Under ``torchrun``, a bare ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


# ---- evaluate -------------------------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> int:
    try:
        probe, metadata = load_probe(args.probe, device=args.device)
        dataset = ProbeDataset(args.dataset)
        evaluation = evaluate_on_dataset(probe, metadata, dataset, args.split, args.split_seed, streaming=args.stream)
    except (ProbeFileError, DatasetError, ValueError) as error:
        logger.error("%s", error)
        return EXIT_FAILED
    title = f"{Path(args.probe).name} on {dataset.root.name} ({args.split})"
    for line in format_report(evaluation.metrics, metadata.evaluator, title).splitlines():
        logger.info("%s", line)
    if args.json:
        _write_json(args.json, {
            "probe": str(args.probe), "dataset": str(dataset.root), "split": args.split,
            "split_seed": args.split_seed, "evaluator": metadata.evaluator, "checkpoint_t": metadata.checkpoint_t,
            "metrics": evaluation.metrics,
        })
    return EXIT_OK


def _write_json(target: str, data: dict) -> None:
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))
    logger.info("metrics written to %s", path)


# ---- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="more log output")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    parser = argparse.ArgumentParser(
        prog="python -m tools.cli",
        description="Probe-Select: collect activation datasets with running ComfyUI servers, train and evaluate "
                    "probes. Run from the pack folder.")
    sub = parser.add_subparsers(dest="command", metavar="{collect,train,evaluate}")
    sub.required = True

    p = sub.add_parser(
        "collect", parents=[common], help="send one collect workflow per prompt to ComfyUI servers",
        description="Fill an API-format collect workflow for every prompt ({prompt} in string inputs, the "
                    "writer's dataset_name, the collect sampler's candidates and a seed derived from the prompt) "
                    "and run it on the servers, one job in flight per server. Resumable: waits for the servers' "
                    "queues to empty, then skips prompts already in the dataset (needs --output-dir). A failed "
                    "prompt is retried once on another server.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line")
    source.add_argument("--coco-captions", metavar="FILE",
                        help="MS-COCO captions JSON (captions_*.json); repeated captions are dropped")
    p.add_argument("--server", metavar="URL", action="append", required=True,
                   help="ComfyUI base URL, e.g. http://127.0.0.1:8188; repeat for more servers (one worker each)")
    p.add_argument("--limit", type=int, metavar="N", help="use the first N prompts (after de-duplication)")
    p.add_argument("--workflow", metavar="FILE", default=None,
                   help="API-format collect workflow (default: example_workflows/api/SD1.5_collect_probe_dataset.json of the pack; the other families have theirs)")
    p.add_argument("--dataset", metavar="NAME", help="dataset name (default: the writer node's dataset_name)")
    p.add_argument("--candidates", type=int, metavar="N", help="seeds per prompt (default: the workflow's)")
    p.add_argument("--channel-reduction", choices=["none", "pca", "projection"],
                   help="store fewer channels: per-sample PCA or a fixed random projection (default: the workflow's "
                        "writer setting); recorded in the dataset, every row of a dataset uses the same")
    p.add_argument("--reduced-channels", type=int, metavar="K", help="channels kept by the reduction (writer default 48)")
    p.add_argument("--projection-seed", type=int, metavar="N", help="seed of the projection (writer default 0)")
    p.add_argument("--x0-size", type=int, metavar="S",
                   help="also store each candidate's x0 prediction latent pooled to SxS (e.g. 16), for probes that "
                        "read x0 (writer default 0 = none)")
    p.add_argument("--output-dir", metavar="DIR",
                   help=f"the servers' shared output directory (holding {DATASETS_SUBFOLDER}/<NAME>); needed to "
                        f"skip prompts already collected")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="offset added to every prompt's seed (default 0; seeds are derived from the prompt)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="seconds one prompt may take on a server (default %(default)s)")
    p.add_argument("--poll", type=float, default=0.5, metavar="S",
                   help="seconds between two looks at a running job (default %(default)s)")
    p.add_argument("--queue-wait-timeout", type=float, metavar="S",
                   help="give up if the servers' queues are not empty after S seconds at start (default: wait)")
    p.add_argument("--no-progress", action="store_true", help="a log line per prompt instead of a progress bar")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", parents=[common], help="train a probe on a dataset",
                       description="Train a probe on the dataset's train split (by prompt), keep the epoch with "
                                   "the best validation within-prompt Spearman. Ctrl-C stops and keeps the best "
                                   "probe so far.")
    p.add_argument("--dataset", required=True, metavar="DIR", help="dataset folder (holding manifest.json)")
    p.add_argument("--checkpoint", type=float, default=0.2, metavar="T",
                   help="checkpoint t the probe reads (the nearest stored one within 0.05; default %(default)s)")
    p.add_argument("--evaluator", default="", metavar="NAME", help="score to predict (default: the dataset's first)")
    p.add_argument("--out", required=True, metavar="FILE", help="probe file to write (.safetensors)")
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="default %(default)s")
    p.add_argument("--batch-prompts", type=int, default=16, metavar="N", help="prompts per batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, metavar="LR", help="peak learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="initial weights and prompt order (default 0)")
    p.add_argument("--patience", type=int, default=10, metavar="N",
                   help="early stopping patience in epochs; 0 = off (default %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, metavar="N",
                   help="train/val/test split of the prompts (default 0)")
    p.add_argument("--no-text", action="store_true", help="no text branch even if the dataset has text embeddings")
    p.add_argument("--inputs", choices=list(PROBE_INPUT_CHOICES), default=None,
                   help="what the probe reads: activations (default), x0 (the sampler's x0 prediction latent; the "
                        "dataset must store it: collect --x0-size), or activations+x0")
    p.add_argument("--state-dir", metavar="DIR", help="save a resumable training state there (and resume from it)")
    p.add_argument("--probe-config", metavar="JSON",
                   help='ProbeConfig fields as JSON, e.g. \'{"stem_width": 32, "widths": [64, 128]}\'')
    p.add_argument("--device", default="cpu", help="torch device (default cpu; under torchrun, cuda = each process's GPU)")
    p.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                   help="read the features from the shards a batch at a time instead of holding them in memory; "
                        "auto: when they exceed 4 GiB or under torchrun (default %(default)s)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="streaming: DataLoader worker processes reading shards (default 0 = in the trainer)")
    p.add_argument("--buffer-groups", type=int, default=1024, metavar="N",
                   help="streaming: prompts in the shuffle buffer (default %(default)s)")
    p.add_argument("--state-every-batches", type=int, default=0, metavar="N",
                   help="streaming: with --state-dir, also save the state every N batches (resume mid-epoch)")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                   help="streaming on a GPU: autocast dtype (auto = bf16 where supported; CPU never autocasts)")
    p.add_argument("--json", metavar="FILE", help="also write the history and best metrics as JSON ('-' = stdout)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="evaluate a probe on a dataset split",
                       description="Within-prompt and global Spearman and Kendall, top-1 hit rate, selected vs mean "
                                   "and best score of a probe on one split of a dataset.")
    p.add_argument("--probe", required=True, metavar="FILE")
    p.add_argument("--dataset", required=True, metavar="DIR")
    p.add_argument("--split", default="test", choices=["test", "val", "train", "all"])
    p.add_argument("--split-seed", type=int, default=0, metavar="N",
                   help="must match the one used for training (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                   help="read the rows a batch at a time (auto: when the features exceed 4 GiB)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write the metrics as JSON to FILE (no FILE or '-': to stdout)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
