# The two set-up commands: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv, installs the project, and makes sure PostgreSQL and Mosquitto run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint services venv clean

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

test: $(STAMP) services lint
	$(BIN)/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) var build *.egg-info
