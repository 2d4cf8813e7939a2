"""Dataset maintenance from the command line (run from the pack folder)::

    python -m tools.dataset report  DIR [--json]       size, shards, rows, prompts, evaluators
    python -m tools.dataset compact DIR [--shard-mb N]  many small shards -> few large ones, duplicates dropped
    python -m tools.dataset checksum DIR               rows and a layout-independent checksum of the rows

Compaction is safe to kill at any moment and while writers append (see
:mod:`probe_select.probes.training.compaction`). Exit codes: 0 ok, 1 failed (message on stderr).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from . import library_package

library_package()

from probe_select.probes.training.compaction import (  # noqa: E402  (needs the package registered first)
    compact_dataset,
    dataset_checksum,
    dataset_report,
    format_dataset_report,
)
from probe_select.probes.training.dataset import DatasetError  # noqa: E402

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.dataset", description="Probe-Select dataset maintenance.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="size, shards, rows, prompts and evaluators of a dataset")
    p.add_argument("dataset", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("compact", help="rewrite the shards into fewer large ones, duplicates dropped")
    p.add_argument("dataset", metavar="DIR")
    p.add_argument("--shard-mb", type=float, default=512.0, help="target shard size in MiB (default %(default)s)")
    p = sub.add_parser("checksum", help="rows and a checksum of the rows, independent of the shard layout")
    p.add_argument("dataset", metavar="DIR")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "report":
            report = dataset_report(args.dataset)
            sys.stdout.write((json.dumps(report, indent=1) if args.json else format_dataset_report(report)) + "\n")
        elif args.command == "compact":
            if not args.shard_mb > 0:
                raise ValueError("--shard-mb must be > 0")
            result = compact_dataset(args.dataset, int(args.shard_mb * 2**20))
            sys.stdout.write(json.dumps(result.__dict__) + "\n")
        else:
            rows, digest = dataset_checksum(args.dataset)
            sys.stdout.write(f"{rows} rows, sha256 {digest}\n")
    except (DatasetError, ValueError) as error:
        logger.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
