"""Several-process streamed training (DDP, gloo on CPU): same quality as one process, each rank its
own share of prompt groups, and a killed rank is a clear error, not a hang."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_data import write_dataset
from probe_select.probes.training.distributed import rank_share

PROC = Path(__file__).resolve().parent / "dist_train_proc.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(dataset: Path, out: Path, rank: int, world: int, port: int, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if world > 1:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    else:
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(name, None)
    return subprocess.Popen([sys.executable, str(PROC), str(dataset), str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dist") / "ds", shards=8, prompts_per_shard=8, seeds=4)


def test_rank_share_gives_every_batch_to_one_rank_and_equal_step_counts():
    plan = [[i] for i in range(7)]
    shares = [rank_share(plan, rank, 2) for rank in range(2)]
    assert shares[0] == [[0], [2], [4], [6]] and shares[1] == [[1], [3], [5], [0]]   # padded like DistributedSampler
    assert rank_share(plan, 0, 1) == plan


def test_two_gloo_processes_match_one_process_within_noise(dataset, tmp_path):
    port = free_port()
    single = start(dataset, tmp_path / "single", 0, 1, port, "--epochs", "4")
    ranks = [start(dataset, tmp_path / "ddp", rank, 2, port, "--epochs", "4") for rank in range(2)]
    outputs = [proc.communicate(timeout=240) for proc in [single, *ranks]]
    for proc, (_, err) in zip([single, *ranks], outputs):
        assert proc.returncode == 0, err[-3000:]
    one = json.loads(outputs[0][0].strip().splitlines()[-1])["best"]
    two = json.loads(outputs[1][0].strip().splitlines()[-1])["best"]
    assert outputs[2][0].strip() == ""                       # rank 1 writes nothing
    assert (tmp_path / "ddp" / "probe.safetensors").exists()
    print(f"val within-prompt Spearman: 1 process {one['within_spearman']:.3f}, 2 processes "
          f"{two['within_spearman']:.3f}; top-1: {one['top1']:.3f} vs {two['top1']:.3f}")
    # Both learn the ranking (chance is 0), and agree within the noise of 26 validation prompts.
    assert one["within_spearman"] > 0.25 and two["within_spearman"] > 0.25
    assert abs(one["within_spearman"] - two["within_spearman"]) < 0.2
    assert abs(one["global_spearman"] - two["global_spearman"]) < 0.2


def test_killing_one_rank_is_a_clear_error_on_the_other_not_a_hang(dataset, tmp_path):
    port = free_port()
    marker = tmp_path / "rank1-hangs"
    survivor = start(dataset, tmp_path / "out", 0, 2, port, "--timeout", "20")
    victim = start(dataset, tmp_path / "out", 1, 2, port, "--timeout", "20", "--hang-after", "2",
                   "--marker", str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[1][-3000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    started = time.monotonic()
    _, err = survivor.communicate(timeout=90)
    assert survivor.returncode == 3, err[-3000:]
    assert "rank 0 of 2" in err and "stopped answering" in err and "start it again" in err
    assert time.monotonic() - started < 60
