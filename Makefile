# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: test lint typecheck demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml services/payments/pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet -e '.[test,postgres,redis,client,chains,metrics,otel]'
	$(BIN)/python -m pip install --quiet -e 'services/payments[postgres]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples scripts services
	$(BIN)/ruff format --check src tests benchmarks examples scripts services

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python scripts/unasync.py --check
	$(BIN)/python scripts/check_core_imports.py
	$(BIN)/python -m pytest

# The chaos demo (about a minute); extra flags pass through, as in
# make demo ARGS="--store postgresql://postgres@127.0.0.1:5432/test --intents 500"
demo: $(STAMP)
	$(BIN)/python -m oncely_payments.demo $(ARGS)

# Load benchmarks (by hand, minutes; see benchmarks/README.md): make bench ARGS="--quick"
bench:
	$(PYTHON) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
