"""Pins on datasets and scoring (issue 11): mismatched writers, stray files, empty datasets, the seed
range, and chunked scoring with a shared text embedding."""
import json
import logging
import os
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dataset_writer_proc import CHECKPOINTS, FEATURE_SHAPE, TEXT_DIM, make_manifest, make_rows
from probe_select.probes.training.dataset import (STALE_TEMP_SECONDS, CandidateRows, DatasetArrays, DatasetError,
                                                 DatasetWriter, ProbeDataset, list_shards, remove_stale_temporaries,
                                                 rows_from_activations, split_by_prompt)
from probe_select.probes.training.dataset import splits as splits_module
from probe_select.probes.features import FEATURE_DTYPE, ActivationSeries, ActivationSet
from probe_select.probes.io import ProbeMetadata
from probe_select.probes.model import ProbeConfig, build_probe
from probe_select.probes.scoring import CandidateScores, score_candidates

# ---- datasets -------------------------------------------------------------------------------


def test_writer_with_one_other_checkpoint_is_refused(tmp_path):
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w1").append(make_rows("a", 0, 2))
    assert CHECKPOINTS == [0.1, 0.2, 0.4]
    other = make_manifest(checkpoints=[0.1, 0.2, 0.5])          # same count, last one differs
    assert make_manifest().compatible_with(other) == ["checkpoints differ ([0.1, 0.2, 0.4] vs [0.1, 0.2, 0.5])"]
    with pytest.raises(DatasetError, match=r"checkpoints differ"):
        DatasetWriter(root, other, writer_id="w2")
    assert make_manifest().compatible_with(make_manifest(checkpoints=[0.1, 0.2, 0.4 + 1e-9])) == []


def test_stray_files_in_shards_are_ignored_with_a_warning(tmp_path, caplog):
    root = tmp_path / "ds"
    writer = DatasetWriter(root, make_manifest(), writer_id="w")
    writer.append(make_rows("a", 0, 3))
    shards = root / "shards"
    (shards / "notes.txt").write_text("collected on the big box\n")
    (shards / "model.safetensors").write_bytes(b"not a shard")
    (shards / "backup").mkdir()
    (shards / ".shard-w-000009.safetensors.1.ab.tmp").write_bytes(b"partial")   # an unfinished write: silent
    with caplog.at_level(logging.WARNING, logger="probe_select.probes.training.dataset"):
        ds = ProbeDataset(root)
    assert len(ds) == 3 and ds.shards == [shards / "shard-w-000000.safetensors"]
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "3 files" in warning[0] and "backup, model.safetensors, notes.txt" in warning[0] and ".tmp" not in warning[0]
    assert torch.equal(ds.features(0.2), make_rows("a", 0, 3).features[:, 1])
    # Writers count only shards too, and keep numbering their own.
    assert writer.append(make_rows("a", 3, 2)) == 5
    assert [p.name for p in list_shards(root)] == ["shard-w-000000.safetensors", "shard-w-000001.safetensors"]


def test_empty_dataset_gives_empty_arrays_of_the_right_shape(tmp_path):
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w")
    ds = ProbeDataset(root)
    assert len(ds) == 0
    features = ds.features(0.2)
    assert features.shape == (0, *FEATURE_SHAPE) and features.dtype == FEATURE_DTYPE
    arrays = ds.arrays(0.4, "clipscore")
    assert len(arrays) == 0 and arrays.t == 0.4
    assert arrays.seeds.shape == (0,) and arrays.scores.shape == (0,)
    assert arrays.text_embedding.shape == (0, TEXT_DIM)
    assert arrays.prompt_groups().shape == (0,)


def test_seeds_outside_comfyuis_range_are_refused(tmp_path):
    good = make_rows("a", 0, 2)

    def rows(seeds):
        return CandidateRows(features=good.features, seeds=seeds, prompts=good.prompts, scores=good.scores)

    assert rows([0, 2**64 - 1]).seeds.tolist() == [0, -1]            # the full range stays distinct
    assert rows([2**63 - 1, 2**63]).seeds.tolist() == [2**63 - 1, -(2**63)]
    with pytest.raises(ValueError, match=r"18446744073709551616 is outside ComfyUI's seed range 0 \.\. 2\*\*64 - 1"):
        rows([0, 2**64])                                             # would be stored as 0
    with pytest.raises(ValueError, match=r"-1 is outside ComfyUI's seed range"):
        rows([-1, 5])                                                # would be stored as 2**64 - 1
    # Stored int64 seeds (two's complement) pass through unchanged.
    assert rows(torch.tensor([-1, 5])).seeds.tolist() == [-1, 5]


# ---- scoring --------------------------------------------------------------------------------


C, P, TEXT = 8, 4, 12


def _probe_and_acts(n):
    config = ProbeConfig(in_channels=C, feature_size=P, stem_width=8, widths=(8,), pooled_size=2,
                         embed_dim=8, time_embed_dim=8, head_hidden=(8,), mlp_hidden=16, text_dim=TEXT)
    probe = build_probe(config, seed=3).eval()
    meta = ProbeMetadata(backbone_family="sd2", tap="output_blocks.7.0", checkpoint_t=0.2,
                         feature_shape=(C, P, P), pooling="adaptive_avg", evaluator="imagereward",
                         score_mean=0.5, score_std=2.0, config=config)
    generator = torch.Generator().manual_seed(0)
    acts = ActivationSet(features=torch.randn(n, C, P, P, generator=generator).to(FEATURE_DTYPE), family="sd2",
                         tap="output_blocks.7.0", step=4, steps=20, sigma=7.5, seeds=list(range(n)), run_id="r",
                         text_embedding=torch.randn(1, TEXT, generator=generator))
    return probe, meta, acts


def test_shared_text_row_is_used_by_every_batch():
    """More candidates than one batch (64) with one [1, D] text row: every batch reads that row."""
    probe, meta, acts = _probe_and_acts(70)
    shared = score_candidates(probe, meta, acts).scores
    assert shared.shape == (70,) and torch.isfinite(shared).all()
    per_row = score_candidates(probe, meta, acts, text_embedding=acts.text_embedding.expand(70, -1).clone()).scores
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-5)
    with torch.no_grad():
        direct = probe(acts.features, acts.t, acts.text_embedding.expand(70, -1)) * 2.0 + 0.5
    torch.testing.assert_close(shared, direct, rtol=0, atol=1e-5)


def test_batch_size_one_scores_like_one_batch():
    probe, meta, acts = _probe_and_acts(5)
    one_by_one = score_candidates(probe, meta, acts, batch_size=1).scores
    together = score_candidates(probe, meta, acts, batch_size=5).scores
    assert one_by_one.shape == (5,) and one_by_one.std() > 0
    torch.testing.assert_close(one_by_one, together, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        score_candidates(probe, meta, acts, batch_size=0)


# ---- pins from the second mutation run (issue 11) -------------------------------------------


def test_default_batches_are_64_candidates():
    """The default chunk (64 rows a forward pass) bounds memory: 70 candidates take two passes."""
    probe, meta, acts = _probe_and_acts(70)
    batches = []
    handle = probe.register_forward_hook(lambda _m, inputs, _o: batches.append(inputs[0].shape[0]))
    try:
        score_candidates(probe, meta, acts)
        assert batches == [64, 6]
        batches.clear()
        score_candidates(probe, meta, acts, batch_size=30)
        assert batches == [30, 30, 10]
    finally:
        handle.remove()


def test_scoring_restores_the_probe_mode_and_handles_no_candidates():
    probe, meta, acts = _probe_and_acts(3)
    probe.train()
    score_candidates(probe, meta, acts)
    assert probe.training                                   # a probe being trained stays in training mode
    probe.eval()
    score_candidates(probe, meta, acts)
    assert not probe.training
    empty = acts.select([])
    result = score_candidates(probe, meta, empty)
    assert result.scores.shape == (0,) and result.seeds == [] and result.order().tolist() == []


def test_candidate_scores_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"scores must be \[N\], got shape \(2, 1\)"):
        CandidateScores(scores=torch.zeros(2, 1), evaluator="x", run_id="r", seeds=[1, 2])
    assert len(CandidateScores(scores=torch.zeros(2), evaluator="x", run_id="r", seeds=[1, 2])) == 2


def test_manifest_refuses_bad_fields():
    for overrides, message in [
        (dict(tap=""), "tap must be a non-empty string"),
        (dict(feature_shape=(4, 4)), "feature_shape must be three positive ints"),
        (dict(checkpoints=[0.1, 1.5]), r"checkpoints must be fractions of steps in \[0, 1\]"),
        (dict(checkpoints=[0.4, 0.2]), "checkpoints must be strictly increasing"),
        (dict(evaluators=["clipscore", ""]), "evaluators must be a non-empty list of names"),
    ]:
        with pytest.raises(ValueError, match=message):
            make_manifest(**overrides)
    # The manifest file is indented JSON (read by people and other tools), one key a line.
    text = make_manifest().to_json()
    assert text == json.dumps(json.loads(text), indent=2) + "\n" and '\n  "tap": "output_blocks.7.0",\n' in text


def test_rows_refuse_non_finite_text():
    good = make_rows("a", 0, 2)
    text = good.text_embedding.clone()
    text[1, 0] = float("nan")
    with pytest.raises(ValueError, match="text_embedding"):
        CandidateRows(features=good.features, seeds=good.seeds, prompts=good.prompts, scores=good.scores, text_embedding=text)


def _rewrite_shard(root, name, metadata=None, tensors=None, drop=()):
    """A copy of the dataset's first shard under ``name`` with metadata / tensors replaced or dropped."""
    with safe_open(str(list_shards(root)[0]), framework="pt") as handle:
        meta = dict(handle.metadata())
        data = {key: handle.get_tensor(key) for key in handle.keys()}
    meta.update(metadata or {})
    data.update(tensors or {})
    for key in drop:
        meta.pop(key, None)
        data.pop(key, None)
    path = root / "shards" / name
    save_file(data, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("change, message", [
    (dict(drop=("writer",)), r"metadata \['writer'\] missing"),
    (dict(metadata={"prompts": json.dumps(["a prompt 0", 5])}), "metadata prompts is not a list of 2 strings"),
    (dict(tensors={"features": make_rows("a", 0, 2).features.float()}), "features are F32"),
    (dict(tensors={"text_embedding": torch.zeros(2, TEXT_DIM + 1)}), rf"text_embedding is torch.float32 \[2, {TEXT_DIM + 1}\]"),
])
def test_shard_disagreeing_with_the_manifest_is_refused(tmp_path, change, message):
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w").append(make_rows("a", 0, 2))
    stray = _rewrite_shard(root, "shard-zz-000000.safetensors", **change)
    with pytest.raises(DatasetError, match=message):
        ProbeDataset(root)
    assert ProbeDataset(root, skip_corrupt=True).skipped == [stray]


def test_split_fractions_must_all_be_non_negative():
    with pytest.raises(ValueError, match="fractions must be three non-negative numbers"):
        split_by_prompt(["a", "b"], (0.8, -0.1, 0.3))
    assert split_by_prompt(["a", "b", "a"], (1.0, 0.0, 0.0))["train"].tolist() == [0, 1, 2]


def test_rows_from_activations_share_one_text_row():
    generator = torch.Generator().manual_seed(0)
    sets = [ActivationSet(features=torch.randn(3, *FEATURE_SHAPE, generator=generator).to(FEATURE_DTYPE), family="sd2",
                          tap="output_blocks.7.0", step=step, steps=20, sigma=1.0, seeds=[5, 6, 7], run_id="r",
                          text_embedding=torch.randn(1, TEXT_DIM, generator=generator)) for step in (2, 4)]
    manifest, rows = rows_from_activations(ActivationSeries(tuple(sets)), {"clipscore": torch.tensor([1.0, 2.0, 3.0])}, "a cat")
    assert manifest.text_dim == TEXT_DIM and manifest.checkpoints == [0.1, 0.2]
    assert rows.text_embedding.shape == (3, TEXT_DIM)
    assert torch.equal(rows.text_embedding, sets[0].text_embedding.expand(3, -1).to(rows.text_embedding.dtype))
    assert rows.features.shape == (3, 2, *FEATURE_SHAPE) and rows.prompts == ["a cat"] * 3


# ---- mutation survivors of the dataset package (issue 11) -------------------------------------


@pytest.mark.parametrize("checkpoints", [[0.1, 0.1, 0.4], [0.1, 0.2, 0.2], [0.0, 1e-6]])
def test_manifest_refuses_any_repeated_checkpoint(checkpoints):
    # One repeated pair is enough, and a gap of exactly the tolerance counts as the same checkpoint
    # (as same_checkpoints says); 1e-6 - 0.0 is exactly the tolerance in floats.
    with pytest.raises(ValueError, match="checkpoints must be strictly increasing"):
        make_manifest(checkpoints=checkpoints)
    assert make_manifest(checkpoints=[0.0, 2e-6]).checkpoints == [0.0, 2e-6]


def test_manifest_refuses_negative_text_dim():
    with pytest.raises(ValueError, match="text_dim must be an int >= 0"):
        make_manifest(text_dim=-1)
    assert make_manifest(text_dim=0).text_dim == 0


@pytest.mark.parametrize("text", [torch.zeros(2), torch.zeros(3, TEXT_DIM), torch.zeros(2, TEXT_DIM, dtype=torch.int64),
                                  torch.zeros(2, TEXT_DIM, 1)])
def test_rows_refuse_a_text_embedding_of_the_wrong_shape_or_dtype(text):
    good = make_rows("a", 0, 2)
    with pytest.raises(ValueError, match=r"text_embedding must be a float \[R, D\] tensor with R=2"):
        CandidateRows(features=good.features, seeds=[1, 2], prompts=["p", "q"], text_embedding=text, scores=good.scores)


@pytest.mark.parametrize("prompts", ["ab", ["a", 3]])
def test_rows_refuse_prompts_that_are_not_a_list_of_strings(prompts):
    good = make_rows("a", 0, 2)
    with pytest.raises(ValueError, match="CandidateRows.prompts must be a list of strings"):
        CandidateRows(features=good.features, seeds=[1, 2], prompts=prompts, scores=good.scores)


def test_rows_refuse_one_empty_prompt_id():
    good = make_rows("a", 0, 2)
    with pytest.raises(ValueError, match="CandidateRows.prompt_ids must not contain empty strings"):
        CandidateRows(features=good.features, seeds=[1, 2], prompts=["p", "q"], prompt_ids=["id", ""], scores=good.scores)


def test_stale_temporary_cleanup_leaves_other_old_files(tmp_path):
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w").append(make_rows("a", 0, 2))
    shards = root / "shards"
    temp = shards / ".shard-w-000001.safetensors.1.ab.tmp"
    temp.write_bytes(b"partial")
    (shards / "notes.txt").write_text("keep me\n")
    old = time.time() - 10 * STALE_TEMP_SECONDS
    for path in shards.iterdir():
        os.utime(path, (old, old))
    assert remove_stale_temporaries(root) == [temp]
    assert sorted(p.name for p in shards.iterdir()) == ["notes.txt", "shard-w-000000.safetensors"]


def test_new_manifest_is_published_by_hard_link(tmp_path, monkeypatch):
    # Where hard links work, the manifest appears whole in one step (link of a finished temporary
    # file); the exclusive-create fallback, which a reader can catch half-written, stays unused.
    real_link = os.link
    links = []

    def recording_link(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)        # raises before recording when the link fails
        links.append((os.path.basename(src), os.path.basename(dst)))

    monkeypatch.setattr(os, "link", recording_link)
    root = tmp_path / "ds"
    DatasetWriter(root, make_manifest(), writer_id="w")
    assert [dst for _, dst in links] == ["manifest.json"]
    assert links[0][0].startswith(".manifest.json.") and links[0][0].endswith(".tmp")
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["manifest.json"]
    assert (root / "manifest.json").read_text(encoding="utf-8") == make_manifest().to_json()


def test_dataset_arrays_count_rows_on_the_first_axis():
    # N = 3 rows of [C, P, P] = [4, 2, 2]: the lengths are checked against N, not against P.
    arrays = DatasetArrays(features=torch.zeros(3, 4, 2, 2, dtype=FEATURE_DTYPE), t=0.2, seeds=torch.arange(3),
                           prompt_ids=["a", "a", "b"], text_embedding=torch.zeros(3, TEXT_DIM), scores=torch.zeros(3))
    assert len(arrays) == 3 and arrays.select([2, 0]).prompt_ids == ["b", "a"]
    with pytest.raises(ValueError, match=r"3 feature rows but \{'seeds': 2, 'prompt_ids': 2, 'scores': 2\}"):
        DatasetArrays(features=torch.zeros(3, 4, 2, 2, dtype=FEATURE_DTYPE), t=0.2, seeds=torch.arange(2),
                      prompt_ids=["a", "b"], text_embedding=None, scores=torch.zeros(2))


@pytest.mark.parametrize("fractions, expected", [((1.0, 0.0, 0.0), "train"), ((0.5, 0.5, 0.0), "val"),
                                                 ((0.0, 1.0, 0.0), "val"), ((0.2, 0.3, 0.5), "test")])
def test_prompt_hashed_to_the_very_top_goes_to_the_last_non_empty_split(monkeypatch, fractions, expected):
    # A digest of all ones gives u = (2**64 - 1) / 2**64, which rounds to 1.0: past every bound, so
    # the fallback must still pick a split that was asked for, never an empty one.
    top = SimpleNamespace(digest=lambda: b"\xff" * 32)
    monkeypatch.setattr(splits_module, "hashlib", SimpleNamespace(sha256=lambda data: top))
    splits = split_by_prompt(["p", "p", "q"], fractions)
    assert {name: idx.tolist() for name, idx in splits.items() if len(idx)} == {expected: [0, 1, 2]}
