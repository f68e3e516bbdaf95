# Two commands on a fresh machine with python3 and make: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint format check-zones bench bench-report clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/probe-server serve

lint: $(STAMP)
	$(BIN)/ruff check probe_server tests bench
	$(BIN)/ruff format --check probe_server tests bench
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format probe_server tests bench
	$(BIN)/ruff check --fix probe_server tests bench

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/http_probe.py

bench-report: $(STAMP)
	$(BIN)/python bench/report_million.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
