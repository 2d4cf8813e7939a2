"""What limits the learned scorer? Two measurements on the proxy bench's bulk set and held-out prompts (t = 0.2).

    make bench-learned-limits                            # after make bench-proxy-bulk and make bench-proxy

The learned scorers of the bulk learning curve rank a prompt's seeds better than the x0 preview does (within-prompt
Spearman) and yet match best-of-8 only at more compute. Two questions, each with its table:

* **Can the probe learn the evaluator?** The x0 preview's own score is a fixed function of the latent the probe
  reads (the x0 latent, decoded by a fixed map, scored by the analytic evaluator): a target without noise. The
  scorer validation favours at the bulk curve's largest point is trained, with the same configuration, rows and
  seed, on that score instead of the final reward. How well it reproduces the score on the held-out prompts says
  how much of the evaluator's logic (which colour where, how many) a probe learns from this many rows; how well it
  then ranks the final reward says what the learned part is worth.
* **Ranking or picking?** Within-prompt Spearman counts every pair of seeds, most of them pairs of failures;
  selection only asks for the top. For every learned scorer of the bulk curve's largest point and for the x0
  preview: the Spearman, the fraction of the oracle gain that top-1 of 5 and of 10 captures, and the success AUC
  (the chance that, within a prompt, a seed whose final score is >= 0.5 outscores one that fails).

* **Does a picking-oriented variant help?** The same scorer at the same largest point, trained with a ranking
  loss weighted toward each prompt's best seeds (``TrainConfig.top_weight``), or pooling its x0 features to 2x2
  instead of 1x1 (where things are: this world's relations): validation and held-out figures, and the compute at
  which it matches best-of-8 as the first of two stages before the x0 preview. The UNet only: the DiT's learned
  scorers rank at about 0 at every size, and a variant of a scorer that learned nothing tells nothing.

Figures go to bench/results/learned_limits.{md,json} and a summary into REPORT.md. The probes trained here are
cached under ``bench/cache/proxy_bench/limits/``; the bulk curve's own probes are reused from its cache (trained
again where missing: same rows, configuration and seed).
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

import proxy_bench  # noqa: E402  (bootstraps ComfyUI and registers probe_select)
from probe_select.probes.training.metrics import per_group_spearman  # noqa: E402

import numpy as np  # noqa: E402

log = logging.getLogger("learned_limits")
CHECKPOINT = proxy_bench.BULK_CHECKPOINT
PREVIEW = f"x0@{CHECKPOINT:g}"          # the x0 preview's score column: the noise-free target
SUCCESS_AT = 0.5                        # a final score >= this satisfies the prompt (as in proxy_models.md)
PICK_OF = (5, 10)
RESULTS_FILE = "learned_limits.json"
# Below this within-prompt Spearman with the x0 preview's own score, the report reads the probe as having learned
# little of the evaluator (a scorer that had learned it would rank the seeds as the preview does, near 1).
LEARNS_THE_EVALUATOR = 0.5
SAYS_NOTHING = 0.1          # a within-prompt Spearman with the final reward below this reads as none


def success_auc(scores: np.ndarray, finals: np.ndarray, groups: np.ndarray) -> float:
    """Mean over prompts with both outcomes of P(a success outscores a failure) among that prompt's seeds (ties
    count one half); NaN when no prompt has both."""
    aucs = []
    for g in np.unique(groups):
        rows = groups == g
        won, lost = scores[rows & (finals >= SUCCESS_AT)], scores[rows & (finals < SUCCESS_AT)]
        if len(won) and len(lost):
            diff = won[:, None] - lost[None, :]
            aucs.append(float((diff > 0).mean() + 0.5 * (diff == 0).mean()))
    return float(np.mean(aucs)) if aucs else float("nan")


def picking(scores: np.ndarray, finals: np.ndarray, groups: np.ndarray) -> dict:
    """How a scorer ranks and how it picks: within-prompt Spearman, the oracle gain of top-1 of N, success AUC."""
    return {"within": float(np.nanmean(per_group_spearman(scores, finals, groups))),
            **{f"oracle_gain_{n}": proxy_bench.oracle_gain(scores, finals, groups, n) for n in PICK_OF},
            "success_auc": success_auc(scores, finals, groups)}


# name: (ProbeConfig overrides, TrainConfig overrides) on the validation pick at the bulk curve's largest point.
VARIANTS = {
    "ranking loss weighted toward the best seeds (top_weight 1)": ({}, {"top_weight": 1.0}),
    "ranking loss weighted toward the best seeds (top_weight 2)": ({}, {"top_weight": 2.0}),
    "x0 features pooled 2x2 (not 1x1)": ({"pooled_size": 2}, {}),
}
VARIANT_FAMILIES = ("unet",)


def variant_file(cache: Path, family: str, scorer: str, count: int, name: str) -> Path:
    probe_overrides, train_overrides = VARIANTS[name]
    tag = "_".join(f"{key}{value:g}" for key, value in sorted({**probe_overrides, **train_overrides}.items()))
    return cache / f"{family}_{scorer}_{count}_{tag}.safetensors"


def _finished_variant(path: Path, wanted, top_weight: float, count: int) -> bool:
    """Whether ``path`` holds a finished training of this variant (same probe configuration, loss and prompts)."""
    from probe_select.probes.io import read_probe_metadata

    if not path.exists():
        return False
    meta = read_probe_metadata(path)
    # text_dim is set by training, from the dataset's text embeddings
    same_probe = dataclasses.replace(meta.config, text_dim=wanted.text_dim).to_dict() == wanted.to_dict()
    return (proxy_bench.bulk_training_finished(meta.training, count) and same_probe
            and meta.training.get("loss", {}).get("top_weight", 0.0) == top_weight)


def variant(family: str, scorer: str, count: int, name: str, bulk, held_ds, setting, cache: Path, target: str,
            previews: dict, finals: np.ndarray, groups: np.ndarray) -> dict:
    """One variant of ``scorer``, trained on the first ``count`` bulk prompts (cached in ``cache``): its validation
    Spearman, held-out picking figures, and where it matches best-of-8 as the first stage before the x0 preview."""
    probe_overrides, train_overrides = VARIANTS[name]
    overrides = {**proxy_bench.LEARNED[scorer], **probe_overrides}
    wanted = proxy_bench.probe_config(bulk.manifest.feature_shape[0], setting, **overrides)
    out = variant_file(cache, family, scorer, count, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not _finished_variant(out, wanted, train_overrides.get("top_weight", 0.0), count):
        proxy_bench.train_and_evaluate(bulk, held_ds, CHECKPOINT, out, setting, target, wanted,
                                       proxy_bench.train_config(setting, epochs=proxy_bench.BULK_EPOCHS,
                                                                **train_overrides),
                                       use_text=proxy_bench.reads_text(overrides), train_prompts=count,
                                       fractions=proxy_bench.BULK_SPLIT)
    from probe_select.probes.io import read_probe_metadata

    info = read_probe_metadata(out).training
    scores = proxy_bench.heldout_predictions(out, held_ds, CHECKPOINT)
    return {"val_within": proxy_bench._float_or_nan(info["val"]["within_spearman"]), "best_epoch": info["best_epoch"],
            "interval": proxy_bench.within_ci(scores, finals, groups, setting.bootstrap),
            **picking(scores, finals, groups),
            "then_preview": first_stage_match(family, setting, name, scores, previews, finals, groups)}


def first_stage_match(family: str, setting, name: str, first: np.ndarray, previews: dict, finals: np.ndarray,
                      groups: np.ndarray) -> str:
    """Where ``first`` at t = 0.2, then the x0 preview (``previews``: its scores by t) at 0.4, matches best-of-8
    (fractions of its compute; REPORT.md's method and prices)."""
    two = dataclasses.replace(setting, checkpoints=(CHECKPOINT, proxy_bench.BULK_SECOND_STAGE))
    eq = proxy_bench.equal_compute(family, two, {"x0_preview": previews, name: {t: first for t in previews}},
                                   finals, groups, name, mixes=((name, "x0_preview"),))
    key = f"two stages (0.2, 0.4) / {proxy_bench.mix_name(name, 'x0_preview')}"
    return proxy_bench.fraction_of_best_of_8(eq["match_best_of_8"][key], eq["best_of_8"]["compute"])


def noise_free_target(family: str, scorer: str, count: int, bulk, held_ds, setting, cache: Path,
                      preview: np.ndarray, groups: np.ndarray) -> dict:
    """``scorer`` trained on the first ``count`` bulk prompts with the x0 preview's score as its target, scored on
    the held-out prompts against that score (``preview``, per held-out row; ``groups``: their prompts) and against
    the final reward."""
    overrides = proxy_bench.LEARNED[scorer]
    out = cache / f"{family}_{scorer}_{count}_preview_target.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    row = proxy_bench.finished_point(out, held_ds, count, overrides, setting)      # a finished training is reused
    if row is None:
        row, _ = proxy_bench.train_and_evaluate(
            bulk, held_ds, CHECKPOINT, out, setting, PREVIEW,
            proxy_bench.probe_config(bulk.manifest.feature_shape[0], setting, **overrides),
            proxy_bench.train_config(setting, epochs=proxy_bench.BULK_EPOCHS),
            use_text=proxy_bench.reads_text(overrides), train_prompts=count, fractions=proxy_bench.BULK_SPLIT)
    scores = proxy_bench.heldout_predictions(out, held_ds, CHECKPOINT)
    against_preview = proxy_bench.within_ci(scores, preview, groups, setting.bootstrap)
    return {"scorer": scorer, "train_rows": row["train_rows"], "val_within": row["val_within"],
            "best_epoch": row["best_epoch"], "against_preview": against_preview, "against_final": row["probe"]}


def measure(family: str, setting, cache: Path) -> dict:
    """Both measurements for one family; {} when its bulk set or its saved bulk curve is missing."""
    from probe_select.probes.training.dataset import ProbeDataset

    bulk_dir, held_dir = proxy_bench.CACHE / f"{family}_bulk", proxy_bench.CACHE / f"{family}_heldout"
    curve = proxy_bench.saved_families(proxy_bench.RESULTS / proxy_bench.BULK_CURVE_FILE, setting).get(family, {})
    if not (bulk_dir / "manifest.json").exists() or not (held_dir / "manifest.json").exists() or not curve:
        log.warning("  %s: needs its bulk set, its held-out set and its saved bulk curve (make bench-proxy-bulk, "
                    "make bench-proxy); skipped", family)
        return {}
    bulk, held_ds = ProbeDataset(bulk_dir), ProbeDataset(held_dir)
    target = proxy_bench.training_target(bulk.manifest)
    largest = {scorer: points[-1] for scorer, points in curve["curves"].items()}
    pick = proxy_bench.validation_pick(largest)
    on_final = {point["train_prompts"]: point for point in curve["curves"][pick]}
    counts = sorted({min(on_final), max(on_final)})        # the curve's smallest and largest points
    finals = held_ds.scores(proxy_bench.EVALUATOR).double().numpy()
    groups = held_ds.arrays(checkpoint_t=CHECKPOINT, evaluator=proxy_bench.EVALUATOR).prompt_groups().numpy()
    preview = held_ds.scores(PREVIEW).double().numpy()
    scorers = {"x0 preview": preview}
    for scorer, point in largest.items():
        proxy_bench.bulk_point(family, scorer, point["train_prompts"], bulk, held_ds, setting, target)
        scorers[proxy_bench.LEARNED_LABELS[scorer]] = proxy_bench.heldout_predictions(
            proxy_bench.bulk_probe_file(family, scorer, point["train_prompts"]), held_ds, CHECKPOINT)
    noise_free = [dict(noise_free_target(family, pick, count, bulk, held_ds, setting, cache, preview, groups),
                       trained_on_final=on_final[count]["within"]) for count in counts]
    for point in noise_free:
        log.info("  %s: %s on the preview's score, %d rows -> %.3f with it, %.3f with the final reward", family,
                 pick, point["train_rows"], point["against_preview"]["within"], point["against_final"]["within"])
    entry = {"pick": pick, "pick_label": proxy_bench.LEARNED_LABELS[pick], "noise_free": noise_free,
             "picking": {name: picking(scores, finals, groups) for name, scores in scorers.items()}}
    if family in VARIANT_FAMILIES:
        count = largest[pick]["train_prompts"]
        pick_scores = scorers[proxy_bench.LEARNED_LABELS[pick]]
        previews = proxy_bench.preview_scores(held_ds, (CHECKPOINT, proxy_bench.BULK_SECOND_STAGE))
        entry["variants"] = {"as in the bulk curve": {
            "val_within": largest[pick]["val_within"], "best_epoch": largest[pick]["best_epoch"],
            "interval": proxy_bench.within_ci(pick_scores, finals, groups, setting.bootstrap),
            **entry["picking"][proxy_bench.LEARNED_LABELS[pick]],
            "then_preview": first_stage_match(family, setting, "as in the bulk curve", pick_scores, previews, finals,
                                              groups)}}
        for name in VARIANTS:
            entry["variants"][name] = variant(family, pick, count, name, bulk, held_ds, setting, cache, target,
                                              previews, finals, groups)
            log.info("  %s: %s -> %.3f (validation %.3f)", family, name, entry["variants"][name]["within"],
                     entry["variants"][name]["val_within"])
    return entry


def summary_line(family: str, entry: dict) -> str:
    """REPORT.md's sentence on a family's learned-scorer limits (its reading follows the figures)."""
    smallest, largest = entry["noise_free"][0], entry["noise_free"][-1]
    preview, learned = entry["picking"]["x0 preview"], entry["picking"][entry["pick_label"]]
    reproduced, carried = largest["against_preview"]["within"], largest["against_final"]["within"]
    learns = ("it learns little of the evaluator's judgement from this many rows" if reproduced < LEARNS_THE_EVALUATOR
              else "it learns much of that score")
    if carried >= preview["within"]:
        carries = "what it learns ranks the final reward at least as well as the preview itself"
    elif carried < SAYS_NOTHING:
        carries = ("what it learns of that score says nothing of the final reward: it learns the part that does not "
                   "predict the outcome")
    else:
        carries = "what it learns ranks the final reward less well than the preview itself"
    picks = "worse than" if learned["oracle_gain_10"] < preview["oracle_gain_10"] else "at least as well as"
    return (f"What limits the learned scorer ({family}, bench/results/learned_limits.md): trained on "
            f"{largest['train_rows']} bulk rows to reproduce the x0 preview's own score, a fixed function of the "
            f"latent it reads, the {entry['pick_label']} reaches {reproduced:.3f} within-prompt Spearman with it on "
            f"the held-out prompts ({smallest['against_preview']['within']:.3f} from {smallest['train_rows']} rows) and "
            f"{carried:.3f} with the final reward, against the preview's own {preview['within']:.3f}: {learns}, and "
            f"{carries}. Trained on the final reward it ranks the seeds at {learned['within']:.3f} and picks {picks} "
            f"the x0 preview: top-1 of 10 captures {learned['oracle_gain_10']:.2f} of the oracle gain against "
            f"{preview['oracle_gain_10']:.2f}, and a success outscores a failure of its prompt with probability "
            f"{learned['success_auc']:.2f} against {preview['success_auc']:.2f}." + variants_sentence(entry))


def variants_sentence(entry: dict) -> str:
    """The variants' reading: which one validation favours, and what it changes on the held-out prompts."""
    variants = entry.get("variants")
    if not variants:
        return ""
    base = variants["as in the bulk curve"]
    chosen = max(variants, key=lambda name: -np.inf if np.isnan(variants[name]["val_within"])
                 else variants[name]["val_within"])
    others = ", ".join(f"{name} {row['within']:.3f} (top-1 of 10 {row['oracle_gain_10']:.2f}, first stage "
                       f"{row['then_preview']})" for name, row in variants.items() if name != "as in the bulk curve")
    verdict = ("validation keeps the scorer as trained" if chosen == "as in the bulk curve"
               else f"validation favours the {chosen}")
    return (f" Variants ({verdict}): as trained {base['within']:.3f} (top-1 of 10 {base['oracle_gain_10']:.2f}, "
            f"first stage before the x0 preview {base['then_preview']}); {others}.")


def markdown(results: dict) -> str:
    lines = ["# What limits the learned scorer", "",
             f"Command: `{results['command']}`. Held-out prompts of the proxy bench (32 x 20 seeds), t = "
             f"{CHECKPOINT:g}; bulk rows as in REPORT.md's learning curve on more data (same split, epochs, seed). "
             f"Intervals: bootstrap 95% over held-out prompts.", ""]
    families = results["families"]
    lines += ["## Can the probe learn the evaluator?", "",
              "The learned scorer validation favours at the bulk curve's largest point, trained on the x0 preview's "
              "own score (a fixed function of the latent it reads: no noise in the target) instead of the final "
              "reward. Held-out within-prompt Spearman:", "",
              "| model | scorer | training rows | with the x0 preview's score [95% CI] | with the final reward [95% CI] "
              "| the same scorer trained on the final reward, with it | the x0 preview, with the final reward |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for family, entry in families.items():
        for point in entry["noise_free"]:
            lines.append(f"| {family} | {entry['pick_label']} | {point['train_rows']} | "
                         f"{proxy_bench.cell(point['against_preview'])} | {proxy_bench.cell(point['against_final'])} | "
                         f"{point['trained_on_final']:.3f} | {entry['picking']['x0 preview']['within']:.3f} |")
    lines += ["", "## Ranking or picking?", "",
              f"Within-prompt Spearman with the final reward (every pair of seeds), the fraction of the oracle gain that "
              f"top-1 of N captures (mean over prompts and random N-subsets of (kept - mean) / (best - mean)), and the "
              f"success AUC (within a prompt, the chance that a seed scoring >= {SUCCESS_AT:g} at the end outscores one "
              f"that fails; prompts with both). Learned scorers: the bulk curve's largest point.", "",
              "| model | scorer | within-prompt Spearman | oracle gain, top-1 of 5 | oracle gain, top-1 of 10 "
              "| success AUC |", "| --- | --- | --- | --- | --- | --- |"]
    for family, entry in families.items():
        for name, row in entry["picking"].items():
            lines.append(f"| {family} | {name} | {row['within']:.3f} | {row['oracle_gain_5']:.3f} | "
                         f"{row['oracle_gain_10']:.3f} | {row['success_auc']:.3f} |")
    with_variants = {family: entry for family, entry in families.items() if entry.get("variants")}
    if with_variants:
        lines += ["", "## Does a picking-oriented variant help?", "",
                  "The validation pick at the bulk curve's largest point, as trained there and in variants (same rows, "
                  "split, epochs and seed; chosen by validation only). First stage: where it matches best-of-8 when "
                  "it prunes at t = 0.2 and the x0 preview at 0.4 (fractions of best-of-8's compute, the two halves of "
                  "the prompts; REPORT.md's method).", "",
                  "| model | variant | validation Spearman | held-out Spearman [95% CI] | oracle gain, top-1 of 5 | "
                  "of 10 | success AUC | first stage before the x0 preview |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for family, entry in with_variants.items():
            for name, row in entry["variants"].items():
                lines.append(f"| {family} | {name} | {row['val_within']:.3f} | {proxy_bench.cell(row['interval'])} | "
                             f"{row['oracle_gain_5']:.3f} | {row['oracle_gain_10']:.3f} | {row['success_auc']:.3f} | "
                             f"{row['then_preview']} |")
    lines += ["", "## Reading", ""] + [f"- {entry['summary']}" for entry in families.values()]
    return "\n".join(lines) + "\n"


def report(families: list[str], setting, cache: Path, out: Path, command: str) -> dict:
    return proxy_bench.family_results(out, Path(RESULTS_FILE).stem, families, setting, command,
                                      lambda family: measure(family, setting, cache), summary_line, markdown)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["unet", "dit"])
    parser.add_argument("--out", type=Path, default=proxy_bench.RESULTS)
    parser.add_argument("--cache", type=Path, default=proxy_bench.CACHE / "limits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setting = proxy_bench.MEDIUM
    proxy_bench.load_pack()
    results = report(args.families, setting, args.cache, args.out,
                     "bench/learned_limits.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    log.info("wrote %s", args.out / "learned_limits.md")
    proxy_bench.rewrite_report_from(args.out)      # REPORT.md's summary
    return results


if __name__ == "__main__":
    from devtools import bootstrap_comfy

    signal.signal(signal.SIGTERM, proxy_bench.stop_on_sigterm)
    bootstrap_comfy(pytorch_attention=True)
    main()
