"""A dataset writer in its own process, for the crash and concurrency tests of tests/test_dataset.py.

Run as a script it appends ``--shards`` shards of ``--rows`` rows (from :func:`make_rows`) to a
dataset, optionally:

- ``--ready FILE --go FILE``: touch ``ready`` once imported, then wait for ``go`` before opening the
  writer, so that two processes create the same new dataset at the same moment;
- ``--pingpong OTHER``: before its shard i, wait until writer ``OTHER`` has i shards, so that two
  processes' appends interleave deterministically;
- ``--hang MARKER``: after the good shards, start one more (large) append whose write stops half-way,
  writes the temporary file's path to ``MARKER`` and sleeps, so the parent can SIGKILL it mid-write.

Imported by the tests, it provides the shared manifest and the row generator, so the parent knows
exactly which rows each process wrote.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import tools  # noqa: E402,F401  (registers the package probe_select, the library's one import name)
from probe_select.probes.training.dataset import writer as writer_module  # noqa: E402
from probe_select.probes.training.dataset import CandidateRows, DatasetManifest, DatasetWriter  # noqa: E402

CHECKPOINTS = [0.1, 0.2, 0.4]
EVALUATORS = ["clipscore", "imagereward"]
FEATURE_SHAPE = (4, 4, 4)
TEXT_DIM = 6
SEEDS_PER_PROMPT = 2


def make_manifest(**overrides) -> DatasetManifest:
    fields = dict(backbone_family="sd2", tap="output_blocks.7.0", feature_shape=FEATURE_SHAPE,
                  pooling="adaptive_avg", checkpoints=CHECKPOINTS, evaluators=EVALUATORS, text_dim=TEXT_DIM)
    return DatasetManifest(**{**fields, **overrides})


def row_key(tag: str, index: int) -> tuple[str, int]:
    """(prompt text, seed) of global row ``index`` of writer ``tag``: two seeds per prompt."""
    return f"{tag} prompt {index // SEEDS_PER_PROMPT}", 1000 + index


def make_rows(tag: str, start: int, count: int, shape=FEATURE_SHAPE, k: int = len(CHECKPOINTS)) -> CandidateRows:
    """Rows ``start .. start+count-1`` of writer ``tag``; every value derives from (tag, index)."""
    keys = [row_key(tag, i) for i in range(start, start + count)]
    offset = sum(map(ord, tag))
    features, text = [], []
    for i in range(start, start + count):
        generator = torch.Generator().manual_seed(offset * 100_003 + i)
        features.append(torch.randn(k, *shape, generator=generator))
        text.append(torch.randn(TEXT_DIM, generator=generator))
    index = torch.arange(start, start + count, dtype=torch.float32)
    return CandidateRows(
        features=torch.stack(features) if features else torch.zeros(0, k, *shape),
        seeds=[seed for _, seed in keys],
        prompts=[prompt for prompt, _ in keys],
        text_embedding=torch.stack(text) if text else torch.zeros(0, TEXT_DIM),
        scores={"clipscore": 0.25 * index + offset, "imagereward": -index},
    )


def _wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.005)


def _hang_mid_write(marker: Path):
    """A stand-in for safetensors' save_file that dies as the real one would half-way: the real one
    writes to a ``.tmpXXXXXX`` sibling and renames it onto ``filename`` when complete; this one
    writes half the bytes there, reports both paths, then hangs."""
    from safetensors.torch import save

    def partial_save_file(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        sibling = Path(filename).with_name(".tmp" + secrets.token_hex(3))
        with open(sibling, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        temp = marker.with_name(marker.name + ".part")
        temp.write_text(json.dumps({"temp": str(filename), "sibling": str(sibling), "size": len(data)}))
        os.replace(temp, marker)
        time.sleep(300)  # the parent kills this process with SIGKILL now

    return partial_save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root")
    parser.add_argument("--writer-id", default=None)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--pingpong", default=None)
    parser.add_argument("--hang", type=Path)
    args = parser.parse_args()
    root = Path(args.root)

    if args.ready:
        args.ready.touch()
    if args.go:
        _wait_for(args.go.exists, f"go file {args.go}")
    writer = DatasetWriter(root, make_manifest(), writer_id=args.writer_id)
    totals = []
    for shard in range(args.shards):
        if args.pingpong:
            def other_has_enough(shard=shard):
                return len(list((root / "shards").glob(f"shard-{args.pingpong}-*.safetensors"))) >= shard
            _wait_for(other_has_enough, f"{shard} shards of writer {args.pingpong}")
        totals.append(writer.append(make_rows(args.tag, shard * args.rows, args.rows)))
    print(json.dumps({"writer_id": writer.writer_id, "totals": totals}), flush=True)
    if args.hang:
        writer_module.save_file = _hang_mid_write(args.hang)
        writer.append(make_rows(args.tag, args.shards * args.rows, 64))
        raise SystemExit("the hanging append returned; it should have been killed")


if __name__ == "__main__":
    main()
