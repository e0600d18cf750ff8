# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: test lint typecheck demo nemesis bench verify clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml services/payments/pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet -e '.[test,postgres,redis,client,chains,metrics,otel,cli]'
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

# The nemesis (about 5 minutes): SQLite, PostgreSQL and Redis in turn (85 s of faults each),
# several service processes on each store under SIGKILL, SIGSTOP, store connection faults and
# duplicated retries, then an audit; ends with one audit line per store (docs/nemesis.md);
# make nemesis STORE=redis DURATION=60, or make nemesis ARGS="--store redis --json nemesis.json"
nemesis: $(STAMP)
	$(BIN)/python -m oncely_payments.nemesis $(if $(STORE),--store $(STORE)) \
		$(if $(DURATION),--duration $(DURATION)) $(ARGS)

# Load benchmarks (by hand, minutes; see benchmarks/README.md): make bench ARGS="--quick"
bench:
	$(PYTHON) benchmarks/run.py $(ARGS)

# The exhaustive interleaving check at deeper bounds than make test (minutes; docs/verification.md)
verify: $(STAMP)
	$(BIN)/python -m tests.verify

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# atheris harnesses (fuzz/), not part of `make test`: make fuzz ARGS='-max_total_time=300'
.PHONY: fuzz
FUZZ_ARGS ?= $(if $(ARGS),$(ARGS),-max_total_time=60)
fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet 'atheris>=2.3'
	for harness in fuzz/fuzz_*.py; do echo "== $$harness"; $(BIN)/python $$harness $(FUZZ_ARGS) || exit 1; done
