# Set-up on a fresh machine: a .venv with the CPU build of torch first (an unpinned torch
# pulls a multi-GB CUDA build), then the package with its dev extra.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint test-min bench docs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# one intra-op thread: the demo's small batches lose to thread overhead (30 s an iteration with 2 threads on a busy 2-core machine)
demo: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m diffusiongym.demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the env tests on the declared minimum versions of the core dependencies (ci/constraints-min.txt), in their own venv
test-min:
	bash ci/min_versions.sh .venv-min

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/engine_overhead.py

# the documentation site into site/ (warnings are errors); notebooks render their committed outputs
docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .venv-min .pytest_cache site
