"""Compaction: every row exactly once (counts and checksum), duplicates dropped, safe under kill -9
at any point, readers opened before it keep working or fail clearly; the dataset report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stream_data import make_manifest, shard_rows, write_dataset
from probe_select.probes.training.compaction import compact_dataset, dataset_checksum, dataset_report
from probe_select.probes.training.dataset import DatasetError, DatasetWriter, ProbeDataset, list_shards
from probe_select.probes.training.streaming import FeatureReader, StreamIndex

HELPER = Path(__file__).resolve().parent / "compaction_proc.py"
ROOT = Path(__file__).resolve().parents[1]


def many_small_shards(root: Path) -> Path:
    """10 shards of 8 rows plus a re-run writer repeating 3 of them (24 duplicate rows)."""
    write_dataset(root, shards=10, prompts_per_shard=4, seeds=2, text_dim=3)
    rerun = DatasetWriter(root, make_manifest(3), writer_id="rerun")
    for shard in (2, 5, 7):
        rerun.append(shard_rows(shard, 4, 2, text_dim=3))
    return root


def sorted_rows(dataset: ProbeDataset) -> tuple[torch.Tensor, list]:
    keys = list(zip(dataset.prompt_ids, dataset.seeds.tolist()))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return dataset.features(0.5)[torch.tensor(order)], [keys[i] for i in order]


def test_compaction_keeps_every_row_once_and_drops_duplicates(tmp_path):
    root = many_small_shards(tmp_path / "ds")
    before = dataset_checksum(root)
    features_before, keys_before = sorted_rows(ProbeDataset(root))
    report = dataset_report(root)
    assert (report["shards"], report["rows_stored"], report["rows"], report["duplicates"], report["prompts"]) == \
        (13, 104, 80, 24, 40)
    result = compact_dataset(root, target_shard_bytes=30 * report["bytes_per_row"])
    assert (result.shards_before, result.rows_before, result.rows_after, result.duplicates_dropped) == (13, 104, 80, 24)
    shards = list_shards(root)
    assert len(shards) == result.shards_after == 3 and all("compact" in p.name for p in shards)
    assert dataset_checksum(root) == before
    after = ProbeDataset(root)
    assert after.duplicates_dropped == 0 and len(after) == 80
    features_after, keys_after = sorted_rows(after)
    assert keys_after == keys_before and torch.equal(features_after, features_before)
    assert dataset_report(root)["bytes"] < report["bytes"]


@pytest.mark.parametrize("phase", ["--pause-after-shards", "--pause-after-deletes"])
def test_compaction_killed_midway_leaves_every_row_readable_exactly_once(tmp_path, phase):
    root = many_small_shards(tmp_path / "ds")
    before = dataset_checksum(root)
    marker = tmp_path / "mid-compaction"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HELPER), str(root), str(marker), phase, "2", "--shard-bytes",
                             str(16 * dataset_report(root)["bytes_per_row"])], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    names = [p.name for p in list_shards(root)]
    assert any("compact" in n for n in names) and any("compact" not in n for n in names)   # really mid-way
    assert dataset_checksum(root) == before
    assert len(ProbeDataset(root)) == 80
    # A second compaction finishes the job.
    compact_dataset(root, target_shard_bytes=40 * dataset_report(root)["bytes_per_row"])
    assert dataset_checksum(root) == before and all("compact" in p.name for p in list_shards(root))


@pytest.mark.parametrize("io", ["pread", "mmap"])
def test_readers_opened_before_compaction_keep_working_or_fail_clearly(tmp_path, io):
    root = many_small_shards(tmp_path / "ds")
    index = StreamIndex(root)
    mapped = FeatureReader(index, checkpoint_k=1, max_open=100, io=io)
    first_rows = index.group_rows([0])
    expected = mapped.features(first_rows)                 # shard 0 mapped before compaction
    dataset = ProbeDataset(root)
    compact_dataset(root, target_shard_bytes=10**9)
    assert torch.equal(mapped.features(first_rows), expected)   # the mapped shard still reads
    with pytest.raises(DatasetError, match="Reopen the dataset"):
        mapped.features(index.group_rows([len(index.groups) - 1]))
    with pytest.raises(DatasetError, match="[Rr]eopen the dataset"):
        dataset.features(0.5)


def test_dataset_command_reports_compacts_and_checksums(tmp_path):
    root = many_small_shards(tmp_path / "ds")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tools.dataset", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    report = json.loads(run("report", str(root), "--json"))
    assert (report["rows"], report["prompts"], report["evaluators"]) == (80, 40, ["clipscore"])
    checksum = run("checksum", str(root))
    assert checksum.startswith("80 rows")
    result = json.loads(run("compact", str(root), "--shard-mb", "1"))
    assert (result["shards_before"], result["shards_after"]) == (13, 1)
    assert run("checksum", str(root)) == checksum
    assert "80 rows (80 stored, 0 duplicates) of 40 prompts" in run("report", str(root))
    failed = subprocess.run([sys.executable, "-m", "tools.dataset", "report", str(tmp_path / "missing")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "does not exist" in failed.stderr
