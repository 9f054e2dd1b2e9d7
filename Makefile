# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the suite).
# Each creates the virtual environment and installs the pinned set first, idempotently.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is named in the SAME pip command as the package, so pip never lets it float to a
# multi-GB CUDA build on machines that have the CPU wheel; GPU users install their own torch
# first and pyproject's range (torch>=2.4) keeps it.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -r requirements-dev.txt -e ".[dev,text,efficientnet]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/multifair demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
