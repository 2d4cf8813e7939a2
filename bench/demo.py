"""`make demo`: the Probe-Select workflow, run by ComfyUI's own execution engine, in the proxy world.

    make demo                                  # or: .venv/bin/python bench/demo.py [--family dit] [--out out/demo]

Loads ComfyUI in-process with this pack and the bench-only proxy-world nodes as custom nodes, queues
the selection workflow (tap -> early sampler -> score -> top-K -> resume) through
`execution.PromptExecutor` (what the server runs), and writes to the output folder. The scorer is the one
validation favoured in the committed proxy-bench run (`--scorer auto`): the demo probe
(ProbeSelectLoadProbe -> ProbeSelectScore) or the training-free x0 preview (ProbeSelectPreviewScore).
- `candidates.png`: the N early candidates (x0 previews at the checkpoint) with their scores,
  kept ones framed in green, next to the finished image(s);
- `summary.txt`: the evaluator score of the kept image vs the mean of all candidates (each finished
  with a plain KSampler for comparison only), and the compute saved.
Needs the proxy models and, to score with the probe, the demo probe (bench/proxy_world/weights/ or bench/cache/).
"""
from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))          # last: ComfyUI's `nodes` must win over the pack's nodes/

from devtools import load_pack  # noqa: E402
from probe_select.probes.atomic import atomic_write_text  # noqa: E402  (devtools registered probe_select)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

log = logging.getLogger("demo")
PROMPT = "a red circle left of a blue square"
RESULTS_JSON = ROOT / "bench" / "results" / "proxy_bench.json"
SCORER_LABELS = {"probe": "the learned probe", "x0_preview": "the x0 preview (decoded and scored by the evaluator)"}


def probe_file(family: str) -> Path:
    for folder in (ROOT / "bench" / "proxy_world" / "weights", ROOT / "bench" / "cache" / "proxy_bench"):
        path = folder / f"{family}_t0.2.safetensors"
        if path.exists():
            return path
    raise SystemExit(f"no demo probe for {family}: run `make bench-proxy` first (it trains one)")


def demo_scorer(family: str) -> str:
    """The scorer validation favoured for ``family`` in the committed proxy-bench run (``demo_scorer`` in
    bench/results/proxy_bench.json: the x0 preview or a learned probe); the probe when the run has none."""
    try:
        saved = json.loads(RESULTS_JSON.read_text())
    except (OSError, ValueError):
        return "probe"
    chosen = saved.get("families", {}).get(family, {}).get("demo_scorer", "probe")
    return "x0_preview" if chosen == "x0_preview" else "probe"


def score_nodes(scorer: str, family: str, probe_name: str, prompt: str) -> dict:
    """The scoring part of the workflow: node "8" outputs the candidates' scores from the early sampler ("6"); the
    probe's part also taps the model ("5", what the early sampler runs) for the activations it reads."""
    if scorer == "x0_preview":
        # training-free: decode each candidate's x0 preview and run the evaluator on it
        return {
            "7": {"class_type": "ProxyWorldVAE", "inputs": {"family": family}},
            "15": {"class_type": "ProxyWorldEvaluator", "inputs": {}},
            "8": {"class_type": "ProbeSelectPreviewScore", "inputs": {"x0_preview": ["6", 1], "vae": ["7", 0],
                                                                      "evaluator": ["15", 0], "prompt": prompt}},
        }
    return {
        "5": {"class_type": "ProbeSelectTap", "inputs": {"model": ["1", 0], "block": "auto", "feature_size": 8}},
        "7": {"class_type": "ProbeSelectLoadProbe", "inputs": {"probe_name": probe_name}},
        # the x0 preview is connected too: the demo probe is whichever learned scorer validation favoured,
        # and the x0-latent probes read it (an activations probe ignores it)
        "8": {"class_type": "ProbeSelectScore", "inputs": {"probe": ["7", 0], "activations": ["6", 2],
                                                           "x0_preview": ["6", 1]}},
    }


def workflow(family: str, probe_name: str, n: int, k: int, seed: int, steps: int, prompt: str, cfg: float,
             sampler: str, scorer: str = "probe") -> dict:
    size = 256 if family == "unet" else 128        # EmptyLatentImage is in pixels / 8
    return {
        "1": {"class_type": "ProxyWorldLoader", "inputs": {"family": family}},
        "2": {"class_type": "ProxyWorldEncode", "inputs": {"text_encoder": ["1", 1], "prompt": prompt}},
        "3": {"class_type": "ProxyWorldEncode", "inputs": {"text_encoder": ["1", 1], "prompt": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "ProbeSelectEarlySampler", "inputs": {
            "model": ["5", 0] if scorer == "probe" else ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "candidates": n, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": "normal",
            "checkpoint_percent": 0.2, "denoise": 1.0}},
        **score_nodes(scorer, family, probe_name, prompt),
        "9": {"class_type": "ProbeSelectTopK", "inputs": {"early_latent": ["6", 0], "scores": ["8", 0], "keep": k}},
        "10": {"class_type": "ProbeSelectResume", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                              "negative": ["3", 0], "latent": ["9", 0], "cfg": cfg}},
        "11": {"class_type": "ProxyWorldDecode", "inputs": {"samples": ["10", 0], "family": family}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "demo_kept"}},
        "13": {"class_type": "ProxyWorldDecode", "inputs": {"samples": ["6", 1], "family": family}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "demo_candidates"}},
    }


class _Server:
    """What PromptExecutor needs of PromptServer: it only sends progress messages here."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass


def _load_nodes(out_dir: Path, probes_dir: Path) -> None:
    import folder_paths
    import nodes

    folder_paths.set_output_directory(str(out_dir))
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    asyncio.run(nodes.load_custom_node(str(ROOT), module_parent="custom_nodes"))
    asyncio.run(nodes.load_custom_node(str(ROOT / "bench" / "proxy_world" / "comfy_nodes"),
                                       module_parent="custom_nodes"))
    folder_paths.add_model_folder_path("probes", str(probes_dir), is_default=True)
    missing = [n for n in ("ProbeSelectTap", "ProxyWorldLoader") if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise SystemExit(f"custom nodes failed to load: {missing}")


def _grid(previews: torch.Tensor, scores: list[float], kept: list[int], finished: torch.Tensor,
          all_finished: torch.Tensor, final_scores: list[float], cell: int = 128) -> Image.Image:
    """Top row: the early candidates (x0 previews) with their probe scores, kept ones framed, then the
    finished kept image(s). Bottom row: every candidate finished by a plain KSampler (comparison
    only) with its evaluator score, the best one marked."""
    n = previews.shape[0]
    row_h = cell + 36
    canvas = Image.new("RGB", ((n + 1 + finished.shape[0]) * (cell + 8) + 8, 2 * row_h + 40), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    to_pil = lambda img: Image.fromarray((img.clamp(0, 1).numpy() * 255).astype("uint8")).resize(  # noqa: E731
        (cell, cell), Image.NEAREST)
    best = max(range(n), key=lambda i: final_scores[i])
    draw.text((8, 4), "early candidates at the checkpoint (x0 previews), score; kept: green frame",
              fill=(200, 200, 200))
    draw.text((8, row_h + 24), "every candidate finished, for comparison only: evaluator score (best: *)",
              fill=(200, 200, 200))
    for i in range(n):
        x = 8 + i * (cell + 8)
        canvas.paste(to_pil(previews[i]), (x, 36))
        if i in kept:
            draw.rectangle((x - 3, 33, x + cell + 2, 36 + cell + 2), outline=(60, 220, 90), width=3)
        draw.text((x, 20), f"#{i} {scores[i]:+.2f}" + (" kept" if i in kept else ""), fill=(230, 230, 230))
        canvas.paste(to_pil(all_finished[i]), (x, row_h + 56))
        draw.text((x, row_h + 40), f"#{i} {final_scores[i]:.3g}" + (" *" if i == best else ""),
                  fill=(120, 230, 140) if i in kept else (230, 230, 230))
    x0 = 8 + (n + 1) * (cell + 8)
    for j in range(finished.shape[0]):
        canvas.paste(to_pil(finished[j]), (x0 + j * (cell + 8), 36))
        draw.text((x0 + j * (cell + 8), 20), f"finished #{kept[j]}", fill=(120, 230, 140))
    return canvas


def run_workflow(executor, args, probe_name: str, prompt: str, seed: int, patcher, text) -> dict:
    """Queue the selection workflow for one prompt; finish every candidate with a plain KSampler for
    comparison; return what the picture and the summary need."""
    import execution
    import nodes
    from bench.proxy_world import models
    from bench.proxy_world.evaluator import score as proxy_score
    from bench.proxy_world.grammar import parse_prompt

    graph = workflow(args.family, probe_name, args.candidates, args.keep, seed, args.steps, prompt,
                     models.DEFAULT_CFG[args.family], models.DEFAULT_SAMPLER[args.family], args.scorer)
    valid = asyncio.run(execution.validate_prompt("demo", graph, None))
    if not valid[0]:
        raise SystemExit(f"workflow invalid: {valid[1]} {valid[3]}")
    executor.execute(graph, "demo", {}, valid[2])
    if not executor.success:
        raise SystemExit(f"workflow failed: {executor.status_messages[-1:]}")

    # Read the run back from the executor's output cache, for the picture and the summary.
    def output(node: str, index: int):
        entry = executor.caches.outputs.get(node)
        if inspect.isawaitable(entry):                                     # the cache is async on 0.33
            entry = asyncio.run(entry)
        values = entry.outputs if hasattr(entry, "outputs") else entry     # CacheEntry on 0.3.75
        return values[index][0]

    early_latent = output("6", 0)
    pos, neg = text.conditioning(prompt), text.conditioning("")
    latent = models.empty_latent(args.family, 1)
    finals = [nodes.common_ksampler(patcher, s, args.steps, models.DEFAULT_CFG[args.family],
                                    models.DEFAULT_SAMPLER[args.family], "normal", pos, neg, latent)[0]["samples"]
              for s in early_latent["probe_select"]["seeds"]]
    all_finished = models.latent_to_image(torch.cat(finals), args.family)
    final_scores = [float(v) for v in proxy_score(all_finished, [parse_prompt(prompt)] * args.candidates)]
    kept = [int(i) for i in output("9", 4).split(",")]
    return {"ranking_text": executor.history_result["outputs"]["9"]["text"][0], "early_latent": early_latent,
            "probe_scores": output("8", 0).scores.tolist(), "kept": kept, "previews": output("13", 0),
            "finished": output("11", 0), "all_finished": all_finished.permute(0, 2, 3, 1),
            "final_scores": final_scores, "kept_score": float(np.mean([final_scores[i] for i in kept])),
            "mean_score": float(np.mean(final_scores)), "best_score": float(max(final_scores))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["unet", "dit"], default="unet",
                        help="unet (default: its demo scorer is a learned probe, validation's choice) or dit (three "
                             "times faster; its demo scorer is the x0 preview)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--more-prompts", type=int, default=23,
                        help="also run this many held-out prompts for the kept-vs-mean summary (one is noisy)")
    parser.add_argument("--scorer", choices=["auto", "probe", "x0_preview"], default="auto",
                        help="what ranks the candidates at the checkpoint; auto (default): the one validation "
                             "favoured in the committed proxy-bench run (bench/results/proxy_bench.json)")
    parser.add_argument("--probe", type=Path, default=None,
                        help="with --scorer probe: this probe file instead of the demo probe (e.g. a distilled "
                             "probe of bench/distilled_probe.py, bench/cache/proxy_bench/probes/)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()       # ComfyUI's SaveImage refuses a relative output directory
    if args.scorer == "auto":
        args.scorer = demo_scorer(args.family)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    probes_dir = args.out / "probes"
    probes_dir.mkdir(exist_ok=True)
    probe_name = ""
    if args.probe is not None and args.scorer != "probe":
        parser.error("--probe needs --scorer probe")
    if args.scorer == "probe":
        source = args.probe if args.probe is not None else probe_file(args.family)
        if not source.is_file():
            parser.error(f"--probe {source}: no such file")
        shutil.copy(source, probes_dir / source.name)
        probe_name = source.name

    log.info("[demo] loading ComfyUI, the pack and the proxy-world nodes ...")
    pack = load_pack()
    del pack
    _load_nodes(args.out, probes_dir)
    import execution

    log.info("[demo] running the Probe-Select workflow (N=%d, K=%d, checkpoint 0.2, %d steps; scorer: %s) through "
             "ComfyUI's executor, and finishing every candidate with a plain KSampler for comparison only ...",
             args.candidates, args.keep, args.steps, SCORER_LABELS[args.scorer])
    # cache_args as ComfyUI's main.py (prompt_worker) builds them for --cache-classic: every key it
    # passes, since executors read them unconditionally (0.33 added "ram_inactive").
    executor = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    # the same model as the workflow's loader, for the comparison runs; loaded once for all prompts
    from bench.proxy_world import models
    patcher, text = models.load(args.family)
    run = run_workflow(executor, args, probe_name, args.prompt, args.seed, patcher, text)
    log.info("[demo] %s", run["ranking_text"].replace("\n", "\n[demo] "))
    grid = _grid(run["previews"], run["probe_scores"], run["kept"], run["finished"], run["all_finished"],
                 run["final_scores"])
    grid.save(args.out / "candidates.png")

    runs = [run]
    if args.more_prompts > 0:
        from bench.proxy_world.train_models import prompt_split
        more = [p for p in prompt_split()[1] if p != args.prompt][: args.more_prompts]
        log.info("[demo] the same workflow on %d more held-out prompts (one prompt's pick is noisy) ...", len(more))
        for i, prompt in enumerate(more):
            runs.append(run_workflow(executor, args, probe_name, prompt, args.seed + 1000 * (i + 1), patcher, text))
    kept = np.array([r["kept_score"] for r in runs])
    mean = np.array([r["mean_score"] for r in runs])
    best = np.array([r["best_score"] for r in runs])
    gain = float(np.mean((kept - mean) / np.maximum(best - mean, 1e-12)))
    s = run["early_latent"]["probe_select"]["stop_step"]
    spent = args.candidates * s + args.keep * (args.steps - s)
    summary = "\n".join([
        f"prompt: {args.prompt} ({args.family}, N={args.candidates}, K={args.keep}, seeds {args.seed}..)",
        f"scorer: {SCORER_LABELS[args.scorer]}" + (f" ({probe_name})" if probe_name else ""),
        f"evaluator score of the kept image(s): {run['kept_score']:.4g}",
        f"mean over all {args.candidates} candidates: {run['mean_score']:.4g}; best: {run['best_score']:.4g}",
        f"over {len(runs)} prompts: kept {kept.mean():.4g} vs mean candidate {mean.mean():.4g} (best {best.mean():.4g}); "
        f"kept beat the mean candidate on {int((kept > mean).sum())} of {len(runs)}; "
        f"fraction of the best-minus-mean gain captured: {gain:.2f}",
        f"denoiser evaluations: {spent} instead of {args.candidates * args.steps} "
        f"({1 - spent / (args.candidates * args.steps):.0%} saved)",
        f"wrote {args.out / 'candidates.png'} and the SaveImage outputs in {args.out}",
        f"total time {time.perf_counter() - started:.1f} s",
    ])
    atomic_write_text(args.out / "summary.txt", summary + "\n")
    for line in summary.splitlines():
        log.info("[demo] %s", line)
    return {"kept_score": run["kept_score"], "mean_score": run["mean_score"], "kept": run["kept"],
            "kept_over_prompts": float(kept.mean()), "mean_over_prompts": float(mean.mean())}


if __name__ == "__main__":
    main()
