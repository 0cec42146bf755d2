# Two entry points: `make demo` (the main job) and `make test` (the unit suite).
# Both create/refresh a local virtual environment in .venv; torch is installed first,
# pinned to the CPU build, so nothing pulls CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kfacperf demo $(ARGS)

test: $(STAMP)
	bash scripts/ensure-chromium.sh
	$(BIN)/ruff check kfacperf tests scripts examples
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks --benchmark-enable --benchmark-only $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .mypy_cache .ruff_cache
