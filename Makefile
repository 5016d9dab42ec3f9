# The two entry points of the README. Both create/reuse .venv first.
SHELL := /bin/bash
include transfusion/defaults.env  # the environment of every entry point, written once
.EXPORT_ALL_VARIABLES:

.PHONY: setup browser repro test test-all lint lock

setup:
	@scripts/setup.sh

repro: setup  ## set up, then run the default pipeline
	source .venv/bin/activate && dvc repro

test: setup  ## set up, then run the test suite (slow tests excluded)
	.venv/bin/python -m pytest -m "not slow and not gpu"

browser:  ## Debian's chromium, for the MLflow UI test (slow) and screenshots; apt-get needs root
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

test-all: setup browser  ## everything but the GPU tests (slow ones included)
	.venv/bin/python -m pytest -m "not gpu"

lint: setup  ## ruff: lint and format check (settings in pyproject.toml)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

lock:  ## refresh requirements.lock from the current .venv
	.venv/bin/python -m pip freeze --exclude-editable | grep -v "^-e" > requirements.lock
