"""Sample the trained proxy-world models with ComfyUI's own sampling and score them.

    .venv/bin/python bench/proxy_world/sample.py            # both families -> bench/results/proxy_models.{md,json}

For each family: 40 held-out prompts (the first 40 of ``train_models.prompt_split()[1]``) x 8 seeds
(seed i = ``--seed + i``, each row drawn from its own seed, so a row equals a batch-1 KSampler run
with that seed, ancestral noise included: the pack's candidate sampler), each model's sampler
(``models.DEFAULT_SAMPLER``), 20 steps, the "normal" scheduler and CFG against
the empty prompt. Images are scored by the proxy-world evaluator (``evaluator.score_terms``).

Figures: mean score; within-prompt score SD (sample SD over the 8 seeds of a prompt, averaged over
prompts); the fraction of samples with a semantic failure (score < 0.5) and, for those, which factor
is lowest (presence, count, shape, extra object, relation); the per-prompt best-minus-mean gap (what
picking the best of 8 seeds gains over a random seed); and the fraction of prompts whose 8 seeds
contain both a failure and a success (where seed selection matters).

``--cfg-sweep`` / ``--sampler-sweep`` also score a few CFG values / samplers on 16 other held-out prompts
(prompts 40-55, ``--sweep-seeds`` seeds): that is how each model's CFG and sampler were chosen, without
looking at the 40 reported prompts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    # Idle OpenMP threads sleep instead of spinning: on 2 cores shared with other processes a
    # spinning second thread made a step ~8x slower than one thread.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.append(str(ROOT))      # last: ComfyUI's `nodes` must win over the pack's nodes/
    from devtools import bootstrap_comfy

    bootstrap_comfy()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.proxy_world import models  # noqa: E402
from bench.proxy_world.evaluator import FLOOR, RELATION_FLOOR, SHAPE_FLOOR, score_terms  # noqa: E402
from bench.proxy_world.grammar import parse_prompt  # noqa: E402
from bench.proxy_world.train_models import prompt_split  # noqa: E402
import tools  # noqa: E402,F401  (registers the package probe_select: the library's one import name)
from probe_select.probes.atomic import atomic_write_text  # noqa: E402
from probe_select.probes.analysis.noise_levels import NoiseLevel, noise_level_at_fraction  # noqa: E402
from probe_select.probes.analysis.schedules import FLOW, VP  # noqa: E402
from probe_select.probes.training.metrics import bootstrap_ci, per_group_spearman  # noqa: E402

log = logging.getLogger("proxy_world.sample")
RESULTS = ROOT / "bench" / "results"

STEPS = 20
DEFAULT_SAMPLER = models.DEFAULT_SAMPLER
SCHEDULER = "normal"
DEFAULT_CFG = models.DEFAULT_CFG
FAIL_BELOW = 0.5
CHECKPOINT = 0.2          # the headline checkpoint: 20% of the steps
FACTORS = ("presence", "count", "shape", "extra", "relation")


def generate(patcher, text_encoder, family: str, prompt: str, seeds: Sequence[int], cfg: float,
             steps: int = STEPS, sampler: Optional[str] = None, scheduler: str = SCHEDULER,
             preview_step: Optional[int] = None):
    """Images ``[len(seeds), 3, 32, 32]`` in 0..1 of ``prompt``, one per seed (consecutive seeds), sampled by
    the pack's own candidate sampler: row i is what a batch-1 KSampler run with ``seeds[i]`` gives, its
    ancestral noise included. ``sampler``: default the model's (:data:`models.DEFAULT_SAMPLER`). With
    ``preview_step`` k, returns ``(images, previews)``: ``previews`` is the x0 prediction the sampler holds
    after k steps (the denoiser output of step k, what the pack's early sampler shows when it stops there),
    drawn as an image (the proxy world's latent is the image, so this "decode" is free and exact)."""
    from probe_select.nodes.engine import split_sampling

    seeds = [int(s) for s in seeds]
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        raise ValueError(f"generate: seeds must be consecutive (candidate i is seed + i), got {seeds}")
    sampler = sampler or DEFAULT_SAMPLER[family]
    capture = (int(preview_step),) if preview_step is not None else ()
    with torch.inference_mode():
        result = split_sampling.run_candidates(
            patcher, text_encoder.conditioning(prompt), text_encoder.conditioning(""), models.empty_latent(family, 1),
            seeds[0], len(seeds), steps, cfg, sampler, scheduler, stop_step=steps, capture_at=capture)
    images = models.latent_to_image(result.latent["samples"], family)
    if preview_step is None:
        return images
    return images, models.latent_to_image(result.x0_at[int(preview_step)], family)


def checkpoint_level(patcher, family: str, fraction: float = CHECKPOINT, steps: int = STEPS,
                     scheduler: str = SCHEDULER) -> NoiseLevel:
    """Where ``fraction`` of the steps lands on the schedule the model samples with (its own
    model_sampling, the DiT's shift included): step, sigma and log-SNR."""
    import comfy.samplers

    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)
    return noise_level_at_fraction(sigmas.cpu(), FLOW if family == "dit" else VP, fraction)


def within_prompt(pred: np.ndarray, target: np.ndarray, n_boot: int = 1000) -> Dict:
    """Mean within-prompt Spearman of ``pred`` against ``target`` (both [P, S]) with its bootstrap 95%
    interval over prompts (prompts whose targets are all equal are left out)."""
    group = np.repeat(np.arange(pred.shape[0]), pred.shape[1])
    per_prompt = per_group_spearman(pred.reshape(-1), target.reshape(-1), group)
    ci = bootstrap_ci(per_prompt, n=n_boot, seed=0)
    return {"mean": ci["mean"], "low": ci["low"], "high": ci["high"], "prompts": ci["n_groups"]}


def evaluate(patcher, text_encoder, family: str, prompts: Sequence[str], n_seeds: int, cfg: float,
             seed: int = 0, steps: int = STEPS, variants: Optional[Dict[str, Dict]] = None,
             sampler: Optional[str] = None) -> Dict:
    """Sample every prompt with seeds ``seed .. seed + n_seeds - 1``; return the figures and rows.

    Also scores the x0 preview at the checkpoint (:data:`CHECKPOINT` of the steps, on the schedule the
    model samples with) and reports its within-prompt Spearman with the final score: the figure that
    says whether the world is as hard at t = 0.2 as real models are (0.17-0.27 on FLUX.1-dev and SDXL).
    ``variants``: evaluator variants to report beside the default, by name: the keyword arguments of
    :func:`score_terms` (``shape_floor``, ``relation_floor``), as :func:`evaluator_variants` builds them."""
    seeds = [seed + i for i in range(n_seeds)]
    sampler = sampler or DEFAULT_SAMPLER[family]
    level = checkpoint_level(patcher, family, CHECKPOINT, steps)
    images, previews = [], []
    t0 = time.perf_counter()
    for prompt in prompts:
        imgs, prev = generate(patcher, text_encoder, family, prompt, seeds, cfg, steps, sampler,
                              preview_step=level.step)
        images.append(imgs)
        previews.append(prev)
    wall = time.perf_counter() - t0
    out = summarize(images, previews, prompts)
    out["variants"] = {name: _headline(summarize(images, previews, prompts, **kwargs))
                       for name, kwargs in (variants or {}).items()}
    out.update({"family": family, "comfy_family": models.COMFY_FAMILY[family], "prompts": len(prompts),
                "seeds_per_prompt": n_seeds, "cfg": cfg, "steps": steps, "sampler": sampler,
                "scheduler": SCHEDULER, "checkpoint": level.as_dict(), "sampling_wall_s": round(wall, 1)})
    out["_images"] = torch.stack(images)                   # [P, S, 3, H, W], not written to JSON
    out["_previews"] = torch.stack(previews)
    return out


HEADLINE = ("success_fraction", "prompts_with_mixed_outcomes", "semantic_failure_share", "mean_score",
            "x0_preview_within_spearman")


def _headline(r: Dict) -> Dict:
    return {k: r[k] for k in HEADLINE}


def summarize(images: Sequence[torch.Tensor], previews: Sequence[torch.Tensor], prompts: Sequence[str],
              shape_floor: Optional[float] = None, relation_floor: Optional[float] = None) -> Dict:
    """The figures of one evaluator setting over sampled images [P][S, 3, H, W] and their previews."""
    scores, prev_scores, factors = [], [], {k: [] for k in FACTORS}
    for prompt, imgs, prev in zip(prompts, images, previews):
        scene = parse_prompt(prompt)
        terms = score_terms(imgs, scene, shape_floor, relation_floor)
        scores.append(terms["score"].numpy())
        prev_scores.append(score_terms(prev, scene, shape_floor, relation_floor)["score"].numpy())
        for k in FACTORS:
            factors[k].append(terms[k].numpy())
    s = np.stack(scores)                                    # [P, S]
    fac = {k: np.stack(v) for k, v in factors.items()}       # [P, S]
    fail = s < FAIL_BELOW
    lowest = np.stack([fac[k] for k in FACTORS], -1).argmin(-1)   # [P, S]
    fail_kinds = {k: float(np.mean(fail & (lowest == i))) for i, k in enumerate(FACTORS)}
    kinds = [parse_prompt(p).kind for p in prompts]
    by_kind = {}
    for kind in ("relation", "count"):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if rows:
            by_kind[kind] = {"prompts": len(rows), "mean_score": float(s[rows].mean()),
                             "failure_fraction": float(fail[rows].mean())}
    gap = s.max(1) - s.mean(1)
    semantic = sum(v for k, v in fail_kinds.items() if k != "shape")
    out = {
        "mean_score": float(s.mean()),
        "success_fraction": float(1.0 - fail.mean()),
        "semantic_failure_share": float(semantic / fail.mean()) if fail.any() else float("nan"),
        "x0_preview_within_spearman": within_prompt(np.stack(prev_scores), s),
        "within_prompt_sd": float(s.std(1, ddof=1).mean()),
        "failure_fraction": float(fail.mean()),
        "failure_by_lowest_factor": fail_kinds,
        "best_minus_mean_gap": float(gap.mean()),
        "best_minus_mean_gap_median": float(np.median(gap)),
        "best_of_n_mean_score": float(s.max(1).mean()),
        "prompts_with_mixed_outcomes": float(np.mean(fail.any(1) & (~fail).any(1))),
        "by_kind": by_kind,
        "per_prompt": [{"prompt": p, "scores": [round(float(v), 4) for v in row],
                        "x0_preview_scores": [round(float(v), 4) for v in prow]}
                       for p, row, prow in zip(prompts, s, np.stack(prev_scores))],
    }
    return out


def save_grid(images: torch.Tensor, path: Path, rows: int = 12) -> None:
    """A PNG of the first ``rows`` prompts (one row each, one column per seed)."""
    from PIL import Image

    imgs = images[:rows]
    p, s, c, h, w = imgs.shape
    grid = imgs.permute(0, 3, 1, 4, 2).reshape(p * h, s * w, c)
    arr = (grid.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).resize((s * w * 3, p * h * 3), Image.NEAREST).save(path)


def sweep(patcher, enc, family: str, prompts: Sequence[str], cfgs: Sequence[float], samplers: Sequence[str],
          seeds: int, variants: Optional[Dict[str, Dict]] = None) -> List[Dict]:
    """The calibration figures at each sampler and CFG (and evaluator variant) on prompts the report does not show."""
    rows = []
    for sampler in samplers:
        for cfg in cfgs:
            r = evaluate(patcher, enc, family, prompts, seeds, cfg, seed=1000, variants=variants,
                         sampler=sampler)
            for name, v in {"default": _headline(r), **r["variants"]}.items():
                rows.append({"sampler": sampler, "cfg": cfg, "evaluator": name, **{k: v[k] for k in HEADLINE}})
                log.info("%s sweep %s", family, rows[-1])
    return rows


def evaluator_variants(shape_floors: str = "", relation_floors: str = "") -> Dict[str, Dict]:
    """Evaluator variants by name from comma-separated floors: ``{"shape floor 0.1": {"shape_floor": 0.1},
    "relation floor 0.1": {"relation_floor": 0.1}, ...}`` (the keyword arguments of :func:`score_terms`)."""
    variants = {}
    for factor, text in (("shape", shape_floors), ("relation", relation_floors)):
        for value in (float(v) for v in text.split(",") if v.strip()):
            variants[f"{factor} floor {value:g}"] = {f"{factor}_floor": value}
    return variants


def calibration_checks(r: Dict) -> Dict[str, bool]:
    """The four targets of a calibrated world, each with its verdict on one family's figures."""
    rho = r["x0_preview_within_spearman"]["mean"]
    return {f"success {100 * r['success_fraction']:.0f}% (target 25-75%)": 0.25 <= r["success_fraction"] <= 0.75,
            f"mixed prompts {100 * r['prompts_with_mixed_outcomes']:.0f}% (target >= 40%)":
                r["prompts_with_mixed_outcomes"] >= 0.40,
            f"semantic share of failures {100 * r['semantic_failure_share']:.0f}% (target > 50%)":
                r["semantic_failure_share"] > 0.5,
            f"x0-preview Spearman {rho:.2f} (target 0.15-0.35)": 0.15 <= rho <= 0.35}


def _training_runs(info: Dict) -> List[Dict]:
    """A weights file's training runs, latest first (``init_from``: the run it continued)."""
    runs = [info]
    while runs[-1].get("init_from", {}).get("info"):
        runs.append(runs[-1]["init_from"]["info"])
    return runs


def _training_cell(info: Dict) -> str:
    """Steps x batch and wall time of a weights file's training, its earlier runs included."""
    runs = _training_runs(info)
    steps = " + ".join(str(run.get("steps_done")) for run in reversed(runs))
    minutes = sum(run.get("wall_s", 0) for run in runs) / 60
    return f"{steps} steps x {info.get('batch_size')}, {minutes:.1f} min"


def _spearman_cell(v: Dict) -> str:
    return f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"


def merge_families(previous: Dict, new: Dict) -> Dict:
    """The families of a run that named some of them (`new`) over those of the previous results: the others keep
    their figures (each entry records the command that made it), in the order of models.FAMILIES."""
    merged = {**previous, **new}
    return {fam: merged[fam] for fam in models.FAMILIES if fam in merged}


def reproduce_lines(results: Dict, command: str) -> List[str]:
    """How to rerun the figures: one command, or each family's own where they were made by different runs."""
    commands = {fam: r.get("command", command) for fam, r in results["families"].items()}
    if len(set(commands.values())) <= 1:
        return [f"Reproduce: `{command}`"]
    return ["Reproduce (each family's figures come from their own run):", "",
            *(f"- {fam}: `{c}`" for fam, c in commands.items())]


def _markdown(results: Dict, command: str) -> str:
    lines = [
        "# Proxy-world diffusion models: sample quality",
        "",
        "Two small text-to-image models trained on the proxy world (bench/proxy_world), built from ComfyUI's own "
        "model classes, sampled in-process with ComfyUI's sampling (the pack's candidate sampler: each row drawn from its "
        "own seed, as a batch-1 KSampler run; each model's sampler, 20 steps, "
        "normal scheduler, CFG against the empty prompt; the sampler is in the tables), scored by the proxy-world "
        "evaluator.",
        "",
        *reproduce_lines(results, command),
        "",
        f"Machine: {results['machine']}; torch {results['torch']}, {results['threads']} threads.",
        "",
        "| family | ComfyUI class | params (diffusion + text) | training | final loss | CFG | mean score | "
        "within-prompt SD | failures (score < 0.5) | best-minus-mean gap | best of the seeds | prompts with mixed seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for fam, r in results["families"].items():
        t = r["training"]
        lines.append(
            f"| {fam} | {r['comfy_class']} | {t.get('params_diffusion', 0) / 1e6:.2f} M + "
            f"{t.get('params_text', 0) / 1e6:.3f} M | {_training_cell(t)} | {t.get('final_loss')} | {r['cfg']} | "
            f"{r['mean_score']:.3f} | "
            f"{r['within_prompt_sd']:.3f} | {100 * r['failure_fraction']:.1f}% | {r['best_minus_mean_gap']:.3f} "
            f"(median {r['best_minus_mean_gap_median']:.3f}) | {r['best_of_n_mean_score']:.3f} | "
            f"{100 * r['prompts_with_mixed_outcomes']:.0f}% |")
    lines += ["", f"{results['prompts']} held-out prompts x {results['seeds']} seeds per family. Within-prompt SD: "
              "sample SD over a prompt's seeds, averaged over prompts. Gap: max over a prompt's seeds minus their "
              "mean, averaged over prompts. Mixed: prompts with at least one failed and one successful seed.", ""]
    lines += ["## Calibration against real models (the headline checkpoint: 20% of the steps)", "",
              "Real FLUX.1-dev and SDXL (200 prompts x 200 seeds, published reward tables): the reward of the x0 "
              "preview after 4 of 20 steps ranks a prompt's seeds with a within-prompt Spearman of 0.17-0.27. "
              "Targets for this world: x0-preview Spearman 0.15-0.35 at 20% of the steps on the real schedules, "
              "25-75% of samples satisfying the prompt (score >= 0.5), >= 40% of prompts mixed, failures mostly "
              "semantic (count, relation, colour binding; not shape).", "",
              "| family | schedule | checkpoint | sigma | log-SNR | real families at 20% | success | mixed prompts | "
              "semantic share of failures | x0-preview within-prompt Spearman [95% CI] |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for fam, r in results["families"].items():
        c = r["checkpoint"]
        real = "SD1.5 / SDXL -3.16" if fam == "unet" else "SD3-medium -4.80, FLUX.1-dev -5.07"
        schedule = "scaled-linear eps (SD1.5's)" if fam == "unet" else f"flow, shift {r.get('shift', 3.0):g} (SD3's)"
        lines.append(f"| {fam} | {schedule} | step {c['step']} of {c['steps']} | {c['sigma']:.4f} | "
                     f"{c['log_snr']:.2f} | {real} | {100 * r['success_fraction']:.1f}% | "
                     f"{100 * r['prompts_with_mixed_outcomes']:.0f}% | {100 * r['semantic_failure_share']:.0f}% | "
                     f"{_spearman_cell(r['x0_preview_within_spearman'])} |")
    lines += ["", "Verdict against the targets (a world is calibrated when all four hold):", ""]
    for fam, r in results["families"].items():
        failed = [name for name, ok in calibration_checks(r).items() if not ok]
        lines.append(f"- {fam}: " + ("calibrated." if not failed else "NOT calibrated: " + "; ".join(failed) + "."))
    # the variant with the relation floored like every other semantic factor (rounds 1-4), named as the CLI names it
    strict_name = next(iter(evaluator_variants(relation_floors=f"{FLOOR:g}")))
    strict = {fam: r["variants"][strict_name] for fam, r in results["families"].items()
              if strict_name in r.get("variants", {})}
    if strict:
        lines += ["", "Calibration round 5 (the evaluator's relation floor, bench/proxy_world/evaluator.py): a wrong "
                  f"relation keeps {results.get('relation_floor')} of the score instead of {FLOOR:g} (still a failure, "
                  "but above a missing, miscoloured or miscounted object), as real reward models see spatial relations "
                  f"only weakly. With {FLOOR:g} the side each colour landed on, fixed in the first steps, ruled the "
                  "ranking. On the "
                  "same samples the x0-preview Spearman moves " + "; ".join(
                      f"{fam} {v['x0_preview_within_spearman']['mean']:.3f} -> "
                      f"{results['families'][fam]['x0_preview_within_spearman']['mean']:.3f}" for fam, v in strict.items())
                  + "; success, mixed prompts and the semantic share of failures stay as they were (the variants below)."]
    missed = [fam for fam, r in results["families"].items() if not all(calibration_checks(r).values())]
    if missed:
        lines += ["", f"Reading ({', '.join(missed)}): with plain euler both models settle the layout (which colour "
                  "where, how many, which side), and with it this reward, in their first steps, so a blurry x0 preview "
                  "already shows it (calibration round 2: 0.59 on the DiT, 0.74 on the UNet, at 20% of the steps). A "
                  "stochastic sampler keeps moving the layout after the checkpoint, as later steps still do in large "
                  "models: euler_ancestral (the sweep below)."]
        for fam in missed:
            r = results["families"][fam]
            lines += ["", f"The {fam} under {r.get('sampler', DEFAULT_SAMPLER[fam])}: success "
                      f"{100 * r['success_fraction']:.0f}%, x0-preview Spearman "
                      f"{_spearman_cell(r['x0_preview_within_spearman'])} against the band's 0.15-0.35: its x0 preview "
                      "ranks the seeds better than on real models, so its early-selection figures are optimistic for "
                      "the x0-preview scorer."]
        if "unet" in missed:
            lines += ["", "UNet history: rounds 1-3 (attention at 8x8 only; 1.9 M parameters, up to 7000 steps x 8) "
                      "satisfied 10-15% of the samples whatever the sampler (euler_ancestral 0-14%): they got most "
                      "counts and colour bindings wrong. Round 4 (these weights) adds attention at 16x16, where a shape "
                      "is 2-4 cells wide (2.14 M parameters; 3418 steps of a 5000-step schedule, continued for 1600 "
                      "steps on a fresh decaying schedule, 56 min in all): 33% with euler_ancestral, 43% with "
                      "dpmpp_2m_sde (whose x0 preview ranks at 0.71)."]
    variants = [(fam, name, v) for fam, r in results["families"].items() for name, v in r.get("variants", {}).items()]
    if variants:
        default = f"shape floor {results.get('shape_floor')}" + (
            f", relation floor {results['relation_floor']}" if "relation_floor" in results else "")
        lines += ["", f"Evaluator variants on the same samples (the default: {default}):", "",
                  "| family | evaluator | success | mixed prompts | semantic share | x0-preview Spearman |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for fam, name, v in variants:
            lines.append(f"| {fam} | {name} | {100 * v['success_fraction']:.1f}% | "
                         f"{100 * v['prompts_with_mixed_outcomes']:.0f}% | {100 * v['semantic_failure_share']:.0f}% | "
                         f"{_spearman_cell(v['x0_preview_within_spearman'])} |")
    lines.append("")
    lines += ["## Failures by their lowest evaluator factor (fraction of all samples)", "",
              "| family | " + " | ".join(FACTORS) + " |", "| --- |" + " --- |" * len(FACTORS)]
    for fam, r in results["families"].items():
        lines.append(f"| {fam} | " + " | ".join(f"{100 * r['failure_by_lowest_factor'][k]:.1f}%" for k in FACTORS)
                     + " |")
    lines += ["", "## By scene kind", "", "| family | kind | prompts | mean score | failures |",
              "| --- | --- | --- | --- | --- |"]
    for fam, r in results["families"].items():
        for kind, v in r["by_kind"].items():
            lines.append(f"| {fam} | {kind} | {v['prompts']} | {v['mean_score']:.3f} | "
                         f"{100 * v['failure_fraction']:.1f}% |")
    if any(r.get("sweep") for r in results["families"].values()):
        lines += ["", "## Sampler and CFG sweep (16 other held-out prompts, not the ones above; chose the default "
                  "sampler, CFG and evaluator)", "",
                  "Intervals over 16 prompts are wide: a setting is chosen because its figures meet the targets, "
                  "not because it differs significantly from the others.", "",
                  "| family | sampler | CFG | evaluator | mean score | success | mixed prompts | "
                  "semantic share | x0-preview Spearman |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for fam, r in results["families"].items():
            for row in r.get("sweep") or []:
                lines.append(f"| {fam} | {row['sampler']} | {row['cfg']} | {row['evaluator']} | {row['mean_score']:.3f} | "
                             f"{100 * row['success_fraction']:.1f}% | {100 * row['prompts_with_mixed_outcomes']:.0f}% | "
                             f"{100 * row['semantic_failure_share']:.0f}% | "
                             f"{_spearman_cell(row['x0_preview_within_spearman'])} |")
    lines += ["", "## Training", ""]
    for fam, r in results["families"].items():
        t = r["training"]
        lines.append(f"- {fam}: weights `{r['weights']}`; " + "; continued from ".join(
            f"{run.get('steps_done')} of {run.get('steps')} steps, batch {run.get('batch_size')}, {run.get('wall_s')} s "
            f"wall / {run.get('cpu_s')} s CPU on {run.get('threads')} threads; loss (mean of the last "
            f"{run.get('final_loss_window')} steps) {run.get('final_loss')} (first 100 steps {run.get('first_loss')})"
            for run in _training_runs(t)) + ".")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=models.FAMILIES, action="append",
                    help="repeat for several (default: both)")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=None, help="default: per family (unet %s, dit %s)" % (
        DEFAULT_CFG["unet"], DEFAULT_CFG["dit"]))
    ap.add_argument("--sampler", default=None, help="default: per family (unet %s, dit %s)" % (
        DEFAULT_SAMPLER["unet"], DEFAULT_SAMPLER["dit"]))
    ap.add_argument("--cfg-sweep", type=str, default="", help="comma-separated CFG values to compare first")
    ap.add_argument("--sampler-sweep", type=str, default="", help="comma-separated sampler names to compare first")
    ap.add_argument("--sweep-seeds", type=int, default=8, help="seeds per prompt in the CFG sweep")
    ap.add_argument("--shape-floors", type=str, default="",
                    help="comma-separated evaluator variants (shape factor floors) to report beside the default")
    ap.add_argument("--relation-floors", type=str, default="",
                    help="comma-separated evaluator variants (relation factor floors) to report beside the default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json of a previous run")
    ap.add_argument("--out", type=Path, default=RESULTS / "proxy_models")
    ap.add_argument("--grid-dir", type=Path, default=models.CACHE_WEIGHTS,
                    help="where sample grids (PNG) go (default: the git-ignored cache)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", force=True)
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    if args.markdown_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
        atomic_write_text(args.out.with_suffix(".md"), _markdown(results, results["command"]))
        return 0
    families = args.family or list(models.FAMILIES)
    variants = evaluator_variants(args.shape_floors, args.relation_floors)
    _, held = prompt_split()
    prompts = held[:args.prompts]
    sweep_prompts = held[args.prompts:args.prompts + 16]
    results = {"prompts": len(prompts), "seeds": args.seeds, "machine": f"{platform.machine()} CPU, "
               f"{os.cpu_count()} cores", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "shape_floor": SHAPE_FLOOR, "relation_floor": RELATION_FLOOR, "families": {}}
    for fam in families:
        patcher, enc = models.load(fam)
        path = models.weights_path(fam)
        meta = models.read_info(path)
        r: Dict = {}
        if args.cfg_sweep or args.sampler_sweep:
            r["sweep"] = sweep(patcher, enc, fam, sweep_prompts,
                               [float(v) for v in args.cfg_sweep.split(",") if v.strip()] or [DEFAULT_CFG[fam]],
                               [v.strip() for v in args.sampler_sweep.split(",") if v.strip()] or [DEFAULT_SAMPLER[fam]],
                               args.sweep_seeds, variants)
        cfg = args.cfg if args.cfg is not None else DEFAULT_CFG[fam]
        ev = evaluate(patcher, enc, fam, prompts, args.seeds, cfg, seed=args.seed, variants=variants,
                      sampler=args.sampler)
        if fam == "dit":
            ev["shift"] = float(patcher.get_model_object("model_sampling").shift)
        images = ev.pop("_images")
        previews = ev.pop("_previews")
        save_grid(previews, args.grid_dir / f"previews_{fam}.png")
        save_grid(images, args.grid_dir / f"samples_{fam}.png")
        ev.update(r)
        ev["weights"] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        ev["comfy_class"] = (f"supported_models.{type(patcher.model.model_config).__name__} / "
                             f"model_base.{type(patcher.model).__name__} ({patcher.model.model_type.name})")
        ev["training"] = meta.get("info", {})
        results["families"][fam] = ev
        log.info("%s: mean %.3f sd %.3f fail %.3f gap %.3f (%.0f s)", fam, ev["mean_score"],
                 ev["within_prompt_sd"], ev["failure_fraction"], ev["best_minus_mean_gap"], ev["sampling_wall_s"])
    command = ".venv/bin/python bench/proxy_world/sample.py" + "".join(
        f" --family {f}" for f in (args.family or [])) + (f" --cfg {args.cfg}" if args.cfg is not None else "") + (
        f" --sampler {args.sampler}" if args.sampler else "") + (
        f" --cfg-sweep {args.cfg_sweep}" if args.cfg_sweep else "") + (
        f" --sampler-sweep {args.sampler_sweep}" if args.sampler_sweep else "") + (
        f" --prompts {args.prompts}" if args.prompts != 40 else "") + (
        f" --seeds {args.seeds}" if args.seeds != 8 else "") + (
        f" --shape-floors {args.shape_floors}" if args.shape_floors else "") + (
        f" --relation-floors {args.relation_floors}" if args.relation_floors else "")
    for fam in families:
        results["families"][fam]["command"] = command
    results["command"] = command
    previous = args.out.with_suffix(".json")
    if args.family and previous.is_file():      # --family rewrites the named families only
        old = json.loads(previous.read_text())
        kept = {fam: {"command": old.get("command"), **r} for fam, r in old["families"].items()}
        results["families"] = merge_families(kept, results["families"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), _markdown(results, command))
    log.info("wrote %s.{md,json}", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
