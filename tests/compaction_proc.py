"""A compaction in its own process, for the kill -9 tests of tests/test_compaction.py.

``python compaction_proc.py DATASET MARKER --pause-after-shards N`` stops (sleeps) after its N-th new
shard is visible; ``--pause-after-deletes N`` stops after deleting N old shards. Either way it first
writes MARKER, so the parent knows it is mid-compaction and can SIGKILL it.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tools  # noqa: E402,F401  (registers the package probe_select)
from probe_select.probes.training.compaction import compact_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("marker")
    parser.add_argument("--pause-after-shards", type=int, default=0)
    parser.add_argument("--pause-after-deletes", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=4096)
    args = parser.parse_args()
    written = []

    def hang() -> None:
        Path(args.marker).touch()
        time.sleep(3600)

    def on_shard(path: Path) -> None:
        written.append(path)
        if len(written) == args.pause_after_shards:
            hang()

    if args.pause_after_deletes:
        deletes = []
        unlink = pathlib.Path.unlink

        def counting_unlink(self, missing_ok=False):
            unlink(self, missing_ok=missing_ok)
            if self.name.startswith("shard-") and "compact" not in self.name:
                deletes.append(self)
                if len(deletes) == args.pause_after_deletes:
                    hang()

        pathlib.Path.unlink = counting_unlink
    compact_dataset(args.dataset, args.shard_bytes, on_shard_written=on_shard)


if __name__ == "__main__":
    main()
