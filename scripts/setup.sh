#!/usr/bin/env bash
# Create (or reuse) .venv with the locked stack and this project installed (editable).
# Re-installs only when requirements.lock or pyproject.toml changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the locked stack into .venv (first time: several minutes)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock 2> >(grep -v "^WARNING: Location" >&2)
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . 2> >(grep -v "^WARNING: Location" >&2)
    echo "$want" > .venv/.installed
fi
