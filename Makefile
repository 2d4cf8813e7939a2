# Every target sets up .venv (torch, ComfyUI 0.3.75 or $COMFYUI_DIR, requirements) first; idempotent.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1
PYTEST_ARGS ?=

.PHONY: setup test test-fast bench lint clean

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
