"""The process environment of every entry point, written once in ``defaults.env``:
no usage statistics or telemetry (Ray, MLflow, DVC), Ray Train V2, quiet tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

ENV_FILE = Path(__file__).with_name("defaults.env")


def defaults() -> dict[str, str]:
    """The ``KEY=value`` lines of ``defaults.env``."""
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def apply() -> None:
    """Set each default that the environment does not already set."""
    for key, value in defaults().items():
        os.environ.setdefault(key, value)
