# Two commands on a fresh machine with python3 and make: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint format messages bench bench-dns bench-report stress clean venv

venv: $(STAMP)

# Debian and Ubuntu ship the venv module apart from python3.
$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { \
		echo "make: '$(PYTHON) -m venv' failed; on Debian or Ubuntu, install python3-venv (apt-get install python3-venv)" >&2; \
		exit 1; }
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

# The survey's message catalogues: extract every message of the templates and
# code into messages.pot, then merge new and changed ones into each language's
# .po (they show as untranslated until a translator fills them in).
messages: $(STAMP)
	$(BIN)/pybabel extract -F babel.cfg -k N_ --no-location --sort-output --omit-header \
		-o probe_server/locale/messages.pot .
	$(BIN)/pybabel update -i probe_server/locale/messages.pot -d probe_server/locale \
		--no-fuzzy-matching

test: lint
	$(BIN)/pytest

# The namespace lab (root): real server, our DNS, Chromium clients of every kind.
# Also refreshes the screenshots in docs/.
lab: $(STAMP)
	PROBE_LAB_SCREENSHOTS=docs $(BIN)/pytest -m lab -v tests/test_lab.py

# The whole benchmark suite beside its peers (nginx, Apache + mod_php, Knot),
# a few minutes; as root it installs them from Debian's packages first. Writes
# the generated part of docs/benchmarks.md. One part: make bench ONLY=http
# (or dns, report).
bench: $(STAMP)
	$(BIN)/python -m bench.suite $(if $(ONLY),--only $(ONLY))

# Needs dnsperf and knot (Debian packages); both servers on CPU 0, dnsperf on CPU 1.
bench-dns: $(STAMP)
	$(BIN)/python -m bench.suite --only dns

bench-report: $(STAMP)
	$(BIN)/python bench/report_million.py

# Faults and hostile input at full size: fuzzing, overload, kill -9, a full
# disk, slow clients, hostile input, against the real process on loopback
# (root for the tmpfs; dnsperf). make test runs the same tests at CI size.
# Prints the summary table and writes it to stress-report.md; fails if an item
# of the table (tests/stress/conftest.py: EXPECTED) has no good row. Only then
# is the table put into docs/reliability.md, between its markers.
stress: $(STAMP)
	PROBE_STRESS=full PROBE_STRESS_REPORT=stress-report.md $(BIN)/pytest -m stress tests/stress
	$(BIN)/python -m tests.stress.publish stress-report.md docs/reliability.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
