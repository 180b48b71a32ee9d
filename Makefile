# The two set-up commands: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv, installs the project, and makes sure PostgreSQL and Mosquitto run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint services browser test-tools venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

services:
	bash scripts/services.sh

demo: $(STAMP) services
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Headless Chromium for the dashboard test (installs Debian's chromium when missing).
browser:
	bash scripts/browser.sh >/dev/null

# socat and systemd-analyze for the RTU and unit-file tests (installed when missing).
test-tools:
	bash scripts/test-tools.sh

test: $(STAMP) services browser test-tools lint
	$(BIN)/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) var build *.egg-info
