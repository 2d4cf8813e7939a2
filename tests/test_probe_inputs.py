"""Probe inputs: probes that read the sampler's x0 prediction latent, alone or with the activations.

Config and file round trips (old files load as activations-only), the x0 branch, scoring (per
candidate, with refusals), datasets that carry x0 (in memory, streamed, compacted) and training
(a target that only the x0 latent explains)."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from probe_select.probes.features import ActivationSeries, ActivationSet, pool_x0
from probe_select.probes.io import ProbeMetadata, load_probe, read_probe_metadata, save_probe
from probe_select.probes.model import ProbeConfig, build_probe, parse_probe_inputs
from probe_select.probes.scoring import ProbeCompatibilityError, score_candidates
from probe_select.probes.training.compaction import compact_dataset, dataset_checksum
from probe_select.probes.training.dataset import (
    CandidateRows,
    DatasetError,
    DatasetWriter,
    ProbeDataset,
    check_probe_matches,
    read_manifest,
    rows_from_activations,
)
from probe_select.probes.training.pipeline import evaluate_on_dataset, train_from_dataset
from probe_select.probes.training.streaming import FeatureReader, StreamIndex
from probe_select.probes.training.train import TrainArrays, TrainConfig, train_probe

SMALL = dict(in_channels=4, feature_size=8, stem_width=8, widths=(8,), attention=False, pooled_size=2, embed_dim=16,
             time_embed_dim=8, head_hidden=(16,), mlp_hidden=32, x0_channels=4, x0_size=8, x0_stem_width=8,
             x0_widths=(8,))
BOTH = ("activations", "x0")


def _config(inputs=BOTH, **changes) -> ProbeConfig:
    return ProbeConfig(**{**SMALL, **changes}, inputs=inputs)


def _meta(config: ProbeConfig, tap="output_blocks.1.0", t=0.25) -> ProbeMetadata:
    return ProbeMetadata(backbone_family="sd1", tap=tap, checkpoint_t=t,
                         feature_shape=(config.in_channels, config.feature_size, config.feature_size),
                         pooling="adaptive_avg", evaluator="clipscore", score_mean=0.5, score_std=2.0, config=config)


def _acts(n=5, seed=0, x0_hw=16, x0_channels=4, tap="output_blocks.1.0", with_x0=True, step=2, steps=8):
    gen = torch.Generator().manual_seed(seed)
    return ActivationSet(features=torch.randn(n, 4, 8, 8, generator=gen).half(), family="sd1", tap=tap, step=step,
                         steps=steps, sigma=1.0, seeds=list(range(100, 100 + n)), run_id="run",
                         x0=torch.randn(n, x0_channels, x0_hw, x0_hw, generator=gen) if with_x0 else None)


# --------------------------------------------------------------------------------------------
# Config and files


def test_inputs_parse_and_config_round_trip():
    assert parse_probe_inputs("activations+x0") == BOTH == parse_probe_inputs(["x0", "activations"])
    assert parse_probe_inputs("x0") == ("x0",)
    for bad in ("x1", "", "x0+x0", "activations+"):
        with pytest.raises(ValueError, match="choose one of"):
            parse_probe_inputs(bad)
    with pytest.raises(ValueError, match="ProbeConfig.inputs"):
        ProbeConfig(in_channels=4, inputs=("pixels",))

    config = _config(inputs=["x0", "activations"], x0_channels=16, x0_size=12)
    assert config.inputs == BOTH and config.reads_x0 and config.reads_activations
    data = config.to_dict()
    assert data["inputs"] == ["activations", "x0"] and data["x0_channels"] == 16 and data["x0_size"] == 12
    assert ProbeConfig.from_dict(json.loads(json.dumps(data))) == config
    # An activations-only config is the same JSON as before inputs existed: older readers still load it.
    plain = ProbeConfig(in_channels=4).to_dict()
    assert not {"inputs", "x0_channels", "x0_size", "x0_stem_width", "x0_widths"} & set(plain)
    assert ProbeConfig.from_dict(plain).inputs == ("activations",)


def test_activation_probe_builds_as_before_x0_inputs():
    # The module order (and so a seed's initial weights and the optimizer's parameter order) is unchanged.
    probe = build_probe(ProbeConfig(**{k: v for k, v in SMALL.items() if not k.startswith("x0")}), seed=1)
    names = [name for name, _ in probe.named_parameters()]
    assert names[:5] == ["input_norm.weight", "input_norm.bias", "stem.weight", "stem.bias", "time_mlp.0.weight"]
    assert not any(name.startswith(("x0_", "fuse")) for name in names)


def test_old_probe_file_loads_as_activations_only(tmp_path):
    config = ProbeConfig(**{k: v for k, v in SMALL.items() if not k.startswith("x0")})
    probe = build_probe(config, seed=2)
    path = save_probe(tmp_path / "old.safetensors", probe, _meta(config))
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert header["format_version"] == "1" and "inputs" not in json.loads(header["probe_config"])
    loaded, meta = load_probe(path)
    assert meta.inputs == ("activations",) and meta.x0_shape is None and not loaded.config.reads_x0
    acts = _acts(with_x0=False)
    assert torch.allclose(score_candidates(loaded, meta, acts).scores,
                          score_candidates(probe.eval(), _meta(config), acts).scores, atol=1e-6)


@pytest.mark.parametrize("inputs", [("x0",), BOTH])
def test_x0_probe_file_round_trip(tmp_path, inputs):
    config = _config(inputs)
    probe = build_probe(config, seed=4).eval()
    path = save_probe(tmp_path / "x0.safetensors", probe, _meta(config))
    with safe_open(str(path), framework="pt") as handle:
        header, names = handle.metadata(), set(handle.keys())
    assert header["format_version"] == "3"          # older readers say "update the pack"
    assert json.loads(header["probe_config"])["inputs"] == list(inputs)
    assert any(name.startswith("x0_stem.") for name in names)
    assert ("stem.weight" in names) == ("activations" in inputs) and ("fuse.weight" in names) == (len(inputs) == 2)
    meta = read_probe_metadata(path)
    assert meta.inputs == inputs and meta.x0_shape == (4, 8, 8) and meta.config == config
    loaded, meta = load_probe(path)
    acts = _acts()
    assert torch.equal(score_candidates(loaded, meta, acts).scores, score_candidates(probe, _meta(config), acts).scores)


# --------------------------------------------------------------------------------------------
# Model and scoring


def test_x0_branch_reads_the_pooled_latent_only():
    probe = build_probe(_config(("x0",)), seed=0).eval()
    x0 = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        out = probe(None, 0.25, x0=x0)
        assert out.shape == (3,) and torch.isfinite(out).all()
        # Features are ignored by an x0-only probe; the x0 latent is not.
        assert torch.equal(probe(torch.randn(3, 4, 8, 8), 0.25, x0=x0), out)
        assert not torch.allclose(probe(None, 0.25, x0=x0.flip(-1)), out)
        # The raw latent's scale, removed by GroupNorm, still reaches the probe (per-channel mean/std).
        assert not torch.allclose(probe(None, 0.25, x0=2 * x0 + 1), out)
    with pytest.raises(ValueError, match="pass x0"):
        probe(None, 0.25)
    with pytest.raises(ValueError, match=r"pooled to \[B, 4, 8, 8\]"):
        probe(None, 0.25, x0=torch.randn(3, 4, 16, 16))


@pytest.mark.parametrize("inputs", [("x0",), BOTH])
def test_scores_do_not_depend_on_batch_mates(inputs):
    config = _config(inputs)
    probe, meta = build_probe(config, seed=5).eval(), _meta(config)
    acts = _acts(n=5)
    together = score_candidates(probe, meta, acts).scores
    assert together.shape == (5,) and torch.isfinite(together).all()
    assert torch.allclose(score_candidates(probe, meta, acts, batch_size=2).scores, together, atol=1e-6)
    for i in range(5):
        alone = score_candidates(probe, meta, acts.select([i])).scores
        assert torch.allclose(alone, together[i:i + 1], atol=1e-6)
    # Changing the other candidates' x0 leaves candidate 0's score alone, and changes theirs.
    other_x0 = acts.x0.clone()
    other_x0[1:] = torch.randn_like(other_x0[1:]) * 3
    changed = score_candidates(probe, meta, acts, x0=other_x0).scores
    assert torch.allclose(changed[0], together[0], atol=1e-6) and not torch.allclose(changed[1:], together[1:])
    # The x0 argument overrides the x0 carried by the activations; pooling happens in scoring.
    assert torch.equal(score_candidates(probe, meta, acts.select(list(range(5))), x0=acts.x0).scores, together)
    pooled = pool_x0(acts.x0, 8)
    with torch.no_grad():
        direct = probe(meta.reduction.apply(acts.features), acts.t, None, pooled) * 2.0 + 0.5
    assert torch.allclose(direct, together, atol=1e-6)


def test_scoring_refuses_missing_or_mismatched_x0():
    config = _config(BOTH)
    probe, meta = build_probe(config, seed=0).eval(), _meta(config)
    with pytest.raises(ProbeCompatibilityError, match=r"reads the sampler's x0 prediction latent.*'x0 preview'"):
        score_candidates(probe, meta, _acts(with_x0=False))
    with pytest.raises(ProbeCompatibilityError, match="trained on 4-channel x0 latents.*has 16 channels"):
        score_candidates(probe, meta, _acts(x0_channels=16))
    with pytest.raises(ProbeCompatibilityError, match="x0 latent has 2 rows but there are 5 candidates"):
        score_candidates(probe, meta, _acts(), x0=torch.randn(2, 4, 16, 16))
    with pytest.raises(ProbeCompatibilityError, match=r"float \[N, 4, H, W\]"):
        score_candidates(probe, meta, _acts(), x0=torch.randn(5, 4, 16))
    # An x0-only probe reads no tap: activations of another tap still score; the family still counts.
    x0_config = _config(("x0",))
    x0_probe, x0_meta = build_probe(x0_config, seed=0).eval(), _meta(x0_config)
    assert score_candidates(x0_probe, x0_meta, _acts(tap="middle_block.0")).scores.shape == (5,)
    with pytest.raises(ProbeCompatibilityError, match="tap"):
        score_candidates(probe, meta, _acts(tap="middle_block.0"))


# --------------------------------------------------------------------------------------------
# Datasets


def _series(n, prompt_seed, with_x0=True):
    sets = []
    for k, step in enumerate((2, 4)):
        acts = _acts(n=n, seed=prompt_seed * 10 + k, with_x0=with_x0, step=step)
        sets.append(ActivationSet(**{**acts.__dict__, "run_id": f"run{prompt_seed}",
                                     "seeds": list(range(prompt_seed * 100, prompt_seed * 100 + n))}))
    return ActivationSeries(tuple(sets))


def _x0_target(series):
    """A score only the x0 latent explains: its channel-0 mean minus the lower-right mean of channel 1."""
    x0 = pool_x0(series.sets[0].x0, 8).float()
    return x0[:, 0].mean(dim=(1, 2)) - x0[:, 1, 4:, 4:].mean(dim=(1, 2))


def _write_dataset(root, prompts=4, n=3, with_x0=True):
    for p in range(prompts):
        series = _series(n, p, with_x0)
        manifest, rows = rows_from_activations(series, {"score": _x0_target(series) if with_x0 else torch.randn(n)},
                                               f"prompt {p}", x0_size=8 if with_x0 else 0)
        DatasetWriter(root, manifest, writer_id=f"w{p}").append(rows)
    return root


def test_dataset_round_trip_with_x0(tmp_path):
    root = _write_dataset(tmp_path / "ds", prompts=3, n=4)
    manifest = read_manifest(root)
    assert manifest.x0_shape == (4, 8, 8) and manifest.format_version == 1
    assert json.loads((root / "manifest.json").read_text())["x0_shape"] == [4, 8, 8]
    ds = ProbeDataset(root)
    assert ds.has_x0 and len(ds) == 12
    expected = {t: torch.cat([pool_x0(_series(4, p).sets[k].x0, 8) for p in range(3)]) for k, t in enumerate((0.25, 0.5))}
    for t, values in expected.items():
        assert ds.x0(t).dtype == torch.float16 and torch.equal(ds.x0(t), values)
    arrays = ds.arrays(0.5, "score")
    assert torch.equal(arrays.x0, expected[0.5])
    picked = arrays.select([5, 0])
    assert torch.equal(picked.x0, expected[0.5][[5, 0]]) and picked.seeds.tolist() == arrays.seeds[[5, 0]].tolist()
    # Streamed reading gives the same rows (both ways of reading).
    index = StreamIndex(root)
    rows = index.group_rows(range(len(index.groups)))
    for io in ("pread", "mmap"):
        reader = FeatureReader(index, manifest.checkpoint_index(0.5), io=io)
        assert torch.equal(reader.x0(rows), expected[0.5])
    # Compaction keeps every row's x0.
    count, digest = dataset_checksum(root)
    compact_dataset(root)
    assert dataset_checksum(root) == (count, digest) and torch.equal(ProbeDataset(root).x0(0.25), expected[0.25])


def test_dataset_without_x0_is_written_as_before(tmp_path):
    root = _write_dataset(tmp_path / "plain", prompts=1, with_x0=False)
    data = json.loads((root / "manifest.json").read_text())
    assert "x0_shape" not in data and data["format_version"] == 1
    ds = ProbeDataset(root)
    assert not ds.has_x0 and ds.x0(0.25) is None and ds.arrays(0.25, "score").x0 is None


def test_writer_and_rows_refuse_mismatched_x0(tmp_path):
    root = _write_dataset(tmp_path / "ds", prompts=1)
    manifest = read_manifest(root)
    series = _series(3, 7, with_x0=False)
    with pytest.raises(ValueError, match="no x0 latent at checkpoints"):
        rows_from_activations(series, {"score": torch.zeros(3)}, "p", x0_size=8)
    _, plain_rows = rows_from_activations(series, {"score": torch.zeros(3)}, "p")
    with pytest.raises(DatasetError, match="rows carry no x0 latent but the dataset stores one"):
        DatasetWriter(root, manifest).append(plain_rows)
    _, small = rows_from_activations(_series(3, 8), {"score": torch.zeros(3)}, "p", x0_size=4)
    with pytest.raises(DatasetError, match=r"x0_shape differs \(\(4, 8, 8\) vs \(4, 4, 4\)\)"):
        DatasetWriter(root, dataclasses.replace(manifest, x0_shape=(4, 4, 4)))
    with pytest.raises(DatasetError, match=r"x0 is \(3, 2, 4, 4, 4\)"):
        DatasetWriter(root, manifest).append(small)
    with pytest.raises(ValueError, match=r"CandidateRows.x0 must be a float \[R, K, c, S, S\]"):
        CandidateRows(features=torch.zeros(3, 2, 4, 8, 8), seeds=[1, 2, 3], prompts=["p"] * 3,
                      scores={"score": torch.zeros(3)}, x0=torch.zeros(3, 1, 4, 8, 8))


def test_x0_probe_on_a_dataset_without_x0_is_refused(tmp_path):
    root = _write_dataset(tmp_path / "plain", prompts=6, with_x0=False)
    ds = ProbeDataset(root)
    for streaming in ("off", "on"):
        with pytest.raises(DatasetError, match="stores no x0 latents.*x0_size"):
            train_from_dataset(ds, 0.25, "score", tmp_path / "p.safetensors", train_config=TrainConfig(epochs=1),
                               probe_config=_config(("x0",)), streaming=streaming)
    assert not (tmp_path / "p.safetensors").exists()
    config = _config(("x0",))
    with pytest.raises(DatasetError, match=r"x0 latent: probe reads \(c, S, S\) = \(4, 8, 8\), dataset stores none"):
        check_probe_matches(ds.manifest, _meta(config, t=0.25))
    arrays = ds.arrays(0.25, "score")
    data = TrainArrays(features=arrays.features, t=0.25, group=arrays.prompt_ids, target=arrays.scores)
    with pytest.raises(ValueError, match="has no x0 latents"):
        train_probe(data, data, config, TrainConfig(epochs=1), {"backbone_family": "sd1", "tap": "t",
                                                                "evaluator": "score"}, tmp_path / "q.safetensors")


# --------------------------------------------------------------------------------------------
# Training


def _synthetic(seed, prompts, seeds=8):
    """Activations that are pure noise; the score is a function of the x0 latent only."""
    gen = torch.Generator().manual_seed(seed)
    n = prompts * seeds
    features = torch.randn(n, 4, 8, 8, generator=gen)
    x0 = torch.randn(n, 4, 8, 8, generator=gen)
    target = x0[:, 0, :4, :4].mean(dim=(1, 2)) - x0[:, 1, 4:, 4:].mean(dim=(1, 2))
    return TrainArrays(features=features.half(), t=0.2, group=torch.arange(prompts).repeat_interleave(seeds),
                       target=target, x0=x0.half())


def test_x0_probes_learn_a_score_only_x0_explains(tmp_path):
    train, val = _synthetic(0, 24), _synthetic(1, 8)
    config = TrainConfig(epochs=14, batch_prompts=4, lr=3e-3, patience=0, ema_decay=0.9)
    base = {"backbone_family": "sd1", "tap": "t", "evaluator": "score"}
    results = {}
    for inputs in [("activations",), ("x0",), BOTH]:
        path = tmp_path / f"{'_'.join(inputs)}.safetensors"
        results[inputs] = result = train_probe(train, val, _config(inputs), config, base, path)
        history = result.history
        assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
        assert load_probe(path)[1].inputs == inputs
    within = {inputs: r.best_metrics["within_spearman"] for inputs, r in results.items()}
    assert within[("x0",)] > 0.5 and within[BOTH] > 0.35
    assert within[("activations",)] < 0.3
    assert within[("x0",)] - within[("activations",)] > 0.3 and within[BOTH] - within[("activations",)] > 0.2


def test_train_and_evaluate_an_x0_probe_from_a_dataset(tmp_path):
    root = _write_dataset(tmp_path / "ds", prompts=12, n=4)
    ds = ProbeDataset(root)
    config = TrainConfig(epochs=2, batch_prompts=4, lr=1e-3)
    probe_config = ProbeConfig(in_channels=1, stem_width=8, widths=(8,), attention=False, pooled_size=2,
                               embed_dim=16, time_embed_dim=8, head_hidden=(16,), mlp_hidden=32, x0_stem_width=8,
                               x0_widths=(8,), inputs=BOTH, x0_size=3)
    for streaming in ("off", "on"):
        out = tmp_path / f"probe_{streaming}.safetensors"
        result, sizes = train_from_dataset(ds, 0.25, "score", out, train_config=config, probe_config=probe_config,
                                           streaming=streaming)
        assert len(result.history) == 2 and sum(sizes.values()) == 48
        probe, meta = load_probe(out)
        # The x0 side and channels come from the dataset, the rest of the architecture from the config.
        assert meta.inputs == BOTH and meta.x0_shape == (4, 8, 8) and meta.feature_shape == (4, 8, 8)
        in_memory = evaluate_on_dataset(probe, meta, ds, split="all", streaming="off")
        streamed = evaluate_on_dataset(probe, meta, ds, split="all", streaming="on")
        assert in_memory.metrics["rows"] == 48
        assert torch.allclose(torch.as_tensor(in_memory.predicted), torch.as_tensor(streamed.predicted), atol=1e-5)


def test_command_line_trains_x0_probes_and_collects_x0(tmp_path, caplog):
    from tools.cli import _writer_settings, build_parser, main
    from tools.collect import fill_workflow

    args = build_parser().parse_args(["collect", "--server", "http://x", "--prompts", "p.txt", "--x0-size", "16"])
    settings = _writer_settings(args)
    assert settings == {"x0_size": 16}
    workflow = {"1": {"class_type": "ProbeSelectDatasetWriter", "inputs": {"dataset_name": "d", "x0_size": 0}}}
    assert fill_workflow(workflow, "a cat", seed=1, writer_settings=settings)["1"]["inputs"]["x0_size"] == 16

    root = _write_dataset(tmp_path / "ds", prompts=12, n=4)
    plain = _write_dataset(tmp_path / "plain", prompts=12, n=4, with_x0=False)
    small = json.dumps({"stem_width": 8, "widths": [8], "attention": False, "pooled_size": 2, "embed_dim": 16,
                        "time_embed_dim": 8, "head_hidden": [16], "mlp_hidden": 32, "x0_stem_width": 8,
                        "x0_widths": [8]})
    out = tmp_path / "x0.safetensors"
    assert main(["train", "-q", "--dataset", str(root), "--checkpoint", "0.25", "--out", str(out), "--epochs", "1",
                 "--inputs", "x0", "--probe-config", small, "--stream", "off"]) == 0
    meta = read_probe_metadata(out)
    assert meta.inputs == ("x0",) and meta.x0_shape == (4, 8, 8)
    refused = tmp_path / "refused.safetensors"
    assert main(["train", "-q", "--dataset", str(plain), "--checkpoint", "0.25", "--out", str(refused),
                 "--epochs", "1", "--inputs", "activations+x0", "--probe-config", small]) != 0
    assert not refused.exists() and "stores no x0 latents" in caplog.text


def test_learning_curve_subsets_train_on_the_first_prompts_only(tmp_path):
    from probe_select.probes.training.dataset import split_by_prompt
    from probe_select.probes.training.pipeline import SPLIT_FRACTIONS, first_prompts

    ds = ProbeDataset(_write_dataset(tmp_path / "ds", prompts=12, n=4))
    ids = ds.prompt_ids
    splits = split_by_prompt(ids, SPLIT_FRACTIONS, seed=0)
    train_ids = list(dict.fromkeys(ids[r] for r in splits["train"].tolist()))
    rows = first_prompts(splits["train"], ids, 2)
    assert [ids[r] for r in rows.tolist()] == [train_ids[0]] * 4 + [train_ids[1]] * 4
    assert torch.equal(first_prompts(splits["train"], ids, 100), splits["train"])
    config = TrainConfig(epochs=1, batch_prompts=4, lr=1e-3)
    probe_config = ProbeConfig(in_channels=1, stem_width=8, widths=(8,), attention=False, pooled_size=2,
                               embed_dim=16, time_embed_dim=8, head_hidden=(16,), mlp_hidden=32)
    _, sizes = train_from_dataset(ds, 0.25, "score", tmp_path / "p.safetensors", train_config=config,
                                  probe_config=probe_config, streaming="off", train_prompts=2)
    assert sizes["train"] == 8 and sizes["val"] == len(splits["val"])
    # without a test split (the probe is judged on another dataset) its prompts go to train and val
    no_test = split_by_prompt(ids, (0.7, 0.3, 0.0), seed=0)
    _, sizes = train_from_dataset(ds, 0.25, "score", tmp_path / "r.safetensors", train_config=config,
                                  probe_config=probe_config, streaming="off", fractions=(0.7, 0.3, 0.0))
    assert sizes == {"train": len(no_test["train"]), "val": len(no_test["val"]), "test": 0}
    assert sizes["train"] + sizes["val"] == len(ids)
    with pytest.raises(ValueError, match="in-memory"):
        train_from_dataset(ds, 0.25, "score", tmp_path / "q.safetensors", train_config=config,
                           probe_config=probe_config, streaming="on", train_prompts=2)
