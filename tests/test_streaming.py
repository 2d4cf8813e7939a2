"""Streaming reader and streamed trainer: the plan is what is trained on, runs are reproducible,
resuming mid-epoch changes nothing, rows read equal ProbeDataset's, and memory is bounded by batches."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from stream_data import EVALUATORS, make_manifest, shard_rows, tiny_probe_config, write_dataset
from probe_select.probes.training.dataset import DatasetWriter, ProbeDataset
from probe_select.probes.training.streaming import (
    BatchSpec,
    FeatureReader,
    StreamConfig,
    StreamIndex,
    epoch_plan,
    make_loader,
)
from probe_select.probes.training import streaming as streaming_module
from probe_select.probes.io import load_probe
from probe_select.probes.training import streamed_train
from probe_select.probes.training.evaluation import evaluate_probe_on
from probe_select.probes.training.streamed_train import StreamSource, autocast_dtype, train_streamed
from probe_select.probes.training.train import TrainConfig
from tools.cli import main

META = {"backbone_family": "sd2", "tap": "output_blocks.7.0", "evaluator": "clipscore"}
STREAM = StreamConfig(buffer_groups=6)


def fast_config(**overrides) -> TrainConfig:
    fields = dict(epochs=2, batch_prompts=4, lr=3e-3, ema_decay=0.5, patience=0, seed=3)
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("stream") / "ds", shards=6, prompts_per_shard=6, seeds=3)


def source_for(root, text=False) -> StreamSource:
    index = StreamIndex(root)
    splits = index.split_groups((0.7, 0.3, 0.0))
    return StreamSource(index, splits["train"], splits["val"], 0.5, "clipscore", use_text=text)


def test_plan_covers_every_group_once_and_depends_on_seed_and_epoch(dataset):
    index = StreamIndex(dataset)
    groups = list(range(len(index.groups)))
    plans = {(seed, epoch): epoch_plan(index, groups, seed=seed, epoch=epoch, batch_prompts=5, buffer_groups=4)
             for seed in (0, 1) for epoch in (0, 1)}
    for plan in plans.values():
        flat = [g for batch in plan for g in batch]
        assert sorted(flat) == groups
        assert [len(b) for b in plan[:-1]] == [5] * (len(plan) - 1)
    assert plans[(0, 0)] == epoch_plan(index, groups, seed=0, epoch=0, batch_prompts=5, buffer_groups=4)
    assert plans[(0, 0)] != plans[(0, 1)] and plans[(0, 0)] != plans[(1, 0)]
    # A buffer of 4 groups keeps the stream near shard order: a group leaves at most a few shards late.
    flat = [g for b in plans[(0, 0)] for g in b]
    assert flat != sorted(flat)


def test_streamed_rows_equal_probe_dataset_rows_with_duplicates_dropped(tmp_path):
    root = write_dataset(tmp_path / "ds", shards=3, prompts_per_shard=4, seeds=2, text_dim=5)
    # A re-run job appends shard 1 again: those rows are duplicates and must be dropped once.
    DatasetWriter(root, make_manifest(5), writer_id="w1").append(shard_rows(1, 4, 2, text_dim=5))
    index = StreamIndex(root)
    reference = ProbeDataset(root)
    assert index.duplicates_dropped == reference.duplicates_dropped == 8
    assert len(index) == len(reference) == 24
    position = {(p, s): i for i, (p, s) in enumerate(zip(reference.prompt_ids, reference.seeds.tolist()))}
    all_groups = list(range(len(index.groups)))
    rows = index.group_rows(all_groups)
    ref_rows = torch.tensor([position[(index.shards[s].prompt_ids[r], int(index.shards[s].seeds[r]))] for s, r in rows])
    for io in ("pread", "mmap"):
        for k, t in enumerate((0.2, 0.5)):
            reader = FeatureReader(index, checkpoint_k=k, max_open=1, io=io)
            assert torch.equal(reader.features(rows), reference.features(t)[ref_rows])
            assert torch.equal(reader.text(rows), reference.text_embedding[ref_rows])
            # Shuffled rows come back in the order asked for.
            shuffled = rows[::-1]
            assert torch.equal(reader.features(shuffled), reference.features(t)[ref_rows.flip(0)])
    assert torch.equal(index.scores(all_groups, "clipscore"), reference.scores("clipscore")[ref_rows])


def test_trainer_visits_exactly_its_plan_and_two_runs_give_identical_probes(dataset, tmp_path):
    config = fast_config()
    runs = []
    for name in ("a", "b"):
        source = source_for(dataset)
        train_streamed(source, tiny_probe_config(), config, META, tmp_path / f"{name}.safetensors",
                       stream_config=STREAM, record_visits=True)
        runs.append(source)
    for epoch in range(config.epochs):
        plan = epoch_plan(runs[0].index, runs[0].train_groups, seed=config.seed, epoch=epoch,
                          batch_prompts=config.batch_prompts, buffer_groups=STREAM.buffer_groups)
        assert runs[0].visits[epoch] == plan
    assert runs[0].visits[0] != runs[0].visits[1]
    assert runs[0].visits == runs[1].visits
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_mid_epoch_ends_with_the_weights_of_an_uninterrupted_run(dataset, tmp_path):
    config = fast_config(epochs=2)
    stream = StreamConfig(buffer_groups=6, state_every_batches=2)
    whole = source_for(dataset)
    train_streamed(whole, tiny_probe_config(), config, META, tmp_path / "whole.safetensors", stream_config=stream,
                   record_visits=True)
    batches_per_epoch = len(whole.visits[0])
    calls = {"n": 0}

    def stop_in_epoch_1() -> bool:
        calls["n"] += 1
        return calls["n"] > batches_per_epoch + 3

    first = source_for(dataset)
    result = train_streamed(first, tiny_probe_config(), config, META, tmp_path / "resumed.safetensors",
                            stream_config=stream, state_dir=tmp_path / "state", should_stop=stop_in_epoch_1,
                            record_visits=True)
    assert result.stopped == "should_stop"
    assert len(first.visits[1]) == 3
    second = source_for(dataset)
    result = train_streamed(second, tiny_probe_config(), config, META, tmp_path / "resumed.safetensors",
                            stream_config=stream, state_dir=tmp_path / "state", record_visits=True)
    assert result.resumed_from_epoch == 1 and result.stopped == "completed"
    assert first.visits[1] + second.visits[1] == whole.visits[1]
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_training_reads_each_row_once_per_epoch_and_at_most_one_batch_at_a_time(dataset, tmp_path,
                                                                                           monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the streamed trainer must not load the whole dataset")

    monkeypatch.setattr(ProbeDataset, "features", refuse)
    reads: list[int] = []
    original = FeatureReader.features

    def counting(self, rows):
        reads.append(len(rows))
        return original(self, rows)

    monkeypatch.setattr(FeatureReader, "features", counting)
    source = source_for(dataset)
    config = fast_config(epochs=1)
    train_streamed(source, tiny_probe_config(), config, META, tmp_path / "p.safetensors", stream_config=STREAM)
    train_rows = sum(len(source.index.groups[g].rows) for g in source.train_groups)
    val_rows = sum(len(source.index.groups[g].rows) for g in source.val_groups)
    seeds = 3
    assert sum(reads) == train_rows + val_rows            # every row once (training + validation)
    assert max(reads) <= max(config.batch_prompts * seeds, config.eval_batch_size)
    # Training reads are one batch of whole prompts each, far fewer rows than the dataset.
    assert all(n <= config.batch_prompts * seeds for n in reads[:-1]) and max(reads[:-1]) < train_rows / 4


def test_reader_bounds_the_shards_and_bytes_it_keeps_mapped(dataset):
    index = StreamIndex(dataset)
    reader = FeatureReader(index, checkpoint_k=0, max_open=2)
    for group in range(len(index.groups)):
        reader.features(index.group_rows([group]))
        assert len(reader._handles) <= 2
    assert reader.rows_read == len(index)
    row_bytes = 4 * 4 * 4 * 2
    budget = 5 * row_bytes                     # fewer rows than one shard holds (18)
    reader = FeatureReader(index, checkpoint_k=0, max_open=100, max_mapped_bytes=budget, io="mmap")
    peak = 0
    for group in range(len(index.groups)):
        rows = index.group_rows([group])
        reader.features(rows)
        peak = max(peak, reader.mapped_bytes)
        assert reader.mapped_bytes <= budget
    assert peak > 0 and len(reader._handles) <= 1


def test_loader_workers_return_batches_in_plan_order(dataset):
    index = StreamIndex(dataset)
    plan = epoch_plan(index, list(range(len(index.groups))), seed=5, epoch=0, batch_prompts=3, buffer_groups=5)
    spec = BatchSpec(index=index, checkpoint_k=1, evaluator=EVALUATORS[0], use_text=False)
    seen = [(position, batch["group_ids"].tolist()) for position, batch in
            make_loader(spec, plan, start=2, num_workers=2)]
    assert seen == [(i, plan[i]) for i in range(2, len(plan))]


def test_reader_opened_before_a_shard_disappears_fails_with_a_clear_message(tmp_path):
    root = write_dataset(tmp_path / "ds", shards=2, prompts_per_shard=2, seeds=2)
    index = StreamIndex(root)
    index.shards[1].path.unlink()
    reader = FeatureReader(index, checkpoint_k=0)
    reader.features(index.group_rows([0]))
    with pytest.raises(streaming_module.DatasetError, match="Reopen the dataset"):
        reader.features(index.group_rows([len(index.groups) - 1]))


def test_streamed_predictions_equal_in_memory_ones_and_auto_streams_only_big_data(dataset, tmp_path, monkeypatch):
    index = StreamIndex(dataset)
    result, sizes = streamed_train.train_from_index(index, 0.5, "clipscore", tmp_path / "p.safetensors",
                                                    train_config=fast_config(epochs=1), stream_config=STREAM)
    assert sizes["train"] + sizes["val"] + sizes["test"] == len(index) and result.stopped == "completed"
    probe, metadata = load_probe(tmp_path / "p.safetensors")
    assert metadata.checkpoint_t == 0.5 and metadata.feature_shape == (4, 4, 4)
    groups = list(range(len(index.groups)))
    predicted, actual, group = streamed_train.predict_on_index(probe, metadata, index, groups, batch_rows=7)
    reference = evaluate_probe_on(probe, metadata, ProbeDataset(dataset).arrays(0.5, "clipscore"))
    # Both readers list rows in shard order here (one writer, no duplicates), so rows line up.
    assert torch.allclose(torch.from_numpy(predicted), torch.from_numpy(reference.predicted), atol=1e-5)
    assert (actual == reference.actual).all() and (group == reference.group).all()
    manifest, rows = index.manifest, len(index)
    assert not streamed_train.wants_streaming("auto", manifest, rows)
    assert streamed_train.wants_streaming("on", manifest, rows) and not streamed_train.wants_streaming("off", manifest, rows)
    monkeypatch.setattr(streamed_train, "STREAM_AUTO_BYTES", rows * 4 * 4 * 4 * 2 - 1)
    assert streamed_train.wants_streaming("auto", manifest, rows)
    monkeypatch.setattr(streamed_train, "STREAM_AUTO_BYTES", 10**12)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert streamed_train.wants_streaming("auto", manifest, rows)


def test_dataloader_workers_train_the_same_probe_as_the_training_process(dataset, tmp_path):
    config = fast_config(epochs=1)
    for workers in (0, 2):
        source = source_for(dataset)
        train_streamed(source, tiny_probe_config(), config, META, tmp_path / f"w{workers}.safetensors",
                       stream_config=StreamConfig(buffer_groups=6, num_workers=workers), record_visits=True)
        assert source.visits[0] == epoch_plan(source.index, source.train_groups, seed=config.seed, epoch=0,
                                              batch_prompts=config.batch_prompts, buffer_groups=6)
    a, b = load_file(str(tmp_path / "w0.safetensors")), load_file(str(tmp_path / "w2.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stream_config_is_checked_and_cpu_never_autocasts():
    with pytest.raises(ValueError, match="buffer_groups"):
        StreamConfig(buffer_groups=0)
    with pytest.raises(ValueError, match="amp"):
        StreamConfig(amp="fp8")
    with pytest.raises(ValueError, match="io"):
        StreamConfig(io="aio")
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is None
    assert autocast_dtype(torch.device("cuda"), "off") is None
    assert autocast_dtype(torch.device("cuda"), "fp16") == torch.float16
    assert autocast_dtype(torch.device("cuda"), "bf16") == torch.bfloat16


def test_cli_trains_streamed_and_evaluates_the_same_either_way(dataset, tmp_path, capsys):
    probe = tmp_path / "cli.safetensors"
    config = '{"stem_width": 8, "widths": [8], "attention": false, "pooled_size": 2, "embed_dim": 8, ' \
             '"time_embed_dim": 8, "head_hidden": [16], "mlp_hidden": 16}'
    assert main(["train", "--dataset", str(dataset), "--checkpoint", "0.5", "--out", str(probe), "--epochs", "2",
                 "--batch-prompts", "4", "--patience", "0", "--probe-config", config, "--stream", "on",
                 "--workers", "1", "--state-dir", str(tmp_path / "state"), "--state-every-batches", "2", "-q"]) == 0
    assert (tmp_path / "state" / "stream_train_state.json").exists()
    reports = []
    for mode in ("on", "off"):
        capsys.readouterr()
        assert main(["evaluate", "--probe", str(probe), "--dataset", str(dataset), "--split", "all", "--stream", mode,
                     "--json", "-", "-q"]) == 0
        reports.append(json.loads(capsys.readouterr().out)["metrics"])
    assert reports[0]["rows"] == len(StreamIndex(dataset))
    assert reports[0].keys() == reports[1].keys()
    for key in reports[0]:
        assert reports[0][key] == pytest.approx(reports[1][key], abs=1e-6), key
