"""Atomic file and folder writes: outputs appear whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``target``; on success it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: Path, mode: str = "w") -> Iterator[Any]:
    """Open a temp file beside ``target`` for writing; rename it over ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.chmod(name, 0o644)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def write_json(target: Path, obj: Any) -> None:
    with atomic_file(target) as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def write_jsonl(target: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_file(target) as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


MANIFEST = "manifest.json"  # size and sha256 of every other file of a folder, written last


def write_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``folder/manifest.json``: size and sha256 of every file under ``folder`` (sub-folders
    included, as relative POSIX paths). Written last: its presence means the rest is whole."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)
    manifest = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(folder: Path, error: type[Exception], missing: str) -> dict[str, dict[str, Any]]:
    """The manifest of ``folder`` after checking every file's size and sha256; the first file
    that differs is an ``error`` naming it (``missing``: the message when there is no manifest)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        items = [(str(name), int(want["bytes"]), str(want["sha256"])) for name, want in manifest.items()]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise error(f"{folder}: {missing}") from None
    for name, size, sha in items:
        file = folder / name
        if not file.is_file():
            raise error(f"{folder}: {name} is missing")
        if file.stat().st_size != size:
            raise error(f"{folder}: {name} is truncated or altered ({file.stat().st_size} bytes, expected {size})")
        if sha256_of(file) != sha:
            raise error(f"{folder}: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def write_csv(target: Path, rows: list[dict[str, float]], columns: list[str] | None = None) -> None:
    """Numeric ``rows`` as CSV (``columns``, default the first row's keys; missing values nan);
    a header only when there are no rows."""
    columns = columns or (list(rows[0]) if rows else ["step"])
    with atomic_file(target) as fh:
        fh.write(",".join(columns) + "\n")
        for row in rows:
            fh.write(",".join(f"{row.get(k, float('nan')):.6g}" for k in columns) + "\n")
