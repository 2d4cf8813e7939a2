"""Training on a synthetic dataset whose score is a known function of the feature maps.

World: K fixed smooth spatial patterns B_k [C, P, P] and a fixed readout v. A prompt has its own
background map (shared by all its seeds) and a score offset; a seed has pattern coefficients c:

    features = background_prompt + sum_k c_k B_k + 0.3 * noise
    score    = 0.5 + 1.3 * (offset_prompt + v . c + 0.4 * c_0^2)

Within a prompt the background cancels, so seeds can be ranked from the maps; across prompts the
offset (unrelated to the maps) makes global ranking much harder than within-prompt ranking.
"""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from probe_select.probes.features import ActivationSet
from probe_select.probes.io import load_probe, read_probe_metadata
from probe_select.probes.training.metrics import global_spearman, within_prompt_spearman
from probe_select.probes.model import ProbeConfig
from probe_select.probes.scoring import score_candidates
from probe_select.probes.training.train import TrainArrays, TrainConfig, evaluate_probe, predict, train_probe

C, P, K = 8, 8, 4
META = dict(backbone_family="sd2", tap="output_blocks.7.0", checkpoint_t=0.2, pooling="adaptive_avg",
            evaluator="synthetic")


def make_world(seed=1234):
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(K, C, 3, 3, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(P, P), mode="bilinear", align_corners=False)
    patterns = patterns / patterns.flatten(1).norm(dim=1)[:, None, None, None] * 6.0
    readout = torch.randn(K, generator=gen)
    return patterns, readout / readout.norm()


def make_split(world, n_prompts, seeds, seed, text_dim=0):
    patterns, readout = world
    gen = torch.Generator().manual_seed(seed)
    background = torch.randn(n_prompts, C, P, P, generator=gen)
    offset = 2.0 * torch.randn(n_prompts, generator=gen)
    coeff = torch.randn(n_prompts, seeds, K, generator=gen)
    maps = torch.einsum("nsk,kchw->nschw", coeff, patterns)
    features = background[:, None] + maps + 0.3 * torch.randn(n_prompts, seeds, C, P, P, generator=gen)
    score = 0.5 + 1.3 * (offset[:, None] + coeff @ readout + 0.4 * coeff[..., 0] ** 2)
    group = torch.arange(n_prompts).repeat_interleave(seeds) + 1000 * seed  # arbitrary ids
    text = torch.randn(n_prompts, text_dim, generator=gen).repeat_interleave(seeds, 0) if text_dim else None
    return TrainArrays(features=features.reshape(-1, C, P, P).half(), t=0.2, group=group,
                       target=score.reshape(-1).float(), text=text)


def small_config(text_dim=0):
    return ProbeConfig(in_channels=C, feature_size=P, stem_width=16, widths=(16, 32), pooled_size=2,
                       embed_dim=32, time_embed_dim=16, head_hidden=(32,), mlp_hidden=64, text_dim=text_dim)


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """The main run: 120 train prompts x 8 seeds, 30 validation and 30 test prompts."""
    train = make_split(world, 120, 8, seed=1)
    val = make_split(world, 30, 8, seed=2)
    test = make_split(world, 30, 8, seed=3)
    out = tmp_path_factory.mktemp("main") / "probe.safetensors"
    epochs = []
    config = TrainConfig(epochs=30, batch_prompts=8, lr=1e-3, patience=0, seed=0)
    result = train_probe(train, val, small_config(), config, META, out, on_epoch=lambda e, m: epochs.append((e, m)))
    return dict(train=train, val=val, test=test, result=result, epochs=epochs, path=out)


def test_reaches_high_within_prompt_spearman_on_held_out_prompts(trained):
    probe, meta = load_probe(trained["path"])
    metrics = evaluate_probe(probe, trained["test"])
    print(f"held-out test: within-prompt Spearman {metrics['within_spearman']:.4f}, global "
          f"{metrics['global_spearman']:.4f}, top-1 {metrics['top1']:.3f}, oracle gain {metrics['oracle_gain']:.3f}")
    assert metrics["within_spearman"] >= 0.9
    # The per-prompt offset is invisible in the maps: global ranking is much worse.
    assert metrics["global_spearman"] < metrics["within_spearman"] - 0.3
    assert metrics["oracle_gain"] > 0.8
    result = trained["result"]
    assert result.best_metrics["within_spearman"] >= 0.9
    assert result.stopped == "completed" and len(result.history) == 30


def test_history_callback_and_metadata(trained):
    result, train = trained["result"], trained["train"]
    assert [e for e, _ in trained["epochs"]] == list(range(30))
    assert trained["epochs"][-1][1] == result.history[-1]
    keys = {"train_loss", "ranking", "align", "val_within_spearman", "val_global_spearman", "val_top1",
            "lr", "tau", "alpha"}
    assert keys <= set(result.history[0])
    assert result.history[0]["tau"] == 1.0 and result.history[0]["alpha"] == pytest.approx(0.2)
    assert result.history[-1]["lr"] < 1e-5  # cosine schedule decays to ~0
    best = max(range(30), key=lambda e: result.history[e]["val_within_spearman"])
    assert result.best_epoch == best

    meta = read_probe_metadata(trained["path"])
    assert meta.score_mean == pytest.approx(float(train.target.double().mean()), rel=1e-6)
    assert meta.score_std == pytest.approx(float(train.target.double().std(unbiased=False)), rel=1e-6)
    training = meta.training
    assert training["best_epoch"] == result.best_epoch and training["epochs_run"] == 30
    assert training["stopped"] == "completed"
    assert training["val"]["within_spearman"] == pytest.approx(result.best_metrics["within_spearman"])
    assert training["data"] == {"train_rows": 960, "train_prompts": 120, "val_rows": 240, "val_prompts": 30}
    assert training["loss"]["lambda_align"] == 0.0  # no text branch
    assert (meta.backbone_family, meta.tap, meta.checkpoint_t, meta.feature_shape) == ("sd2", "output_blocks.7.0", 0.2, (C, P, P))


def test_probe_file_scores_candidates_in_evaluator_units(trained):
    probe, meta = load_probe(trained["path"])
    test = trained["test"]
    rows = slice(0, 8)  # the 8 seeds of the first test prompt
    acts = ActivationSet(features=test.features[rows], family="sd2", tap="output_blocks.7.0", step=4, steps=20,
                         sigma=1.0, seeds=list(range(8)), run_id="run")
    scores = score_candidates(probe, meta, acts)
    z = predict(probe, test)[rows]
    assert torch.allclose(scores.scores, z * meta.score_std + meta.score_mean, atol=1e-5)
    # Scores are in evaluator units: on the scale of the raw targets, not z-scores.
    all_scores = predict(probe, test) * meta.score_std + meta.score_mean
    assert abs(float(all_scores.mean()) - float(test.target.mean())) < 2.0
    assert within_prompt_spearman(all_scores, test.target, test.group) > 0.9
    assert global_spearman(all_scores, test.target) < 0.7


def _short(world, text_dim=8):
    return make_split(world, 20, 4, seed=11, text_dim=text_dim), make_split(world, 6, 4, seed=12, text_dim=text_dim)


SHORT = dict(epochs=4, batch_prompts=4, lr=1e-3, patience=0, seed=7)


def _weights(path):
    return load_file(str(path))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _strip_time(history):
    return [{k: v for k, v in entry.items() if k not in ("seconds", "samples_per_s")} for entry in history]


def test_deterministic_with_text_branch(world, tmp_path):
    train, val = _short(world)
    results = [train_probe(train, val, small_config(text_dim=8), TrainConfig(**SHORT), META, tmp_path / f"{i}.safetensors")
               for i in range(2)]
    assert _same_weights(tmp_path / "0.safetensors", tmp_path / "1.safetensors")
    assert _strip_time(results[0].history) == _strip_time(results[1].history)
    assert results[0].history[0]["align"] > 0  # the InfoNCE term is active
    assert read_probe_metadata(tmp_path / "0.safetensors").training["loss"]["lambda_align"] == 10.0
    other = train_probe(train, val, small_config(text_dim=8), TrainConfig(**{**SHORT, "seed": 8}), META, tmp_path / "2.safetensors")
    assert not _same_weights(tmp_path / "0.safetensors", tmp_path / "2.safetensors")
    assert other.history != results[0].history
    # The text probe scores with a shared text embedding.
    probe, meta = load_probe(tmp_path / "0.safetensors")
    acts = ActivationSet(features=val.features[:4], family="sd2", tap="output_blocks.7.0", step=4, steps=20,
                         sigma=1.0, seeds=[0, 1, 2, 3], run_id="r", text_embedding=val.text[:1])
    assert score_candidates(probe, meta, acts).scores.shape == (4,)


class Cancel(Exception):
    pass


def test_resume_equals_uninterrupted_run(world, tmp_path):
    train, val = _short(world)
    config = TrainConfig(**SHORT, save_state_every=1)
    full = train_probe(train, val, small_config(8), config, META, tmp_path / "full.safetensors", state_dir=tmp_path / "full_state")

    def cancel_after_epoch_1(epoch, metrics):
        if epoch == 1:
            raise Cancel
    with pytest.raises(Cancel):
        train_probe(train, val, small_config(8), config, META, tmp_path / "resumed.safetensors",
                    state_dir=tmp_path / "state", on_epoch=cancel_after_epoch_1)
    info = json.loads((tmp_path / "state" / "train_state.json").read_text())
    assert info["completed_epochs"] == 2
    # The interrupted run left a loadable probe (its best so far).
    assert read_probe_metadata(tmp_path / "resumed.safetensors").training["stopped"] == "running"

    resumed = train_probe(train, val, small_config(8), config, META, tmp_path / "resumed.safetensors", state_dir=tmp_path / "state")
    assert resumed.resumed_from_epoch == 2
    assert _strip_time(resumed.history) == _strip_time(full.history)
    assert resumed.best_epoch == full.best_epoch
    assert _same_weights(tmp_path / "full.safetensors", tmp_path / "resumed.safetensors")
    # Final raw and EMA weights and optimizer moments are identical too, not just the best EMA.
    final_full = load_file(str(tmp_path / "full_state" / "train_state_e0004.safetensors"))
    final_resumed = load_file(str(tmp_path / "state" / "train_state_e0004.safetensors"))
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["train_state.json", "train_state_e0004.safetensors"]

    # A finished state just rewrites the probe; a state of another run is refused.
    again = train_probe(train, val, small_config(8), config, META, tmp_path / "again.safetensors", state_dir=tmp_path / "state")
    assert again.resumed_from_epoch == 4 and _same_weights(tmp_path / "full.safetensors", tmp_path / "again.safetensors")
    with pytest.raises(ValueError, match="different run"):
        train_probe(train, val, small_config(8), TrainConfig(**{**SHORT, "seed": 1}), META,
                    tmp_path / "x.safetensors", state_dir=tmp_path / "state")


def _stop_after(batches):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > batches
    return should_stop


@pytest.mark.parametrize("batches, best_epoch", [(3, -1), (7, 0)])
def test_should_stop_keeps_best_so_far(world, tmp_path, batches, best_epoch):
    # 20 prompts / 4 per batch = 5 batches per epoch: 3 batches stop inside epoch 0 (before any
    # validation), 7 batches stop inside epoch 1 (after epoch 0 was validated and saved).
    train, val = _short(world)
    path = tmp_path / "stopped.safetensors"
    result = train_probe(train, val, small_config(8), TrainConfig(**SHORT), META, path, should_stop=_stop_after(batches))
    assert result.stopped == "should_stop"
    assert result.best_epoch == best_epoch
    assert len(result.history) == (0 if best_epoch < 0 else 1)
    probe, meta = load_probe(path)
    assert meta.training["stopped"] == "should_stop"
    assert meta.training["best_epoch"] == best_epoch
    assert meta.training["val"]["within_spearman"] == pytest.approx(result.best_metrics["within_spearman"])
    assert evaluate_probe(probe, val)["within_spearman"] == pytest.approx(result.best_metrics["within_spearman"])
    if best_epoch == 0:
        assert result.best_metrics["within_spearman"] == pytest.approx(result.history[0]["val_within_spearman"])


def test_trains_under_inference_mode_with_priors(world, tmp_path):
    with torch.inference_mode():
        train, val = _short(world, text_dim=0)
        assert train.features.is_inference()
        result = train_probe(train, val, small_config(), TrainConfig(**{**SHORT, "epochs": 2, "score_mean": 0.3594, "score_std": 0.9424}),
                             META, tmp_path / "p.safetensors")
    assert result.score_mean == 0.3594 and result.score_std == 0.9424
    meta = read_probe_metadata(tmp_path / "p.safetensors")
    assert (meta.score_mean, meta.score_std) == (0.3594, 0.9424)
    assert meta.training["score_norm_source"] == "prior"
    assert all(math.isfinite(entry["train_loss"]) for entry in result.history)


def test_rejects_mismatched_inputs(world, tmp_path):
    train, val = _short(world, text_dim=0)
    with pytest.raises(ValueError, match="in_channels"):
        train_probe(train, val, ProbeConfig(in_channels=C + 1, feature_size=P), TrainConfig(**SHORT), META, tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="text branch"):
        train_probe(train, val, small_config(text_dim=8), TrainConfig(**SHORT), META, tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="metadata_base"):
        train_probe(train, val, small_config(), TrainConfig(**SHORT), {**META, "colour": "red"}, tmp_path / "p.safetensors")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    # Prompt ids may be strings (as in DatasetArrays.prompt_ids).
    named = TrainArrays(features=train.features[:6], t=0.2, group=["a", "a", "b", "b", "a", "c"], target=train.target[:6])
    assert named.group.tolist() == [0, 0, 1, 1, 0, 2] and named.num_prompts == 3
    assert not (tmp_path / "p.safetensors").exists()
