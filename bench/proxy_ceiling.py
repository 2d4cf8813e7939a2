"""The ceiling of early selection: how well could *any* scorer at a checkpoint rank a prompt's seeds?

    make bench-proxy-ceiling                             # two lanes a model, then the report
    .venv/bin/python bench/proxy_ceiling.py --quick      # a reduced setting (what the tests run)

Both proxy models sample with euler_ancestral: every step after a checkpoint draws fresh noise, so a
candidate's final reward is not a function of its state there. The most a scorer at t can know is the
expected final reward given that state. Here every held-out candidate of the proxy bench (its prompts, seeds,
sampler and CFG) is stopped at t and finished again ``M`` times with other noise after t (a *redraw*: the same
state, other seeds for the noise of the remaining steps). From these, on the held-out prompts:

* test-retest: the within-prompt Spearman of two finishes of the same states (recorded finish vs a redraw);
* the expected final reward, estimated by the mean of the M redraws, as a scorer of the recorded finishes: a
  lower bound of the ceiling (a mean of M draws still carries noise), with its 95% CI over prompts;
* the ceiling extrapolated to infinitely many redraws: if the final reward is f(state) plus independent noise
  and r is the test-retest correlation, the mean of M redraws correlates ``r / sqrt(r + (1 - r) / M)`` with a
  finish and f(state) itself ``sqrt(r)`` (the same model's prediction at M is printed beside the measurement,
  its check; Spearman stands in for Pearson here, so it is an estimate);
* equal compute: the expected reward (mean of the redraws) as a scorer priced at nothing, like the oracle,
  beside the x0 preview and the oracle (the realised final reward, which no scorer can know), with the proxy
  bench's schedules, prices and best-of-8 rule.

Per prompt, the results are cached under ``bench/cache/proxy_bench/ceiling/<family>_<steps>steps_<seeds>seeds/``
(one file each, written atomically: an interrupted run goes on where it stopped); the figures go to
bench/results/proxy_ceiling.{md,json} and a summary into REPORT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import proxy_bench  # noqa: E402  (bootstraps ComfyUI and registers probe_select)
from probe_select.probes.atomic import atomic_write, atomic_write_text  # noqa: E402
from probe_select.probes.checkpoints import checkpoint_step  # noqa: E402
from probe_select.probes.training.metrics import per_group_spearman  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("proxy_ceiling")
CHECKPOINTS = (0.2, 0.4)
REDRAWS = {0.2: 3, 0.4: 2}           # the headline checkpoint gets one more (each costs a finish from t)
# Redraw m of candidate seed s draws its noise after t with seed s + (m + 1) * REDRAW_SEED_STRIDE: far from
# every candidate seed of the collection (prompt p's are first_seed + 0..seeds-1, prompts 1000 apart).
REDRAW_SEED_STRIDE = 100_003
RESULTS_FILE = "proxy_ceiling.json"


def redraw(latent: dict, seeds: list[int]) -> dict:
    """The early LATENT of the pack's split sampler, made to finish with the noise streams of ``seeds`` after its
    stop step: the same state, another draw of every later step's noise.

    The resume continues from the stopped latent (the recorded early calls are dropped, so it does not replay
    the early steps, which would redraw their noise too) with each row's noise stream at the position the
    early phase left it. With the candidates' own seeds this is the plain finish (exact for single-step
    samplers such as euler_ancestral, the proxy models'; checked by :func:`check_redraw`)."""
    from probe_select.nodes.engine.split_sampling import PACK_KEY

    meta = dict(latent[PACK_KEY])
    if len(seeds) != len(meta["seeds"]):
        raise ValueError(f"redraw: {len(seeds)} seeds for {len(meta['seeds'])} candidates")
    meta.update(seeds=[int(s) for s in seeds], calls=None)
    return dict(latent, **{PACK_KEY: meta})


def redraw_seeds(seeds: list[int], m: int) -> list[int]:
    """The noise seeds of redraw ``m`` (0-based) of candidates ``seeds``."""
    return [int(s) + (m + 1) * REDRAW_SEED_STRIDE for s in seeds]


def check_redraw(finished: torch.Tensor, again: torch.Tensor, what: str) -> None:
    """A redraw with the candidates' own seeds must give their finish: otherwise the resume no longer continues
    the state it was given, and every redraw figure would measure something else."""
    error = (finished - again).abs().max().item()
    scale = finished.abs().max().item()
    # Not bitwise: the resume converts the stopped LATENT back to the sampler's x, and that float rounding grows over
    # the remaining steps (up to 3e-5 of the scale on the DiT); a redraw moves the finish by more than 1e-2 of it.
    if error > 1e-4 * max(scale, 1.0):
        raise RuntimeError(f"{what}: finishing the stopped candidates again with their own noise differs from their "
                           f"finish by {error:.3g} (scale {scale:.3g}); the redraws would not continue the same state")
    log.info("  %s: a redraw with the candidates' own seeds equals their finish (max |diff| %.2g)", what, error)


def prompt_file(cache: Path, family: str, setting, index: int) -> Path:
    """Where one held-out prompt's results are cached: a folder per model and setting (steps and seeds), so that a
    --quick run never mixes its prompts into the report's."""
    return cache / "ceiling" / f"{family}_{setting.steps}steps_{setting.heldout_seeds}seeds" / f"prompt_{index:03d}.npz"


def collect_prompt(patcher, text, family: str, prompt: str, index: int, setting, check: bool = False) -> dict:
    """One held-out prompt's candidates: the recorded finish, the x0-preview score at each checkpoint and the
    finals of the redraws from each checkpoint (``{t: [seeds, REDRAWS[t]]}``)."""
    from bench.proxy_world import evaluator, grammar, models
    from probe_select.nodes.engine import split_sampling

    positive, negative = text.conditioning(prompt), text.conditioning("")
    scene = grammar.parse_prompt(prompt)
    first = proxy_bench.first_seed(proxy_bench.HELDOUT_SEED_BASE, index)
    seeds = list(range(first, first + setting.heldout_seeds))
    cfg = proxy_bench.cfg_of(family, setting)

    def reward(latent) -> np.ndarray:
        image = models.latent_to_image(latent["samples"] if isinstance(latent, dict) else latent, family)
        return np.asarray(evaluator.score(image, [scene] * len(seeds)), dtype=np.float64)

    out = {}
    early = None
    for t in CHECKPOINTS:
        k = checkpoint_step(setting.steps, t)
        if early is None:
            early = split_sampling.run_candidates(patcher, positive, negative, models.empty_latent(family, 1), first,
                                                  len(seeds), setting.steps, cfg, proxy_bench.sampler_of(family),
                                                  "normal", stop_step=k, capture_at=(k,))
        else:
            # carried on from the previous checkpoint, as the pack's multi-stage pruning does (exact: it replays the
            # recorded steps), instead of sampling the first steps again
            early = split_sampling.advance(patcher, positive, negative, early.latent, cfg, k)
        out[f"preview_{t:g}"] = reward(early.x0)
        if t == CHECKPOINTS[-1]:
            # the recorded finish: the pack's exact resume (it replays the early steps)
            finished = split_sampling.resume(patcher, positive, negative, early.latent, cfg)
            out["final"] = reward(finished)
            if check:
                again = split_sampling.resume(patcher, positive, negative, redraw(early.latent, seeds), cfg)
                check_redraw(finished["samples"], again["samples"], f"{family} prompt {index}")
        finishes = [split_sampling.resume(patcher, positive, negative, redraw(early.latent, redraw_seeds(seeds, m)),
                                          cfg) for m in range(REDRAWS[t])]
        out[f"redraws_{t:g}"] = np.stack([reward(latent) for latent in finishes], axis=1)
    return out


def save_arrays(path: Path, arrays: dict) -> None:
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def collect(family: str, setting, cache: Path, lane: tuple[int, int] = (1, 1)) -> None:
    """Every held-out prompt of ``setting`` not cached yet (every lane-th from the lane's own), one file each."""
    patcher, text = proxy_bench.load_model(family)
    prompts = proxy_bench.heldout_prompts(setting)
    prompt_file(cache, family, setting, 0).parent.mkdir(parents=True, exist_ok=True)
    lane_index, lanes = lane
    checked = False
    for index, prompt in enumerate(prompts):
        path = prompt_file(cache, family, setting, index)
        if index % lanes != lane_index - 1 or path.exists():
            continue
        arrays = collect_prompt(patcher, text, family, prompt, index, setting, check=not checked)
        checked = True
        atomic_write(path, lambda tmp: save_arrays(tmp, arrays))
        log.info("  %s: prompt %d of %d finished again from %s", family, index + 1, len(prompts),
                 ", ".join(f"t = {t:g} ({REDRAWS[t]}x)" for t in CHECKPOINTS))


def load(family: str, setting, cache: Path) -> dict:
    """The cached arrays of every held-out prompt, stacked (rows: prompt-major); raises when some are missing."""
    count = len(proxy_bench.heldout_prompts(setting))
    missing = [i for i in range(count) if not prompt_file(cache, family, setting, i).exists()]
    if missing:
        raise FileNotFoundError(f"{family}: {len(missing)} of {count} held-out prompts have no redraws yet "
                                f"(first: {missing[0]}); run --collect-only (resumable) before the report")
    parts = [dict(np.load(prompt_file(cache, family, setting, i))) for i in range(count)]
    data = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    data["groups"] = np.repeat(np.arange(count), setting.heldout_seeds)
    return data


def reliability_ceiling(test_retest: float, m: float = float("inf")) -> float:
    """Correlation with a finish of the mean of ``m`` redraws when final = f(state) + independent noise and two
    finishes of one state correlate ``test_retest``: r / sqrt(r + (1 - r) / m); sqrt(r) as m grows."""
    r = max(float(test_retest), 0.0)
    if r == 0.0:
        return 0.0
    return r / np.sqrt(r + (1.0 - r) / m) if np.isfinite(m) else float(np.sqrt(r))


def summarize(family: str, data: dict, setting) -> dict:
    """The ceiling figures of one model (module docstring) and its equal-compute curves."""
    finals, groups = data["final"], data["groups"]
    by_t = {}
    for t in CHECKPOINTS:
        redraws = data[f"redraws_{t:g}"]
        # every pair of finishes of the same states: the recorded one with each redraw, and redraws with each other
        draws = np.concatenate([finals[:, None], redraws], axis=1)
        pairs = [(a, b) for a in range(draws.shape[1]) for b in range(a + 1, draws.shape[1])]
        retest = float(np.mean([np.nanmean(per_group_spearman(draws[:, a], draws[:, b], groups)) for a, b in pairs]))
        expected = proxy_bench.within_ci(redraws.mean(axis=1), finals, groups, setting.bootstrap)
        by_t[t] = {"redraws": int(redraws.shape[1]), "test_retest": retest, "expected_final": expected,
                   "model_at_redraws": reliability_ceiling(retest, redraws.shape[1]),
                   "ceiling": reliability_ceiling(retest),
                   "x0_preview": proxy_bench.within_ci(data[f"preview_{t:g}"], finals, groups, setting.bootstrap)}
    predictions = {"x0_preview": {t: data[f"preview_{t:g}"] for t in CHECKPOINTS},
                   "expected": {t: data[f"redraws_{t:g}"].mean(axis=1) for t in CHECKPOINTS}}
    eq = proxy_bench.equal_compute(family, dataclasses.replace(setting, checkpoints=CHECKPOINTS), predictions,
                                   finals, groups, "expected", free=("expected",))
    keep = [key for key in eq["curves"]
            if key == "best-of-N" or key.endswith(("/ expected", "/ oracle", "/ x0_preview"))]
    return {"prompts": int(len(np.unique(groups))), "seeds": int(setting.heldout_seeds), "by_t": by_t,
            "equal_compute": dict(eq, curves={k: eq["curves"][k] for k in keep},
                                  match_best_of_8={k: eq["match_best_of_8"][k] for k in keep})}


def markdown(results: dict) -> str:
    setting = results["setting"]
    lines = ["# The ceiling of early selection in the proxy world", "",
             f"Command: `{results['command']}`. Generated {results['generated']}.", "",
             "Both proxy models sample with euler_ancestral, so every step after a checkpoint draws fresh noise and "
             "the final reward is not a function of the state at t. Each held-out candidate (the proxy bench's "
             f"{setting['heldout_prompts']} prompts x {setting['heldout_seeds']} seeds, {setting['steps']} steps) was "
             "stopped at t and finished again with other noise after t. The expected final reward given the state "
             "is what a perfect scorer at t would know; the mean of the redraws estimates it (a lower bound: "
             "finitely many draws), and the test-retest correlation r extrapolates it to infinitely many "
             "(sqrt(r); the same model's prediction at the measured number of redraws is its check). "
             "Within-prompt Spearman against the recorded final reward, 95% CI over prompts.", "",
             "| model | t | test-retest (two finishes of one state) | mean of redraws (n) | model at n | "
             "ceiling (extrapolated) | x0 preview |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for family, entry in results["families"].items():
        for t, row in entry["by_t"].items():
            expected, preview = proxy_bench.cell(row["expected_final"]), proxy_bench.cell(row["x0_preview"])
            lines.append(f"| {family} | {float(t):g} | {row['test_retest']:.3f} | {expected} ({row['redraws']}) | "
                         f"{row['model_at_redraws']:.3f} | {row['ceiling']:.3f} | {preview} |")
    lines += ["", "## At equal compute", "",
              "The proxy bench's schedules and prices (REPORT.md, 'Reward at equal compute'). 'expected': the mean of "
              "the redraws as the scorer, priced at nothing (the best any scorer at that checkpoint could do, up "
              "to the redraws' own noise); 'oracle': the realised final reward, which no scorer can know. Compute "
              "to match best-of-8 as a fraction of best-of-8's, chosen on one half of the prompts and judged on "
              "the other (both ways).", "", "| model | method / scorer | compute to match best-of-8 | "
              "best reward at <= 0.5 of best-of-8's compute |", "| --- | --- | --- | --- |"]
    for family, entry in results["families"].items():
        eq = entry["equal_compute"]
        unit = eq["best_of_8"]["compute"]
        lines.append(f"| {family} | best-of-8 | 1.00 | {eq['best_of_8']['reward']:.4f} at 1.00 (its own) |")
        for key, found in eq["match_best_of_8"].items():
            if key == "best-of-N":
                continue
            best_half = proxy_bench.best_reward_at_half(eq["curves"][key], unit)
            lines.append(f"| {family} | {key} | {proxy_bench.fraction_of_best_of_8(found, unit)} | "
                         + (f"{best_half:.4f} |" if math.isfinite(best_half) else "- |"))
    return "\n".join(lines) + "\n"


def report(families: list[str], setting, cache: Path, out: Path, command: str) -> dict:
    import datetime
    path = out / RESULTS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    setting_json = json.loads(json.dumps(setting.__dict__))
    entries = saved.get("families", {}) if saved.get("setting") == setting_json else {}
    for family in families:
        entries[family] = summarize(family, load(family, setting, cache), setting)
    results = {"setting": setting_json, "command": command, "redraws": {str(t): n for t, n in REDRAWS.items()},
               "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "families": {f: entries[f] for f in ("unet", "dit") if f in entries}}
    results = json.loads(json.dumps(results, default=float))
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "proxy_ceiling.md", markdown(results))
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the proxy bench's reduced setting (smoke test)")
    parser.add_argument("--families", nargs="+", default=["unet", "dit"])
    parser.add_argument("--out", type=Path, default=proxy_bench.RESULTS)
    parser.add_argument("--cache", type=Path, default=proxy_bench.CACHE)
    parser.add_argument("--collect-only", action="store_true", help="only finish the candidates again, no report")
    parser.add_argument("--lane", type=proxy_bench.parse_lane, default=(1, 1), metavar="I/N",
                        help="with --collect-only: every N-th prompt from the I-th (run 1/N .. N/N at once)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setting = proxy_bench.QUICK if args.quick else proxy_bench.MEDIUM
    proxy_bench.load_pack()
    for family in args.families:
        collect(family, setting, args.cache, args.lane if args.collect_only else (1, 1))
    if args.collect_only:
        return {}
    results = report(args.families, setting, args.cache, args.out,
                     "bench/proxy_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    log.info("wrote %s", args.out / "proxy_ceiling.md")
    proxy_bench.rewrite_report_from(args.out)      # REPORT.md's summary of the ceiling
    return results


if __name__ == "__main__":
    from devtools import bootstrap_comfy

    signal.signal(signal.SIGTERM, proxy_bench.stop_on_sigterm)
    bootstrap_comfy(pytorch_attention=True)   # an hour of sampling: PyTorch's attention (see bootstrap_comfy)
    main()
