# Every target sets up .venv (torch, ComfyUI 0.3.75 or $COMFYUI_DIR, requirements) first; idempotent.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
PYTEST_ARGS ?=

.PHONY: setup test test-fast bench bench-core bench-streaming bench-proxy proxy-models demo lint clean

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite without the tests that start a real ComfyUI server.
test-fast: setup
	$(PY) -m pytest -m "not server" $(PYTEST_ARGS)

# Benchmarks write their figures to bench/results/ (not timed tests): core.md, train.md and the
# proxy-world REPORT.md with its plots (about 40 minutes on 2 cores; the proxy models are trained
# first only if their weights are missing).
bench: bench-core bench-streaming bench-proxy

bench-core: setup
	$(PY) bench/bench_core.py
	$(PY) bench/bench_train.py

# Training from disk vs from memory: rows/s and peak memory on a 1 GB and a 25 GB synthetic dataset
# (written to the system temp folder and deleted after; needs ~30 GB free; about an hour on 2 shared cores).
bench-streaming: setup
	$(PY) bench/bench_streaming.py

clean:
	rm -rf .venv .comfyui .pytest_cache

lint: setup
	$(PY) -m ruff check --select F,E9 --line-length 120 nodes probes tools devtools scripts tests __init__.py bench

# The proxy-world models: committed weights, or trained here (<= 15 minutes each) when missing.
proxy-models: setup
	@for f in unet dit; do \
	  $(PY) -c "from devtools import bootstrap_comfy; bootstrap_comfy(); from bench.proxy_world import models; models.weights_path('$$f')" 2>/dev/null \
	    || $(PY) bench/proxy_world/train_models.py --family $$f; \
	done

# Probe-Select measured end to end in the proxy world: collects the four datasets in two parallel
# lanes (the UNet's training set alone; the rest in turn), then trains the probes and writes
# bench/results/REPORT.md.
bench-proxy: proxy-models
	@set -e; \
	$(PY) bench/proxy_bench.py --families unet --collect-only train & lane1=$$!; \
	( $(PY) bench/proxy_bench.py --families unet --collect-only heldout && \
	  $(PY) bench/proxy_bench.py --families dit --collect-only train && \
	  $(PY) bench/proxy_bench.py --families dit --collect-only heldout ) & lane2=$$!; \
	wait $$lane1; wait $$lane2
	$(PY) bench/proxy_bench.py --reuse-datasets

demo: proxy-models
	$(PY) bench/demo.py
