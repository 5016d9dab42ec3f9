"""Where a run comes from: the DVC pipeline run it belongs to, its inputs' digests in ``dvc.lock``,
the git commit, and the params that differ from the committed ``params.yaml``. No MLflow here:
``transfusion.tracking`` turns these facts into parent runs, datasets and tags.

A pipeline run is one ``dvc repro`` or one ``dvc exp run`` (queued ones included). DVC starts each
stage as its own process (``$SHELL -c "python cli.py STAGE"``) with ``DVC_STAGE`` set, from the one
``dvc`` process of that pipeline run (for a queued experiment: its ``dvc exp exec-run``). That
process's PID and start time, read from the process tree, are the key every stage of the pipeline
run shares (:func:`invocation_key`), and no other pipeline run has.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from transfusion.errors import BadInput

TRACK_STAGE = "track"  # the last stage of dvc.yaml: closes the pipeline run (stages/track.py)


def dvc_stage() -> str | None:
    """The stage DVC is running in this process (``$DVC_STAGE``), None outside DVC."""
    return os.environ.get("DVC_STAGE") or None


def _is_dvc(cmdline: list[str]) -> bool:
    """A ``dvc`` command line: ``dvc repro``, ``python -m dvc exp exec-run ...``."""
    words = [Path(w).name for w in cmdline[:3]]
    return "dvc" in words or (len(cmdline) > 2 and cmdline[1:3] == ["-m", "dvc"])


def invocation_key() -> str | None:
    """``host:pid:start`` of the nearest ``dvc`` process above this one (None: not under DVC):
    one value for every stage of a pipeline run, another for the next run."""
    import psutil

    if dvc_stage() is None:
        return None
    proc = psutil.Process().parent()
    while proc is not None:
        try:
            if _is_dvc(proc.cmdline()):
                return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"
            proc = proc.parent()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
    return None


def experiment_name() -> str | None:
    """The DVC experiment's name (``dvc exp run [-n NAME]`` sets ``$DVC_EXP_NAME``), else None."""
    return os.environ.get("DVC_EXP_NAME") or None


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(cwd: Path | None = None) -> tuple[str, bool]:
    """(commit, dirty): HEAD and whether tracked files differ from it ("unknown", False outside git)."""
    commit = (_git("rev-parse", "HEAD", cwd=cwd) or "").strip() or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return commit, bool(status and status.strip())


def baseline_params(cwd: Path | None = None) -> dict[str, Any] | None:
    """``params.yaml`` as committed at the experiment's baseline (``$DVC_EXP_BASELINE_REV``) or
    HEAD: what "the params that differ" are measured against. None when git has no such file."""
    rev = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    text = _git("show", f"{rev}:params.yaml", cwd=cwd)
    if text is None:
        return None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(loaded, dict):
        return None
    from pydantic import ValidationError

    from transfusion.config import Params

    try:  # resolved as the run's own params are (10 and 10.0 are one value), else as written
        return Params.model_validate(loaded).model_dump(mode="json")
    except ValidationError:
        return loaded


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"vae": {"lr": 1e-3}}`` -> ``{"vae.lr": 1e-3}`` (lists and None as strings): params as
    MLflow logs them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def params_diff(current: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, str]:
    """Flat ``section.key -> value`` (as text) of ``current`` where it differs from ``baseline``."""
    now, then = flatten(current), flatten(baseline or {})
    return {k: str(v) for k, v in now.items() if k not in then or str(then[k]) != str(v)}


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


# ---------------------------------------------------------------------------------------------
# dvc.yaml and dvc.lock
# ---------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BadInput(f"{path}: not readable YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("stages"), dict):
        raise BadInput(f"{path}: expected a mapping with 'stages'")
    return loaded["stages"]


def pipeline_stages(root: Path) -> list[str]:
    """The stages of ``root/dvc.yaml`` in file order, without the closing ``track`` stage."""
    return [s for s in _read_yaml(root / "dvc.yaml") if s != TRACK_STAGE]


def read_lock(root: Path) -> dict[str, dict[str, Any]]:
    """``dvc.lock``'s stages (empty before the first ``dvc repro``)."""
    return _read_yaml(root / "dvc.lock") if (root / "dvc.lock").is_file() else {}


def lock_digest(entry: dict[str, Any]) -> str:
    """md5 of a stage's ``dvc.lock`` entry (deps, params and outs with their hashes): equal
    digests mean the same inputs gave the same outputs."""
    canonical = json.dumps({k: entry.get(k) for k in ("deps", "params", "outs")}, sort_keys=True)
    return hashlib.md5(canonical.encode()).hexdigest()


def dep_hashes(entry: dict[str, Any]) -> dict[str, str]:
    """``path -> md5`` of a stage's dependencies as ``dvc.lock`` recorded them."""
    return {d["path"]: str(d.get("md5", "")) for d in entry.get("deps") or [] if "path" in d}


@dataclass(frozen=True)
class Input:
    """A stage's input produced by another stage: its ``paths:`` name, path and ``dvc.lock`` md5."""

    name: str
    path: str
    digest: str
    producer: str


def stage_inputs(root: Path, stage: str, paths: dict[str, str]) -> list[Input]:
    """The deps of ``stage`` in ``dvc.yaml`` that another stage writes, each with the md5 its
    producer's ``dvc.lock`` entry gives it now (upstream stages have finished by the time a stage
    starts, so these are the digests this run reads)."""
    stages = _read_yaml(root / "dvc.yaml")
    names = {str(v): k for k, v in paths.items()}
    produced = {
        str(o["path"]): (name, str(o.get("md5", "")))
        for name, entry in read_lock(root).items()
        for o in entry.get("outs") or []
        if "path" in o
    }
    out = []
    for dep in (stages.get(stage) or {}).get("deps") or []:
        path = re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(paths.get(m.group(1), m.group(0))), str(dep))
        if path in produced and produced[path][0] != stage:
            producer, md5 = produced[path]
            out.append(Input(names.get(path, Path(path).name), path, md5, producer))
    return out


def raw_inputs(data) -> list[Input]:
    """The pinned registry archives the ``data`` stage reads (a ``DataConfig``): name, the
    project page of the pinned version, its sha256 (no ``dvc.lock`` entry: the pin is the digest).
    Local folders given instead are not pinned and not listed."""
    pinned = []
    if data.source == "mnist_scenes" and data.mnist.local_path is None:
        pinned.append(("mnist", data.mnist.archive))
    if data.text.local_dir is None:
        pinned.append(("text", data.text.archive))
    return [
        Input(name, f"https://pypi.org/project/{spec.package}/{spec.version}/", spec.sha256, "registry")
        for name, spec in pinned
    ]
