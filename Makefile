# The two entry points of the README. Both create/reuse .venv first.
SHELL := /bin/bash
include transfusion/defaults.env  # the environment of every entry point, written once
.EXPORT_ALL_VARIABLES:

.PHONY: setup repro test test-all lint lock

setup:
	@scripts/setup.sh

repro: setup  ## set up, then run the default pipeline
	source .venv/bin/activate && dvc repro

test: setup  ## set up, then run the test suite (slow tests excluded)
	.venv/bin/python -m pytest -m "not slow and not gpu"

test-all: setup  ## everything but the GPU tests (slow ones included)
	.venv/bin/python -m pytest -m "not gpu"

lint: setup  ## ruff: lint and format check (settings in pyproject.toml)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

lock:  ## refresh requirements.lock from the current .venv
	.venv/bin/python -m pip freeze --exclude-editable | grep -v "^-e" > requirements.lock
