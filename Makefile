# The two set-up commands: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv, installs the project, and makes sure PostgreSQL and Mosquitto run.
# `make demo` seeds two days of plant history, then serves the live plant until Ctrl-C;
# `make demo DEMO_ONCE=1` (or CI=true) runs live for half a minute, prints OEE and ends.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The demo installs the project only; the tests add their tools (pytest, ruff, mypy, ...).
# Editable in compat mode (a path entry): the default mode for a flat layout warns on every
# install about folders shadowing the packages, which here are the packages themselves.
EDITABLE := --config-settings editable_mode=compat
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# pytest-xdist workers for `make test`: the suite mostly waits in real time (PLCs, broker,
# agents), so two workers halve it; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: demo test lint services browser test-tools venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(EDITABLE) -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q $(EDITABLE) -e '.[test]'
	touch $(TEST_STAMP)

venv: $(STAMP)

services:
	bash scripts/services.sh

demo: $(STAMP) services
	$(BIN)/python scripts/demo.py

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Headless Chromium for the dashboard test (installs Debian's chromium when missing).
browser:
	bash scripts/browser.sh >/dev/null

# socat and systemd-analyze for the RTU and unit-file tests (installed when missing).
test-tools:
	bash scripts/test-tools.sh

test: $(TEST_STAMP) services browser test-tools lint
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

clean:
	rm -rf $(VENV) var build *.egg-info
