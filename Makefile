# Quick start: `make up` (run the platform) and `make test` (run the test suite).
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every install takes the locked versions of constraints.txt, so two fresh machines install the same set.
LOCK := constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

.PHONY: up test check lint format typecheck install bench chaos chaos-short clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/meter up

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy meter_platform ingest_gateway

check: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy meter_platform ingest_gateway
	$(BIN)/python -m pytest

# Capture and end to end (ingest_bench.py), capture against the number of gateway processes
# (gateways.py), end to end against the number of drainers (drainers.py), freshness after a quiet spell
# on the whole platform (quiet.py), and usage queries at volume (query.py; BENCH_QUERY_EVENTS=20000000
# for the issue's 20M).
BENCH_QUERY_EVENTS ?= 2000000
bench: install
	$(BIN)/python bench/ingest_bench.py
	$(BIN)/python bench/gateways.py --runs 1
	$(BIN)/python bench/drainers.py --drainers 1,2,4
	$(BIN)/python bench/quiet.py
	$(BIN)/python bench/query.py --events $(BENCH_QUERY_EVENTS)

# kill -9 every part of the platform under load, then count acked vs stored (README: Chaos suite).
# CHAOS_ARGS='--scenarios nats,gateway' runs a few; chaos-short runs each fault once (~25 min for all).
chaos: install
	$(BIN)/python tests/chaos/run.py $(CHAOS_ARGS)

chaos-short: install
	$(BIN)/python tests/chaos/run.py --short $(CHAOS_ARGS)

# Re-resolve the newest versions pyproject.toml allows, in a scratch venv, and write them to constraints.txt.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet '.[dev]'
	{ echo "# The resolved set of every dependency (and theirs) that make installs with: pip install -c constraints.txt."; \
	  echo "# Refresh with \`make lock\` (re-resolves the newest versions pyproject.toml allows), then run make check."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -vi '^meter-platform'; } > $(LOCK)
	rm -rf .lock-venv
	@echo "constraints.txt refreshed: review the diff, then make check"

clean:
	rm -rf $(VENV) .meter dagster_home/storage dagster_home/history dagster_home/logs
