# The two entry points of the README. Both create/reuse .venv first.
SHELL := /bin/bash
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test test-all lock

setup:
	@scripts/setup.sh

repro: setup  ## set up, then run the default pipeline
	source .venv/bin/activate && dvc repro

test: setup  ## set up, then run the test suite (slow tests excluded)
	.venv/bin/python -m pytest -m "not slow and not gpu"

test-all: setup
	.venv/bin/python -m pytest -m "not gpu"

lock:  ## refresh requirements.lock from the current .venv
	.venv/bin/python -m pip freeze --exclude-editable | grep -v "^-e" > requirements.lock
