"""A noise-aware preview reward: the evaluator's own terms on the x0 preview at t = 0.1-0.4, re-weighted on
training previews to rank a prompt's seeds by their *finished* score.

    .venv/bin/python bench/preview_reward.py        # -> bench/results/preview_reward.{md,json} (about 10 minutes)

Real models: the reward of the decoded x0 preview after 20% of the steps ranks a prompt's seeds at only
0.17-0.27; a reward model fine-tuned on noisy previews doubles that. This is the proxy world's version of
that fine-tuning. The analytic evaluator (bench/proxy_world/evaluator.py) multiplies six factors (presence,
count, shape, extra objects, relation, quality); on a noisy preview some of them measure the noise more than
the image. A small ranker over their logs (and three diagnostics) learns which to trust at that noise level,
with a within-prompt pairwise logistic loss on the training prompts' previews. Its cost at inference is the
x0 preview's (a decode and the evaluator), not a probe's: it is reported beside the x0 preview, not as a
learned probe.

The ranker reads the preview at one or two scales: the x0 latent as stored, and the same pooled 2x2 once more
before the decode (a coarser read, in which the noise of an early preview averages out while counts and
relations survive). Which scales, and a linear ranker or a 16-unit MLP, is chosen by 5-fold cross-validation
over the training prompts (whole prompts a fold); each fitted ranker is the mean of a few seeds' fits, and the
chosen one is fitted again on every training prompt.

It reads the proxy bench's cached datasets (``make bench-proxy`` collects them): each row's stored x0 latent
(the DiT's at full size; the UNet's pooled 2x2, as the probes read it, then decoded and resized to the image
size), its final score, its prompt. The held-out prompts are only scored. The held-out figures at equal compute
use the proxy bench's own schedules and prices: at its checkpoints (0.2, 0.4), and at every recorded checkpoint
up to 0.4 and every pair of them ("where to cut").
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import proxy_bench  # noqa: E402  (bootstraps ComfyUI and registers probe_select)
from probe_select.probes.training.metrics import per_group_spearman  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("preview_reward")
RESULTS = ROOT / "bench" / "results"
TERMS = ("presence", "count", "shape", "extra", "relation", "quality")
FEATURES = (*TERMS, "extra_mass", "fill", "log1p_shape_dist2")
CHECKPOINTS = (0.1, 0.2, 0.3, 0.4)  # the recorded checkpoints up to 0.4: where a cut could pay
HIDDEN_CHOICES = (0, 16)           # 0: linear
SCALE_CHOICES = (1, 2)             # reads of the preview: the x0 latent as stored, then pooled 2x2 once more
FOLDS = 5                          # cross-validation over the training prompts picks the scales and the ranker
ENSEMBLE = 3                       # seeds whose fits one ranker averages (a full-batch fit still depends on its init)


def feature_names(scales: int) -> tuple[str, ...]:
    """The names of :func:`side_by_side`'s columns: FEATURES, then each coarser read's, suffixed."""
    return tuple(name if s == 0 else f"{name}@{2 ** s}x" for s in range(scales) for name in FEATURES)


def factor_of(name: str) -> str:
    """The FEATURES entry a :func:`feature_names` column reads, at whichever scale ("count@2x" -> "count")."""
    return name.split("@")[0]


def preview_features(dataset, family: str, t: float, coarser: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, len(FEATURES)]``: the log of each evaluator factor and three diagnostics, on each row's x0
    preview at checkpoint ``t`` (the stored x0 latent decoded, resized to the evaluator's image size); and the
    evaluator's own score of that preview ``[rows]``. ``coarser``: how many times the latent is average-pooled
    2x2 before the decode."""
    return latent_features(dataset.x0(t).float(), dataset.prompts, family, coarser)


def latent_features(latent: torch.Tensor, prompts: list[str], family: str,
                    coarser: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """:func:`preview_features` of any x0 latents ``[rows, c, S, S]`` with their prompts."""
    from bench.proxy_world import evaluator, grammar, models

    for _ in range(coarser):
        latent = F.avg_pool2d(latent, 2)
    images = models.latent_to_image(latent, family)
    if images.shape[-1] != models.IMAGE_SIZE:
        images = F.interpolate(images, size=models.IMAGE_SIZE, mode="bilinear", align_corners=False)
    terms = evaluator.score_terms(images, [grammar.parse_prompt(p) for p in prompts])
    columns = [torch.log(terms[name].clamp(min=1e-6)) for name in TERMS]
    columns += [terms["extra_mass"], terms["fill"], torch.log1p(terms["shape_dist2"])]
    return torch.stack(columns, 1).double().numpy(), terms["score"].double().numpy()


def preview_reads(dataset, family: str, t: float, scales: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`preview_features` at each of ``scales`` scales (the stored one first), each read once."""
    return [preview_features(dataset, family, t, coarser) for coarser in range(scales)]


def side_by_side(reads: list[tuple[np.ndarray, np.ndarray]], scales: int) -> np.ndarray:
    """The features of the first ``scales`` of :func:`preview_reads`' reads, side by side ``[rows, 9 * scales]``."""
    return np.concatenate([features for features, _ in reads[:scales]], 1)


def fit_ranker(features: np.ndarray, target: np.ndarray, groups: np.ndarray, hidden: int = 0, steps: int = 300,
               seed: int = 0, names: tuple[str, ...] = FEATURES) -> "Ranker":
    """A ranker over standardised features, fit by a within-prompt pairwise logistic loss (full batch, Adam;
    probes.training.distillation.fit_pairwise)."""
    from probe_select.probes.training.distillation import fit_pairwise, within_pairs
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = torch.as_tensor((features - mean) / std, dtype=torch.float32)
    net = (torch.nn.Linear(x.shape[1], 1) if hidden == 0 else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)))
    better, worse = within_pairs(target, groups)
    return Ranker(fit_pairwise(net, x, better, worse, steps), mean, std, names)


class Ranker:
    """A fitted ranker: scores rows of features (higher = predicted better)."""

    def __init__(self, net: torch.nn.Module, mean: np.ndarray, std: np.ndarray, names: tuple[str, ...] = FEATURES):
        self.net, self.mean, self.std, self.names = net, mean, std, names

    def __call__(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor((features - self.mean) / self.std, dtype=torch.float32)
            return self.net(x)[:, 0].double().numpy()

    def weights(self) -> dict:
        """The linear ranker's weight per (standardised) feature; {} for an MLP."""
        if not isinstance(self.net, torch.nn.Linear):
            return {}
        return {name: round(float(w), 3) for name, w in zip(self.names, self.net.weight[0].detach())}


class Ensemble:
    """Rankers of one kind fitted from different seeds: their mean score."""

    def __init__(self, rankers: list[Ranker]):
        self.rankers = rankers

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return np.mean([ranker(features) for ranker in self.rankers], 0)

    def weights(self) -> dict:
        """The mean of the linear rankers' weights; {} for MLPs."""
        each = [ranker.weights() for ranker in self.rankers]
        return {name: round(float(np.mean([w[name] for w in each])), 3) for name in each[0]} if each[0] else {}


def fit_ensemble(features: np.ndarray, target: np.ndarray, groups: np.ndarray, hidden: int,
                 names: tuple[str, ...] = FEATURES, seeds: int = ENSEMBLE) -> Ensemble:
    return Ensemble([fit_ranker(features, target, groups, hidden, seed=seed, names=names) for seed in range(seeds)])


def prompt_folds(groups: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """The fold of every row ``[rows]``: whole prompts a fold, the prompts shuffled, folds as even as they go."""
    prompts = np.unique(groups)
    if len(prompts) < folds:
        raise ValueError(f"prompt_folds: {len(prompts)} prompts cannot fill {folds} folds")
    fold_of = dict(zip(np.random.default_rng(seed).permutation(prompts).tolist(), np.arange(len(prompts)) % folds))
    return np.array([fold_of[g] for g in groups.tolist()])


def cross_validated(features: np.ndarray, target: np.ndarray, groups: np.ndarray, hidden: int,
                    folds: np.ndarray, seeds: int = ENSEMBLE) -> float:
    """Mean within-prompt Spearman of rankers fitted on all folds but one, each scoring the one left out."""
    scores = []
    for fold in np.unique(folds):
        fit, left_out = folds != fold, folds == fold
        ranker = fit_ensemble(features[fit], target[fit], groups[fit], hidden, seeds=seeds)
        scores.append(within(ranker(features[left_out]), target[left_out], groups[left_out]))
    return float(np.mean(scores))


def choose_ranker(train_features: dict, target: np.ndarray, groups: np.ndarray, folds: int = FOLDS,
                  seeds: int = ENSEMBLE) -> tuple[tuple, dict, Ensemble]:
    """Every (scales, hidden) candidate's cross-validated Spearman; the best one's key, and that ranker (the mean
    of ``seeds`` fits) fitted on every row. ``train_features``: {scales: features of the training rows}."""
    fold_of_row = prompt_folds(groups, folds)
    cv = {(scales, hidden): cross_validated(train_features[scales], target, groups, hidden, fold_of_row, seeds)
          for scales in train_features for hidden in HIDDEN_CHOICES}
    best = max(cv, key=cv.get)
    return best, cv, fit_ensemble(train_features[best[0]], target, groups, best[1], names=feature_names(best[0]),
                                  seeds=seeds)


def within(pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> float:
    return float(np.nanmean(per_group_spearman(pred, target, groups)))


def candidate_name(scales: int, hidden: int) -> str:
    return f"{ {1: 'one scale', 2: 'two scales'}.get(scales, f'{scales} scales')}, {'linear' if hidden == 0 else 'MLP'}"


def evaluate_family(family: str, cache: Path) -> dict:
    """Choose and fit the ranker per checkpoint on the training set (:func:`choose_ranker`), score the held-out
    set with it and with every other candidate; the held-out figures with bootstrap intervals, and the preview
    scorers at equal compute: the plain x0 preview, the chosen ranker, and the best one-scale ranker (the
    noise-aware preview as it was before the coarser read)."""
    from probe_select.probes.training.dataset import ProbeDataset

    train, held = ProbeDataset(cache / f"{family}_train"), ProbeDataset(cache / f"{family}_heldout")
    target = train.scores(proxy_bench.EVALUATOR).double().numpy()
    train_groups = train.arrays(checkpoint_t=CHECKPOINTS[0], evaluator=proxy_bench.EVALUATOR).prompt_groups().numpy()
    finals = held.scores(proxy_bench.EVALUATOR).double().numpy()
    groups = held.arrays(checkpoint_t=CHECKPOINTS[0], evaluator=proxy_bench.EVALUATOR).prompt_groups().numpy()
    by_t, tuned, one_scale = {}, {}, {}
    for t in CHECKPOINTS:
        train_reads, held_reads = (preview_reads(ds, family, t, max(SCALE_CHOICES)) for ds in (train, held))
        train_x = {scales: side_by_side(train_reads, scales) for scales in SCALE_CHOICES}
        held_x = {scales: side_by_side(held_reads, scales) for scales in SCALE_CHOICES}
        best, cv, ranker = choose_ranker(train_x, target, train_groups)
        # every candidate fitted on all training rows and scored on the held-out prompts: reported, never chosen on
        held_scores = {key: (ranker if key == best else fit_ensemble(train_x[key[0]], target, train_groups, key[1],
                                                                      names=feature_names(key[0])))(held_x[key[0]])
                       for key in cv}
        best_one_scale = max((key for key in cv if key[0] == 1), key=cv.get)
        tuned[t], one_scale[t] = held_scores[best], held_scores[best_one_scale]
        plain = held.scores(f"x0@{t:g}").double().numpy()
        plain_train = train.scores(f"x0@{t:g}").double().numpy()
        by_t[t] = {"scales": best[0], "hidden": best[1], "chosen": candidate_name(*best),
                   "one_scale_chosen": candidate_name(*best_one_scale),
                   "cross_validated": {candidate_name(*key): value for key, value in cv.items()},
                   "x0_preview_on_training_prompts": within(plain_train, target, train_groups),
                   "weights": ranker.weights(),
                   "heldout_by_candidate": {candidate_name(*key): interval(scores, finals, groups)
                                            for key, scores in held_scores.items()},
                   "tuned": interval(tuned[t], finals, groups), "one_scale": interval(one_scale[t], finals, groups),
                   "x0_preview": interval(plain, finals, groups),
                   "x0_preview_as_read": interval(held_reads[0][1], finals, groups)}
        log.info("%s t=%g: noise-aware preview %.3f (%s, cross-validated %.3f), x0 preview %.3f", family, t,
                 by_t[t]["tuned"]["within"], by_t[t]["chosen"], cv[best], by_t[t]["x0_preview"]["within"])
    previews = {"x0_preview": proxy_bench.preview_scores(held, CHECKPOINTS), "tuned_preview_one_scale": one_scale,
                "tuned_preview": tuned}
    setting = proxy_bench.MEDIUM
    eq = proxy_bench.equal_compute(family, setting, previews, finals, groups, "tuned_preview", previews=tuple(previews))
    # the same at every recorded checkpoint up to 0.4 and every pair of them: a scorer that still ranks at 0.1
    # may pay for an earlier, cheaper cut (the plain preview and the chosen ranker only: it is ten times the work)
    wide = {name: previews[name] for name in ("x0_preview", "tuned_preview")}
    anywhere = proxy_bench.equal_compute(family, setting, wide, finals, groups, "tuned_preview", previews=tuple(wide),
                                         checkpoints=CHECKPOINTS)
    return {"by_t": by_t, "train_rows": len(target), "heldout_rows": len(finals),
            "match_best_of_8": eq["match_best_of_8"], "best_of_8": eq["best_of_8"],
            "at_half_compute": at_half_compute(eq),
            "every_checkpoint": {"match_best_of_8": anywhere["match_best_of_8"],
                                 "at_half_compute": at_half_compute(anywhere)}}


def at_half_compute(eq: dict) -> dict:
    """The best mean kept reward of each method and scorer at no more than half of best-of-8's compute."""
    return {key: proxy_bench.best_reward_at_half(points, eq["best_of_8"]["compute"])
            for key, points in eq["curves"].items()}


def interval(pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> dict:
    """Within-prompt Spearman with its bootstrap interval (proxy_bench's, 1000 draws) and nothing else."""
    ci = proxy_bench.within_ci(pred, target, groups, n_boot=1000)
    return {key: ci[key] for key in ("within", "low", "high")}


SCORER_LABELS = {"x0_preview": "x0 preview", "tuned_preview_one_scale": "noise-aware preview, one scale",
                 "tuned_preview": "noise-aware preview"}


def markdown(results: dict) -> str:
    families = results["families"]
    sizes = ", ".join(f"{family} {res['train_rows']} training / {res['heldout_rows']} held-out rows"
                      for family, res in families.items())
    names = [candidate_name(scales, hidden) for scales in SCALE_CHOICES for hidden in HIDDEN_CHOICES]
    lines = ["# A noise-aware preview reward", "",
             f"Command: `{results['command']}` (reads the proxy bench's cached datasets: {sizes}).",
             "",
             "The evaluator's six factors and three diagnostics, measured on each candidate's x0 preview, re-weighted "
             "by a ranker fit on the training prompts' previews against their finished scores (within-prompt pairwise "
             "logistic loss). The real-model analogue is a reward model fine-tuned on noisy previews. It costs what "
             "the x0 preview costs (a decode and the evaluator); it is not a probe. The ranker reads the x0 latent as "
             "the datasets store it: the DiT's whole, the UNet's pooled 2x2 (then decoded and resized), which alone "
             "smooths the noisy preview; the column 'as read' is the unchanged evaluator on that same preview. "
             "Candidates: the preview read at one scale (as stored) or at two (also pooled 2x2 once more before the "
             f"decode), a linear ranker or a 16-unit MLP, each the mean of {ENSEMBLE} seeds' fits; chosen by "
             f"{FOLDS}-fold cross-validation over the training prompts (whole prompts a fold), then fitted on all of "
             "them. Held-out within-prompt Spearman with the finished score [95% CI]:", "",
             "| model | t | x0 preview | x0 preview as read, evaluator unchanged | noise-aware preview | chosen | "
             f"cross-validated: {' / '.join(names)}; x0 preview |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for family, res in families.items():
        for t, row in res["by_t"].items():
            cv = " / ".join(f"{row['cross_validated'][name]:.3f}" for name in names)
            lines.append(f"| {family} | {t} | {proxy_bench.cell(row['x0_preview'])} | "
                         f"{proxy_bench.cell(row['x0_preview_as_read'])} | {proxy_bench.cell(row['tuned'])} | "
                         f"{row['chosen']} | {cv}; {row['x0_preview_on_training_prompts']:.3f} |")
    lines += ["", "Every candidate on the held-out prompts (reported, not chosen on):", "",
              f"| model | t | {' | '.join(names)} |", "| --- | --- |" + " --- |" * len(names)]
    for family, res in families.items():
        for t, row in res["by_t"].items():
            lines.append(f"| {family} | {t} | "
                         + " | ".join(proxy_bench.cell(row["heldout_by_candidate"][name]) for name in names) + " |")
    lines += ["", "At equal compute (the proxy bench's schedules and prices; compute to match best-of-8 on one half "
              "of the held-out prompts, judged on the other, both ways; and the best reward at <= 0.5 of best-of-8's "
              "compute). 'One scale': the one-scale candidate cross-validation favours, the noise-aware preview "
              "without the coarser read:", "",
              "| model | method | scorer | compute to match best-of-8 (fraction) | best reward at <= 0.5 "
              "(best-of-8: reward) |", "| --- | --- | --- | --- | --- |"]
    for family, res in families.items():
        bo8 = res["best_of_8"]
        for key, found in res["match_best_of_8"].items():
            method, _, scorer = key.partition(" / ")
            if scorer not in SCORER_LABELS:
                continue
            frac = " / ".join(f"{f['compute']:.2f} ({f['compute'] / bo8['compute']:.2f})" for f in found) or "never"
            lines.append(f"| {family} | {method} | {SCORER_LABELS[scorer]} | {frac} | "
                         f"{res['at_half_compute'][key]:.4f} ({bo8['reward']:.4f}) |")
    lines += ["", "Where to cut: the same at every recorded checkpoint up to 0.4 and every pair of them, for the x0 "
              "preview, the noise-aware preview and the oracle (compute to match best-of-8 as a fraction of its "
              "compute, chosen on one half of the prompts / on the other; the reward the chosen schedule reaches on "
              "the half it is judged on, against best-of-8's there):", "",
              "| model | method | x0 preview | noise-aware preview | oracle |", "| --- | --- | --- | --- | --- |"]
    for family, res in families.items():
        found, bo8 = res["every_checkpoint"]["match_best_of_8"], res["best_of_8"]["compute"]
        methods = dict.fromkeys(key.partition(" / ")[0] for key in found if " / " in key)
        for method in methods:
            cells = [" / ".join(f"{f['compute'] / bo8:.2f} ({f['reward']:.3f} vs {f['best_of_8']:.3f})"
                                for f in found[f"{method} / {scorer}"]) or "never"
                     for scorer in ("x0_preview", "tuned_preview", "oracle")]
            lines.append(f"| {family} | {method} | " + " | ".join(cells) + " |")
    lines += ["", "Linear rankers' weights (standardised features; the mean over the seeds' fits):", ""]
    for family, res in families.items():
        for t, row in res["by_t"].items():
            if row["weights"]:
                lines.append(f"- {family} t={t}: " + ", ".join(f"{k} {v:+.2f}" for k, v in row["weights"].items()))
    lines += ["", "## Reading", ""] + [f"- {res['summary']}" for res in families.values()]
    return "\n".join(lines) + "\n"


def measure(family: str, cache: Path) -> dict:
    """A family's figures (:func:`evaluate_family`); {} when the proxy bench's sets of it are not collected."""
    if not all((cache / f"{family}_{part}" / "manifest.json").exists() for part in ("train", "heldout")):
        log.warning("  %s: needs the proxy bench's training and held-out sets (make bench-proxy); skipped", family)
        return {}
    return evaluate_family(family, cache)


def at_t(by_t: dict, t: float) -> dict:
    """``by_t``'s row at checkpoint ``t``, its keys floats (as measured) or strings (as read back from JSON)."""
    return by_t[t] if t in by_t else by_t[f"{t:g}"]


def cheapest_anywhere(entry: dict, scorer: str = "tuned_preview") -> list:
    """For each half of the prompts a method may be chosen on: the cheapest (method, match) of ``scorer`` at any
    recorded checkpoint or pair of them, judged on the other half."""
    found = [(key.partition(" / ")[0], match) for key, matches in entry["every_checkpoint"]["match_best_of_8"].items()
             if key.endswith(f" / {scorer}") for match in matches]
    return [min(((method, match) for method, match in found if match["chosen_on"] == half),
                key=lambda pair: pair[1]["compute"]) for half in (0, 1)
            if any(match["chosen_on"] == half for _, match in found)]


def summary_line(family: str, entry: dict) -> str:
    """REPORT.md's sentence on a family's noise-aware preview."""
    unit = entry["best_of_8"]["compute"]
    t01, t02 = at_t(entry["by_t"], 0.1), at_t(entry["by_t"], 0.2)
    one, two = (proxy_bench.fraction_of_best_of_8(entry["match_best_of_8"][f"{method} / tuned_preview"], unit)
                for method in ("one stage at 0.2", "two stages (0.2, 0.4)"))
    anywhere = "; ".join(f"{method} at {match['compute'] / unit:.2f}, reaching {match['reward']:.3f} on the other half "
                         f"against best-of-8's {match['best_of_8']:.3f}" for method, match in cheapest_anywhere(entry))
    return (f"The noise-aware preview ({family}, bench/results/preview_reward.md; the evaluator's factors on the x0 "
            "preview re-weighted on the training prompts' previews, the stand-in for a reward model fine-tuned on "
            "noisy previews; it decodes and runs the evaluator, so it is not a probe): at t = 0.2 "
            f"{proxy_bench.cell(t02['tuned'])} against the x0 preview's {t02['x0_preview']['within']:.3f}, at t = 0.1 "
            f"{t01['tuned']['within']:.3f} against {t01['x0_preview']['within']:.3f}. At equal compute it matches "
            f"best-of-8 at {one} of its compute in one stage at 0.2 and at {two} in two stages (0.2, 0.4); cutting at "
            f"any recorded checkpoint up to 0.4, the cheapest method chosen on each half of the prompts: "
            f"{anywhere or 'none matches'}.")


def report(families: list[str], cache: Path, out: Path, command: str) -> dict:
    return proxy_bench.family_results(out, Path(proxy_bench.PREVIEW_REWARD_FILE).stem, families, proxy_bench.MEDIUM,
                                      command, lambda family: measure(family, cache), summary_line, markdown,
                                      needs="the proxy bench's training and held-out sets")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["unet", "dit"])
    parser.add_argument("--cache", type=Path, default=proxy_bench.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    proxy_bench._modules()
    results = report(args.families, args.cache, args.out,
                     " ".join(["bench/preview_reward.py", *(argv if argv is not None else sys.argv[1:])]))
    proxy_bench.rewrite_report_from(args.out)      # REPORT.md's sentences
    return results


if __name__ == "__main__":
    main()
