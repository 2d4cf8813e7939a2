"""Probe files: round trip, header keys, refusal of pickles and damaged files, atomic writes."""
import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from probe_select.probes import atomic_write, atomic_write_text
from probe_select.probes.io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ProbeFileError,
    ProbeMetadata,
    load_probe,
    read_probe_metadata,
    save_probe,
)
from probe_select.probes.model import ProbeConfig, build_probe

HEADER_KEYS = {"format", "format_version", "backbone_family", "tap", "checkpoint_t", "feature_shape",
               "pooling", "evaluator", "score_norm", "training", "probe_config"}


def tiny_config(**overrides) -> ProbeConfig:
    base = dict(in_channels=8, feature_size=8, stem_width=16, widths=(16, 32), pooled_size=2,
                embed_dim=32, time_embed_dim=16, head_hidden=(32,), mlp_hidden=64, text_dim=12)
    return ProbeConfig(**{**base, **overrides})


def make_metadata(config: ProbeConfig, **overrides) -> ProbeMetadata:
    fields = dict(backbone_family="sd2", tap="output_blocks.7.0", checkpoint_t=0.2,
                  feature_shape=(config.in_channels, config.feature_size, config.feature_size),
                  pooling="adaptive_avg", evaluator="imagereward", score_mean=0.3594,
                  score_std=0.9424, training={"epochs": 3, "val_spearman": 0.81}, config=config)
    return ProbeMetadata(**{**fields, **overrides})


@pytest.fixture()
def saved(tmp_path):
    """A valid probe file: (path, probe, metadata)."""
    config = tiny_config()
    probe = build_probe(config, seed=5)
    metadata = make_metadata(config)
    path = tmp_path / "sd2_imagereward.safetensors"
    save_probe(path, probe, metadata)
    return path, probe, metadata


def rewrite(src, dst, header_edit=None, tensor_edit=None):
    """Copy a probe file, editing its header and/or tensors (to build damaged files)."""
    with safe_open(str(src), framework="pt") as handle:
        header = dict(handle.metadata())
    tensors = load_file(str(src))
    if header_edit:
        header_edit(header)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(dst), metadata=header)
    return dst


def test_round_trip_outputs_and_metadata(saved):
    path, probe, metadata = saved
    loaded, loaded_meta = load_probe(path)
    assert loaded_meta == metadata
    assert loaded_meta.feature_shape == (8, 8, 8) and loaded_meta.config.widths == (16, 32)
    assert not loaded.training
    x, text = torch.randn(4, 8, 8, 8).half(), torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.2, text), probe.eval()(x, 0.2, text))
    for name, tensor in probe.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert read_probe_metadata(path) == metadata


def test_half_precision_file_is_half_the_size_and_loads_as_float32(saved, tmp_path):
    path, probe, metadata = saved
    half = save_probe(tmp_path / "half.safetensors", probe, metadata, dtype=torch.float16)
    stored = load_file(str(half))
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    assert 0.45 < half.stat().st_size / path.stat().st_size < 0.6
    loaded, loaded_meta = load_probe(half)
    assert loaded_meta == metadata
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    for name, tensor in probe.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor.half().float(), rtol=0, atol=0)
    x, text = torch.randn(4, 8, 8, 8).half(), torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.2, text), probe.eval()(x, 0.2, text), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="floating-point"):
        save_probe(tmp_path / "int.safetensors", probe, metadata, dtype=torch.int8)


def test_header_keys_and_values(saved):
    path, probe, metadata = saved
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        names = set(handle.keys())
    assert set(header) == HEADER_KEYS
    assert header["format"] == FORMAT_NAME == "probe-select"
    assert header["format_version"] == "1" and FORMAT_VERSION == 4     # unreduced probes stay readable by version 1
    assert header["backbone_family"] == "sd2" and header["tap"] == "output_blocks.7.0"
    assert float(header["checkpoint_t"]) == 0.2
    assert json.loads(header["feature_shape"]) == [8, 8, 8]
    assert json.loads(header["score_norm"]) == {"mean": 0.3594, "std": 0.9424}
    assert json.loads(header["training"]) == {"epochs": 3, "val_spearman": 0.81}
    assert ProbeConfig.from_dict(json.loads(header["probe_config"])) == probe.config
    assert names == set(probe.state_dict())


def test_load_never_unpickles(saved, tmp_path, monkeypatch):
    path, probe, _ = saved
    pickled = tmp_path / "probe.safetensors"
    torch.save(probe.state_dict(), pickled)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be used to read probes")

    monkeypatch.setattr(torch, "load", forbidden)
    load_probe(path)  # a real probe loads without torch.load
    with pytest.raises(ProbeFileError, match=r"probe\.safetensors.*pickled"):
        load_probe(pickled)


def test_missing_file(tmp_path):
    with pytest.raises(ProbeFileError, match=r"nowhere\.safetensors.*not found"):
        load_probe(tmp_path / "nowhere.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a safetensors file at all" * 10])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(ProbeFileError, match=r"garbage\.safetensors.*not a readable safetensors"):
        load_probe(path)


def test_truncated_file(saved, tmp_path):
    path, _, _ = saved
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ProbeFileError, match=r"truncated\.safetensors.*(truncated|corrupt)"):
        load_probe(truncated)
    with pytest.raises(ProbeFileError, match=r"truncated\.safetensors"):
        read_probe_metadata(truncated)


def test_not_a_probe(tmp_path):
    no_metadata = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(no_metadata))
    with pytest.raises(ProbeFileError, match=r"lora\.safetensors is not a Probe-Select probe.*no 'format'"):
        load_probe(no_metadata)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ProbeFileError, match=r"other\.safetensors is not a Probe-Select probe.*'pt'"):
        load_probe(other)


def test_newer_format_version(saved, tmp_path):
    path, _, _ = saved
    newer_version = str(FORMAT_VERSION + 1)
    newer = rewrite(path, tmp_path / "newer.safetensors", header_edit=lambda h: h.update(format_version=newer_version))
    with pytest.raises(ProbeFileError, match=rf"newer\.safetensors.*version {newer_version}.*[Uu]pdate the pack"):
        load_probe(newer)
    with pytest.raises(ProbeFileError, match=f"version {newer_version}"):
        read_probe_metadata(newer)


def test_unparsable_format_version(saved, tmp_path):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "badversion.safetensors", header_edit=lambda h: h.update(format_version="one"))
    with pytest.raises(ProbeFileError, match=r"badversion\.safetensors.*format_version 'one'"):
        load_probe(bad)


def test_missing_metadata_keys(saved, tmp_path):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "incomplete.safetensors", header_edit=lambda h: (h.pop("tap"), h.pop("score_norm")))
    with pytest.raises(ProbeFileError, match=r"incomplete\.safetensors.*'tap'.*'score_norm'|incomplete\.safetensors.*'score_norm'.*'tap'"):
        load_probe(bad)


def test_invalid_metadata_values(saved, tmp_path):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "badjson.safetensors", header_edit=lambda h: h.update(probe_config="{oops"))
    with pytest.raises(ProbeFileError, match=r"badjson\.safetensors.*invalid probe metadata"):
        load_probe(bad)

    def future_config(header):
        config = json.loads(header["probe_config"])
        config["num_experts"] = 4
        header["probe_config"] = json.dumps(config)

    future = rewrite(path, tmp_path / "future.safetensors", header_edit=future_config)
    with pytest.raises(ProbeFileError, match=r"future\.safetensors.*num_experts"):
        load_probe(future)


def test_missing_tensor(saved, tmp_path):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "missing.safetensors", tensor_edit=lambda t: t.pop("stem.weight"))
    with pytest.raises(ProbeFileError, match=r"missing\.safetensors.*missing tensors \[stem\.weight\]"):
        load_probe(bad)


def test_unexpected_tensor(saved, tmp_path):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "extra.safetensors", tensor_edit=lambda t: t.update(extra_head=torch.zeros(3)))
    with pytest.raises(ProbeFileError, match=r"extra\.safetensors.*unexpected tensors \[extra_head\]"):
        load_probe(bad)


def test_misshaped_tensor(saved, tmp_path):
    path, _, _ = saved
    bad = rewrite(path, tmp_path / "shape.safetensors", tensor_edit=lambda t: t.update({"stem.bias": torch.zeros(17)}))
    with pytest.raises(ProbeFileError, match=r"shape\.safetensors.*mis-shaped tensors \[stem\.bias \(17,\) \(expected \(16,\)\)\]"):
        load_probe(bad)


def test_non_finite_weights(saved, tmp_path):
    path, _, _ = saved

    def poison(tensors):
        tensors["stem.bias"] = tensors["stem.bias"].clone()
        tensors["stem.bias"][0] = float("nan")

    bad = rewrite(path, tmp_path / "nan.safetensors", tensor_edit=poison)
    with pytest.raises(ProbeFileError, match=r"nan\.safetensors.*stem\.bias"):
        load_probe(bad)


def test_save_checks_metadata_matches_probe(tmp_path):
    config = tiny_config()
    probe = build_probe(config)
    target = tmp_path / "p.safetensors"
    with pytest.raises(ValueError, match="config"):
        save_probe(target, probe, make_metadata(tiny_config(embed_dim=64)))
    with pytest.raises(ValueError, match="feature_shape"):
        save_probe(target, probe, make_metadata(config, feature_shape=(320, 8, 8)))
    with pytest.raises(ValueError, match="JSON"):
        save_probe(target, probe, make_metadata(config, training={"when": object()}))
    assert list(tmp_path.iterdir()) == []


def test_metadata_validation():
    config = tiny_config()
    with pytest.raises(ValueError, match="score normalisation"):
        make_metadata(config, score_std=0.0)
    with pytest.raises(ValueError, match="checkpoint_t"):
        make_metadata(config, checkpoint_t=1.5)
    with pytest.raises(ValueError, match="feature_shape"):
        make_metadata(config, feature_shape=(8, 8))


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "shard.bin"
    target.write_bytes(b"old content")
    seen = []

    def failing_writer(temp_path):
        seen.append(temp_path)
        temp_path.write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing_writer)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.bin"]
    assert seen[0].parent == tmp_path
    assert re.fullmatch(r"\.shard\.bin\.\d+\.[0-9a-f]+\.tmp", seen[0].name)


def test_atomic_write_success_replaces(tmp_path):
    target = tmp_path / "shard.bin"
    target.write_bytes(b"old content")
    assert atomic_write(target, lambda temp_path: temp_path.write_bytes(b"new content")) == target
    assert target.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.bin"]


def test_atomic_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "REPORT.md"
    target.write_text("old report\n")
    assert atomic_write_text(target, "new report \u2264 0.5\n") == target
    assert target.read_text(encoding="utf-8") == "new report \u2264 0.5\n"
    # text that cannot be encoded fails before the rename: the old report stays, no temporary file is left
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "caf\u00e9", encoding="ascii")
    assert target.read_text(encoding="utf-8") == "new report \u2264 0.5\n"
    assert [p.name for p in tmp_path.iterdir()] == ["REPORT.md"]


def test_atomic_write_gives_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        def private_writer(temp_path):        # replaces the file with a 0600 one, as safetensors does
            temp_path.unlink()
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"data")
            os.close(fd)

        target = atomic_write(tmp_path / "probe.safetensors", private_writer)
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(umask)


def test_save_probe_failure_keeps_old_probe(saved, monkeypatch):
    path, probe, metadata = saved
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr("probe_select.probes.io.save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_probe(path, build_probe(probe.config, seed=99), metadata)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
