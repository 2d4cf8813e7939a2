"""Analysis benchmark: feature throughput (images/s) of the image-set metrics, and metric math time.

    .venv/bin/python bench/bench_analysis.py [--images 32] [--metric-rows 1000] [--threads 1]

Writes bench/results/analysis.md and bench/results/analysis.json. Every figure comes from this run.
The FID InceptionV3 and the open_clip ViT-B-32 run with random weights: the same computation as
with the real weights (no weights can be downloaded here), so the timings hold for both.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

import tools  # noqa: E402,F401  (registers the package probe_select: the library's one import name)
from probe_select.probes.atomic import atomic_write_text  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from probe_select.probes.analysis import features as feat  # noqa: E402
from probe_select.probes.analysis import image_metrics as im  # noqa: E402
from probe_select.probes.analysis import ood  # noqa: E402
from probe_select.probes.analysis.inception import FIDInceptionV3  # noqa: E402

log = logging.getLogger("bench_analysis")
RESULTS = ROOT / "bench" / "results"


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 16, 16, generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()


def timed(fn, repeats: int = 1) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def clip_vit_b32() -> feat.ClipExtractor:
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.eval()
    return feat.ClipExtractor(model, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32:random", 224,
                              (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="images per throughput measurement")
    parser.add_argument("--size", type=int, default=512, help="side of the input images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--metric-rows", type=int, default=1000, help="feature rows per set for the metric math")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = smooth_images(args.images, args.size)
    figures: dict[str, float] = {}

    for mode in feat.RESIZE_MODES:
        seconds = timed(lambda: feat.preprocess_images(images, 299, mode))
        figures[f"resize {args.size}->299 {mode}, images/s"] = args.images / seconds
        log.info("resize %s: %.1f images/s", mode, args.images / seconds)

    inception = feat.InceptionExtractor(FIDInceptionV3().eval(), "random")
    pixels = feat.preprocess_images(images[: args.batch_size], 299, "clean")
    with torch.inference_mode():
        inception.features(pixels[:2])                      # warm-up
        seconds = timed(lambda: inception.features(pixels))
    figures["FID Inception forward only (299 px), images/s"] = pixels.shape[0] / seconds
    for mode in feat.RESIZE_MODES:
        seconds = timed(lambda: feat.extract_features([images], [inception], mode, batch_size=args.batch_size))
        figures[f"FID Inception end to end ({mode} resize), images/s"] = args.images / seconds
        log.info("inception end to end %s: %.2f images/s", mode, args.images / seconds)

    clip = clip_vit_b32()
    seconds = timed(lambda: feat.extract_features([images], [clip], "clean", batch_size=args.batch_size))
    figures["open_clip ViT-B-32 end to end (clean resize, 224 px), images/s"] = args.images / seconds
    log.info("clip end to end: %.2f images/s", args.images / seconds)

    rng = np.random.RandomState(0)
    n = args.metric_rows
    x, y = rng.randn(n, 2048).astype(np.float32), rng.randn(n, 2048).astype(np.float32) + 0.1
    figures[f"FID from {n} + {n} x 2048 features, s"] = timed(lambda: im.fid_from_features(x, y))
    subset = min(1000, n)
    figures[f"KID, one subset of {subset}, s"] = timed(lambda: im.kid(x, y, subsets=1, subset_size=subset))
    figures[f"precision/recall (k=3), {n} + {n}, s"] = timed(lambda: im.precision_recall(x, y))
    figures[f"density/coverage (k=5), {n} + {n}, s"] = timed(lambda: im.density_coverage(x, y))
    e1, e2 = rng.randn(n, 512), rng.randn(n, 512)
    figures[f"CMMD, {n} + {n} x 512 embeddings, s"] = timed(lambda: im.cmmd(e1, e2))
    figures[f"OOD fit (Ledoit-Wolf + 5-fold cross-fit), {n} x 2048, s"] = timed(
        lambda: ood.fit_reference(x, "bench"))
    feature_bytes = 10_000 * (2048 + 1008) * 4
    figures["memory for 10,000 images' Inception features (pool + logits), MB"] = feature_bytes / 1e6

    info = (f"Machine: {os.cpu_count()} cores ({platform.machine()}), torch {torch.__version__} on CPU, "
            f"{torch.get_num_threads()} thread(s). Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    lines = [
        "# Analysis benchmark: image-set metrics",
        "",
        f"Command: `bench/bench_analysis.py --images {args.images} --size {args.size} --batch-size {args.batch_size} "
        f"--metric-rows {args.metric_rows}`. {info}",
        "",
        f"{args.images} smooth random {args.size}x{args.size} images (ComfyUI IMAGE floats). The FID InceptionV3 and "
        "open_clip ViT-B-32 have random weights: the same computation as the real ones. Metric math on random "
        "float32 features. One timing each (a brief run on a shared machine: expect a few percent of noise).",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {value:.4g} |" for name, value in figures.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "analysis.md", "\n".join(lines) + "\n")
    atomic_write_text(RESULTS / "analysis.json", json.dumps({"args": vars(args), "figures": figures}, indent=2) + "\n")
    log.info("wrote %s", RESULTS / "analysis.md")


if __name__ == "__main__":
    main()
