# Every target sets up .venv (torch, ComfyUI 0.3.75 or $COMFYUI_DIR, requirements) first; idempotent.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
PYTEST_ARGS ?=

.PHONY: setup test test-fast bench bench-proxy demo lint clean

setup:
	@bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite without the tests that start a real ComfyUI server.
test-fast: setup
	$(PY) -m pytest -m "not server" $(PYTEST_ARGS)

# Benchmarks write their figures to bench/results/ (not timed tests).
bench: setup
	$(PY) bench/bench_core.py
	$(PY) bench/bench_train.py

clean:
	rm -rf .venv .comfyui .pytest_cache

lint: setup
	$(PY) -m ruff check --select F,E9 --line-length 120 nodes probes tests __init__.py bench workflows

# Probe-Select measured end to end in the proxy world (trains the proxy models first if needed).
bench-proxy: setup
	@for f in unet dit; do \
	  $(PY) -c "import sys; sys.path[:0] = ['tests', '.']; import conftest; from bench.proxy_world import models; models.weights_path('$$f')" 2>/dev/null \
	    || $(PY) bench/proxy_world/train_models.py --family $$f; \
	done
	$(PY) bench/proxy_bench.py

demo: setup
	$(PY) bench/demo.py
