# Every target sets up its environment (torch, ComfyUI, requirements) first; idempotent.
# ComfyUI 0.3.75 (default) lives in .venv + .comfyui/ComfyUI; another version, built from a source
# tarball (COMFYUI_VERSION=0.33.0, optionally COMFYUI_SRC=<tarball>), in .venv-0.33 + .comfyui/ComfyUI-0.33.0.
COMFYUI_VERSION ?= 0.3.75
VENV ?= $(if $(filter 0.3.75,$(COMFYUI_VERSION)),.venv,.venv-$(basename $(COMFYUI_VERSION)))
export COMFYUI_VERSION VENV
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
PYTEST_ARGS ?=
# The suite on three pytest-xdist workers, each taking whole files, longest first (tests/conftest.py): a
# file's module fixtures (servers, tiny models) are set up once, on one worker. Three on the CI machine's 2
# cores, because a worker often waits (a ComfyUI server starting, a browser page, a subprocess) and a third
# fills those gaps: 661 s against 747 s with two on a 2-core AMD EPYC. TEST_WORKERS= runs it in one process.
TEST_WORKERS ?= -n 3 --dist loadfile --no-loadscope-reorder

.PHONY: setup test test-fast bench bench-core bench-flops bench-noise-levels bench-sd15 bench-streaming bench-proxy bench-proxy-bulk bench-proxy-ceiling bench-learned-limits bench-score-blend bench-preview-reward bench-distilled-probe proxy-models demo lint package clean mutation pictures

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest $(TEST_WORKERS) $(PYTEST_ARGS)

# The suite without the tests that start a real ComfyUI server.
test-fast: setup
	$(PY) -m pytest $(TEST_WORKERS) -m "not server" $(PYTEST_ARGS)

# Benchmarks write their figures to bench/results/ (not timed tests): core.md, train.md and the
# proxy-world REPORT.md with its plots (about 40 minutes on 2 cores; the proxy models are trained
# first only if their weights are missing).
bench: bench-core bench-flops bench-noise-levels bench-sd15 bench-streaming bench-proxy

bench-core: setup
	$(PY) bench/bench_core.py
	$(PY) bench/bench_train.py

# Mutation testing (not part of `make test`): the modules and tests in bench/mutation.toml, one mutant
# at a time in a temporary copy of the repository; writes bench/results/mutation.md. A subset:
# make mutation MUTATION_ARGS="--module probes/losses.py --max-mutants 10 --output /tmp/m.md"
MUTATION_ARGS ?=
mutation: setup
	$(PY) devtools/mutation.py $(MUTATION_ARGS)

# FLOPs of the real SD1.5/SDXL/SD3-medium/FLUX.1-dev denoisers, decoders, evaluators and the probe (meta
# device, about a minute) and the compute ratio of each selection method: bench/results/flops.md.
bench-flops: setup
	$(PY) bench/flops.py

# Where 20% of the default steps lands (sigma, log-SNR) on real SD1.5/SDXL/SD3/FLUX schedules, from
# ComfyUI's own model_sampling objects (no weights, a second): bench/results/noise_levels.md and .json.
bench-noise-levels: setup
	$(PY) bench/noise_levels.py

# The pack's nodes end to end on a real-size SD1.5 UNet and VAE with random weights (256 px, CPU, N=5, K=1)
# against a plain KSampler batch, profiled: bench/results/sd15_measured.md (about 15 minutes on a quiet 2-core machine,
# one thread; longer when shared). SD15_ARGS="--candidates 20 --keep 2 --output-stem bench/results/sd15_measured_n20"
# for the other setting (about 4 times longer).
SD15_ARGS ?=
bench-sd15: setup
	$(PY) bench/bench_sd15_measured.py $(SD15_ARGS)

# The Comfy Registry archive, built as `comfy node pack` builds it (git-tracked files less
# .comfyignore): out/probe-select-<version>.zip and out/archive-files.txt. Fails when it would carry
# weights, tests, bench or dev files, exceed 1 MB, or when the registry's ruff checks would warn.
package: setup
	$(PY) -m scripts.package

# Training from disk vs from memory: rows/s and peak memory on a 1 GB and a 25 GB synthetic dataset
# (written to the system temp folder and deleted after; needs ~30 GB free; about an hour on 2 shared cores).
bench-streaming: setup
	$(PY) bench/bench_streaming.py

clean:
	rm -rf .venv .venv-* .comfyui .pytest_cache

lint: setup
	$(PY) -m ruff check --select F,E9 --line-length 120 nodes probes tools devtools scripts tests __init__.py bench

# The proxy-world models: committed weights, or trained here (up to an hour each) when missing.
proxy-models: setup
	@for f in unet dit; do \
	  $(PY) -c "from devtools import bootstrap_comfy; bootstrap_comfy(); from bench.proxy_world import models; models.weights_path('$$f')" 2>/dev/null \
	    || $(PY) bench/proxy_world/train_models.py --family $$f; \
	done

# Probe-Select measured end to end in the proxy world: collects the four datasets in two parallel
# lanes (the UNet's training set alone; the rest in turn), then trains the probes and writes
# bench/results/REPORT.md.
# PROXY_BENCH_ARGS=--medium: fewer prompts (what the committed report was run with, see its command line).
PROXY_BENCH_ARGS ?=
# Background lanes ignore Ctrl-C (bash does that to `&` jobs of a script): on Ctrl-C or TERM the recipe stops
# its whole process group with TERM, which the lanes handle by removing their temporary files and exiting.
STOP_LANES_ON_INTERRUPT = trap 'trap - INT TERM; kill -TERM 0; exit 130' INT TERM
bench-proxy: proxy-models
	@set -e; $(STOP_LANES_ON_INTERRUPT); \
	$(PY) bench/proxy_bench.py $(PROXY_BENCH_ARGS) --families unet --collect-only train & lane1=$$!; \
	( $(PY) bench/proxy_bench.py $(PROXY_BENCH_ARGS) --families unet --collect-only heldout && \
	  $(PY) bench/proxy_bench.py $(PROXY_BENCH_ARGS) --families dit --collect-only train && \
	  $(PY) bench/proxy_bench.py $(PROXY_BENCH_ARGS) --families dit --collect-only heldout ) & lane2=$$!; \
	wait $$lane1; wait $$lane2
	$(PY) bench/proxy_bench.py $(PROXY_BENCH_ARGS) --reuse-datasets

# The learning curve on more data (REPORT.md, "Learning curve on more data"): 940 training prompts x 12 seeds
# of each model at t = 0.2 and 0.4 (11,280 rows; collected in two lanes, one per core: about 80 min a model;
# resumable). Run it before bench-proxy, whose report step trains every learned scorer on growing parts of it.
bench-proxy-bulk: proxy-models
	@set -e; $(STOP_LANES_ON_INTERRUPT); for family in unet dit; do \
	  $(PY) bench/proxy_bench.py $(PROXY_BENCH_ARGS) --families $$family --collect-only bulk --lane 1/2 & lane1=$$!; \
	  $(PY) bench/proxy_bench.py $(PROXY_BENCH_ARGS) --families $$family --collect-only bulk --lane 2/2 & lane2=$$!; \
	  wait $$lane1; wait $$lane2; \
	done

# The ceiling of early selection (REPORT.md, bench/results/proxy_ceiling.md): every held-out candidate of the
# proxy bench finished again from t = 0.2 and 0.4 with other noise after t, which estimates the expected final
# reward given the state there, the most any scorer at t can know. Two lanes a model (about 25 min a model on 2
# cores; resumable), then the figures.
bench-proxy-ceiling: proxy-models
	@set -e; $(STOP_LANES_ON_INTERRUPT); for family in unet dit; do \
	  $(PY) bench/proxy_ceiling.py --families $$family --collect-only --lane 1/2 & lane1=$$!; \
	  $(PY) bench/proxy_ceiling.py --families $$family --collect-only --lane 2/2 & lane2=$$!; \
	  wait $$lane1; wait $$lane2; \
	done
	$(PY) bench/proxy_ceiling.py

# What limits the learned scorer (REPORT.md, bench/results/learned_limits.md): can a probe learn the x0 preview's
# own score (a target without noise) from the bulk set's rows, and does it pick the top or only rank the failures?
# Reads bench-proxy-bulk's and bench-proxy's cached datasets and the saved bulk curve (about 10 min a model).
bench-learned-limits: setup
	$(PY) bench/learned_limits.py

# The x0 preview blended with a probe (ProbeSelectBlendScores; REPORT.md, bench/results/score_blend.md): each
# learned scorer's blend with the plain and the noise-aware preview, weights fitted on the bulk set's validation
# prompts, judged on the held-out prompts and at equal compute. Reads the cached bulk and held-out sets and the
# saved bulk curve (a few minutes a model).
bench-score-blend: setup
	$(PY) bench/score_blend.py

# A noise-aware preview reward (the real-model analogue: a reward model fine-tuned on noisy previews): the
# evaluator's factors on the x0 preview, re-weighted on the training prompts' previews; reads bench-proxy's
# cached datasets -> bench/results/preview_reward.md (about 10 minutes; equal compute at every checkpoint up to 0.4).
bench-preview-reward: setup
	$(PY) bench/preview_reward.py

# A learned scorer without the decode (REPORT.md, bench/results/distilled_probe.md): a probe on the x0 latent and
# the prompt, trained to predict the evaluator's factors on the decoded preview (every recorded x0 latent of the
# main, bulk and early sets and its flips), with a ranker folded into its head; one probe file a checkpoint in
# bench/cache/proxy_bench/probes/, judged on the held-out prompts, at equal compute, and on the confirmation prompts
# (32 held-out prompts no schedule's choice sees). The early set (every training-split prompt x 8 seeds run to
# t = 0.4 only: the teacher needs no finished image) and the confirmation set are collected first in two lanes
# (about 15 min, resumable); the distillation then takes about 15 min for the UNet on the main and early sets (more
# with the bulk set), and the demo's scorer is chosen again (the distilled probe where it leads the x0 preview in
# validation). Run bench-proxy first (its main and held-out sets). A variant (another teacher, fewer sets) is
# recorded beside that run without touching its figures: bench/distilled_probe.py --aside [--teacher later]
# [--probe fine|wide|keypoints] [--centred] [--text tokens] [--seed N] (the table of sets and teachers in
# distilled_probe.md lists each such run's command).
bench-distilled-probe: proxy-models
	@set -e; $(STOP_LANES_ON_INTERRUPT); \
	$(PY) bench/proxy_bench.py --families unet --collect-only early --lane 1/2 & lane1=$$!; \
	( $(PY) bench/proxy_bench.py --medium --families unet --collect-only confirm && \
	  $(PY) bench/proxy_bench.py --families unet --collect-only early --lane 2/2 ) & lane2=$$!; \
	wait $$lane1; wait $$lane2
	$(PY) bench/distilled_probe.py --families unet --epochs 6
	$(PY) bench/proxy_bench.py --choose-demo-scorer --families unet

demo: proxy-models
	$(PY) bench/demo.py

# The README's pictures of every analysis node's output (docs/images/*.png, made by the nodes on the
# proxy-world models and ComfyUI's own schedules; deterministic, about 10 minutes on 2 cores) and the
# analysis templates' thumbnails drawn from them (example_workflows/*_analysis_*.jpg).
pictures: proxy-models
	$(PY) bench/analysis_pictures.py
	$(PY) scripts/build_workflows.py --thumbnails
