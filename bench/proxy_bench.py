"""Probe-Select measured end to end in the proxy world: quality of early selection and its cost.

    make bench-proxy                               # the full report (both models)
    .venv/bin/python bench/proxy_bench.py --quick  # a reduced setting (what the tests smoke-run)

For each proxy model (an SD1.x-family UNet and an SD3-family DiT, bench/proxy_world/models.py):
1. Collect: every prompt's candidates (seed + i) are finished with the pack's own split sampler,
   recording the tapped block at each checkpoint t and the x0 prediction there. Finished images and
   x0 previews are scored by the analytic evaluator. Rows go to Probe-Select datasets (train prompts,
   held-out prompts) in bench/cache/proxy_bench/.
2. Train one probe per checkpoint on the training prompts (the pack's trainer).
3. On held-out prompts: within-prompt Spearman (headline) and global Spearman of the probe, of the
   x0-preview scorer and of random scores, with bootstrap 95% intervals over prompts; the fraction of
   the oracle gain that top-1 of N captures.
4. Cost in one run: generate-all-then-select vs Probe-Select vs the x0-preview scorer at N=5, K=1,
   t=0.2 and other settings, in denoiser evaluations and wall-clock.
Writes bench/results/REPORT.md, bench/results/proxy_bench.json and PNG plots.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))          # last: ComfyUI's `nodes` must win over the pack's nodes/

from devtools import load_pack  # noqa: E402  (bootstraps ComfyUI in-process, as the tests do)
from probe_select.probes.atomic import atomic_write_text  # noqa: E402  (devtools registered probe_select)
from probe_select.probes.checkpoints import checkpoint_step  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("proxy_bench")
RESULTS = ROOT / "bench" / "results"
CACHE = DEFAULT_CACHE = ROOT / "bench" / "cache" / "proxy_bench"
DEMO_PROBES = ROOT / "bench" / "proxy_world" / "weights"   # committed next to the proxy models
EVALUATOR = "proxy"
# The probes learn log(score): the proxy score is a product of factors, each floored at 0.1, so its
# log is a sum (one term per factor) and the many failed seeds, whose scores differ by factors of
# 10 at values near 0, are spread out. The ranking of a prompt's seeds is the same, so every
# metric is computed against the raw score.
TRAIN_TARGET = "proxy_log"
LOG_FLOOR = 1e-6
# Rows also store each checkpoint's x0-prediction latent pooled to 16x16 (the UNet's 4x32x32, the DiT's
# native 16x16x16): what the learned x0 scorers read (free at inference: no decode, no evaluator).
X0_SIZE = 16


@dataclass
class Setting:
    train_prompts: int
    heldout_prompts: int
    train_seeds: int
    heldout_seeds: int
    steps: int
    cfg: object      # a number, or None: each model's own CFG (bench.proxy_world.models.DEFAULT_CFG)
    checkpoints: tuple
    epochs: int
    feature_size: int
    bootstrap: int
    cost_repeats: int


FULL = Setting(train_prompts=128, heldout_prompts=48, train_seeds=16, heldout_seeds=20, steps=20, cfg=None,
               checkpoints=(0.1, 0.2, 0.3, 0.4, 0.6), epochs=40, feature_size=8, bootstrap=1000, cost_repeats=5)
MEDIUM = Setting(train_prompts=96, heldout_prompts=32, train_seeds=12, heldout_seeds=20, steps=20, cfg=None,
                 checkpoints=(0.1, 0.2, 0.3, 0.4, 0.6), epochs=30, feature_size=8, bootstrap=1000, cost_repeats=2)
QUICK = Setting(train_prompts=16, heldout_prompts=8, train_seeds=4, heldout_seeds=6, steps=10, cfg=4.0,
                checkpoints=(0.2, 0.4), epochs=2, feature_size=4, bootstrap=50, cost_repeats=1)


# The learning curve's bulk training set (``--collect-only bulk``): enough prompts that the largest point trains
# on >= 10,000 rows once 10% of the prompts are held for validation. The probes are judged on the held-out
# dataset, so the bulk set needs no test split of its own. The curve is at t = 0.2; the rows also hold t = 0.4
# (free: the candidates pass it on their way to the end) for the second stage of two-stage pruning.
BULK_PROMPTS, BULK_SEEDS, BULK_CHECKPOINT = 940, 12, 0.2      # 11,280 rows: 846 train prompts, 10,152 rows
BULK_SECOND_STAGE = 0.4
BULK_SPLIT = (0.9, 0.1, 0.0)

# The early set (``--collect-only early``): every training-split prompt's candidates run only to EARLY_STOP, their
# x0 latents kept at each checkpoint up to it and no finished score. A learner of the preview's reading
# (bench/distilled_probe.py) needs nothing more: its teacher reads the x0 latent itself, so a row costs 0.4 of a
# generation instead of a whole one. Its seeds start far from every other set's, so no trajectory repeats one.
EARLY_SEEDS, EARLY_STOP, EARLY_CHECKPOINTS = 8, 0.4, (0.1, 0.2, 0.3, 0.4)
EARLY_SEED_BASE = 20_000_000

# The confirmation set (``--collect-only confirm``): the held-out prompts after the report's, as many seeds each. A
# schedule chosen on the report's held-out prompts is judged on these, which no choice has seen
# (bench/distilled_probe.py). Its seeds start far from every other set's.
CONFIRM_PROMPTS, CONFIRM_SEED_BASE = 32, 30_000_000

UNTRAINED = False     # --untrained: random-initialised proxy models (smoke tests of the pipeline only)
BULK_CURVE = True     # --skip-bulk-curve: left to a later --bulk-curve-only run (the bulk set may still be collecting)


# Candidate i of prompt p is seed ``first_seed(seed_base, p) + i``; the held-out prompts' seeds start far from the
# training prompts' (seed base 0), so no held-out candidate repeats a training one.
HELDOUT_SEED_BASE = 10_000_000


def first_seed(seed_base: int, prompt_index: int) -> int:
    """The seed of candidate 0 of the ``prompt_index``-th prompt of a collection."""
    return seed_base + prompt_index * 1000


def heldout_split() -> list[str]:
    """Every prompt of the grammar's held-out split, in the split's order (the bench reads it from the front)."""
    from bench.proxy_world import grammar
    _, held = grammar.split_prompts(grammar.all_prompts(seed=0), seed=0)
    return held


def heldout_prompts(setting: Setting) -> list[str]:
    """The held-out prompts the report is measured on (the first ``setting.heldout_prompts`` of the split)."""
    return heldout_split()[: setting.heldout_prompts]


def confirmation_prompts(setting: Setting) -> list[str]:
    """The confirmation set's prompts: the CONFIRM_PROMPTS held-out prompts after :func:`heldout_prompts`."""
    return heldout_split()[setting.heldout_prompts: setting.heldout_prompts + CONFIRM_PROMPTS]


def cfg_of(family: str, setting: Setting) -> float:
    """The setting's CFG, or the model's own (models.DEFAULT_CFG) when the setting leaves it to the model."""
    from bench.proxy_world import models
    return float(models.DEFAULT_CFG[family] if setting.cfg is None else setting.cfg)


def sampler_of(family: str) -> str:
    """The sampler the model samples with (bench.proxy_world.models.DEFAULT_SAMPLER: chosen in its calibration)."""
    from bench.proxy_world import models
    return models.DEFAULT_SAMPLER[family]


def load_model(family: str):
    from bench.proxy_world import models
    if UNTRAINED:
        return models.build(family), models.build_text_encoder(family)
    return models.load(family)


# What the conditioning's pooled output, which the sets store and the prompt-conditioned probes read, is made of
# (bench/proxy_world/text.py). A run records its family's; a record without one predates the UNet's "tokens".
PROMPT_EMBEDDINGS = {"mean": "a projection of the mean over its tokens (nearly blind to word order)",
                     "tokens": "its token features in order"}


def prompt_embedding(family: str) -> str:
    from bench.proxy_world import models
    return models.TEXT_POOLING[family]


def prompt_embedding_note(results: dict) -> str:
    """The report's note on the prompt embedding each family's probes read, and where a saved bulk curve read
    another (collected before the UNet's pooled output kept word order)."""
    parts = []
    for family, res in results["families"].items():
        main = res.get("prompt_embedding", "mean")
        bulk = res.get("bulk_learning_curve") or {}
        part = f"{family}: {PROMPT_EMBEDDINGS[main]}"
        if bulk and bulk.get("prompt_embedding", "mean") != main:
            part += (f" (its bulk curve, collected before: {PROMPT_EMBEDDINGS[bulk.get('prompt_embedding', 'mean')]}; "
                     "only its prompt-conditioned scorer reads it)")
        parts.append(part)
    return ("- Prompt embedding (the conditioning's pooled output: the sets store it, the prompt-conditioned probes "
            "read it): " + "; ".join(parts) + ".")


def _modules():
    pack = load_pack()
    from bench.proxy_world import evaluator, grammar, models
    return pack, grammar, models, evaluator


# ---- 1. collection -------------------------------------------------------------------------------

def collect(family: str, prompts: list[str], seeds: int, setting: Setting, dataset_dir: Path, seed_base: int,
            resume: bool = False, lane: tuple[int, int] = (1, 1), stop_at: float | None = None) -> dict:
    """Run every prompt's candidates to the end; write a dataset; return preview scores per t.

    ``stop_at``: run them only to that fraction of the steps instead (every checkpoint at or before it); the rows
    then hold no finished score, only the evaluator's score of each checkpoint's preview (``x0@t``).

    ``resume``: keep the rows already in ``dataset_dir`` and collect only the prompts it lacks (the bulk set takes
    hours: an interrupted run goes on where it stopped); otherwise the dataset is collected anew.
    ``lane`` (i, n): collect only every n-th prompt, starting at the i-th, so that n processes (one per core) fill
    one dataset together; each writes its own shards, and a prompt's seeds do not depend on the lane."""
    pack, grammar, models, evaluator = _modules()
    from probe_select.nodes.engine import split_sampling
    from probe_select.nodes.nodes_tap import apply_tap
    from probe_select.probes.training.dataset import DatasetWriter, ProbeDataset, rows_from_activations
    from probe_select.probes.training.dataset.rows import prompt_id

    patcher, text = load_model(family)
    tapped = apply_tap(patcher, "auto", setting.feature_size)
    negative = text.conditioning("")
    steps = setting.steps
    capture = [checkpoint_step(steps, t) for t in setting.checkpoints]
    stop_step = steps if stop_at is None else checkpoint_step(steps, stop_at)
    if max(capture) > stop_step:
        raise ValueError(f"collect: checkpoints {setting.checkpoints} go past stop_at={stop_at}")
    done = set()
    if resume and (dataset_dir / "manifest.json").exists():
        done = set(ProbeDataset(dataset_dir).prompt_ids)
        log.info("  %s: %d of %d prompts already in %s", family, len(done), len(prompts), dataset_dir)
    elif dataset_dir.exists():
        shutil.rmtree(dataset_dir)
    writer = None
    lane_index, lanes = lane
    for p, prompt in enumerate(prompts):
        if p % lanes != lane_index - 1 or prompt_id(prompt) in done:
            continue
        positive = text.conditioning(prompt)
        scene = grammar.parse_prompt(prompt)
        result = split_sampling.run_candidates(
            tapped, positive, negative, models.empty_latent(family, 1), first_seed(seed_base, p), seeds, steps,
            cfg_of(family, setting), sampler_of(family), "normal", stop_step=stop_step, capture_at=capture)
        scores = {}
        if stop_at is None:
            final = evaluator.score(models.latent_to_image(result.latent["samples"], family), [scene] * seeds)
            final = torch.as_tensor(final, dtype=torch.float64)
            scores = {EVALUATOR: final.float(), TRAIN_TARGET: final.clamp(min=LOG_FLOOR).log().float()}
        for t, k in zip(setting.checkpoints, capture):
            preview = evaluator.score(models.latent_to_image(result.x0_at[k], family), [scene] * seeds)
            scores[f"x0@{t:g}"] = torch.as_tensor(preview, dtype=torch.float32)
        manifest, rows = rows_from_activations(result.activations, scores, prompt, x0_size=X0_SIZE)
        if writer is None:
            writer = DatasetWriter(dataset_dir, manifest, writer_id="bench" if lanes == 1 else f"bench-lane{lane_index}")
        writer.append(rows)
        if (p + 1) % 20 == 0 or p + 1 == len(prompts):
            log.info("  %s: collected %d/%d prompts", family, p + 1, len(prompts))
    return {"rows": len(prompts) * seeds, "tap": tapped_path(tapped)}


def tapped_path(model) -> str:
    from probe_select.nodes.engine.capture import find_tap
    return find_tap(model).path


# ---- 2./3. probes and metrics ----------------------------------------------------------------------

def within_ci(pred: np.ndarray, target: np.ndarray, group: np.ndarray, n_boot: int) -> dict:
    from probe_select.probes.training.metrics import bootstrap_ci, global_spearman, per_group_spearman
    per_prompt = per_group_spearman(pred, target, group)
    ci = bootstrap_ci(per_prompt[np.isfinite(per_prompt)], n=n_boot, seed=0)
    return {"within": ci["mean"], "low": ci["low"], "high": ci["high"], "global": global_spearman(pred, target)}


def random_baseline(target: np.ndarray, group: np.ndarray, n_boot: int, draws: int = 20) -> dict:
    """Random scores, averaged over draws so that the row shows random selection's expectation."""
    from probe_select.probes.training.metrics import bootstrap_ci, global_spearman, per_group_spearman
    rng = np.random.default_rng(1)
    preds = [rng.random(len(target)) for _ in range(draws)]
    per_prompt = np.nanmean([per_group_spearman(p, target, group) for p in preds], axis=0)
    ci = bootstrap_ci(per_prompt[np.isfinite(per_prompt)], n=n_boot, seed=0)
    return {"within": ci["mean"], "low": ci["low"], "high": ci["high"],
            "global": float(np.mean([global_spearman(p, target) for p in preds])),
            "oracle_gain": {n: float(np.nanmean([oracle_gain(p, target, group, n, draws=2) for p in preds]))
                            for n in (2, 5, 10, 20)}}


def oracle_gain(pred: np.ndarray, target: np.ndarray, group: np.ndarray, n: int, draws: int = 20) -> float:
    """Mean over prompts and random N-subsets of (selected - mean) / (best - mean) for top-1 of N."""
    rng = np.random.default_rng(0)
    gains = []
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        if len(rows) < n:
            continue
        for _ in range(draws):
            sub = rng.choice(rows, n, replace=False)
            best, mean = target[sub].max(), target[sub].mean()
            if best - mean < 1e-9:
                continue
            gains.append((target[sub[np.argmax(pred[sub])]] - mean) / (best - mean))
    return float(np.mean(gains)) if gains else float("nan")


# The bench probe: the pack's Probe with no down blocks (a 1x1 stem, global average pool, small MLPs),
# ~40 k parameters. With ~1,600 training rows the convolutional probes (the pack's default scaled
# down, kept below as ablations) memorise the training prompts within a few epochs; this one has the
# best validation within-prompt Spearman (training prompts only) for both models.
BENCH_PROBE = dict(stem_width=32, widths=(), pooled_size=1, embed_dim=32, mlp_hidden=64, head_hidden=(32,),
                   attention=False)
CNN_PROBE = dict(stem_width=32, widths=(64, 128), embed_dim=128, mlp_hidden=256, head_hidden=(128,),
                 attention=False, pooled_size=2)


# The learned scorers compared at every checkpoint: what each reads (ProbeConfig overrides on the bench
# probe). "probe" is the paper's (activations of the tapped block); the x0 ones read the sampler's x0
# prediction latent through a small time-conditioned CNN (the pack's x0 branch, default widths).
# "x0_text_probe" also conditions its x0 encoder on the prompt (text_film): this world's reward is about
# whether the image matches its prompt (which colour where, how many), which a text-blind probe can
# only guess at.
LEARNED = {
    "probe": {},
    "x0_probe": dict(inputs=("x0",), x0_size=X0_SIZE),
    "both_probe": dict(inputs=("activations", "x0"), x0_size=X0_SIZE),
    "x0_text_probe": dict(inputs=("x0",), x0_size=X0_SIZE, text_film=True),
}
LEARNED_LABELS = {"probe": "probe (activations)", "x0_probe": "x0-latent probe", "both_probe": "activations + x0 probe",
                  "x0_text_probe": "prompt-conditioned x0-latent probe"}


def reads_text(overrides: dict) -> bool:
    """Whether a learned scorer's probe reads the prompt's text embedding."""
    return bool(overrides.get("text_film"))


SCORERS = (*LEARNED, "x0_preview", "random")


def probe_config(channels: int, setting: Setting, **overrides):
    from probe_select.probes.model import ProbeConfig
    base = dict(in_channels=channels, feature_size=setting.feature_size, **BENCH_PROBE)
    return ProbeConfig(**{**base, **overrides})


def train_config(setting: Setting, **overrides):
    from probe_select.probes.training.train import TrainConfig
    base = dict(epochs=setting.epochs, batch_prompts=16, lr=1e-3, patience=10, seed=0, lambda_align=0.0)
    return TrainConfig(**{**base, **overrides})


def _float_or_nan(value) -> float:
    """A validation figure as a float; NaN where it is undefined (None: constant scores or predictions)."""
    return float("nan") if value is None else float(value)


def train_and_evaluate(train_ds, held_ds, t: float, out: Path, setting: Setting, target: str, config, tcfg,
                       use_text: bool = False, train_prompts=None, fractions=None) -> dict:
    """Train a probe at checkpoint t on the training prompts; score it on the held-out prompts."""
    from probe_select.probes.training.evaluation import evaluate_probe_on
    from probe_select.probes.io import load_probe
    from probe_select.probes.training.pipeline import train_from_dataset

    started = time.perf_counter()
    split = {} if fractions is None else {"fractions": fractions}
    result, sizes = train_from_dataset(train_ds, t, target, out, use_text=use_text, probe_config=config,
                                       train_config=tcfg, streaming="off", train_prompts=train_prompts, **split)
    train_seconds = time.perf_counter() - started
    probe, meta = load_probe(out)
    evaluation = evaluate_probe_on(probe, meta, held_ds.arrays(checkpoint_t=t, evaluator=EVALUATOR))
    best = result.history[result.best_epoch] if 0 <= result.best_epoch < len(result.history) else {}
    row = {"train_rows": sizes["train"], "train_seconds": round(train_seconds, 1), "best_epoch": result.best_epoch,
           "val_within": _float_or_nan(best.get("val_within_spearman")),
           "probe_parameters": sum(p.numel() for p in probe.parameters()),
           "probe": heldout_figures(evaluation, setting)}
    return row, evaluation


def heldout_figures(evaluation, setting: Setting) -> dict:
    """A probe's held-out figures: within-prompt Spearman with its interval, global Spearman, top-1 oracle gains."""
    figures = within_ci(evaluation.predicted, evaluation.actual, evaluation.group, setting.bootstrap)
    figures["oracle_gain"] = {n: oracle_gain(evaluation.predicted, evaluation.actual, evaluation.group, n)
                              for n in (2, 5, 10, 20)}
    return figures


def noise_levels(family: str, setting: Setting) -> dict:
    """Where each checkpoint t lands on the schedule the model samples with (sigma, log-SNR)."""
    from bench.proxy_world.sample import checkpoint_level

    patcher, _ = load_model(family)
    return {t: checkpoint_level(patcher, family, t, setting.steps).as_dict() for t in setting.checkpoints}


def real_levels_line() -> str:
    """The log-SNR real families reach after 20% of their default steps (bench/results/noise_levels.json)."""
    from probe_select.probes.analysis.noise_levels import load_family_levels
    try:
        levels = load_family_levels()
    except (OSError, ValueError):
        return "Real families at 20% of their default steps: see bench/results/noise_levels.md."
    return ("Real families at 20% of their default steps (ComfyUI's own model_sampling, bench/results/noise_levels.md): "
            + ", ".join(f"{lv.label} {lv.log_snr:.2f}" for lv in levels) + ".")


def training_target(manifest) -> str:
    """What the learned scorers are trained on: the log evaluator score where the dataset's manifest lists
    it, the evaluator score itself otherwise."""
    return TRAIN_TARGET if TRAIN_TARGET in manifest.evaluators else EVALUATOR


def probe_file_name(family: str, scorer: str, t: float) -> str:
    """The file of learned scorer ``scorer`` trained at checkpoint ``t``: the bench probe ("probe") keeps the
    family's plain name, which the demo reads too; the other scorers carry their own name."""
    return f"{family}_t{t:g}.safetensors" if scorer == "probe" else f"{family}_{scorer}_t{t:g}.safetensors"


def evaluate_family(family: str, setting: Setting, train_dir: Path, heldout_dir: Path) -> dict:
    _modules()
    from probe_select.probes.training.dataset import ProbeDataset

    train_ds, held_ds = ProbeDataset(train_dir), ProbeDataset(heldout_dir)
    rows = {}
    channels = train_ds.manifest.feature_shape[0]
    train_target = training_target(train_ds.manifest)
    predictions = {}          # scorer -> t -> held-out predictions (dataset row order), for the compute curves
    for t in setting.checkpoints:
        row = {}
        for name, overrides in LEARNED.items():
            out = CACHE / probe_file_name(family, name, t)
            learned, evaluation = train_and_evaluate(train_ds, held_ds, t, out, setting, train_target,
                                                     probe_config(channels, setting, **overrides), train_config(setting),
                                                     use_text=reads_text(overrides))
            row[name] = learned.pop("probe")
            row[name].update({k: learned[k] for k in ("val_within", "best_epoch", "probe_parameters", "train_rows",
                                                      "train_seconds")})
            predictions.setdefault(name, {})[t] = np.asarray(evaluation.predicted, dtype=np.float64)
        target, group = evaluation.actual, evaluation.group
        preview = held_ds.scores(f"x0@{t:g}").double().numpy()
        predictions.setdefault("x0_preview", {})[t] = preview
        row["x0_preview"] = within_ci(preview, target, group, setting.bootstrap)
        row["x0_preview"]["oracle_gain"] = {n: oracle_gain(preview, target, group, n) for n in (2, 5, 10, 20)}
        row["random"] = random_baseline(target, group, setting.bootstrap)
        rows[t] = row
        log.info("  %s t=%g: %s, x0-preview %.3f, random %.3f", family, t,
                 ", ".join(f"{name} {row[name]['within']:.3f} (val {row[name]['val_within']:.3f})" for name in LEARNED),
                 row["x0_preview"]["within"], row["random"]["within"])
    finals = held_ds.scores(EVALUATOR).double().numpy()
    groups = held_ds.arrays(checkpoint_t=setting.checkpoints[0], evaluator=EVALUATOR).prompt_groups().numpy()
    spread = float(np.mean([finals[groups == g].std() for g in np.unique(groups)]))
    t02 = min(setting.checkpoints, key=lambda c: abs(c - 0.2))
    best = validation_pick({name: rows[t02][name] for name in LEARNED})        # chosen by validation only
    rows[t02]["x0_preview"]["val_within"] = preview_validation(train_ds, t02)
    return {"by_t": rows, "heldout_mean_score": float(finals.mean()), "within_prompt_sd": spread,
            "semantic_failure_rate": float((finals < 0.5).mean()), "noise_levels": noise_levels(family, setting),
            "best_learned": best, "demo_scorer": demo_scorer(rows[t02], best),
            "learning_curve": learning_curve(family, setting, train_ds, held_ds, best, train_target, t02,
                                             rows[t02][best]),
            "bulk_learning_curve": bulk_learning_curve(family, setting, held_ds, train_target) if BULK_CURVE else {},
            "equal_compute": equal_compute(family, setting,
                                           {name: predictions[name] for name in ("x0_preview", *LEARNED)},
                                           finals, groups, best, mixes=learned_then_preview(best, setting))}


def learned_then_preview(scorer: str, setting: Setting) -> tuple:
    """The two-stage mix the learned scorer earns its place in: it prunes the many at t = 0.2 for (almost) nothing,
    the x0 preview prunes the few left at 0.4, where it ranks far better than at 0.2."""
    return ((scorer, "x0_preview"),) if {0.2, 0.4} <= set(setting.checkpoints) else ()


def main_run_equal_compute(family: str, setting: Setting, best: str) -> dict:
    """The main run's equal-compute figures again, from its cached probes and held-out set (no training)."""
    from probe_select.probes.training.dataset import ProbeDataset

    held_ds = ProbeDataset(CACHE / f"{family}_heldout")
    ts = [t for t in setting.checkpoints if t in PRUNING_CHECKPOINTS]
    predictions = {"x0_preview": preview_scores(held_ds, ts)}
    for name in LEARNED:
        predictions[name] = {t: heldout_predictions(CACHE / probe_file_name(family, name, t), held_ds, t) for t in ts}
    finals = held_ds.scores(EVALUATOR).double().numpy()
    groups = held_ds.arrays(checkpoint_t=setting.checkpoints[0], evaluator=EVALUATOR).prompt_groups().numpy()
    return equal_compute(family, setting, predictions, finals, groups, best, mixes=learned_then_preview(best, setting))


def preview_validation(train_ds, t: float) -> float:
    """Within-prompt Spearman of the x0-preview scorer on the validation prompts of the training set: the rows
    every learned scorer's ``val_within`` is measured on (train_from_dataset's split), so the two compare."""
    from probe_select.probes.training.dataset import split_by_prompt
    from probe_select.probes.training.metrics import within_prompt_spearman
    from probe_select.probes.training.pipeline import SPLIT_FRACTIONS

    arrays = train_ds.arrays(checkpoint_t=t, evaluator=EVALUATOR)
    val = split_by_prompt(arrays.prompt_ids, SPLIT_FRACTIONS, seed=0)["val"]
    rows = arrays.select(val)
    preview = train_ds.scores(f"x0@{t:g}")[val]
    return float(within_prompt_spearman(preview.numpy(), rows.scores.numpy(), rows.prompt_groups().numpy()))


DISTILLED = "distilled_probe"        # bench/distilled_probe.py's scorer, as a family's figures name it
SCORER_LABELS = {**LEARNED_LABELS, DISTILLED: "distilled probe"}


def validation_leads(row: dict, best_learned: str, distilled: dict | None = None, t: float = 0.2) -> dict:
    """{learned scorer: its validation Spearman less the x0 preview's on the same rows (training prompts only)}: this
    run's best learned scorer (on its validation prompts) and, where measured, the distilled probe (on its own)."""
    def known(figure) -> float:         # an undefined figure (constant scores: NaN) ranks nothing
        return float("-inf") if figure is None or math.isnan(figure) else float(figure)

    leads = {best_learned: known(row[best_learned]["val_within"]) - known(row["x0_preview"].get("val_within"))}
    figures = ((distilled or {}).get("validation") or {}).get(f"{t:g}")
    if figures:
        leads[DISTILLED] = known(figures[DISTILLED]) - known(figures["x0_preview"])
    return leads


def demo_scorer(row: dict, best_learned: str, distilled: dict | None = None, t: float = 0.2) -> str:
    """The scorer `make demo` selects with: the learned scorer with the largest validation lead over the x0 preview
    (:func:`validation_leads`), or the x0 preview when none leads it (never the held-out figures the report judges
    by)."""
    leads = {scorer: lead for scorer, lead in validation_leads(row, best_learned, distilled, t).items()
             if not math.isnan(lead)}
    chosen = max(leads, key=leads.get, default="x0_preview")
    return chosen if leads.get(chosen, 0) > 0 else "x0_preview"


def choose_demo_scorers(families: list[str], results_dir: Path) -> dict:
    """``--choose-demo-scorer``: add the x0 preview's validation figure and the demo scorer to a saved run
    (proxy_bench.json), from the cached training sets, without training again; then rewrite the report."""
    from probe_select.probes.training.dataset import ProbeDataset

    _modules()
    path = results_dir / "proxy_bench.json"
    saved = json.loads(path.read_text())
    for family in families:
        res = saved["families"][family]
        t02 = min(res["by_t"], key=lambda c: abs(float(c) - 0.2))
        row = res["by_t"][t02]
        row["x0_preview"]["val_within"] = preview_validation(ProbeDataset(CACHE / f"{family}_train"), float(t02))
        res["demo_scorer"] = demo_scorer(row, res.get("best_learned", "probe"), res.get(DISTILLED), float(t02))
        log.info("%s: x0-preview validation %.3f, best learned (%s) %.3f, leads over the preview %s -> the demo "
                 "scores with %s", family, row["x0_preview"]["val_within"], res.get("best_learned", "probe"),
                 row[res.get("best_learned", "probe")]["val_within"],
                 validation_leads(row, res.get("best_learned", "probe"), res.get(DISTILLED), float(t02)),
                 res["demo_scorer"])
        if res["demo_scorer"] == DISTILLED and CACHE == DEFAULT_CACHE:     # the committed demo probe: the bench's own
            written = write_demo_probe(family, source=ROOT / res[DISTILLED]["probe_files"][f"{float(t02):g}"])
            res["demo_probe"] = str(written.relative_to(ROOT) if written.is_relative_to(ROOT) else written)
    saved["command"] = followed_by(saved, f"--choose-demo-scorer --families {' '.join(families)}")
    atomic_write_text(path, json.dumps(saved, indent=2, default=float) + "\n")
    return saved


def curve_point(train_prompts: int, train_rows: int, val_within: float, heldout: dict, **extra) -> dict:
    """One learning-curve point: the training set's size, the validation score, ``extra`` (the bulk curve's
    epochs and seconds) and the held-out within-prompt Spearman with its 95% CI from ``heldout``."""
    return {"train_prompts": train_prompts, "train_rows": train_rows, "val_within": val_within, **extra,
            **{k: heldout[k] for k in ("within", "low", "high")}}


def learning_curve(family: str, setting: Setting, train_ds, held_ds, scorer: str, target: str, t: float,
                   full: dict) -> list:
    """Held-out within-prompt Spearman of ``scorer`` trained on growing prefixes of the training prompts.
    The last point, every training prompt, is ``full``: the run of :func:`evaluate_family` at ``t`` (the
    same rows, config and seed, so training it again would give the same probe)."""
    channels = train_ds.manifest.feature_shape[0]
    prompts = len(set(train_ds.prompt_ids))
    (CACHE / "curve").mkdir(parents=True, exist_ok=True)
    points = []
    for fraction in (0.125, 0.25, 0.5):
        count = max(2, int(round(fraction * prompts)))
        row, _ = train_and_evaluate(train_ds, held_ds, t, CACHE / "curve" / f"{family}_{scorer}_{count}.safetensors",
                                    setting, target, probe_config(channels, setting, **LEARNED[scorer]),
                                    train_config(setting), use_text=reads_text(LEARNED[scorer]), train_prompts=count)
        points.append(curve_point(count, row["train_rows"], row["val_within"], row["probe"]))
        log.info("  %s learning curve %s: %d rows -> %.3f", family, scorer, row["train_rows"], row["probe"]["within"])
    points.append(curve_point(prompts, full["train_rows"], full["val_within"], full))
    return points


# The bulk curve's points (the first n prompts of the bulk set's train split, BULK_SEEDS rows each) and its
# epoch cap: an epoch of the largest point is ten times as many steps as one of the main run's, and early
# stopping ends most runs sooner.
BULK_CURVE_PROMPTS = (96, 212, 423, 846)          # of the train split: 1,152 to 10,152 rows
BULK_EPOCHS = 12


def bulk_training_finished(training: dict, count: int) -> bool:
    """Whether a probe file's training summary is a finished bulk-set training on its first ``count`` prompts."""
    return (training.get("stopped") in ("early_stopping", "completed") and training.get("epochs") == BULK_EPOCHS
            and training.get("data", {}).get("train_prompts") == count)


def finished_point(path: Path, held_ds, count: int, overrides: dict, setting: Setting, t: float = BULK_CHECKPOINT):
    """A learning-curve point whose training already finished (its probe file says so, for the same prompts,
    epochs and inputs), scored on the held-out prompts again instead of trained again; None otherwise."""
    from probe_select.probes.io import load_probe
    from probe_select.probes.training.evaluation import evaluate_probe_on

    if not path.exists():
        return None
    probe, meta = load_probe(path)
    info = meta.training
    wanted = probe_config(meta.config.in_channels, setting, **overrides)
    if (not bulk_training_finished(info, count) or meta.config.inputs != wanted.inputs
            or meta.config.text_film != wanted.text_film):
        return None
    evaluation = evaluate_probe_on(probe, meta, held_ds.arrays(checkpoint_t=t, evaluator=EVALUATOR))
    log.info("  %s: finished training found, scored again", path.name)
    return {"train_rows": info["data"]["train_rows"], "val_within": _float_or_nan(info["val"]["within_spearman"]),
            "best_epoch": info["best_epoch"], "train_seconds": None, "probe": heldout_figures(evaluation, setting)}


def bulk_probe_file(family: str, scorer: str, train_prompts: int, t: float = BULK_CHECKPOINT) -> Path:
    """Where the bulk curve keeps the probe of one of its points (and the second stage's probe, at t)."""
    at = "" if t == BULK_CHECKPOINT else f"_t{t:g}"
    return CACHE / "bulk_curve" / f"{family}_{scorer}_{train_prompts}{at}.safetensors"


def bulk_point(family: str, scorer: str, count: int, bulk, held_ds, setting: Setting, target: str,
               t: float = BULK_CHECKPOINT) -> dict:
    """Scorer ``scorer`` trained at t on the first ``count`` prompts of the bulk set and scored on the held-out
    prompts: its cached probe when that training already finished, else trained now."""
    out = bulk_probe_file(family, scorer, count, t)
    overrides = LEARNED[scorer]
    row = finished_point(out, held_ds, count, overrides, setting, t=t)
    if row is None:
        row, _ = train_and_evaluate(bulk, held_ds, t, out, setting, target,
                                    probe_config(bulk.manifest.feature_shape[0], setting, **overrides),
                                    train_config(setting, epochs=BULK_EPOCHS), use_text=reads_text(overrides),
                                    train_prompts=count, fractions=BULK_SPLIT)
    return row


def bulk_learning_curve(family: str, setting: Setting, held_ds, target: str) -> dict:
    """Every learned scorer at t = 0.2 trained on growing prefixes of the bulk training set (``--collect-only
    bulk``, up to >= 10,000 training rows), each scored on the held-out prompts; {} when it was not collected."""
    from probe_select.probes.training.dataset import ProbeDataset

    bulk_dir = CACHE / f"{family}_bulk"
    if not (bulk_dir / "manifest.json").exists():
        return {}
    bulk = ProbeDataset(bulk_dir)
    available = len(set(bulk.prompt_ids))
    if available < BULK_PROMPTS:
        # The curve's points are prefixes of the set in shard order, and each lane's shards grow in place: a
        # partial set's points would be other prompts than the finished set's, and their cached probes would be
        # taken for the finished set's points.
        log.warning("  %s: the bulk set has %d of its %d prompts; finish it (--collect-only bulk, resumable) before "
                    "its learning curve", family, available, BULK_PROMPTS)
        return {}
    (CACHE / "bulk_curve").mkdir(parents=True, exist_ok=True)
    curves = {}
    for scorer in LEARNED:
        points = []
        for count in sorted({min(c, available) for c in BULK_CURVE_PROMPTS}):
            row = bulk_point(family, scorer, count, bulk, held_ds, setting, target)
            points.append(curve_point(count, row["train_rows"], row["val_within"], row["probe"],
                                      best_epoch=row["best_epoch"], train_seconds=row["train_seconds"]))
            log.info("  %s bulk curve %s: %d rows -> %.3f", family, scorer, row["train_rows"], row["probe"]["within"])
        curves[scorer] = points
    return {"rows": len(bulk.prompt_ids), "prompts": available, "epochs": BULK_EPOCHS, "curves": curves,
            "prompt_embedding": prompt_embedding(family),
            "equal_compute": bulk_equal_compute(family, setting, held_ds, curves, bulk, target)}


def validation_pick(points: dict) -> str:
    """The scorer whose point (one per scorer, e.g. the largest of each bulk curve) has the best validation
    figure; an undefined one (NaN) never wins."""
    return max(points, key=lambda scorer: np.nan_to_num(points[scorer]["val_within"], nan=-np.inf))


def bulk_scorer_name(scorer: str, train_rows: int) -> str:
    """How the equal-compute figures name a scorer trained on the bulk set's largest point."""
    return f"{scorer} on {train_rows} bulk rows"


def preview_scores(dataset, checkpoints) -> dict:
    """The x0 preview's recorded score of every row of ``dataset`` at each checkpoint t: {t: [rows] float64}."""
    return {t: dataset.scores(f"x0@{t:g}").double().numpy() for t in checkpoints}


def heldout_predictions(path: Path, held_ds, t: float, text=None) -> np.ndarray:
    """A saved probe's scores of the held-out rows at checkpoint t, in the dataset's row order (float64);
    ``text``: ``[rows, D]`` prompt embeddings to read instead of the dataset's own."""
    import dataclasses

    from probe_select.probes.io import load_probe
    from probe_select.probes.training.evaluation import evaluate_probe_on

    probe, meta = load_probe(path)
    arrays = held_ds.arrays(checkpoint_t=t, evaluator=EVALUATOR)
    if text is not None:
        arrays = dataclasses.replace(arrays, text_embedding=text)
    evaluation = evaluate_probe_on(probe, meta, arrays)
    return np.asarray(evaluation.predicted, dtype=np.float64)


def bulk_equal_compute(family: str, setting: Setting, held_ds, curves: dict, bulk=None, target: str = "") -> dict:
    """Does more data make the learned scorer pay? The bulk curve's largest point, the scorer validation
    favours there, at equal compute on the held-out prompts: pruning once at t = 0.2 with it, and in two stages
    (t = 0.2 with it; t = 0.4 with the same kind of scorer trained on the bulk set's t = 0.4 rows where ``bulk``
    holds them, else the main run's). Its curves go beside the main run's in the report; {} when that t = 0.4
    probe is missing."""
    largest = {scorer: points[-1] for scorer, points in curves.items()}
    best = validation_pick(largest)
    count = largest[best]["train_prompts"]
    second_from_bulk = bulk is not None and BULK_SECOND_STAGE in bulk.manifest.checkpoints
    stage_probes = {BULK_CHECKPOINT: bulk_probe_file(family, best, count),
                    BULK_SECOND_STAGE: (bulk_probe_file(family, best, count, BULK_SECOND_STAGE) if second_from_bulk
                                        else CACHE / probe_file_name(family, best, BULK_SECOND_STAGE))}
    if BULK_SECOND_STAGE not in setting.checkpoints:
        return {}
    if second_from_bulk:
        bulk_point(family, best, count, bulk, held_ds, setting, target, t=BULK_SECOND_STAGE)
    if not all(path.exists() for path in stage_probes.values()):
        return {}
    learned = {t: heldout_predictions(path, held_ds, t) for t, path in stage_probes.items()}
    finals = held_ds.scores(EVALUATOR).double().numpy()
    groups = held_ds.arrays(checkpoint_t=BULK_CHECKPOINT, evaluator=EVALUATOR).prompt_groups().numpy()
    preview = preview_scores(held_ds, (0.2, 0.4))
    name = bulk_scorer_name(best, largest[best]["train_rows"])
    two = dataclasses.replace(setting, checkpoints=(0.2, 0.4))
    eq = equal_compute(family, two, {"x0_preview": preview, name: learned}, finals, groups, best,
                       mixes=learned_then_preview(name, two))
    # Kept: the rows that read the bulk-trained probe (best-of-N, the x0 preview, random and the oracle are the
    # main run's rows; pruning once at t = 0.4 would not read that probe at all).
    reads_it = [key for key in eq["curves"] if key.endswith((f" / {name}", f" / {mix_name(name, 'x0_preview')}"))
                and not key.startswith("one stage at 0.4")]
    return dict(eq, scorer=name, second_stage="bulk" if second_from_bulk else "main run",
                curves={key: eq["curves"][key] for key in reads_it},
                match_best_of_8={key: eq["match_best_of_8"][key] for key in reads_it})


# Prices in step-equivalents (1 = one denoiser step of one candidate, CFG included) of what the real
# family of each proxy model pays besides the denoiser, from the FLOP counts of bench/results/flops.json:
# the UNet is priced as SD1.5 at 512 px, the DiT as FLUX.1-dev at 1024 px. The evaluator is a BLIP-sized
# ViT-L/16 at 384 px (ImageReward); the x0 preview is decoded with TAESD; learned scorers cost one probe pass.
PRICED_AS = {"unet": ("SD1.5, 512 px", "sd15_step", "sd15_probe", "vae4_decode_64", "taesd4_decode_64"),
             "dit": ("FLUX.1-dev, 1024 px", "flux_dev_step", "flux_dev_probe", "vae16_decode_128", "taesd16_decode_128")}
EVALUATOR_FLOPS = "vit_l16_384"


def step_prices(family: str) -> dict:
    flops = json.loads((ROOT / "bench" / "results" / "flops.json").read_text())
    label, step, probe, vae, taesd = PRICED_AS[family]
    unit = float(flops[step]["flops"])
    return {"priced_as": label, "decode": flops[vae]["flops"] / unit, "evaluator": flops[EVALUATOR_FLOPS]["flops"] / unit,
            "x0_preview": (flops[taesd]["flops"] + flops[EVALUATOR_FLOPS]["flops"]) / unit,
            "probe": flops[probe]["flops"] / unit}


# Random N-subsets of each prompt's seeds every schedule is judged on (probes.pruning.mean_kept_reward): with
# 20 seeds a prompt, disjoint runs of N = 11 would use 11 of them once, and the figures of neighbouring schedules
# would differ by which seeds they happened to read more than by what they do.
EQUAL_COMPUTE_DRAWS = 200


# The checkpoints every pruning method cuts at unless told otherwise: the headline's 0.2 and the later 0.4.
PRUNING_CHECKPOINTS = (0.2, 0.4)


# The Ks a staged method tries at each of its cuts, by its number of cuts (each K below the one before it and N).
STAGED_KS = {2: ((2, 3, 4, 5, 6, 8), (1, 2, 3)), 3: ((3, 4, 6, 8, 10, 12), (2, 3, 4, 6), (1, 2))}


def compute_schedules(max_n: int, checkpoints: tuple = PRUNING_CHECKPOINTS, stages: int = 2) -> dict:
    """The schedules of each method (pruning library syntax), every N up to ``max_n`` candidates: best-of-N, one
    stage at each checkpoint, two stages at each pair of checkpoints (earlier first), and with ``stages`` = 3
    three stages at each triple."""
    ns = range(2, max_n + 1)
    methods = {"best-of-N": [f"{n}" for n in range(1, max_n + 1)]}
    for t in checkpoints:
        methods[f"one stage at {t:g}"] = [f"{n}: {t:g}->{k}" for n in ns for k in (1, 2, 3, 4) if k < n]
    for size in range(2, stages + 1):
        for cuts in itertools.combinations(checkpoints, size):
            methods[staged_method(cuts)] = [
                f"{n}: " + ", ".join(f"{t:g}->{k}" for t, k in zip(cuts, ks))
                for n, *ks in itertools.product(ns, *STAGED_KS[size]) if all(a > b for a, b in zip([n, *ks], ks))]
    return methods


def staged_method(cuts: tuple) -> str:
    """How :func:`compute_schedules` names the method that cuts at each of ``cuts`` in turn (two or three)."""
    return f"{('two', 'three')[len(cuts) - 2]} stages ({', '.join(f'{t:g}' for t in cuts)})"


def two_stage_method(first: float, second: float) -> str:
    """How :func:`compute_schedules` names the method that cuts at checkpoints ``first`` then ``second``."""
    return staged_method((first, second))


def mix_name(first: str, second: str) -> str:
    """A staged scorer that scores every cut but the last with ``first`` and the last with ``second``."""
    return f"{first} -> {second}"


def prompt_tables(scores: dict, finals: np.ndarray, groups: np.ndarray) -> list:
    """One pruning ScoreTable per prompt, in the order the prompts first appear in ``groups``: its seeds' scores at
    each checkpoint of ``scores`` ({t: [rows]}; none for best-of-N) and their finished rewards."""
    from probe_select.probes.pruning import ScoreTable
    at = tuple(scores)
    return [ScoreTable(at, np.stack([scores[t][groups == g] for t in at], 1) if at else np.zeros(((groups == g).sum(), 0)),
                       finals[groups == g]) for g in dict.fromkeys(groups.tolist())]


def equal_compute(family: str, setting: Setting, predictions: dict, finals: np.ndarray, groups: np.ndarray,
                  best: str, previews: tuple = ("x0_preview",), free: tuple = (), blends: tuple = (),
                  mixes: tuple = (), checkpoints: tuple = PRUNING_CHECKPOINTS, stages: int = 2) -> dict:
    """Mean kept reward against compute for every method and scorer, on the held-out prompts' recorded scores.

    Compute counts denoiser steps, the scorer at each pruning stage, the decode of every finished
    candidate and the evaluator's final pick (see probes.pruning.schedule_cost), priced as on the real
    family (:func:`step_prices`), in full generations (best-of-1 = 1). Every schedule is judged on
    EQUAL_COMPUTE_DRAWS random N-subsets of each prompt's seeds, the same for every scorer. The headline is
    the compute at which each method first matches best-of-8's mean reward; the cheapest such schedule is
    chosen on one half of the prompts and its reward and compute are reported on the other half (and the
    other way round), so the choice never sees the prompts it is judged on. ``previews``: the scorers that
    decode the x0 preview and run the evaluator on it (priced so); ``free``: scorers priced at nothing, like
    random and the oracle (bounds, not methods); ``blends``: scorers that mix a preview with a probe
    (probes.training.blending), priced as both; every other scorer is priced as a probe. ``mixes``: pairs
    (first, second) of those scorers, each giving a staged scorer (:func:`mix_name`) that prunes at every cut of a
    multi-stage method but its last with the first and at the last with the second, each stage priced as its own
    scorer. ``checkpoints``: where the methods cut and ``stages`` how many cuts a schedule makes at most
    (:func:`compute_schedules`; each checkpoint must be one of ``setting.checkpoints``)."""
    from probe_select.probes.pruning import (StageCosts, full_generation_cost, mean_kept_reward, parse_schedule,
                                             schedule_cost)
    prices = step_prices(family)
    steps = setting.steps
    ts = [t for t in setting.checkpoints if t in checkpoints]
    if len(ts) != len(checkpoints):
        raise ValueError(f"equal_compute: checkpoints {checkpoints} are not all among the recorded "
                         f"{setting.checkpoints}")
    order = list(dict.fromkeys(groups.tolist()))
    scorers = dict(predictions)       # x0_preview and learned scorers (any other name is priced as a probe)
    rng = np.random.default_rng(0)
    scorers["random"] = {t: rng.random(len(finals)) for t in ts}
    scorers["oracle"] = {t: finals for t in ts}

    def price(name: str) -> float:
        return (prices["x0_preview"] + prices["probe"] if name in blends else prices["x0_preview"] if name in previews
                else 0.0 if name in ("random", "oracle", *free) else prices["probe"])

    unit = full_generation_cost(steps, StageCosts(decode=prices["decode"], final_score=prices["evaluator"]))
    max_n = min(int((groups == g).sum()) for g in order)
    halves = [order[0::2], order[1::2]]

    def stage(scores: dict, stage_price: dict) -> tuple[list, StageCosts]:
        """A scorer's score tables on every prompt, then on each half (built once, read by every schedule), and
        what its stages cost."""
        by_prompt = dict(zip(order, prompt_tables(scores, finals, groups)))
        tables = [list(by_prompt.values())] + [[by_prompt[g] for g in half] for half in halves]
        return tables, StageCosts(score=stage_price, decode=prices["decode"], final_score=prices["evaluator"])

    staged = {name: stage({t: scorers[name][t] for t in ts}, {t: price(name) for t in ts}) for name in scorers}
    # a mix is one scorer at a staged method's earlier cuts and another at its last: its tables and prices per method
    cut_sets = [cuts for size in range(2, stages + 1) for cuts in itertools.combinations(ts, size)]
    mixed = {(staged_method(cuts), mix_name(first, second)):
             stage({t: scorers[first if t != cuts[-1] else second][t] for t in cuts},
                   {t: price(first if t != cuts[-1] else second) for t in cuts})
             for first, second in mixes for cuts in cut_sets}
    curves, headline = {}, {}
    for method, texts in compute_schedules(max_n, tuple(ts), stages).items():
        runs = {name: staged[name] for name in (["random"] if method == "best-of-N" else scorers)}
        runs.update({name: found for (cuts_at, name), found in mixed.items() if cuts_at == method})
        for name, (tables, cost) in runs.items():
            points = []
            for text in texts:
                schedule = parse_schedule(text)
                every, *in_halves = (mean_kept_reward(part, schedule, steps, draws=EQUAL_COMPUTE_DRAWS)
                                     for part in tables)
                points.append({"schedule": text, "compute": schedule_cost(schedule, steps, cost) / unit,
                               "reward": every, "halves": in_halves})
            curves[f"{method} / {name}" if method != "best-of-N" else method] = points
    # best-of-8 (best-of-the-most when fewer seeds were recorded, as in the quick smoke run)
    bo8 = max((p for p in curves["best-of-N"] if int(p["schedule"]) <= 8), key=lambda p: int(p["schedule"]))
    for key, points in curves.items():
        found = []
        for pick_on, judge_on in ((0, 1), (1, 0)):
            matching = [p for p in points if p["halves"][pick_on] >= bo8["halves"][pick_on]]
            if matching:
                chosen = min(matching, key=lambda p: p["compute"])
                found.append({"schedule": chosen["schedule"], "compute": chosen["compute"], "chosen_on": pick_on,
                              "reward": chosen["halves"][judge_on], "best_of_8": bo8["halves"][judge_on]})
        headline[key] = found
    return {"prices": prices, "unit_steps": unit, "best_of_8": bo8, "curves": curves, "match_best_of_8": headline,
            "best_learned": best, "prompts": len(order), "seeds": max_n, "draws": EQUAL_COMPUTE_DRAWS}





# What else was tried at t = 0.2, each against the bench probe above (same data, same seed).
# name: (probe config overrides, train config overrides, target, text branch)
ABLATIONS = {
    "CNN probe: the pack's architecture scaled down (stem 32, widths 64/128, 2x2 pool)": (
        CNN_PROBE, {}, TRAIN_TARGET, False),
    "smaller CNN probe (stem 16, widths 32/64, embed 64)": (
        dict(CNN_PROBE, stem_width=16, widths=(32, 64), embed_dim=64, mlp_hidden=128, head_hidden=(64,)), {},
        TRAIN_TARGET, False),
    "bench probe with a 2x2 pool (not global)": (dict(pooled_size=2), {}, TRAIN_TARGET, False),
    "bench probe + text branch and InfoNCE alignment (weight 10, the pack's default)": (
        {}, dict(lambda_align=10.0), TRAIN_TARGET, True),
    "raw score as the target (not log)": ({}, {}, EVALUATOR, False),
    "ranking loss without margin (alpha 0)": ({}, dict(alpha_max=0.0), TRAIN_TARGET, False),
    "ranking + Pearson term (weight 1)": ({}, dict(lambda_pearson=1.0), TRAIN_TARGET, False),
    "learning rate 1e-4 (not 1e-3)": ({}, dict(lr=1e-4), TRAIN_TARGET, False),
    "training seed 1 (not 0)": ({}, dict(seed=1), TRAIN_TARGET, False),
    # The learned scorers above pool to 1x1 before their MLP, which erases where things are, and this
    # world's failures are largely where things are (relations): the same with a 4x4 pool.
    "x0-latent probe with a 4x4 pool (not global)": (
        dict(inputs=("x0",), x0_size=X0_SIZE, pooled_size=4), {}, TRAIN_TARGET, False),
    "activations + x0 probe with a 4x4 pool (not global)": (
        dict(inputs=("activations", "x0"), x0_size=X0_SIZE, pooled_size=4), {}, TRAIN_TARGET, False),
    "prompt-conditioned x0-latent probe with a 4x4 pool (not global)": (
        dict(inputs=("x0",), x0_size=X0_SIZE, pooled_size=4, text_film=True), {}, TRAIN_TARGET, True),
}


def ablation(family: str, setting: Setting, train_dir: Path, heldout_dir: Path, t: float = 0.2,
             names=None) -> dict:
    from probe_select.probes.training.dataset import ProbeDataset
    train_ds, held_ds = ProbeDataset(train_dir), ProbeDataset(heldout_dir)
    channels = train_ds.manifest.feature_shape[0]
    (CACHE / "ablation").mkdir(parents=True, exist_ok=True)
    out = {}
    text_dim = train_ds.manifest.text_dim
    for i, (name, (config_overrides, train_overrides, target, use_text)) in enumerate(ABLATIONS.items()):
        if (names is not None and name not in names) or (use_text and not text_dim):
            continue
        row, _ = train_and_evaluate(train_ds, held_ds, t, CACHE / "ablation" / f"{family}_{i}.safetensors", setting,
                                    target, probe_config(channels, setting, **config_overrides),
                                    train_config(setting, **train_overrides), use_text=use_text)
        out[name] = row
        log.info("  %s ablation %r: probe %.3f [%.3f, %.3f]", family, name, row["probe"]["within"],
                 row["probe"]["low"], row["probe"]["high"])
    return out


def followed_by(saved: dict, args: str) -> str:
    """The saved run's command with a later step that added to its figures, as the report's first line shows it."""
    step = f"bench/proxy_bench.py {args}"
    command = saved.get("command", "make bench-proxy")
    return command if command.endswith(step) else f"{command}; then {step}"


def saved_setting(saved: dict) -> Setting:
    """The Setting a saved run (proxy_bench.json) was made with (its checkpoints a tuple again)."""
    return Setting(**{k: tuple(v) if k == "checkpoints" else v for k, v in saved["setting"].items()})


def update_saved_run(families: list[str], results_dir: Path, step: str, figures) -> dict:
    """A later step on a saved run (proxy_bench.json): ``figures(family, its saved results, setting)`` puts new
    figures into each family's results, each written as soon as done; the report is rewritten afterwards."""
    _modules()
    path = results_dir / "proxy_bench.json"
    saved = json.loads(path.read_text())
    setting = saved_setting(saved)
    saved["command"] = followed_by(saved, f"{step} --families {' '.join(families)}")
    for family in families:
        figures(family, saved["families"][family], setting)
        atomic_write_text(path, json.dumps(saved, indent=2, default=float) + "\n")
    return saved


def add_ablations(families: list[str], results_dir: Path) -> dict:
    """``--ablation-only``: the probe variants at t=0.2 for a saved run (proxy_bench.json) whose report step skipped
    them, trained on its cached datasets with the run's setting; the report is then rewritten from the saved figures."""
    def figures(family: str, res: dict, setting: Setting) -> None:
        res["ablation"] = ablation(family, setting, CACHE / f"{family}_train", CACHE / f"{family}_heldout")
    return update_saved_run(families, results_dir, "--ablation-only", figures)


def add_equal_compute(families: list[str], results_dir: Path) -> dict:
    """``--equal-compute-only``: the saved run's equal-compute figures measured again (after a change to how they
    are measured), from its cached probes and held-out sets; the report is then rewritten from the saved figures."""
    def figures(family: str, res: dict, setting: Setting) -> None:
        res["equal_compute"] = main_run_equal_compute(family, setting, res["best_learned"])
    return update_saved_run(families, results_dir, "--equal-compute-only", figures)


# ---- 4. cost ----------------------------------------------------------------------------------------

def timing_setup(family: str, setting: Setting, t: float):
    """What the timed runs share: the model, its tapped clone, the probe trained nearest t, one fixed
    prompt (not a training or held-out one) with its conditioning, and an empty latent."""
    _, grammar, models, _ = _modules()
    from probe_select.nodes.nodes_tap import apply_tap
    from probe_select.probes.io import load_probe

    patcher, text = load_model(family)
    tapped = apply_tap(patcher, "auto", setting.feature_size)
    nearest = min(setting.checkpoints, key=lambda c: abs(c - t))
    probe, meta = load_probe(CACHE / probe_file_name(family, "probe", nearest))
    prompt = grammar.all_prompts(limit=1, seed=99)[0]
    return (patcher, tapped, probe, meta, prompt, text.conditioning(prompt), text.conditioning(""),
            models.empty_latent(family, 1))


def cost(family: str, setting: Setting, n: int, k: int, t: float, repeats: int) -> dict:
    """Wall-clock and denoiser evaluations of the three ways to pick K of N, in one run."""
    pack, grammar, models, evaluator = _modules()
    from probe_select.nodes.engine import split_sampling
    from probe_select.probes.scoring import score_candidates
    import nodes as comfy_nodes

    patcher, tapped, probe, meta, prompt, pos, neg, latent = timing_setup(family, setting, t)
    cfg = cfg_of(family, setting)
    scene = grammar.parse_prompt(prompt)
    steps = setting.steps

    def decode_and_score(samples):
        return evaluator.score(models.latent_to_image(samples, family), [scene] * samples.shape[0])

    def generate_all():
        out = split_sampling.run_candidates(patcher, pos, neg, latent, 0, n, steps, cfg, sampler_of(family), "normal",
                                            stop_step=steps, capture_at=())
        scores = decode_and_score(out.latent["samples"])
        return int(torch.as_tensor(scores).argmax())

    def probe_select():
        early = split_sampling.run_early(tapped, pos, neg, latent, 0, n, steps, cfg, sampler_of(family), "normal", t)
        scores = score_candidates(probe, meta, early.activations)
        kept = split_sampling.select_rows(early.latent, scores.order()[:k].tolist())
        final = split_sampling.resume(patcher, pos, neg, kept, cfg)
        decode_and_score(final["samples"])

    def x0_preview():
        early = split_sampling.run_early(patcher, pos, neg, latent, 0, n, steps, cfg, sampler_of(family), "normal", t)
        order = torch.as_tensor(decode_and_score(early.x0["samples"])).argsort(descending=True, stable=True)
        kept = split_sampling.select_rows(early.latent, order[:k].tolist())
        final = split_sampling.resume(patcher, pos, neg, kept, cfg)
        decode_and_score(final["samples"])

    del comfy_nodes
    times = {"generate_all": [], "probe_select": [], "x0_preview": []}
    generate_all(), probe_select(), x0_preview()          # warm-up
    for _ in range(repeats):
        for name, fn in (("generate_all", generate_all), ("probe_select", probe_select), ("x0_preview", x0_preview)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    med = {name: float(np.median(v)) for name, v in times.items()}
    s = checkpoint_step(steps, t)
    return {"N": n, "K": k, "t": t, "steps": steps, "seconds": {k_: round(v, 4) for k_, v in med.items()},
            "wallclock_ratio_probe": round(med["probe_select"] / med["generate_all"], 3),
            "wallclock_ratio_x0_preview": round(med["x0_preview"] / med["generate_all"], 3),
            "denoiser_evals": {"generate_all": n * steps, "probe_select": n * s + k * (steps - s),
                               "x0_preview": n * s + k * (steps - s)},
            "denoiser_ratio": round((n * s + k * (steps - s)) / (n * steps), 3)}


def overheads(family: str, setting: Setting, n: int = 5, t: float = 0.2, repeats: int = 7) -> dict:
    """Tap overhead (early sampling with vs without the tap), probe latency and activation memory per
    candidate, on this proxy model; runs interleaved so that drift hits both sides alike."""
    _modules()
    from probe_select.nodes.engine import split_sampling
    from probe_select.probes.scoring import score_candidates

    patcher, tapped, probe, meta, _, pos, neg, latent = timing_setup(family, setting, t)

    def early(model):
        return split_sampling.run_early(model, pos, neg, latent, 0, n, setting.steps, cfg_of(family, setting),
                                        sampler_of(family), "normal", t)

    activations = early(tapped).activations
    early(patcher)                                         # warm-up
    plain, with_tap, probe_s = [], [], []
    for _ in range(repeats):
        for model, times in ((patcher, plain), (tapped, with_tap)):
            started = time.perf_counter()
            early(model)
            times.append(time.perf_counter() - started)
        started = time.perf_counter()
        score_candidates(probe, meta, activations)
        probe_s.append(time.perf_counter() - started)
    plain_med, tap_med = float(np.median(plain)), float(np.median(with_tap))
    return {"N": n, "t": t, "repeats": repeats, "early_plain_s": round(plain_med, 4), "early_tap_s": round(tap_med, 4),
            "tap_overhead_pct": round(100 * (tap_med - plain_med) / plain_med, 2),
            "probe_ms_per_candidate": round(1000 * float(np.median(probe_s)) / n, 3),
            "denoiser_step_ms_per_candidate": round(1000 * plain_med / (n * checkpoint_step(setting.steps, t)), 3),
            "activation_bytes_per_candidate": int(activations.features[0].numel() * activations.features.element_size()),
            "activation_shape": list(activations.features.shape[1:]), "activation_dtype": str(activations.features.dtype)}


def write_demo_probe(family: str, scorer: str = "probe", t: float = 0.2, source: Path | None = None) -> Path:
    """The t=0.2 probe of the learned scorer validation favoured (``source``: another probe file, e.g. the distilled
    probe's), in fp16, where `make demo` finds it on a fresh clone (under the demo's name whatever it reads: the
    demo connects activations and x0)."""
    from probe_select.probes.io import load_probe, save_probe
    probe, meta = load_probe(source if source is not None else CACHE / probe_file_name(family, scorer, t))
    return save_probe(DEMO_PROBES / probe_file_name(family, "probe", t), probe, meta, dtype=torch.float16)


# ---- report -----------------------------------------------------------------------------------------

BULK_CURVE_FILE = "proxy_bulk_curve.json"


def add_bulk_curves(families: list[str], setting: Setting, results_dir: Path) -> dict:
    """The bulk learning curve of each family, in its own file (``proxy_bulk_curve.json``: the bulk set takes an
    hour to collect and its curve a while to train, so it runs beside the report step); a report step or
    ``--report-only`` run afterwards puts it in REPORT.md."""
    from probe_select.probes.training.dataset import ProbeDataset

    _modules()
    path = results_dir / BULK_CURVE_FILE
    setting_json = json.loads(json.dumps(setting.__dict__))
    curves = saved_families(path, setting)
    renewed = []              # families with a new curve (an unfinished bulk set gives none: the saved one stays)
    for family in families:
        held_ds = ProbeDataset(CACHE / f"{family}_heldout")
        target = training_target(held_ds.manifest)
        curve = bulk_learning_curve(family, setting, held_ds, target)
        if curve:
            curves[family] = curve
            renewed.append(family)
    out = {"setting": setting_json, "families": curves}
    # the saved run's own copy of each curve (a run with the bulk curve holds one) would hide the new one
    run_path = results_dir / "proxy_bench.json"
    if run_path.exists():
        run = json.loads(run_path.read_text())
        stale = [family for family in renewed if run.get("setting") == setting_json
                 and run["families"].get(family, {}).get("bulk_learning_curve")]
        for family in stale:
            run["families"][family]["bulk_learning_curve"] = curves[family]
        if stale:
            size = "--quick " if setting == QUICK else "--medium " if setting == MEDIUM else ""
            run["command"] = followed_by(run, f"{size}--bulk-curve-only --families {' '.join(families)}")
            atomic_write_text(run_path, json.dumps(run, indent=2, default=float) + "\n")
    atomic_write_text(path, json.dumps(out, indent=2, default=float) + "\n")
    return out


def attach_bulk_curves(results: dict, results_dir: Path) -> None:
    """Put the saved bulk learning curves (same setting) into the families that have none."""
    path = results_dir / BULK_CURVE_FILE
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    if saved.get("setting") != json.loads(json.dumps(results["setting"])):
        return
    for family, curve in saved["families"].items():
        if family in results["families"] and not results["families"][family].get("bulk_learning_curve"):
            results["families"][family]["bulk_learning_curve"] = curve


def restore_keys(entry: dict) -> dict:
    """A family's figures as a run holds them, from their JSON: checkpoints (t) and N as numbers again."""
    def ints(value):
        if isinstance(value, dict):
            return {(int(k) if k.isdigit() else k) if isinstance(k, str) else k: ints(v) for k, v in value.items()}
        return [ints(v) for v in value] if isinstance(value, list) else value

    entry = ints(entry)
    entry["by_t"] = {float(t): row for t, row in entry["by_t"].items()}
    entry["noise_levels"] = {float(t): lv for t, lv in (entry.get("noise_levels") or {}).items()}
    return entry


def merge_saved_families(results: dict, saved_path: Path) -> str | None:
    """Add the families of a saved run with the same setting that this run did not evaluate (``--families dit``
    after ``--families unet``: one report for both), in the order of FAMILIES. Returns the command behind the kept
    families' figures (the saved run's), None when none was kept."""
    if not saved_path.exists():
        return None
    saved = json.loads(saved_path.read_text())
    if json.loads(json.dumps(results["setting"])) != saved.get("setting"):
        return None
    merged = {}
    for family in ("unet", "dit"):
        if family in results["families"]:
            merged[family] = results["families"][family]
        elif family in saved["families"]:
            entry = restore_keys(saved["families"][family])
            if any(scorer not in row for row in entry["by_t"].values() for scorer in SCORERS):
                log.info("%s: the saved figures predate some scorers; not kept", family)
                continue
            merged[family] = entry
            log.info("%s: figures kept from the saved run (%s)", family, saved_path)
    kept = [family for family in merged if family not in results["families"]]
    results["families"] = merged
    if not kept:
        return None
    return f"{saved.get('command', 'an earlier run')} (the {' and '.join(kept)} figures, kept)"


def plots(results: dict, setting: Setting) -> list[str]:
    from probe_select.probes.plots import line_plot
    names = []
    for family, res in results["families"].items():
        ts = list(res["by_t"])
        within = {name: [res["by_t"][t][name]["within"] for t in ts] for name in SCORERS}
        panels = [within, within,
                  {name: [res["by_t"][min(ts, key=lambda c: abs(c - 0.2))][name]["oracle_gain"][n]
                          for n in (2, 5, 10, 20)] for name in SCORERS}]
        levels = res.get("noise_levels") or {}
        snr = [round(float(levels[t]["log_snr"]), 2) for t in ts] if len(levels) == len(ts) else None
        real = "real 20%: SD1.5/SDXL -3.16" if family == "unet" else "real 20%: SD3 -4.80, FLUX -5.07"
        image = line_plot(panels, [f"{family}: within-prompt Spearman (held-out prompts) against the checkpoint t",
                                   f"{family}: the same against the log-SNR of the checkpoint ({real})",
                                   f"{family}: fraction of the oracle gain captured by top-1 of N (t=0.2)"],
                          x_values=[ts, snr, [2, 5, 10, 20]])
        name = f"proxy_{family}.png"
        image.save(RESULTS / name)
        names.append(name)
    return names


def cell(r: dict) -> str:
    return f"{r['within']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def distilled_cells(res: dict, t: float) -> str:
    """The summary's distilled-probe cells at checkpoint t: its held-out figure [CI] and its lead over the x0 preview
    on the same rows ('- | -' where the family has no distilled probe)."""
    row = ((res.get(DISTILLED) or {}).get("heldout") or {}).get(f"{t:g}")
    if not row:
        return "- | -"
    return f"{cell(row[DISTILLED])} | {row[DISTILLED]['within'] - row['x0_preview']['within']:+.3f}"


def equal_compute_summary(results: dict) -> list:
    """The report's lead: reward of the kept image against compute, and the compute to match best-of-8."""
    lines = ["## Reward at equal compute", "",
             "Mean final reward of the kept image (held-out prompts) against compute in full generations: denoiser "
             "steps, the scorer at each pruning stage, the decode of every finished candidate and the evaluator's "
             "final pick, priced in step-equivalents as on each model's real family (bench/results/flops.json). "
             "Schedules in the pruning library's syntax ('N: t->K, ...'). Oracle: the final reward itself as the "
             "scorer (the ceiling of a scorer at that checkpoint). 'A -> B': A prunes at t = 0.2 and B at 0.4, each "
             "stage priced as its own scorer. Every schedule, N from 1 to the recorded seeds, is judged on "
             f"{EQUAL_COMPUTE_DRAWS} random N-subsets of each prompt's seeds, the same subsets for every scorer. "
             "Match best-of-8: the cheapest schedule of a "
             "method whose reward reaches best-of-8's on one half of the prompts, judged on the other half (both "
             "ways); 'never' when no schedule up to the recorded candidates reaches it.", ""]
    for family, res in results["families"].items():
        eq = res.get("equal_compute")
        if not eq:
            continue
        pr = eq["prices"]
        lines += [f"### {family} (priced as {pr['priced_as']}: one generation = {eq['unit_steps']:.2f} step-equivalents; "
                  f"decode {pr['decode']:.3f}, evaluator {pr['evaluator']:.3f}, x0-preview scoring {pr['x0_preview']:.3f}, "
                  f"probe {pr['probe']:.5f} per candidate)", "",
                  f"Best-of-8: reward {eq['best_of_8']['reward']:.4f} at compute {eq['best_of_8']['compute']:.2f}. "
                  f"{eq['prompts']} prompts x {eq['seeds']} seeds.", "",
                  "| method / scorer | compute to match best-of-8 (fraction of best-of-8's) | schedule chosen | reward "
                  "on the other half (best-of-8 there) | best reward at <= 0.5 of best-of-8's compute |",
                  "| --- | --- | --- | --- | --- |"]
        bo8 = eq["best_of_8"]["compute"]
        bulk_eq = (res.get("bulk_learning_curve") or {}).get("equal_compute") or {}
        bulk_rows = bulk_eq.get("curves", {})
        distilled = res.get(DISTILLED) or {}
        distilled_eq = distilled.get("equal_compute") or {}
        matches = {**eq["match_best_of_8"], **bulk_eq.get("match_best_of_8", {}),
                   **distilled_eq.get("match_best_of_8", {})}
        for key, points in {**eq["curves"], **bulk_rows, **distilled_eq.get("curves", {})}.items():
            found = matches.get(key) or []
            best_half = best_reward_at_half(points, bo8)
            if found:
                frac = " / ".join(f"{f['compute']:.2f} ({f['compute'] / bo8:.2f})" for f in found)
                chosen = " / ".join(f["schedule"] for f in found)
                judged = " / ".join(f"{f['reward']:.4f} ({f['best_of_8']:.4f})" for f in found)
            else:
                frac, chosen, judged = "never", "-", "-"
            lines.append(f"| {key} | {frac} | {chosen} | {judged} | {best_half:.4f} |")
        if bulk_rows:
            lines += ["", f"'{bulk_eq['scorer']}': the learned scorer validation favours at the largest point of the "
                      "learning curve on more data (below), trained on the bulk set at t=0.2; its two-stage rows "
                      + ("score t=0.4 with the same kind of scorer trained on the bulk set's t=0.4 rows"
                         if bulk_eq.get("second_stage") == "bulk" else
                         "score t=0.4 with the main run's scorer of the same kind (the bulk set has t=0.2 only)")
                      + "; its '-> x0_preview' row with the x0 preview instead."]
        if distilled:
            lines += ["", distilled_line(distilled)]
        lines.append("")
    return lines


def english_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def distilled_line(distilled: dict) -> str:
    """The report's sentence on the probe distilled from the preview's reading (bench/distilled_probe.py)."""
    spearman = "; ".join(f"t = {t}: {f['distilled_probe']['within']:.3f} [{f['distilled_probe']['low']:.3f}, "
                         f"{f['distilled_probe']['high']:.3f}] against the x0 preview's {f['x0_preview']['within']:.3f}"
                         for t, f in distilled["heldout"].items())
    return ("'distilled_probe' (bench/results/distilled_probe.md): a probe on the x0 latent and the prompt, trained on "
            f"{distilled['train_rows']} rows of the {english_list(distilled['sets'])} set"
            f"{'s' if len(distilled['sets']) > 1 else ''}"
            + (f" ({distilled['unfinished_rows']} of them early rows, candidates stopped at t = {EARLY_STOP:g}: the "
               "teacher needs no finished image)" if distilled.get("unfinished_rows") else "")
            + " to predict the evaluator's factors on the decoded "
            "preview (the noise-aware preview's inputs), with a linear ranker folded into its head: no decode and no "
            f"evaluator at inference, priced as a probe. Held-out within-prompt Spearman: {spearman}."
            + confirmation_sentence(distilled.get("confirmation")))


def confirmation_sentence(confirmation: dict | None) -> str:
    """The report's test on prompts no choice saw: each scorer's cheapest schedule chosen on every held-out prompt
    that reaches best-of-8 on the confirmation prompts ('' when that set was not judged)."""
    if not confirmation:
        return ""
    bo8 = confirmation["best_of_8"]

    def verdict(scorer: str) -> str:
        found = confirmation["cheapest"].get(scorer)
        if found is None:
            return f"{scorer}: none"
        return (f"{scorer}: {found['fraction']:.2f} of best-of-8's compute ({found['method']}, "
                f"{found['schedule']}; {found['confirmation']:.4f})")

    return (f" Confirmation on {confirmation['prompts']} held-out prompts that no choice saw (each method's schedule "
            "chosen on all the held-out prompts above, in up to three stages at any checkpoints; best-of-8 there "
            f"{bo8['confirmation']:.4f}), the cheapest that reaches best-of-8 there, by scorer: "
            + "; ".join(verdict(scorer) for scorer in confirmation["cheapest"]) + ".")


def write_report(results: dict, setting: Setting, command: str, images: list[str]) -> None:
    lines = [
        "# Probe-Select in the proxy world", "",
        f"Command: `{command}`"
        + (" (the last step of `make bench-proxy`, whose `--collect-only` steps built the datasets)"
           if "--reuse-datasets" in command else "")
        + f". Machine: {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} "
        f"on CPU, {torch.get_num_threads()} thread(s). Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Setting: {setting.train_prompts} training prompts x {setting.train_seeds} seeds, {setting.heldout_prompts} "
        f"held-out prompts x {setting.heldout_seeds} seeds, {setting.steps} steps (sampler: "
        f"{', '.join(f'{f} ' + r.get('sampler', sampler_of(f)) for f, r in results['families'].items())}), CFG "
        f"{setting.cfg if setting.cfg is not None else ', '.join(f'{f} {cfg_of(f, setting):g}' for f in results['families'])}, "
        f"checkpoints {', '.join(f'{t:g}' for t in setting.checkpoints)}; evaluator: the analytic proxy evaluator "
        "(bench/proxy_world/evaluator.py). Within-prompt Spearman is the headline (it is what seed selection "
        "needs); global Spearman, across prompts, is shown for reference only. Intervals: bootstrap 95% over "
        "held-out prompts.", "",
    ]
    lines += ["## Summary (t = 0.2, N = 5, K = 1)", "",
              "Within-prompt Spearman with the final evaluator score on held-out prompts [95% CI]. The learned "
              "scorers need no decode and no evaluator at inference; the x0-preview scorer decodes the x0 "
              "prediction and runs the evaluator on it. Best learned: the learned scorer of this run with the best "
              "validation Spearman (training prompts only). Distilled probe: the x0-latent probe that reads the "
              "prompt and learned the preview's reading on more rows (bench/results/distilled_probe.md; see the "
              "equal-compute notes below).", "",
              "| model | log-SNR at t = 0.2 | x0-preview | " + " | ".join(LEARNED_LABELS[n] for n in LEARNED)
              + " | best learned (by validation) | best learned - x0-preview | distilled probe | distilled probe - "
              "x0-preview | random | Probe-Select / generate-all, wall-clock | denoiser evaluations |",
              "| --- | --- | --- |" + " --- |" * len(LEARNED) + " --- | --- | --- | --- | --- | --- | --- |"]
    for family, res in results["families"].items():
        t02k = min(res["by_t"], key=lambda c: abs(c - 0.2))
        t02 = res["by_t"][t02k]
        lv = (res.get("noise_levels") or {}).get(t02k)
        best = res.get("best_learned", "probe")
        c = next((c for c in res["cost"] if (c["N"], c["K"], c["t"]) == (5, 1, 0.2)), res["cost"][0])
        lines.append(f"| {family} | {lv['log_snr']:.2f} | " if lv else f"| {family} | - | ")
        lines[-1] += (f"{cell(t02['x0_preview'])} | " + " | ".join(cell(t02[name]) for name in LEARNED)
                      + f" | {LEARNED_LABELS[best]}: {t02[best]['within']:.3f} | "
                      f"{t02[best]['within'] - t02['x0_preview']['within']:+.3f} | {distilled_cells(res, t02k)} | "
                      f"{t02['random']['within']:.3f} | {c['wallclock_ratio_probe']} | {c['denoiser_ratio']} |")
    lines += ["", real_levels_line(), ""]
    # the ceiling of early selection (bench/proxy_ceiling.py) and what limits the learned scorer (learned_limits.py)
    ceilings, limits = saved_families(RESULTS / CEILING_FILE, setting), saved_families(RESULTS / LIMITS_FILE, setting)
    blends = saved_families(RESULTS / BLEND_FILE, setting)      # the x0 preview blended with a probe (score_blend.py)
    tuned = saved_families(RESULTS / PREVIEW_REWARD_FILE, setting)     # the noise-aware preview (preview_reward.py)
    if ceilings:
        lines += [ceiling_summary(ceilings), ""]
    if any(res.get("equal_compute") for res in results["families"].values()):
        lines += equal_compute_summary(results)
    for family, res in results["families"].items():
        lines += [f"## {family} ({res['collect']['tap']})", "",
                  f"Held-out finished images: mean score {res['heldout_mean_score']:.3f}, within-prompt SD "
                  f"{res['within_prompt_sd']:.3f}, semantic failures (score < 0.5) {res['semantic_failure_rate']:.1%}.",
                  "",
                  "| t | sigma | log-SNR | x0-preview [95% CI] | " + " | ".join(LEARNED_LABELS[n] for n in LEARNED)
                  + " | random | probe global | x0-preview global |",
                  "| --- | --- | --- | --- |" + " --- |" * len(LEARNED) + " --- | --- | --- |"]
        levels = res.get("noise_levels") or {}
        for t, row in res["by_t"].items():
            lv = levels.get(t) or levels.get(str(t)) or {}
            sigma = f"{lv['sigma']:.4f}" if lv else "-"
            snr = f"{lv['log_snr']:.2f}" if lv else "-"
            lines.append(f"| {t:g} | {sigma} | {snr} | {cell(row['x0_preview'])} | "
                         + " | ".join(cell(row[name]) for name in LEARNED)
                         + f" | {cell(row['random'])} | {row['probe']['global']:.3f} | {row['x0_preview']['global']:.3f} |")
        lines += ["", real_levels_line()]
        t02k = min(res["by_t"], key=lambda c: abs(c - 0.2))
        t02 = res["by_t"][t02k]
        lines += ["", "Fraction of the oracle gain captured by top-1 of N (t=0.2):", "",
                  "| scorer | N=2 | N=5 | N=10 | N=20 |", "| --- | --- | --- | --- | --- |"]
        for name in SCORERS:
            g = t02[name]["oracle_gain"]
            lines.append(f"| {name} | " + " | ".join(f"{g[n]:.3f}" for n in (2, 5, 10, 20)) + " |")
        best = res.get("best_learned", "probe")
        gap = t02[best]["within"] - t02["x0_preview"]["within"]
        bar = [f"At t=0.2 the best learned scorer by validation, the {LEARNED_LABELS[best]} "
               f"({t02[best]['within']:.3f} [{t02[best]['low']:.3f}, {t02[best]['high']:.3f}]), "
               f"{'beats' if gap > 0 else 'does NOT beat'} the x0-preview scorer ({t02['x0_preview']['within']:.3f}) "
               f"by {gap:+.3f}; the bar is >= 0.6 and >= x0-preview + 0.15: "
               f"{'met' if t02[best]['within'] >= 0.6 and gap >= 0.15 else 'NOT met'}."]
        distilled = res.get(DISTILLED) or {}
        held = (distilled.get("heldout") or {}).get(f"{t02k:g}")
        if held:
            d, gap = held[DISTILLED], held[DISTILLED]["within"] - held["x0_preview"]["within"]
            bar.append(f"The distilled probe (the x0 latent and the prompt; no decode, no evaluator) ranks them at "
                       f"{d['within']:.3f} [{d['low']:.3f}, {d['high']:.3f}], {gap:+.3f} over the x0 preview: the bar "
                       f"is {'met' if d['within'] >= 0.6 and gap >= 0.15 else 'NOT met'}.")
        lines += ["", *bar, ""]
        if "val_within" in t02["x0_preview"]:
            chosen = res.get("demo_scorer", best)
            figures = (distilled.get("validation") or {}).get(f"{t02k:g}")
            lines += [f"Validation (training prompts only) of every scorer at t=0.2: x0 preview "
                      f"{t02['x0_preview']['val_within']:.3f}, best learned {t02[best]['val_within']:.3f}"
                      + (f"; on the distilled probe's own validation rows, the distilled probe {figures[DISTILLED]:.3f}, "
                         f"the x0 preview {figures['x0_preview']:.3f}" if figures else "")
                      + "; `make demo` scores with the scorer that leads the x0 preview most on validation: "
                      f"{'the x0 preview' if chosen == 'x0_preview' else 'the ' + SCORER_LABELS[chosen]}.", ""]
        if res.get("learning_curve"):
            lines += [f"Learning curve of the {LEARNED_LABELS[best]} at t=0.2 (trained on the first n training "
                      "prompts; validation and held-out prompts unchanged):", "",
                      "| training prompts | training rows | validation | held-out within-prompt [95% CI] |",
                      "| --- | --- | --- | --- |"]
            for point in res["learning_curve"]:
                lines.append(f"| {point['train_prompts']} | {point['train_rows']} | {point['val_within']:.3f} | "
                             f"{point['within']:.3f} [{point['low']:.3f}, {point['high']:.3f}] |")
            lines.append("")
        bulk = res.get("bulk_learning_curve") or {}
        if bulk.get("curves"):
            sizes = [p["train_rows"] for p in next(iter(bulk["curves"].values()))]
            lines += [f"Learning curve on more data: every learned scorer at t=0.2, trained on the first n prompts of "
                      f"a bulk training set ({bulk['rows']} rows: {bulk['prompts']} training prompts x "
                      f"{bulk['rows'] // max(1, bulk['prompts'])} seeds, collected like the main set; 10% of the "
                      f"prompts held for validation, none for testing; at most {bulk['epochs']} epochs), scored on "
                      "the same held-out prompts. Held-out within-prompt Spearman [95% CI] (validation):", "",
                      "| scorer | " + " | ".join(f"{n} rows" for n in sizes) + " |",
                      "| --- |" + " --- |" * len(sizes)]
            for scorer, points in bulk["curves"].items():
                lines.append(f"| {LEARNED_LABELS.get(scorer, scorer)} | " + " | ".join(
                    f"{p['within']:.3f} [{p['low']:.3f}, {p['high']:.3f}] ({p['val_within']:.3f})" for p in points)
                    + " |")
            lines += ["", f"x0-preview scorer on the same held-out prompts: {t02['x0_preview']['within']:.3f}.", ""]
        if family in ceilings:
            lines += [*ceiling_lines(ceilings[family], t02, best, bulk), ""]
        if family in limits:
            lines += [limits[family]["summary"], ""]
        if family in blends:
            lines += [blends[family]["summary"], ""]
        if family in tuned:
            lines += [tuned[family]["summary"], ""]
        if res.get("ablation") == {}:
            lines += ["The probe variants at t=0.2 (ablations) were not run for this report (`--skip-ablation`).", ""]
        if res.get("ablation"):
            lines += ["What else was tried at t=0.2 (same data and seed unless named; validation: within-prompt "
                      "Spearman on 10% of the training prompts, what model selection may look at; held-out: "
                      "the report's prompts):", "",
                      "| probe variant | parameters | validation | held-out within-prompt [95% CI] | oracle gain N=5 "
                      "| best epoch |", "| --- | --- | --- | --- | --- | --- |"]
            for name, row in [("the bench probe above (1x1 stem, global pool, MLP; log(score))",
                               {**t02["probe"], "probe": t02["probe"]}), *res["ablation"].items()]:
                lines.append(f"| {name} | {row.get('probe_parameters', '')} | {row.get('val_within', float('nan')):.3f} | "
                             f"{cell(row['probe'])} | {row['probe']['oracle_gain'][5]:.3f} | {row['best_epoch']} |")
            lines.append("")
        o = res["overheads"]
        lines += [f"Overheads (N={o['N']}, early sampling to t={o['t']:g}, medians of {o['repeats']} interleaved runs): "
                  f"tap overhead {o['tap_overhead_pct']}% ({o['early_plain_s']} s without the tap, {o['early_tap_s']} s "
                  f"with it); probe {o['probe_ms_per_candidate']} ms per candidate against "
                  f"{o['denoiser_step_ms_per_candidate']} ms per denoiser step per candidate; captured activations "
                  f"{o['activation_bytes_per_candidate'] / 1024:.1f} KiB per candidate ({o['activation_dtype']}, "
                  f"{'x'.join(str(d) for d in o['activation_shape'])}).", ""]
        lines += [f"Cost (median wall-clock of {setting.cost_repeats} interleaved runs after a warm-up; decoding "
                  "and the evaluator included, on N images for generate-all and the x0-preview scorer, on K for "
                  "Probe-Select):", "",
                  "| N | K | t | generate-all s | Probe-Select s | x0-preview s | Probe-Select / all (wall) | "
                  "x0-preview / all (wall) | denoiser evals all -> selected |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in res["cost"]:
            s = c["seconds"]
            lines.append(f"| {c['N']} | {c['K']} | {c['t']:g} | {s['generate_all']} | {s['probe_select']} | "
                         f"{s['x0_preview']} | {c['wallclock_ratio_probe']} | {c['wallclock_ratio_x0_preview']} | "
                         f"{c['denoiser_evals']['generate_all']} -> {c['denoiser_evals']['probe_select']} "
                         f"({c['denoiser_ratio']}) |")
        lines.append("")
    lines += [
        "## Notes", "",
        "- Models: bench/proxy_world/train_models.py, up to an hour of CPU each; quality of their samples and "
        "the calibration against real models (success rate, mixed prompts, x0-preview Spearman at the real 20% "
        "point): bench/results/proxy_models.md.",
        "- Schedules: the UNet samples with SD1.5's scaled-linear eps schedule and the DiT with SD3's own flow "
        "shift 3.0, so a checkpoint fraction lands where it lands on the real families (the log-SNR columns). "
        "Until calibration round 2 the DiT sampled with shift 1.0, where t = 0.2 was far less noisy than on SD3 "
        "or FLUX and the x0 preview far too informative (0.58 then).",
        f"- Bench probe: the pack's Probe class without down blocks (1x1 stem, global average pool, small MLPs; "
        f"chosen by validation Spearman, see the tables), tap `auto`, features pooled to "
        f"{setting.feature_size}x{setting.feature_size}, listwise ranking loss on log(score) "
        f"(same ranking as the score; the log turns the product of floored factors into a sum), no text branch, "
        f"up to {setting.epochs} epochs with early stopping on the within-prompt Spearman of 10% of the training "
        f"prompts; {setting.train_prompts} training prompts x {setting.train_seeds} seeds. Other variants: the "
        "tables above.",
        "- Seeds: candidate i of training prompt p has seed 1000 p + i, of held-out prompt p 10,000,000 + 1000 p + "
        "i; training and held-out prompts come from disjoint halves of the grammar's prompt list "
        "(grammar.split_prompts, seed 0).",
        prompt_embedding_note(results),
        "- Core figures on a 25 M-parameter SD1 UNet (tap overhead, probe latency, split/resume exactness): "
        "bench/results/core.md.", ""]
    lines += [f"![{name}]({name})" for name in images]
    atomic_write_text(RESULTS / "REPORT.md", "\n".join(lines) + "\n")


CEILING_FILE = "proxy_ceiling.json"
LIMITS_FILE = "learned_limits.json"
BLEND_FILE = "score_blend.json"
PREVIEW_REWARD_FILE = "preview_reward.json"


def saved_families(path: Path, setting: Setting) -> dict:
    """Per family, the figures a bench script saved at ``path`` (its JSON: ``setting`` and ``families``) when they
    were measured in ``setting``; {} when there are none or they are another setting's."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    return saved["families"] if saved.get("setting") == json.loads(json.dumps(setting.__dict__)) else {}


def family_results(out: Path, name: str, families: list, setting: Setting, command: str, measure, summary_line,
                   markdown, needs: str = "its bulk set, held-out set and bulk curve") -> dict:
    """The figures of a script that adds a sentence per family to REPORT.md (learned_limits.py, score_blend.py,
    preview_reward.py):
    ``measure(family)`` for each family ({} when it lacks its data: skipped), joined to the other families' figures
    saved in ``out/<name>.json`` in the same setting, each with its sentence ``summary_line(family, entry)`` (which
    REPORT.md reads); written atomically to ``out/<name>.json`` and ``.md`` (``markdown(results)``). Nothing is
    written when no family has figures (``needs``: what a family lacks then, for the message)."""
    results = {"command": command, "setting": json.loads(json.dumps(setting.__dict__)), "families": {}}
    results["families"].update(saved_families(out / f"{name}.json", setting))     # a one-family run keeps the other's
    for family in families:
        entry = measure(family)
        if entry:
            results["families"][family] = entry
    if not results["families"]:
        raise SystemExit(f"{name}: no family has {needs}; nothing written")
    for family, entry in results["families"].items():
        entry["summary"] = summary_line(family, entry)
    atomic_write_text(out / f"{name}.json", json.dumps(results, indent=1, allow_nan=True))
    atomic_write_text(out / f"{name}.md", markdown(results))
    return results


def rewrite_report_from(out: Path) -> None:
    """REPORT.md again, with the figures a later script saved in ``out``, when the proxy bench's run is there."""
    global RESULTS
    if (out / "proxy_bench.json").exists():
        RESULTS = out
        rewrite_report()


def best_reward_at_half(points: list, unit: float) -> float:
    """The best mean kept reward of one method's curve (``points``) at no more than half of best-of-8's compute
    ``unit``; nan when no point is that cheap."""
    return max((p["reward"] for p in points if p["compute"] <= 0.5 * unit), default=float("nan"))


def fraction_of_best_of_8(found: list, unit: float) -> str:
    """Where a method matches best-of-8 (``match_best_of_8``: one entry per half of the prompts it was chosen on),
    as fractions of best-of-8's compute ``unit``."""
    if not found:
        return "never"
    return " / ".join(f"{f['compute'] / unit:.2f}" for f in found) + ("" if len(found) == 2 else " (one half only)")


def ceiling_summary(ceilings: dict) -> str:
    """The Summary's sentence on what any scorer at t = 0.2 could reach."""
    parts = []
    for family, entry in ceilings.items():
        row, eq = entry["by_t"]["0.2"], entry["equal_compute"]
        match = fraction_of_best_of_8(eq["match_best_of_8"]["one stage at 0.2 / expected"], eq["best_of_8"]["compute"])
        parts.append(f"{family} {cell(row['expected_final'])} (mean of {row['redraws']} redraws; extrapolated "
                     f"{row['ceiling']:.3f}), matching best-of-8 at {match} of its compute in one stage at 0.2")
    return ("The ceiling at t = 0.2 (bench/results/proxy_ceiling.md): both models sample with euler_ancestral, so "
            "every later step draws fresh noise and the final reward is not a function of the state at t. The "
            "expected final reward given that state, the most any scorer at t can know, ranks the seeds at "
            + "; ".join(parts) + ".")


def ceiling_lines(entry: dict, t02: dict, best: str, bulk: dict) -> list:
    """A family's learned scorers and x0 preview at t = 0.2 against the ceiling there, and the ceiling at equal
    compute."""
    row, eq = entry["by_t"]["0.2"], entry["equal_compute"]
    learned = [f"the {LEARNED_LABELS[best]} (validation's pick) {t02[best]['within']:.3f}"]
    largest = {scorer: points[-1] for scorer, points in (bulk.get("curves") or {}).items()}
    if largest:
        pick = validation_pick(largest)
        learned.append(f"on {largest[pick]['train_rows']} bulk rows the {LEARNED_LABELS[pick]} (validation's pick) "
                       f"{largest[pick]['within']:.3f}")
    matches = {key: fraction_of_best_of_8(eq["match_best_of_8"][key], eq["best_of_8"]["compute"])
               for key in ("one stage at 0.2 / expected", "two stages (0.2, 0.4) / expected", "one stage at 0.2 / oracle")}
    return [f"Against the ceiling at t = 0.2 (bench/results/proxy_ceiling.md; same prompts and seeds): test-retest "
            f"of two finishes of one state {row['test_retest']:.3f}; expected final reward (mean of {row['redraws']} "
            f"redraws) {cell(row['expected_final'])}, extrapolated to infinitely many {row['ceiling']:.3f}; x0 preview "
            f"{t02['x0_preview']['within']:.3f}; " + "; ".join(learned) + ". At equal compute the expected final "
            f"reward (priced at nothing) matches best-of-8 at {matches['one stage at 0.2 / expected']} of its compute "
            f"in one stage at 0.2 and at {matches['two stages (0.2, 0.4) / expected']} in two stages (0.2, 0.4); the "
            f"realised-final oracle at {matches['one stage at 0.2 / oracle']} in one stage."]


def rewrite_report() -> dict:
    """REPORT.md again from the saved run (proxy_bench.json) and the saved bulk curves; returns the run."""
    _modules()
    saved = json.loads((RESULTS / "proxy_bench.json").read_text())
    saved["families"] = {family: restore_keys(res) for family, res in saved["families"].items()}
    attach_bulk_curves(saved, RESULTS)
    setting = saved_setting(saved)
    write_report(saved, setting, saved.get("command", "make bench-proxy"), plots(saved, setting))
    return saved


def parse_lane(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N), 1 <= I <= N: one of N collection lanes."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"--lane {text!r}: expected I/N with 1 <= I <= N, e.g. 1/2 and 2/2")
    return int(match[1]), int(match[2])


def main(argv=None) -> dict:
    global RESULTS, CACHE, UNTRAINED, BULK_CURVE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced setting (smoke test)")
    parser.add_argument("--medium", action="store_true", help="fewer prompts than the full report (~15 min a model)")
    parser.add_argument("--families", nargs="+", default=["unet", "dit"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=CACHE, help="datasets and probes (default bench/cache/)")
    parser.add_argument("--untrained", action="store_true", help="random proxy models: test the pipeline only")
    parser.add_argument("--reuse-datasets", action="store_true", help="skip collection when the datasets exist")
    parser.add_argument("--report-only", action="store_true", help="rewrite REPORT.md from proxy_bench.json")
    parser.add_argument("--skip-ablation", action="store_true", help="leave out the probe variants at t=0.2")
    parser.add_argument("--skip-bulk-curve", action="store_true",
                        help="leave out the learning curve on the bulk set (add it later with --bulk-curve-only)")
    parser.add_argument("--bulk-curve-only", action="store_true",
                        help="add the bulk learning curve to the saved run (proxy_bulk_curve.json, and proxy_bench.json "
                             "when it holds an older one) and rewrite the report")
    parser.add_argument("--ablation-only", action="store_true",
                        help="train the probe variants at t=0.2 (ablations) for the saved run, on its cached datasets, "
                             "and rewrite the report")
    parser.add_argument("--equal-compute-only", action="store_true",
                        help="measure the saved run's reward at equal compute again from its cached probes and "
                             "held-out sets, and rewrite the report")
    parser.add_argument("--choose-demo-scorer", action="store_true",
                        help="add the x0 preview's validation figure and the demo's scorer (by validation) to the "
                             "saved run, from the cached training sets, and rewrite the report")
    parser.add_argument("--collect-only", choices=["train", "heldout", "bulk", "early", "confirm"],
                        help="only collect this dataset and stop (run them in parallel processes, then "
                             "the report with --reuse-datasets); bulk: the learning curve's training rows; early: "
                             "the distilled probe's extra rows (candidates run to 0.4 only, no finished score); confirm: held-out "
                             "prompts beyond the report's, to judge schedules chosen on the report's")
    parser.add_argument("--lane", type=parse_lane, default=(1, 1), metavar="I/N",
                        help="with --collect-only bulk, early or confirm: collect every N-th prompt from the I-th (run lanes 1/N .. N/N "
                             "at once, one per core)")
    args = parser.parse_args(argv)
    if args.lane != (1, 1) and args.collect_only not in ("bulk", "early", "confirm"):
        parser.error("--lane splits the bulk, early and confirm collections only: use it with one of them")
    if args.choose_demo_scorer:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        CACHE = args.cache
        choose_demo_scorers(args.families, args.out)
    if args.ablation_only:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        CACHE = args.cache
        add_ablations(args.families, args.out)
    if args.equal_compute_only:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        CACHE = args.cache
        add_equal_compute(args.families, args.out)
    if args.report_only or args.choose_demo_scorer or args.ablation_only or args.equal_compute_only:
        RESULTS = args.out
        return rewrite_report()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setting = QUICK if args.quick else MEDIUM if args.medium else FULL
    RESULTS, CACHE, UNTRAINED, BULK_CURVE = args.out, args.cache, args.untrained, not args.skip_bulk_curve
    if args.bulk_curve_only:
        curves = add_bulk_curves(args.families, setting, args.out)
        if (RESULTS / "proxy_bench.json").exists():
            rewrite_report()
        return curves
    RESULTS.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    _, grammar, _, _ = _modules()
    prompts = grammar.all_prompts(seed=0)
    train_prompts, _ = grammar.split_prompts(prompts, seed=0)
    results = {"setting": setting.__dict__, "families": {}}
    for family in args.families:
        log.info("%s: collecting", family)
        train_dir, held_dir = CACHE / f"{family}_train", CACHE / f"{family}_heldout"
        if args.collect_only == "bulk":
            collect(family, train_prompts[:BULK_PROMPTS], BULK_SEEDS,
                    dataclasses.replace(setting, checkpoints=(BULK_CHECKPOINT, BULK_SECOND_STAGE)),
                    CACHE / f"{family}_bulk", 0, resume=True, lane=args.lane)
            continue
        if args.collect_only == "confirm":
            collect(family, confirmation_prompts(setting), setting.heldout_seeds, setting, CACHE / f"{family}_confirm",
                    CONFIRM_SEED_BASE, resume=True, lane=args.lane)
            continue
        if args.collect_only == "early":
            collect(family, train_prompts, EARLY_SEEDS, dataclasses.replace(setting, checkpoints=EARLY_CHECKPOINTS),
                    CACHE / f"{family}_early", EARLY_SEED_BASE, resume=True, lane=args.lane, stop_at=EARLY_STOP)
            continue
        if args.collect_only:
            prompts_, seeds_, dir_, base_ = ((train_prompts[: setting.train_prompts], setting.train_seeds, train_dir, 0)
                                            if args.collect_only == "train" else
                                            (heldout_prompts(setting), setting.heldout_seeds, held_dir, HELDOUT_SEED_BASE))
            collect(family, prompts_, seeds_, setting, dir_, base_)
            continue
        if args.reuse_datasets and (train_dir / "manifest.json").exists() and (held_dir / "manifest.json").exists():
            from probe_select.probes.training.dataset import read_manifest
            info = {"rows": None, "tap": read_manifest(train_dir).tap}
        else:
            info = collect(family, train_prompts[: setting.train_prompts], setting.train_seeds, setting, train_dir, 0)
            collect(family, heldout_prompts(setting), setting.heldout_seeds, setting, held_dir, HELDOUT_SEED_BASE)
        log.info("%s: training probes and evaluating", family)
        res = evaluate_family(family, setting, train_dir, held_dir)
        res["collect"] = info
        res["sampler"], res["cfg"] = sampler_of(family), cfg_of(family, setting)
        res["prompt_embedding"] = prompt_embedding(family)
        res["ablation"] = {} if args.skip_ablation else ablation(family, setting, train_dir, held_dir)
        res["cost"] = [cost(family, setting, n, k, t, setting.cost_repeats)
                       for n, k, t in ((5, 1, 0.2), (10, 2, 0.2), (5, 1, 0.4))
                       if not args.quick or (n, k, t) == (5, 1, 0.2)]
        res["overheads"] = overheads(family, setting, repeats=2 if args.quick else 7)
        if setting is not QUICK and not args.untrained and args.cache == DEFAULT_CACHE:
            res["demo_probe"] = str(write_demo_probe(family, res["best_learned"]).relative_to(ROOT))
        results["families"][family] = res
    if args.collect_only:
        return results
    earlier = merge_saved_families(results, RESULTS / "proxy_bench.json")
    attach_bulk_curves(results, RESULTS)
    command = "bench/proxy_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if earlier:         # the report names every command behind its figures
        command = f"{earlier}; then {command}"
    results["command"] = command
    # the figures first: they took the time; the report is rewritten from them with --report-only
    atomic_write_text(RESULTS / "proxy_bench.json", json.dumps(results, indent=2, default=float) + "\n")
    write_report(results, setting, command, plots(results, setting))
    log.info("wrote %s", RESULTS / "REPORT.md")
    return results


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM (make's lanes are stopped with it: background lanes ignore Ctrl-C) unwinds like Ctrl-C, so an
    interrupted collection removes its temporary shard files and keeps every finished shard."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    import signal

    from devtools import bootstrap_comfy

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    bootstrap_comfy(pytorch_attention=True)   # hours of sampling: PyTorch's attention (see bootstrap_comfy)
    main()
