"""Activation datasets: round trip, manifest checks and races, crashes mid-write, concurrent
writers, corrupt shards, duplicate rows, prompt splits, and probe/dataset compatibility."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dataset_writer_proc import CHECKPOINTS, EVALUATORS, FEATURE_SHAPE, TEXT_DIM, make_manifest, make_rows, row_key
from probe_select.probes.training.dataset import (
    STALE_TEMP_SECONDS,
    CandidateRows,
    DatasetArrays,
    DatasetError,
    DatasetManifest,
    DatasetWriter,
    ProbeDataset,
    check_probe_matches,
    list_shards,
    prompt_id,
    read_manifest,
    split_by_prompt,
)
from probe_select.probes.io import ProbeMetadata
from probe_select.probes.model import ProbeConfig

HELPER = Path(__file__).resolve().parent / "dataset_writer_proc.py"


def cat_rows(batches: list[CandidateRows]) -> dict:
    return {
        "features": torch.cat([b.features for b in batches]),
        "seeds": torch.cat([b.seeds for b in batches]),
        "prompts": [p for b in batches for p in b.prompts],
        "prompt_ids": [p for b in batches for p in b.prompt_ids],
        "text": torch.cat([b.text_embedding for b in batches]),
        "scores": {e: torch.cat([b.scores[e] for b in batches]) for e in EVALUATORS},
    }


def start_helper(root: Path, tag: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(HELPER), str(root), "--tag", tag, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"helper failed ({proc.returncode}):\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------


def test_round_trip_order_and_running_total(tmp_path):
    root = tmp_path / "ds"
    writer = DatasetWriter(root, make_manifest(), writer_id="w1")
    batches = [make_rows("a", 0, 2), make_rows("a", 2, 3), make_rows("a", 5, 4)]
    totals = [writer.append(batch) for batch in batches]
    assert totals == [2, 5, 9]
    assert [p.name for p in list_shards(root)] == [f"shard-w1-{i:06d}.safetensors" for i in range(3)]
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "shards"]

    # The shard layout promised to other tools.
    with safe_open(str(list_shards(root)[1]), framework="pt") as handle:
        assert set(handle.keys()) == {"features", "seeds", "text_embedding", "score.clipscore", "score.imagereward"}
        meta = handle.metadata()
        assert set(meta) == {"format", "format_version", "prompts", "prompt_ids", "checkpoints", "writer", "created"}
        assert meta["format"] == "probe-select-dataset" and meta["writer"] == "w1"
        assert json.loads(meta["checkpoints"]) == CHECKPOINTS
        assert json.loads(meta["prompts"]) == batches[1].prompts
        assert handle.get_tensor("features").dtype == torch.float16
        assert handle.get_tensor("score.clipscore").dtype == torch.float32

    ds = ProbeDataset(root)
    expected = cat_rows(batches)
    assert len(ds) == 9 and ds.skipped == [] and ds.duplicates_dropped == 0
    assert ds.manifest == make_manifest()
    assert torch.equal(ds.seeds, expected["seeds"])
    assert ds.prompts == expected["prompts"]
    assert ds.prompt_ids == expected["prompt_ids"] == [prompt_id(p) for p in expected["prompts"]]
    assert torch.equal(ds.text_embedding, expected["text"])
    for evaluator in EVALUATORS:
        assert torch.equal(ds.scores(evaluator), expected["scores"][evaluator])
    for k, t in enumerate(CHECKPOINTS):
        features = ds.features(t)
        assert features.shape == (9, *FEATURE_SHAPE) and features.dtype == torch.float16
        assert torch.equal(features, expected["features"][:, k])
    # A requested fraction picks the nearest stored one within the one tolerance (probes/checkpoints.py).
    assert torch.equal(ds.features(0.23), expected["features"][:, 1])
    with pytest.raises(DatasetError, match=r"t=0\.55.*\[0\.1, 0\.2, 0\.4\]"):
        ds.features(0.55)
    with pytest.raises(DatasetError, match="pickscore.*clipscore"):
        ds.scores("pickscore")

    # Rows follow shard names, not write times: writer "a0" writes last but sorts first.
    DatasetWriter(root, make_manifest(), writer_id="a0").append(make_rows("z", 0, 2))
    again = ProbeDataset(root)
    assert again.prompts == make_rows("z", 0, 2).prompts + expected["prompts"]
    assert torch.equal(again.features(0.2)[2:], expected["features"][:, 1])

    # The trainer's path: arrays at one checkpoint and evaluator, then a split.
    arrays = again.arrays(checkpoint_t=0.2, evaluator="imagereward")
    split = split_by_prompt(again.prompt_ids)
    train = arrays.select(split["train"])
    assert isinstance(train, DatasetArrays) and train.t == 0.2 and train.evaluator == "imagereward"
    assert torch.equal(train.features, again.features(0.2)[split["train"]])
    assert torch.equal(train.scores, again.scores("imagereward")[split["train"]])
    assert train.prompt_ids == [again.prompt_ids[i] for i in split["train"].tolist()]
    assert torch.equal(again.subset(split["val"], checkpoint_t=0.4, evaluator="clipscore").seeds, again.seeds[split["val"]])
    groups = arrays.prompt_groups()
    assert groups.tolist()[:4] == [0, 0, 1, 1]  # two seeds per prompt


def test_default_writer_id_is_unique_and_numbering_resumes(tmp_path):
    root = tmp_path / "ds"
    first, second = DatasetWriter(root, make_manifest()), DatasetWriter(root, make_manifest())
    assert first.writer_id != second.writer_id
    assert re.fullmatch(rf"[A-Za-z0-9_]+-{os.getpid()}-[0-9a-f]{{8}}", first.writer_id)
    first.append(make_rows("a", 0, 1))
    assert second.append(make_rows("b", 0, 1)) == 2
    assert (root / "shards" / f"shard-{first.writer_id}-000000.safetensors").is_file()
    # A writer id reused later continues after its own shards instead of overwriting them.
    DatasetWriter(root, make_manifest(), writer_id="fixed").append(make_rows("c", 0, 1))
    assert DatasetWriter(root, make_manifest(), writer_id="fixed").append(make_rows("c", 1, 1)) == 4
    assert (root / "shards" / "shard-fixed-000001.safetensors").is_file()
    assert len(ProbeDataset(root)) == 4


def test_rows_are_validated_against_the_manifest(tmp_path):
    writer = DatasetWriter(tmp_path / "ds", make_manifest(), writer_id="w")
    good = make_rows("a", 0, 2)
    with pytest.raises(ValueError, match="2 feature rows but 3 seeds"):
        CandidateRows(features=good.features, seeds=[1, 2, 3], prompts=good.prompts, scores=good.scores)
    with pytest.raises(ValueError, match=r"\[R, K, C, P, P\]"):
        CandidateRows(features=good.features[:, 0], seeds=[1, 2], prompts=good.prompts, scores=good.scores)
    with pytest.raises(ValueError, match="imagereward.*NaN"):
        CandidateRows(features=good.features, seeds=[1, 2], prompts=good.prompts,
                      scores={**good.scores, "imagereward": torch.tensor([0.0, float("nan")])})
    with pytest.raises(DatasetError, match=r"2 checkpoints on axis 1 .* 3"):
        writer.append(make_rows("a", 0, 2, k=2))
    with pytest.raises(DatasetError, match=r"\(4, 2, 2\).*\(4, 4, 4\)"):
        writer.append(make_rows("a", 0, 2, shape=(4, 2, 2)))
    with pytest.raises(DatasetError, match=r"missing evaluators \['imagereward'\]"):
        writer.append(CandidateRows(features=good.features, seeds=good.seeds, prompts=good.prompts,
                                    text_embedding=good.text_embedding, scores={"clipscore": good.scores["clipscore"]}))
    with pytest.raises(DatasetError, match="no text_embedding"):
        writer.append(CandidateRows(features=good.features, seeds=good.seeds, prompts=good.prompts, scores=good.scores))
    assert list_shards(tmp_path / "ds") == []
    # Seeds above 2**63 (ComfyUI allows up to 2**64 - 1) stay distinct as two's complement.
    rows = CandidateRows(features=good.features, seeds=[2**64 - 1, 5], prompts=good.prompts, scores=good.scores)
    assert rows.seeds.tolist() == [-1, 5]


def test_manifest_json_round_trip_and_newer_version_refused(tmp_path):
    manifest = make_manifest()
    assert DatasetManifest.from_json(manifest.to_json()) == manifest
    data = json.loads(manifest.to_json())
    assert data["format"] == "probe-select-dataset" and data["format_version"] == 1
    assert data["feature_shape"] == [4, 4, 4] and data["text_dim"] == TEXT_DIM
    assert "reduction" not in data          # stored as tapped: readable by format-1 readers
    with pytest.raises(DatasetError, match="version 3.*update the pack"):
        DatasetManifest.from_json(json.dumps({**data, "format_version": 3}), source="x/manifest.json")
    with pytest.raises(ValueError, match="strictly increasing"):
        make_manifest(checkpoints=[0.2, 0.1])
    assert make_manifest(evaluators=["imagereward", "clipscore"]).compatible_with(manifest) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty has no manifest\.json"):
        ProbeDataset(tmp_path / "empty")


def test_manifest_mismatch_names_the_differing_fields(tmp_path):
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w1").append(make_rows("a", 0, 2))
    before = (root / "manifest.json").read_bytes()
    with pytest.raises(DatasetError) as info:
        DatasetWriter(root, make_manifest(tap="output_blocks.8.0"), writer_id="w2")
    message = str(info.value)
    assert str(root) in message and "tap differs" in message and "output_blocks.8.0" in message
    assert "checkpoints" not in message
    with pytest.raises(DatasetError) as info:
        DatasetWriter(root, make_manifest(backbone_family="sd3", checkpoints=[0.1, 0.2], text_dim=0))
    message = str(info.value)
    assert "backbone_family differs" in message and "checkpoints differ" in message and "text_dim differs" in message
    assert (root / "manifest.json").read_bytes() == before
    assert len(ProbeDataset(root)) == 2


def test_concurrent_creation_with_threads_yields_one_manifest(tmp_path):
    for attempt in range(4):
        root = tmp_path / f"ds{attempt}"
        manifests = [make_manifest()] * 5 + [make_manifest(tap="other.tap")]
        barrier = threading.Barrier(len(manifests))
        results: list = [None] * len(manifests)

        def create(i):
            barrier.wait()
            try:
                results[i] = DatasetWriter(root, manifests[i])
            except DatasetError as error:
                results[i] = error

        threads = [threading.Thread(target=create, args=(i,)) for i in range(len(manifests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winner = read_manifest(root)
        assert winner in (make_manifest(), make_manifest(tap="other.tap"))
        for manifest, result in zip(manifests, results):
            if manifest == winner:
                assert isinstance(result, DatasetWriter), result
            else:
                assert isinstance(result, DatasetError) and "tap differs" in str(result)
        assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "shards"]  # no temp files left


def test_two_processes_create_and_append_concurrently(tmp_path):
    """Two writer processes create the same new dataset at once, then interleave their appends."""
    root = tmp_path / "ds"
    shards, rows = 5, 3
    go = tmp_path / "go"
    procs = {
        tag: start_helper(root, tag, "--writer-id", f"proc{tag}", "--shards", str(shards), "--rows", str(rows),
                          "--ready", str(tmp_path / f"ready{tag}"), "--go", str(go), "--pingpong", f"proc{other}")
        for tag, other in (("A", "B"), ("B", "A"))
    }
    try:
        wait_until(lambda: all((tmp_path / f"ready{tag}").exists() for tag in procs))
        go.touch()
        results = {tag: finish(proc) for tag, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Interleaved: each process already saw the other's shards when it appended its later ones.
    for tag in procs:
        totals = results[tag]["totals"]
        assert len(totals) == shards and totals[-1] >= (2 * shards - 1) * rows
    assert read_manifest(root) == make_manifest()
    ds = ProbeDataset(root)
    expected = {(prompt_id(p), s) for tag in procs for p, s in (row_key(tag, i) for i in range(shards * rows))}
    keys = list(zip(ds.prompt_ids, ds.seeds.tolist()))
    assert len(keys) == len(set(keys)) == 2 * shards * rows
    assert set(keys) == expected
    # Values came through intact: A's rows first (shard name order), in write order.
    expected_a = make_rows("A", 0, shards * rows)
    assert torch.equal(ds.features(0.4)[: shards * rows], expected_a.features[:, 2])
    assert torch.equal(ds.scores("clipscore")[: shards * rows], expected_a.scores["clipscore"])
    assert sorted(p.name for p in (root / "shards").iterdir()) == [p.name for p in list_shards(root)]


def test_writer_killed_mid_write_leaves_no_visible_shard(tmp_path):
    root = tmp_path / "ds"
    marker = tmp_path / "marker.json"
    proc = start_helper(root, "K", "--writer-id", "killed", "--shards", "3", "--rows", "2", "--hang", str(marker))
    try:
        wait_until(lambda: marker.exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()[1]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = json.loads(marker.read_text())
    temp = Path(partial["temp"])
    sibling = Path(partial["sibling"])
    # The half-written bytes are still there, but only in hidden temp files next to the shards.
    assert temp.parent == root / "shards" and temp.name.startswith(".") and temp.name.endswith(".tmp")
    assert sibling.parent == root / "shards" and re.fullmatch(r"\.tmp\w{6}", sibling.name)
    assert temp.is_file() and 0 < sibling.stat().st_size < partial["size"]
    assert [p.name for p in list_shards(root)] == [f"shard-killed-{i:06d}.safetensors" for i in range(3)]

    ds = ProbeDataset(root)
    assert ds.skipped == [] and len(ds) == 6
    assert torch.equal(ds.features(0.1), make_rows("K", 0, 6).features[:, 0])
    # A later writer (even under the same id) appends normally; the temp file stays ignored.
    assert DatasetWriter(root, make_manifest(), writer_id="killed").append(make_rows("K", 6, 2)) == 8
    assert (root / "shards" / "shard-killed-000003.safetensors").is_file()
    assert DatasetWriter(root, make_manifest()).append(make_rows("L", 0, 1)) == 9
    ds = ProbeDataset(root)
    assert len(ds) == 9 and ds.prompts[:8] == make_rows("K", 0, 8).prompts
    # Fresh temporaries may belong to a live writer: kept. Once stale, the next writer removes them.
    assert temp.is_file() and sibling.is_file()


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("opener", ["writer", "reader"])
def test_stale_temporaries_of_killed_writers_are_removed(tmp_path, opener):
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w").append(make_rows("A", 0, 2))
    shards = root / "shards"
    killed = [shards / ".shard-w-000001.safetensors.4242.0a1b2c3d.tmp", shards / ".tmpZ9y8X7"]
    live = [shards / ".shard-v-000000.safetensors.4243.0f0f0f0f.tmp", shards / ".tmpLiVe01"]
    for path in killed + live:
        path.write_bytes(b"\0" * 1024)
    for path in killed:
        _age(path, STALE_TEMP_SECONDS + 60)
    for path in live:
        _age(path, STALE_TEMP_SECONDS - 60)
    if opener == "writer":
        assert DatasetWriter(root, make_manifest(), writer_id="w").append(make_rows("A", 2, 2)) == 4
    else:
        assert len(ProbeDataset(root)) == 2
    assert not any(path.exists() for path in killed)
    assert all(path.is_file() for path in live)
    assert [p.name for p in list_shards(root)] == [f"shard-w-{i:06d}.safetensors" for i in range(1 + (opener == "writer"))]


def test_corrupt_shard_is_named_and_can_be_skipped(tmp_path, caplog):
    root = tmp_path / "ds"
    writer = DatasetWriter(root, make_manifest(), writer_id="w")
    for i in range(3):
        writer.append(make_rows("a", 2 * i, 2))
    bad = list_shards(root)[1]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as info:
        ProbeDataset(root)
    assert bad.name in str(info.value) and "skip_corrupt=True" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="probe_select.probes.training.dataset"):
        ds = ProbeDataset(root, skip_corrupt=True)
    assert ds.skipped == [bad] and bad.name in caplog.text
    assert len(ds) == 4
    expected = make_rows("a", 0, 6)
    assert ds.prompts == expected.prompts[:2] + expected.prompts[4:]
    assert torch.equal(ds.features(0.2), torch.cat([expected.features[:2, 1], expected.features[4:, 1]]))
    # A writer's cheap count (headers and file sizes only) leaves the damaged shard out.
    assert DatasetWriter(root, make_manifest()).append(make_rows("b", 0, 1)) == 5


def test_inconsistent_shard_is_refused(tmp_path):
    """A readable shard whose contents disagree with the manifest (here: copied from a dataset with
    other checkpoints) is refused like a truncated one."""
    DatasetWriter(tmp_path / "other", make_manifest(checkpoints=[0.1, 0.2, 0.3])).append(make_rows("a", 0, 2))
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w").append(make_rows("b", 0, 2))
    stray = root / "shards" / "shard-zz.safetensors"
    stray.write_bytes(list_shards(tmp_path / "other")[0].read_bytes())
    with pytest.raises(DatasetError, match=r"shard-zz\.safetensors is inconsistent: it holds checkpoints \[0\.1, 0\.2, 0\.3\]"):
        ProbeDataset(root)
    assert ProbeDataset(root, skip_corrupt=True).skipped == [stray]


def test_duplicate_rows_are_dropped_once(tmp_path, caplog):
    root = tmp_path / "ds"
    # Writer "b" (later shard name) re-collects rows 3..5 of writer "a" with other scores, as a
    # re-run job would; same prompt with another seed, and same seed with another prompt, stay.
    first = make_rows("a", 0, 6)
    rerun = make_rows("a", 3, 5)
    rerun.scores = {name: values + 100 for name, values in rerun.scores.items()}
    DatasetWriter(root, make_manifest(), writer_id="b").append(rerun)
    DatasetWriter(root, make_manifest(), writer_id="a").append(first)
    other_prompt = CandidateRows(features=first.features[:1], seeds=first.seeds[:1], prompts=["a different prompt"],
                                 text_embedding=first.text_embedding[:1], scores={k: v[:1] for k, v in first.scores.items()})
    DatasetWriter(root, make_manifest(), writer_id="c").append(other_prompt)
    with caplog.at_level(logging.INFO, logger="probe_select.probes.training.dataset"):
        ds = ProbeDataset(root)
    assert ds.duplicates_dropped == 3 and "dropped 3 duplicate rows" in caplog.text
    assert len(ds) == 6 + 2 + 1
    keys = list(zip(ds.prompt_ids, ds.seeds.tolist()))
    assert len(set(keys)) == len(keys)
    expected = make_rows("a", 0, 8)
    assert ds.prompts == expected.prompts + ["a different prompt"]
    assert torch.equal(ds.scores("clipscore")[:6], first.scores["clipscore"])  # the first copy is kept
    assert torch.equal(ds.scores("clipscore")[6:8], rerun.scores["clipscore"][3:])
    assert torch.equal(ds.features(0.4)[:8], expected.features[:, 2])
    assert torch.equal(ds.text_embedding[:8], expected.text_embedding)


def test_split_by_prompt_is_disjoint_proportional_and_stable():
    prompts = [f"p{i}" for i in range(1000)]
    rows = [p for p in prompts for _ in range(3)]  # three seeds per prompt
    split = split_by_prompt(rows, seed=0)
    assert sorted(torch.cat(list(split.values())).tolist()) == list(range(len(rows)))
    assigned = {}
    for name, index in split.items():
        assert torch.equal(index, index.sort().values)
        for i in index.tolist():
            assert assigned.setdefault(rows[i], name) == name  # no prompt in two splits
    counts = {name: sum(1 for v in assigned.values() if v == name) for name in ("train", "val", "test")}
    assert abs(counts["train"] - 800) <= 40 and abs(counts["val"] - 100) <= 30 and abs(counts["test"] - 100) <= 30

    # Growing the dataset (new prompts, before and after, in another order) keeps every split.
    grown = [f"q{i}" for i in range(300)] + list(reversed(rows)) + [f"r{i}" for i in range(200)]
    grown_split = split_by_prompt(grown, seed=0)
    for name, index in grown_split.items():
        for i in index.tolist():
            if grown[i] in assigned:
                assert assigned[grown[i]] == name
    assert {k: v.tolist() for k, v in split_by_prompt(rows, seed=0).items()} == {k: v.tolist() for k, v in split.items()}
    reseeded = split_by_prompt(rows, seed=1)
    assert not torch.equal(reseeded["val"], split["val"])
    assert split_by_prompt(rows, fractions=(1, 0, 0))["train"].numel() == len(rows)
    assert split_by_prompt(rows, fractions=(8, 1, 1))["val"].tolist() == split["val"].tolist()
    with pytest.raises(ValueError, match="three non-negative"):
        split_by_prompt(rows, fractions=(0.8, 0.2))


def test_check_probe_matches_refuses_other_backbone_or_tap(tmp_path):
    manifest = make_manifest()
    config = ProbeConfig(in_channels=4, feature_size=4, stem_width=8, widths=(8,), pooled_size=2, embed_dim=8,
                         time_embed_dim=8, head_hidden=(8,), mlp_hidden=8, text_dim=TEXT_DIM)

    def metadata(**overrides):
        fields = dict(backbone_family="sd2", tap="output_blocks.7.0", checkpoint_t=0.2, feature_shape=FEATURE_SHAPE,
                      pooling="adaptive_avg", evaluator="imagereward", config=config)
        return ProbeMetadata(**{**fields, **overrides})

    check_probe_matches(manifest, metadata())  # matches: no error
    with pytest.raises(DatasetError, match=r"tap: probe 'joint_blocks\.20', dataset 'output_blocks\.7\.0'"):
        check_probe_matches(manifest, metadata(tap="joint_blocks.20"))
    with pytest.raises(DatasetError, match=r"backbone family: probe 'sd3', dataset 'sd2'"):
        check_probe_matches(manifest, metadata(backbone_family="sd3"))
    with pytest.raises(DatasetError, match=r"feature shape.*\(4, 8, 8\)"):
        check_probe_matches(manifest, metadata(feature_shape=(4, 8, 8)))
    with pytest.raises(DatasetError, match="evaluator: probe 'pickscore'"):
        check_probe_matches(manifest, metadata(evaluator="pickscore"))
    check_probe_matches(manifest, metadata(evaluator="pickscore", checkpoint_t=0.3), require_evaluator=False, require_checkpoint=False)
    root = tmp_path / "ds"
    DatasetWriter(root, manifest)
    with pytest.raises(DatasetError, match=re.escape(str(root))):
        check_probe_matches(ProbeDataset(root), metadata(tap="joint_blocks.20"))
