"""Train the two proxy-world diffusion models (and their text encoders) on CPU, deterministically.

    .venv/bin/python bench/proxy_world/train_models.py --family unet   # then: --family dit

Everything goes through ComfyUI's own parametrisation of the model (``comfy.model_base``):

* sigma from the model's ``model_sampling``: EPS (``unet``): one of the 1000 discrete sigmas,
  uniformly; FLOW (``dit``): for half the batch ``model_sampling.sigma(1000 * u)`` with u ~ U(0, 1),
  i.e. SD3's ``time_snr_shift(3.0, u)``, the sigmas the samplers visit, for the other half
  ``sigma = u`` (unshifted: more low and middle noise, where the small shapes get their edges);
* ``x_t = model_sampling.noise_scaling(sigma, noise, x0)``;
* ``denoised = model.apply_model(x_t, sigma, c_crossattn=context[, y=pooled])``, the call ComfyUI's
  samplers make (SD3's ``extra_conds`` turn ``pooled_output`` into ``y``);
* the prediction ``(x_t - denoised) / sigma`` (eps for EPS, the velocity for CONST) against its target
  (``noise``; ``noise - x0``), plain MSE: DDPM's (and SD1.x's) eps loss, the rectified-flow velocity
  loss. (An SNR+1 weighting of the eps loss, tried on the UNet, put ~90% of the weight on sigma > 5
  and left the shapes blobby at this budget.)

Data: on-the-fly jittered renders (``render_batch(scenes, rng=...)``) of random train-split prompts
(:func:`prompt_split`: ``grammar.split_prompts(all_prompts(), seed=0, held_out=0.2)``); a count scene
with probability 0.3, else a relation scene. 10% of the prompts are replaced by ``""`` so that the
unconditional embedding is learned for classifier-free guidance. The text encoder trains jointly.

AdamW (lr 1e-3 after 100 warm-up steps, cosine to 10% at ``--steps``, weight decay 0.01, gradient
clip 1), EMA of the weights (0.999, with the usual (1+t)/(10+t) warm-up); the EMA weights are saved.
Fixed seeds: the same ``--steps`` gives the same weights on the same CPU and thread count.
``--minutes`` is a wall-clock cap: a run that reaches it stops early and saves what it has; the
step count reached is recorded (``steps_done``) and ``--steps S --stop-at-step N --minutes 0``
reproduces it exactly.

The weights go to ``bench/cache/proxy_world/proxy_<family>.safetensors`` and, when all proxy weights
together stay under 24 MB (stored as float16), also to ``bench/proxy_world/weights/`` (committed; loaders prefer it).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":          # bootstrap ComfyUI in-process, exactly as the tests do
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
from bench.proxy_world.grammar import all_prompts, parse_prompt, split_prompts  # noqa: E402
from bench.proxy_world.render import render_batch  # noqa: E402

log = logging.getLogger("proxy_world.train")

COMMIT_LIMIT_BYTES = 24 * 1024 * 1024
STORED_DTYPE = torch.float16     # the saved EMA weights; load() widens them to float32
DEFAULT_STEPS = {"unet": 1800, "dit": 11000}   # the committed weights: unet 1800 of 1800, dit cut by --minutes 58 (steps_done in the file)
DEFAULT_BATCH = {"unet": 8, "dit": 16}
COUNT_FRACTION = 0.3
UNCOND_P = 0.1


def prompt_split() -> Tuple[List[str], List[str]]:
    """(train prompts, held-out prompts) of the proxy world: 1072 / 268 of the 1340 prompts."""
    return split_prompts(all_prompts(), seed=0, held_out=0.2)


@dataclass
class TrainConfig:
    family: str
    steps: int
    batch_size: int = 32
    seed: int = 0
    lr: float = 1e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    uncond_p: float = UNCOND_P
    count_fraction: float = COUNT_FRACTION
    minutes: Optional[float] = None
    stop_at_step: Optional[int] = None   # stop after this many steps (reproduces a --minutes-capped run)
    fixed_batch: bool = False     # tests: one batch (images, prompts, noise, sigmas) for every step
    log_every: int = 50
    init_from: Optional[str] = None   # a saved weights file to continue from (its EMA weights), not a fresh init


@dataclass
class TrainResult:
    patcher: object                # ComfyUI ModelPatcher holding the EMA weights
    text_encoder: object           # TextEncoder holding the EMA weights
    losses: List[float]
    info: Dict = field(default_factory=dict)


class _Data:
    """Deterministic stream of (prompts, images [B, 3, 32, 32]) from the train split."""

    def __init__(self, rng: np.random.Generator, count_fraction: float):
        train, _ = prompt_split()
        self.rel = [p for p in train if parse_prompt(p).kind == "relation"]
        self.cnt = [p for p in train if parse_prompt(p).kind == "count"]
        self.rng = rng
        self.count_fraction = count_fraction

    def batch(self, n: int):
        g = self.rng
        prompts = []
        for _ in range(n):
            pool = self.cnt if g.random() < self.count_fraction else self.rel
            prompts.append(pool[int(g.integers(len(pool)))])
        images = render_batch([parse_prompt(p) for p in prompts], size=models.IMAGE_SIZE, rng=g)
        return prompts, images


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def _sample_sigmas(model, family: str, n: int, gen: torch.Generator) -> torch.Tensor:
    ms = model.model_sampling
    if family == "unet":       # EPS, discrete: one of the 1000 training sigmas
        t = torch.randint(0, len(ms.sigmas), (n,), generator=gen)
        return ms.sigmas[t].float()
    # FLOW: sigma in (0, 1). Half the batch with SD3's shift (3.0: what the samplers visit, mostly
    # high noise), half unshifted (sigma = u), so the fine structure of these 32 px images (low and
    # middle noise) is trained as well.
    u = torch.rand(n, generator=gen) * (1 - 2e-3) + 1e-3
    shifted = ms.sigma(u * ms.multiplier).float()
    return torch.where(torch.arange(n) % 2 == 0, shifted, u)


def diffusion_loss(model, text_encoder, family: str, x0: torch.Tensor, prompts: Sequence[str],
                   noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss [B] through ComfyUI's parametrisation (see the module docstring)."""
    ms = model.model_sampling
    context, pooled = text_encoder.encode(list(prompts))
    x_t = ms.noise_scaling(sigma, noise, x0)
    kwargs = {"y": pooled} if family == "dit" else {}
    denoised = model.apply_model(x_t, sigma, c_crossattn=context, transformer_options={}, **kwargs)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    pred = (x_t - denoised) / s
    if family == "unet":
        target = noise
    else:
        target = noise - x0
    return (pred - target).square().flatten(1).mean(1)


@torch.no_grad()
def _ema_update(ema: List[torch.Tensor], params: List[torch.Tensor], decay: float) -> None:
    for e, p in zip(ema, params):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def require_gradients(family: str, denoiser: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Fail loudly when a backward pass left the denoiser or the text encoder without any gradient
    (a run would otherwise "train" for its whole budget and save its initial weights)."""
    for name, module in (("denoiser", denoiser), ("text encoder", text_encoder)):
        if not any(p.grad is not None for p in module.parameters()):
            raise RuntimeError(f"{family}: no parameter of the {name} received a gradient, so nothing would "
                               f"train; check that its weights require grad and that the loss depends on them")


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.family`` from a fresh deterministic initialisation; see the module docstring."""
    family = cfg.family
    torch.manual_seed(cfg.seed)
    patcher = models.build(family, seed=cfg.seed)
    model = patcher.model
    enc = models.build_text_encoder(family, seed=cfg.seed)
    init_info = None
    if cfg.init_from:
        # Continue a saved run: its weights (the EMA, in its stored precision) replace the fresh init,
        # and this run's schedule (warm-up, cosine decay) starts over on them.
        saved_patcher, saved_enc = models.load(family, cfg.init_from)
        model.diffusion_model.load_state_dict(
            {k: v.float() for k, v in saved_patcher.model.diffusion_model.state_dict().items()}, strict=True)
        enc.load_state_dict({k: v.float() for k, v in saved_enc.state_dict().items()}, strict=True)
        init_info = models.read_info(cfg.init_from).get("info")
        log.info("%s: continuing from %s (%s)", family, cfg.init_from, init_info)
    model.diffusion_model.train()
    enc.train()
    # Everything trains. Said explicitly: ComfyUI 0.33 builds its layers with frozen weights
    # (requires_grad False), where picking the parameters that require a gradient trained nothing.
    params = list(model.diffusion_model.parameters()) + list(enc.parameters())
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)

    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    data = _Data(rng, cfg.count_fraction)
    fixed = None
    losses: List[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    stopped_early = False
    step = 0
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(cfg.steps):
            if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
                stopped_early = True
                log.info("%s: stopping at step %d of %d (--stop-at-step)", family, step, cfg.steps)
                break
            if cfg.minutes is not None and time.perf_counter() - t0 > 60.0 * cfg.minutes:
                stopped_early = True
                log.warning("%s: --minutes %.1f reached after %d of %d steps; saving what there is",
                            family, cfg.minutes, step, cfg.steps)
                break
            if fixed is None or not cfg.fixed_batch:
                prompts, images = data.batch(cfg.batch_size)
                drop = rng.random(len(prompts)) < cfg.uncond_p
                prompts = ["" if d else p for p, d in zip(prompts, drop)]
                x0 = models.image_to_data(images, family)
                noise = torch.randn(x0.shape, generator=gen)
                sigma = _sample_sigmas(model, family, x0.shape[0], gen)
                fixed = (prompts, x0, noise, sigma)
            prompts, x0, noise, sigma = fixed
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            loss = diffusion_loss(model, enc, family, x0, prompts, noise, sigma).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                require_gradients(family, model.diffusion_model, enc)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            _ema_update(ema, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
            losses.append(float(loss.detach()))
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                recent = losses[-cfg.log_every:]
                log.info("%s step %d/%d loss %.4f (mean of last %d) lr %.2e %.1fs",
                         family, step + 1, cfg.steps, sum(recent) / len(recent), len(recent),
                         _lr_at(cfg, step), time.perf_counter() - t0)
    steps_done = len(losses)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():                     # the EMA weights are the ones kept
        for e, p in zip(ema, params):
            p.copy_(e)
    model.diffusion_model.eval()
    enc.eval()
    tail = losses[-min(200, len(losses)):] if losses else [float("nan")]
    curve = [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)]
    info = {
        "family": family, "comfy_family": models.COMFY_FAMILY[family],
        "steps": cfg.steps, "steps_done": steps_done, "stopped_early": stopped_early,
        "batch_size": cfg.batch_size, "seed": cfg.seed, "lr": cfg.lr, "ema_decay": cfg.ema_decay,
        "uncond_p": cfg.uncond_p, "count_fraction": cfg.count_fraction,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": torch.get_num_threads(),
        "final_loss": round(float(np.mean(tail)), 5), "final_loss_window": len(tail),
        "first_loss": round(float(np.mean(losses[:100])), 5) if losses else None,
        "loss_curve_per_100_steps": curve,
        "params_diffusion": models.param_count(patcher), "params_text": models.param_count(enc),
        "torch": torch.__version__,
    }
    if cfg.init_from:
        info["init_from"] = {"path": str(cfg.init_from), "info": init_info}
    return TrainResult(patcher=patcher, text_encoder=enc, losses=losses, info=info)


def _other_size(family: str) -> int:
    """Bytes of the other families' saved weights (0 where none is saved yet)."""
    total = 0
    for fam in models.FAMILIES:
        if fam == family:
            continue
        sizes = [p.stat().st_size for p in models.weights_candidates(fam) if p.is_file()]
        total += max(sizes) if sizes else 0
    return total


def save_result(result: TrainResult, family: str, commit: str = "auto") -> List[Path]:
    """Write the cache file, and the committed copy when all weights stay under 24 MB."""
    info = dict(result.info)
    cache = models.CACHE_WEIGHTS / models.WEIGHTS_NAME.format(family=family)
    written = [models.save(cache, result.patcher, result.text_encoder, family, info, dtype=STORED_DTYPE)]
    total = cache.stat().st_size + _other_size(family)
    if commit == "yes" or (commit == "auto" and total < COMMIT_LIMIT_BYTES):
        committed = models.COMMITTED_WEIGHTS / models.WEIGHTS_NAME.format(family=family)
        written.append(models.save(committed, result.patcher, result.text_encoder, family, info, dtype=STORED_DTYPE))
    else:
        stale = models.COMMITTED_WEIGHTS / models.WEIGHTS_NAME.format(family=family)
        if stale.is_file():
            log.warning("%s is now stale (all weights %.1f MB >= 24 MB); remove it", stale, total / 2 ** 20)
    log.info("all proxy weights together: %.2f MB", total / 2 ** 20)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=models.FAMILIES, required=True)
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default: unet 1800, dit 4800)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap (default 60; 0: none)")
    ap.add_argument("--stop-at-step", type=int, default=None,
                    help="stop after this many steps of the --steps schedule (reproduces a capped run exactly)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--commit-weights", choices=("auto", "yes", "no"), default="auto",
                    help="also write bench/proxy_world/weights/ (auto: when all weights < 24 MB)")
    ap.add_argument("--init-from", default=None, help="continue from this saved weights file (a new schedule)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    logging.getLogger().setLevel(logging.WARNING)      # ComfyUI's own info lines
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(family=args.family, steps=args.steps or DEFAULT_STEPS[args.family],
                      batch_size=args.batch_size or DEFAULT_BATCH[args.family], seed=args.seed, lr=args.lr,
                      minutes=args.minutes or None, stop_at_step=args.stop_at_step,
                      init_from=args.init_from)
    log.info("training proxy-world %s: %s", args.family, cfg)
    result = train(cfg)
    log.info("done: %s", json.dumps({k: v for k, v in result.info.items() if k != "loss_curve_per_100_steps"}))
    log.info("loss per 100 steps: %s", result.info["loss_curve_per_100_steps"])
    if not args.no_save:
        for p in save_result(result, args.family, args.commit_weights):
            log.info("wrote %s (%.2f MB)", p, p.stat().st_size / 2 ** 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
