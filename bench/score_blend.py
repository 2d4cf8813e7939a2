"""Blending the x0 preview with a probe (ProbeSelectBlendScores) on the proxy bench's held-out prompts.

    make bench-score-blend                               # after make bench-proxy-bulk and make bench-proxy

The x0 preview runs the evaluator on a blurry estimate of the finished image and so tells the seeds that will
satisfy the prompt; the learned probes rank a prompt's seeds better overall but mostly by ordering the failures
(bench/results/learned_limits.md). ``probes.training.blending`` mixes the two, each standardised within a prompt's
seeds, with a weight fitted on validation prompts. For each learned scorer of the bulk learning curve's largest point:

* the blend of the plain x0 preview (what ProbeSelectPreviewScore gives) and that probe, its weight fitted on
  the bulk set's validation prompts (the curve's own split), judged on the held-out prompts: within-prompt
  Spearman, the fraction of the oracle gain that top-1 of 5 / 10 captures, the success AUC;
* the same with the noise-aware preview (bench/preview_reward.py's ranker of the evaluator's factors on the
  preview, here fitted on the bulk set's training prompts): the proxy world's stand-in for a reward model
  fine-tuned on noisy previews, which the pack does not ship;
* at equal compute (the proxy bench's schedules and prices; a blend pays for the preview and the probe), the
  blends of validation's pick, at t = 0.2 and, for the second stage, at t = 0.4 with the same kind of probe
  trained on the bulk set's t = 0.4 rows.

Figures go to bench/results/score_blend.{md,json} and a sentence per model into REPORT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import learned_limits  # noqa: E402
import preview_reward  # noqa: E402
import proxy_bench  # noqa: E402  (bootstraps ComfyUI and registers probe_select)
from probe_select.probes.training.blending import blend_scores, fit_blend_weight  # noqa: E402

import numpy as np  # noqa: E402

log = logging.getLogger("score_blend")
CHECKPOINTS = (proxy_bench.BULK_CHECKPOINT, proxy_bench.BULK_SECOND_STAGE)
PREVIEW, TUNED = "x0 preview", "noise-aware preview"
RESULTS_FILE = "score_blend.json"
EQUAL_COMPUTE_METHODS = ("one stage at 0.2", "two stages (0.2, 0.4)")


def signed(gain: dict) -> str:
    """A difference of within-prompt Spearman with its interval: '+0.059 [+0.031, +0.086]'."""
    return f"{gain['within']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]"


def blend_name(first: str, scorer: str) -> str:
    return f"{first} + {proxy_bench.LEARNED_LABELS[scorer]}"


class Rows:
    """One dataset's rows at checkpoint t as the blends read them: groups, finals, preview scores."""

    def __init__(self, dataset, t: float, rows=None):
        arrays = dataset.arrays(checkpoint_t=t, evaluator=proxy_bench.EVALUATOR)
        self.arrays = arrays if rows is None else arrays.select(rows)
        take = (lambda values: values) if rows is None else (lambda values: values[rows.numpy()])
        self.groups = self.arrays.prompt_groups().numpy()
        self.finals = take(dataset.scores(proxy_bench.EVALUATOR).double().numpy())
        self.preview = take(dataset.scores(f"x0@{t:g}").double().numpy())


def probe_scores(path: Path, rows: Rows) -> np.ndarray:
    from probe_select.probes.io import load_probe
    from probe_select.probes.training.evaluation import probe_predictions

    probe, meta = load_probe(path)
    return probe_predictions(probe, meta, rows.arrays).double().numpy()


def blended(first_val, second_val, val: Rows, first_held, second_held, held: Rows) -> tuple[dict, np.ndarray]:
    """The blend's weight fitted on the validation rows, and its held-out scores."""
    fit = fit_blend_weight(first_val, second_val, val.finals, val.groups)
    scores = blend_scores(first_held, second_held, fit.weight, held.groups).double().numpy()
    return {"weight": fit.weight, "val_within": fit.within}, scores


def scorers_within(scores: np.ndarray, rows: Rows) -> float:
    return learned_limits.picking(scores, rows.finals, rows.groups)["within"]


def judged(scores: np.ndarray, held: Rows, bootstrap: int, **extra) -> dict:
    """A scorer's held-out figures: within-prompt Spearman with its interval, top-1 oracle gains, success AUC."""
    return dict(extra, **learned_limits.picking(scores, held.finals, held.groups),
                interval=proxy_bench.within_ci(scores, held.finals, held.groups, bootstrap))


def paired_gain(scores: np.ndarray, other: np.ndarray, held: Rows, bootstrap: int) -> dict:
    """Within-prompt Spearman of ``scores`` minus that of ``other`` on the same prompts: the mean of the per-prompt
    differences and its bootstrap interval (prompts resampled together, so the prompts' own difficulty cancels)."""
    from probe_select.probes.training.metrics import bootstrap_ci, per_group_spearman

    ours, theirs = (per_group_spearman(s, held.finals, held.groups) for s in (scores, other))
    ci = bootstrap_ci(ours - theirs, n=bootstrap, seed=0)
    return {"within": ci["mean"], "low": ci["low"], "high": ci["high"]}


def noise_aware_preview(bulk, held_ds, family: str, t: float, fit_rows, val_rows) -> tuple[np.ndarray, np.ndarray]:
    """The noise-aware preview's scores of the bulk validation rows and of the held-out rows: preview_reward's
    ranker (linear or MLP, chosen on the validation rows) fitted on the bulk set's training rows."""
    target = bulk.scores(proxy_bench.EVALUATOR).double().numpy()
    groups = bulk.arrays(checkpoint_t=t, evaluator=proxy_bench.EVALUATOR).prompt_groups().numpy()
    features, _ = preview_reward.preview_features(bulk, family, t)
    held_features, _ = preview_reward.preview_features(held_ds, family, t)
    fitted = [preview_reward.fit_ranker(features[fit_rows], target[fit_rows], groups[fit_rows], hidden)
              for hidden in preview_reward.HIDDEN_CHOICES]
    ranker = max(fitted, key=lambda r: preview_reward.within(r(features[val_rows]), target[val_rows], groups[val_rows]))
    return ranker(features[val_rows]), ranker(held_features)


def measure(family: str, setting) -> dict:
    """Every blend of one family; {} when its bulk set, held-out set or saved bulk curve is missing."""
    from probe_select.probes.training.dataset import ProbeDataset
    from probe_select.probes.training.dataset.splits import split_by_prompt

    bulk_dir, held_dir = proxy_bench.CACHE / f"{family}_bulk", proxy_bench.CACHE / f"{family}_heldout"
    curve = proxy_bench.saved_families(proxy_bench.RESULTS / proxy_bench.BULK_CURVE_FILE, setting).get(family, {})
    if not (bulk_dir / "manifest.json").exists() or not (held_dir / "manifest.json").exists() or not curve:
        log.warning("  %s: needs its bulk set, its held-out set and its saved bulk curve (make bench-proxy-bulk, "
                    "make bench-proxy); skipped", family)
        return {}
    bulk, held_ds = ProbeDataset(bulk_dir), ProbeDataset(held_dir)
    target = proxy_bench.training_target(bulk.manifest)
    splits = split_by_prompt(bulk.prompt_ids, proxy_bench.BULK_SPLIT, seed=0)      # the bulk curve's own split
    val = {t: Rows(bulk, t, splits["val"]) for t in CHECKPOINTS}
    held = {t: Rows(held_ds, t) for t in CHECKPOINTS}
    largest = {scorer: points[-1] for scorer, points in curve["curves"].items()}

    t = proxy_bench.BULK_CHECKPOINT
    scorers = {PREVIEW: judged(held[t].preview, held[t], setting.bootstrap)}
    blends, held_scores = {}, {}
    for scorer, point in largest.items():
        count = point["train_prompts"]
        proxy_bench.bulk_point(family, scorer, count, bulk, held_ds, setting, target)     # trained if missing
        path = proxy_bench.bulk_probe_file(family, scorer, count)
        on_val, on_held = probe_scores(path, val[t]), probe_scores(path, held[t])
        scorers[proxy_bench.LEARNED_LABELS[scorer]] = judged(on_held, held[t], setting.bootstrap)
        fit, scores = blended(val[t].preview, on_val, val[t], held[t].preview, on_held, held[t])
        blends[scorer] = fit
        better_alone = max((held[t].preview, on_held), key=lambda s: scorers_within(s, held[t]))
        gain = paired_gain(scores, better_alone, held[t], setting.bootstrap)
        scorers[blend_name(PREVIEW, scorer)] = judged(scores, held[t], setting.bootstrap, **fit, gain=gain)
        held_scores[scorer] = (on_val, on_held)
    pick = max(blends, key=lambda scorer: blends[scorer]["val_within"])
    count = largest[pick]["train_prompts"]
    log.info("  %s: validation's pick among the blends: %s (weight %.2f)", family, pick, blends[pick]["weight"])

    # Both stages for the equal-compute rows: the pick's blends, the noise-aware preview and its blend with the pick.
    fit_rows, val_rows = splits["train"].numpy(), splits["val"].numpy()
    label = proxy_bench.LEARNED_LABELS[pick]
    stages = {PREVIEW: {}, blend_name(PREVIEW, pick): {}, TUNED: {}, blend_name(TUNED, pick): {}, label: {}}
    weights = {}
    for t in CHECKPOINTS:
        if t == proxy_bench.BULK_CHECKPOINT:
            on_val, on_held = held_scores[pick]
        else:
            proxy_bench.bulk_point(family, pick, count, bulk, held_ds, setting, target, t=t)
            path = proxy_bench.bulk_probe_file(family, pick, count, t)
            on_val, on_held = probe_scores(path, val[t]), probe_scores(path, held[t])
        tuned_val, tuned_held = noise_aware_preview(bulk, held_ds, family, t, fit_rows, val_rows)
        preview_fit, preview_blend = blended(val[t].preview, on_val, val[t], held[t].preview, on_held, held[t])
        tuned_fit, tuned_blend = blended(tuned_val, on_val, val[t], tuned_held, on_held, held[t])
        stages[PREVIEW][t], stages[blend_name(PREVIEW, pick)][t] = held[t].preview, preview_blend
        stages[TUNED][t], stages[blend_name(TUNED, pick)][t] = tuned_held, tuned_blend
        stages[label][t] = on_held
        weights[f"{t:g}"] = {blend_name(PREVIEW, pick): preview_fit, blend_name(TUNED, pick): tuned_fit}
        if t == proxy_bench.BULK_CHECKPOINT:
            scorers[TUNED] = judged(tuned_held, held[t], setting.bootstrap)
            better_alone = max((tuned_held, on_held), key=lambda s: scorers_within(s, held[t]))
            scorers[blend_name(TUNED, pick)] = judged(
                tuned_blend, held[t], setting.bootstrap, **tuned_fit,
                gain=paired_gain(tuned_blend, better_alone, held[t], setting.bootstrap))
    t = proxy_bench.BULK_CHECKPOINT
    # The probe alone, and as the cheap first stage of two whose second (t = 0.4) is a preview.
    mixes = ((label, PREVIEW), (label, TUNED))
    eq = proxy_bench.equal_compute(family, dataclasses.replace(setting, checkpoints=CHECKPOINTS), stages,
                                   held[t].finals, held[t].groups, pick, previews=(PREVIEW, TUNED),
                                   blends=tuple(name for name in stages if "+" in name), mixes=mixes)
    unit = eq["best_of_8"]["compute"]
    keys = [f"{method} / {name}" for method in EQUAL_COMPUTE_METHODS for name in stages]
    keys += [f"{EQUAL_COMPUTE_METHODS[-1]} / {proxy_bench.mix_name(*mix)}" for mix in mixes]
    rows = {key: {"match": proxy_bench.fraction_of_best_of_8(eq["match_best_of_8"][key], unit),
                  "at_half": proxy_bench.best_reward_at_half(eq["curves"][key], unit)} for key in keys}
    return {"pick": pick, "pick_label": proxy_bench.LEARNED_LABELS[pick], "train_rows": largest[pick]["train_rows"],
            "scorers": scorers, "weights_by_t": weights, "best_of_8": eq["best_of_8"]["reward"],
            "equal_compute": rows}


def summary_line(family: str, entry: dict) -> str:
    """REPORT.md's sentence on a family's blends (its reading follows the figures)."""
    scorers, pick = entry["scorers"], entry["pick_label"]
    preview, probe = scorers[PREVIEW], scorers[pick]
    blend, tuned_blend = scorers[f"{PREVIEW} + {pick}"], scorers[f"{TUNED} + {pick}"]
    gain = blend["gain"]
    verdict = ("ranks the seeds better than either alone" if gain["low"] > 0 else
               "ranks the seeds worse than the better of the two alone" if gain["high"] < 0 else
               "ranks the seeds about as well as the better of the two alone")
    verdict += f" (by {signed(gain)}, paired over prompts)"
    two = entry["equal_compute"]
    return (f"Blending the x0 preview with a probe ({family}, bench/results/score_blend.md; ProbeSelectBlendScores): "
            f"with the {pick} (validation's pick, weight {blend['weight']:.2f} on the probe) the blend {verdict}: "
            f"{blend['within']:.3f} within-prompt Spearman against {preview['within']:.3f} (preview) and "
            f"{probe['within']:.3f} (probe); top-1 of 10 captures {blend['oracle_gain_10']:.2f} of the oracle gain "
            f"(the preview {preview['oracle_gain_10']:.2f}, the probe {probe['oracle_gain_10']:.2f}). With the "
            f"noise-aware preview in place "
            f"of the plain one: {tuned_blend['within']:.3f} ({scorers[TUNED]['within']:.3f} alone; "
            f"{signed(tuned_blend['gain'])} over the better alone). In two stages "
            f"(0.2, 0.4) they match best-of-8 at {two[f'two stages (0.2, 0.4) / {PREVIEW} + {pick}']['match']} and "
            f"{two[f'two stages (0.2, 0.4) / {TUNED} + {pick}']['match']} of its compute (the x0 preview alone "
            f"{two[f'two stages (0.2, 0.4) / {PREVIEW}']['match']}); the probe alone at 0.2 then the x0 preview at 0.4 "
            f"at {two[f'two stages (0.2, 0.4) / {proxy_bench.mix_name(pick, PREVIEW)}']['match']}, then the noise-aware "
            f"preview at {two[f'two stages (0.2, 0.4) / {proxy_bench.mix_name(pick, TUNED)}']['match']}.")


def markdown(results: dict) -> str:
    lines = ["# Blending the x0 preview with a probe", "",
             f"Command: `{results['command']}`. Held-out prompts of the proxy bench (32 x 20 seeds); probes from the "
             "learning curve's largest point on the bulk set; blend weights (on the probe) fitted on the bulk set's "
             "validation prompts (probes.training.blending.fit_blend_weight). The noise-aware preview is "
             "bench/preview_reward.py's ranker fitted on the bulk set's training prompts: a stand-in for a reward model "
             "fine-tuned on noisy previews, not a node of the pack. Intervals: bootstrap 95% over held-out prompts; a "
             "blend's gain over the better of its two scorers alone is the mean of the per-prompt differences, the "
             "prompts resampled together.", ""]
    for family, entry in results["families"].items():
        lines += [f"## {family} (t = {proxy_bench.BULK_CHECKPOINT:g})", "",
                  "| scorer | weight on the probe (validation Spearman) | within-prompt Spearman [95% CI] | blend minus "
                  "the better of its two alone [95% CI] | oracle gain, top-1 of 5 | of 10 | success AUC |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, row in entry["scorers"].items():
            fit = f"{row['weight']:.2f} ({row['val_within']:.3f})" if "weight" in row else "-"
            gain = signed(row["gain"]) if "gain" in row else "-"
            lines.append(f"| {name} | {fit} | {proxy_bench.cell(row['interval'])} | {gain} | "
                         f"{row['oracle_gain_5']:.3f} | {row['oracle_gain_10']:.3f} | {row['success_auc']:.3f} |")
        lines += ["", f"At equal compute (best-of-8: reward {entry['best_of_8']:.4f}; the proxy bench's schedules and "
                      "prices, a blend paying for the preview and the probe, 'A -> B' pruning at 0.2 with A and at "
                      "0.4 with B, each stage paying for its own scorer; second stages at t = 0.4 with weights "
                      + ", ".join(f"{name} {fit['weight']:.2f}" for name, fit in entry["weights_by_t"]["0.4"].items())
                      + "):", "",
                  "| method / scorer | compute to match best-of-8 (fraction, per half) | best reward at <= 0.5 of its "
                  "compute |", "| --- | --- | --- |"]
        for key, row in entry["equal_compute"].items():
            lines.append(f"| {key} | {row['match']} | {row['at_half']:.4f} |")
        lines.append("")
    lines += ["## Reading", ""] + [f"- {entry['summary']}" for entry in results["families"].values()]
    return "\n".join(lines) + "\n"


def report(families: list[str], setting, out: Path, command: str) -> dict:
    return proxy_bench.family_results(out, Path(RESULTS_FILE).stem, families, setting, command,
                                      lambda family: measure(family, setting), summary_line, markdown)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["unet", "dit"])
    parser.add_argument("--out", type=Path, default=proxy_bench.RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    proxy_bench.load_pack()
    proxy_bench._modules()
    results = report(args.families, proxy_bench.MEDIUM, args.out,
                     " ".join(["bench/score_blend.py", *(argv if argv is not None else sys.argv[1:])]))
    log.info("wrote %s", args.out / "score_blend.md")
    proxy_bench.rewrite_report_from(args.out)      # REPORT.md's sentences
    return results


if __name__ == "__main__":
    from devtools import bootstrap_comfy

    signal.signal(signal.SIGTERM, proxy_bench.stop_on_sigterm)
    bootstrap_comfy(pytorch_attention=True)
    main()
