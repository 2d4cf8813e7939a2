"""One rank of a streamed training job, for tests/test_distributed.py (started like torchrun does:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

``python dist_train_proc.py DATASET OUT_DIR [--epochs N] [--hang-after K --marker FILE]``: trains
with the settings the test compares; rank 0 prints the validation metrics as JSON. With
``--hang-after``, this rank touches ``marker`` after K batches and then hangs (the test kills it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stream_data import tiny_probe_config  # noqa: E402
from probe_select.probes.training.distributed import DistributedError  # noqa: E402
from probe_select.probes.training.streaming import StreamConfig, StreamIndex  # noqa: E402
from probe_select.probes.training.streamed_train import StreamSource, train_streamed  # noqa: E402
from probe_select.probes.training.train import TrainConfig  # noqa: E402

META = {"backbone_family": "sd2", "tap": "output_blocks.7.0", "evaluator": "clipscore"}
SPLIT = (0.6, 0.4, 0.0)


def config(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_prompts=4, lr=1e-2, ema_decay=0.5, patience=0, seed=1)


def source(root: str) -> StreamSource:
    index = StreamIndex(root)
    splits = index.split_groups(SPLIT)
    return StreamSource(index, splits["train"], splits["val"], 0.5, "clipscore")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--hang-after", type=int, default=0)
    parser.add_argument("--marker", default="")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    batches = {"n": 0}

    def should_stop() -> bool:
        batches["n"] += 1
        if args.hang_after and batches["n"] > args.hang_after:
            Path(args.marker).touch()
            time.sleep(3600)
        return False

    try:
        result = train_streamed(source(args.dataset), tiny_probe_config(), config(args.epochs), META,
                                Path(args.out) / "probe.safetensors",
                                stream_config=StreamConfig(buffer_groups=8, dist_timeout_s=args.timeout),
                                should_stop=should_stop)
    except DistributedError as error:
        print(f"DistributedError: {error}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"best": result.best_metrics, "history": result.history}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
