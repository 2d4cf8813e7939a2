"""A noise-aware preview reward: the evaluator's own terms on the t = 0.2 / 0.4 x0 preview, re-weighted on
training previews to rank a prompt's seeds by their *finished* score.

    .venv/bin/python bench/preview_reward.py        # -> bench/results/preview_reward.{md,json} (about a minute)

Real models: the reward of the decoded x0 preview after 20% of the steps ranks a prompt's seeds at only
0.17-0.27; a reward model fine-tuned on noisy previews doubles that. This is the proxy world's version of
that fine-tuning. The analytic evaluator (bench/proxy_world/evaluator.py) multiplies six factors (presence,
count, shape, extra objects, relation, quality); on a noisy preview some of them measure the noise more than
the image. A small ranker over their logs (and three diagnostics) learns which to trust at that noise level,
with a within-prompt pairwise logistic loss on the training prompts' previews. Its cost at inference is the
x0 preview's (a decode and the evaluator), not a probe's: it is reported beside the x0 preview, not as a
learned probe.

It reads the proxy bench's cached datasets (``make bench-proxy`` collects them): each row's stored x0 latent
(the DiT's at full size; the UNet's pooled 2x2, as the probes read it, then decoded and resized to the image
size), its final score, its prompt. The ranker (linear, or a 16-unit MLP) is chosen by validation on 10% of
the training prompts; the held-out prompts are only scored. The held-out figures at equal compute use the
proxy bench's own schedules and prices.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import proxy_bench  # noqa: E402  (bootstraps ComfyUI and registers probe_select)
from probe_select.probes.atomic import atomic_write_text  # noqa: E402
from probe_select.probes.training.dataset.splits import split_by_prompt  # noqa: E402
from probe_select.probes.training.metrics import bootstrap_ci, per_group_spearman  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("preview_reward")
RESULTS = ROOT / "bench" / "results"
TERMS = ("presence", "count", "shape", "extra", "relation", "quality")
FEATURES = (*TERMS, "extra_mass", "fill", "log1p_shape_dist2")
CHECKPOINTS = (0.2, 0.4)
HIDDEN_CHOICES = (0, 16)           # 0: linear


def preview_features(dataset, family: str, t: float) -> tuple[np.ndarray, np.ndarray]:
    """``[rows, len(FEATURES)]``: the log of each evaluator factor and three diagnostics, on each row's x0
    preview at checkpoint ``t`` (the stored x0 latent decoded, resized to the evaluator's image size); and the
    evaluator's own score of that preview ``[rows]``."""
    from bench.proxy_world import evaluator, grammar, models

    images = models.latent_to_image(dataset.x0(t).float(), family)
    if images.shape[-1] != models.IMAGE_SIZE:
        images = F.interpolate(images, size=models.IMAGE_SIZE, mode="bilinear", align_corners=False)
    terms = evaluator.score_terms(images, [grammar.parse_prompt(p) for p in dataset.prompts])
    columns = [torch.log(terms[name].clamp(min=1e-6)) for name in TERMS]
    columns += [terms["extra_mass"], terms["fill"], torch.log1p(terms["shape_dist2"])]
    return torch.stack(columns, 1).double().numpy(), terms["score"].double().numpy()


def within_pairs(target: np.ndarray, groups: np.ndarray, margin: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (better, worse) of rows of one prompt whose targets differ by more than ``margin``."""
    better, worse = [], []
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        gap = target[rows][:, None] - target[rows][None, :]
        i, j = np.nonzero(gap > margin)
        better.append(rows[i])
        worse.append(rows[j])
    return np.concatenate(better), np.concatenate(worse)


def fit_ranker(features: np.ndarray, target: np.ndarray, groups: np.ndarray, hidden: int = 0, steps: int = 300,
               seed: int = 0) -> "Ranker":
    """A ranker over standardised features, fit by a within-prompt pairwise logistic loss (full batch, Adam)."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = torch.as_tensor((features - mean) / std, dtype=torch.float32)
    net = (torch.nn.Linear(x.shape[1], 1) if hidden == 0 else
           torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)))
    better, worse = (torch.as_tensor(i) for i in within_pairs(target, groups))
    if len(better) == 0:
        raise ValueError("fit_ranker: no prompt has two rows with different targets: nothing to rank")
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        scores = net(x)[:, 0]
        loss = F.softplus(scores[worse] - scores[better]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return Ranker(net.eval(), mean, std)


class Ranker:
    """A fitted ranker: scores rows of features (higher = predicted better)."""

    def __init__(self, net: torch.nn.Module, mean: np.ndarray, std: np.ndarray):
        self.net, self.mean, self.std = net, mean, std

    def __call__(self, features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.as_tensor((features - self.mean) / self.std, dtype=torch.float32)
            return self.net(x)[:, 0].double().numpy()

    def weights(self) -> dict:
        """The linear ranker's weight per (standardised) feature; {} for an MLP."""
        if not isinstance(self.net, torch.nn.Linear):
            return {}
        return {name: round(float(w), 3) for name, w in zip(FEATURES, self.net.weight[0].detach())}


def within(pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> float:
    return float(np.nanmean(per_group_spearman(pred, target, groups)))


def evaluate_family(family: str, cache: Path) -> dict:
    """Fit the ranker per checkpoint on the training set (model chosen by validation), score the held-out set;
    the held-out figures with bootstrap intervals, and both preview scorers at equal compute."""
    from probe_select.probes.training.dataset import ProbeDataset

    train, held = ProbeDataset(cache / f"{family}_train"), ProbeDataset(cache / f"{family}_heldout")
    target = train.scores(proxy_bench.EVALUATOR).double().numpy()
    train_groups = train.arrays(checkpoint_t=CHECKPOINTS[0], evaluator=proxy_bench.EVALUATOR).prompt_groups().numpy()
    finals = held.scores(proxy_bench.EVALUATOR).double().numpy()
    groups = held.arrays(checkpoint_t=CHECKPOINTS[0], evaluator=proxy_bench.EVALUATOR).prompt_groups().numpy()
    splits = split_by_prompt(train.prompt_ids, proxy_bench.BULK_SPLIT, seed=0)
    fit_rows, val_rows = splits["train"].numpy(), splits["val"].numpy()
    by_t, tuned = {}, {}
    for t in CHECKPOINTS:
        (x_train, _), (x_held, as_read) = preview_features(train, family, t), preview_features(held, family, t)
        candidates = {}
        for hidden in HIDDEN_CHOICES:
            ranker = fit_ranker(x_train[fit_rows], target[fit_rows], train_groups[fit_rows], hidden)
            candidates[hidden] = (within(ranker(x_train[val_rows]), target[val_rows], train_groups[val_rows]), ranker)
        hidden = max(candidates, key=lambda h: candidates[h][0])
        val, ranker = candidates[hidden]
        tuned[t] = ranker(x_held)
        plain = held.scores(f"x0@{t:g}").double().numpy()
        plain_train = train.scores(f"x0@{t:g}").double().numpy()
        by_t[t] = {"hidden": hidden, "val_within": val,
                   "val_within_by_hidden": {h: candidates[h][0] for h in HIDDEN_CHOICES},
                   "val_within_x0_preview": within(plain_train[val_rows], target[val_rows], train_groups[val_rows]),
                   "weights": ranker.weights(),
                   "tuned": interval(tuned[t], finals, groups), "x0_preview": interval(plain, finals, groups),
                   "x0_preview_as_read": interval(as_read, finals, groups)}
        log.info("%s t=%g: tuned preview %.3f (hidden %d, val %.3f), x0 preview %.3f", family, t,
                 by_t[t]["tuned"]["within"], hidden, val, by_t[t]["x0_preview"]["within"])
    previews = {"x0_preview": proxy_bench.preview_scores(held, CHECKPOINTS), "tuned_preview": tuned}
    setting = proxy_bench.MEDIUM
    eq = proxy_bench.equal_compute(family, setting, previews, finals, groups, "tuned_preview",
                                   previews=("x0_preview", "tuned_preview"))
    half = 0.5 * eq["best_of_8"]["compute"]
    return {"by_t": by_t, "train_rows": len(target), "heldout_rows": len(finals),
            "match_best_of_8": eq["match_best_of_8"], "best_of_8": eq["best_of_8"],
            "at_half_compute": {key: max((p["reward"] for p in points if p["compute"] <= half), default=float("nan"))
                                for key, points in eq["curves"].items()}}


def interval(pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> dict:
    per_prompt = per_group_spearman(pred, target, groups)
    ci = bootstrap_ci(per_prompt[np.isfinite(per_prompt)], n=1000, seed=0)
    return {"within": ci["mean"], "low": ci["low"], "high": ci["high"]}


def markdown(results: dict) -> str:
    sizes = ", ".join(f"{family} {res['train_rows']} training / {res['heldout_rows']} held-out rows"
                      for family, res in results.items())
    lines = ["# A noise-aware preview reward", "",
             f"Command: `.venv/bin/python bench/preview_reward.py` (reads the proxy bench's cached datasets: {sizes}).",
             "",
             "The evaluator's six factors and three diagnostics, measured on each candidate's x0 preview, re-weighted "
             "by a ranker fit on the training prompts' previews against their finished scores (within-prompt pairwise "
             "logistic loss; linear or a 16-unit MLP, chosen by validation on 10% of the training prompts). The "
             "real-model analogue is a reward model fine-tuned on noisy previews. It costs what the x0 preview costs "
             "(a decode and the evaluator); it is not a probe. The ranker reads the x0 latent as the datasets store "
             "it: the DiT's whole, the UNet's pooled 2x2 (then decoded and resized), which alone smooths the noisy "
             "preview; the column 'as read' is the unchanged evaluator on that same preview. Held-out within-prompt "
             "Spearman with the finished score [95% CI]:", "",
             "| model | t | x0 preview | x0 preview as read, evaluator unchanged | noise-aware preview | ranker "
             "(validation: linear / MLP; x0 preview) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for family, res in results.items():
        for t, row in res["by_t"].items():
            vals = row["val_within_by_hidden"]
            lines.append(f"| {family} | {t} | {proxy_bench.cell(row['x0_preview'])} | "
                         f"{proxy_bench.cell(row['x0_preview_as_read'])} | {proxy_bench.cell(row['tuned'])} | "
                         f"{'linear' if row['hidden'] == 0 else 'MLP'} ({vals[0]:.3f} / {vals[16]:.3f}; "
                         f"{row['val_within_x0_preview']:.3f}) |")
    lines += ["", "At equal compute (the proxy bench's schedules and prices; compute to match best-of-8 on one half "
              "of the held-out prompts, judged on the other, both ways; and the best reward at <= 0.5 of best-of-8's "
              "compute):", "",
              "| model | method / scorer | compute to match best-of-8 (fraction) | best reward at <= 0.5 "
              "(best-of-8: reward) |", "| --- | --- | --- | --- |"]
    for family, res in results.items():
        bo8 = res["best_of_8"]
        for key, found in res["match_best_of_8"].items():
            if key == "best-of-N" or not key.endswith(("x0_preview", "tuned_preview")):
                continue
            frac = " / ".join(f"{f['compute']:.2f} ({f['compute'] / bo8['compute']:.2f})" for f in found) or "never"
            lines.append(f"| {family} | {key} | {frac} | {res['at_half_compute'][key]:.4f} ({bo8['reward']:.4f}) |")
    lines += ["", "Linear rankers' weights (standardised features):", ""]
    for family, res in results.items():
        for t, row in res["by_t"].items():
            if row["weights"]:
                lines.append(f"- {family} t={t}: " + ", ".join(f"{k} {v:+.2f}" for k, v in row["weights"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["unet", "dit"])
    parser.add_argument("--cache", type=Path, default=proxy_bench.DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    proxy_bench._modules()
    results = {family: evaluate_family(family, args.cache) for family in args.families}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "preview_reward.json", json.dumps(results, indent=2, default=float) + "\n")
    atomic_write_text(args.out / "preview_reward.md", markdown(results))
    return results


if __name__ == "__main__":
    main()
