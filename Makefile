# orders-export — everything runs from a virtualenv in .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Arguments for `make demo`, e.g. make demo DEMO_ARGS="--port 8080 --demo-orders 500000"
DEMO_ARGS ?=

.PHONY: install demo test lint typecheck pytest bench bench-seed clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/orders-export dev $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Whole test modules run in PYTEST_WORKERS processes (pytest-xdist); most tests wait on real
# servers, so two workers halve the wall time on two cores. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
pytest: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test: lint typecheck pytest

# The export benchmark (docs/performance.md); BENCH_ARGS="--rows 5000000 --skip-naive" for 5M.
BENCH_ARGS ?=
bench: install
	$(BIN)/python benchmarks/export.py $(BENCH_ARGS)

bench-seed: install
	$(BIN)/python benchmarks/seed.py

clean:
	rm -rf $(VENV) .dev-stack .pytest_cache .mypy_cache .ruff_cache
