# One place for the commands the README and CI use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev check lint test test-cluster test-browser test-failover test-soak cluster bench clean

# Install into .venv whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/tokencast dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP)
	$(BIN)/python -m pytest

# Every check CI runs on the default suite: lint, types, tests.
check: lint test

# The pages in a real browser: needs Debian's chromium (.ci/run installs it).
test-browser: $(STAMP)
	$(BIN)/python -m pytest -m browser

# Many real processes behind nginx (needs nginx and redis-server).
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster

# Redis failing over under Sentinel, and long broker outages under running jobs
# (starts its own Redis and Sentinels; needs redis-sentinel: .ci/run installs it).
test-failover: $(STAMP)
	$(BIN)/python -m pytest -m failover

# A whole deployment behind nginx under faults for 10 minutes (prints a summary;
# needs nginx and redis-server). A shorter try: TOKENCAST_SOAK_SECONDS=120 make test-soak
test-soak: $(STAMP)
	$(BIN)/python -m pytest -m soak -s

# The fan-out benchmark (starts its own Redis and processes; about 8 minutes).
# A quick look: make bench BENCH_ARGS="--scenarios S1,S4 --repeat 1"
bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.bench $(BENCH_ARGS)

# A local cluster to play with: Redis, 3 web nodes, 2 workers, nginx on :8080.
cluster: $(STAMP)
	$(BIN)/python deploy/local/cluster.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
