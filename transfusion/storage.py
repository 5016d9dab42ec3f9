"""Run storage: a folder named by a local path or by any URI that pyarrow understands.

Training checkpoints live in one such folder, and on a cluster so do the inputs that the workers
read, so that a worker restarted on any node finds them. Locally it is a plain folder; on a
cluster an object store or a shared filesystem::

    /abs/path  or  relative/path            a local folder
    s3://bucket/prefix                      AWS credentials from the usual environment
    s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http
                                            an S3-compatible server (MinIO, moto, Ceph)
    gs://bucket/prefix, hdfs://...          whatever ``pyarrow.fs.FileSystem.from_uri`` takes

A folder is uploaded file by file with ``manifest.json`` last, so a reader that verifies the
manifest (``transfusion.train.checkpoint.verify_checkpoint``) never takes a half-written one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transfusion.errors import BadInput
from transfusion.io import MANIFEST


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, name: str) -> str:
    """``location/name``, keeping a URI's query (``s3://b/p?endpoint_override=...``) at the end."""
    text = str(location)
    base, sep, query = text.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


class Store:
    """A folder at ``location`` (path or URI): list, upload, download and delete sub-folders."""

    def __init__(self, location: str | Path) -> None:
        import pyarrow.fs as pafs

        self.location = str(location)
        if is_uri(location):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.location)
            except (ValueError, OSError) as err:  # pyarrow: ArrowInvalid is a ValueError
                raise BadInput(f"{self.location}: not a storage URI pyarrow can open ({err})") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).resolve())
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def local_path(self, name: str) -> Path:
        """``name`` as a local folder (only for a local store)."""
        assert self.local, self.location
        return Path(self.path(name))

    def _listing(self) -> list:
        """pyarrow's FileInfo of every entry directly in the store (none if it is not there)."""
        import pyarrow.fs as pafs

        try:
            return self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except OSError:
            return []

    def names(self) -> list[str]:
        """The sub-folders, sorted by name."""
        import pyarrow.fs as pafs

        return sorted(i.base_name for i in self._listing() if i.type == pafs.FileType.Directory)

    def entries(self) -> list[str]:
        """Every file and folder name directly in the store."""
        return sorted(i.base_name for i in self._listing())

    def delete_file(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except (FileNotFoundError, OSError):
            pass

    def files(self, name: str) -> list[str]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(name), allow_not_found=True, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def put(self, local: Path, name: str, trailer: tuple[str, bytes] | None = None) -> str:
        """Upload folder ``local`` as ``name`` (replacing it); its ``manifest.json`` (or the
        ``trailer`` file, given as name and bytes) is written last."""
        local = Path(local)
        target = self.path(name)
        self.delete(name)
        self.fs.create_dir(target, recursive=True)
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == MANIFEST, str(p)))
        for file in files:
            rel = file.relative_to(local).as_posix()
            if "/" in rel:
                self.fs.create_dir(f"{target}/{rel.rsplit('/', 1)[0]}", recursive=True)
            with file.open("rb") as src, self.fs.open_output_stream(f"{target}/{rel}") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        if trailer is not None:
            with self.fs.open_output_stream(f"{target}/{trailer[0]}") as dst:
                dst.write(trailer[1])
        return target

    def read(self, name: str) -> bytes | None:
        """The bytes of file ``name`` (a path inside the store), or None if it is not there."""
        try:
            with self.fs.open_input_stream(self.path(name)) as src:
                return src.read()
        except (FileNotFoundError, OSError):
            return None

    def write(self, name: str, data: bytes) -> None:
        """File ``name`` (a path inside the store) with ``data``, whole or not at all: a local
        file through a renamed temp file, an object through one upload."""
        if self.local:
            from transfusion.io import atomic_file

            with atomic_file(self.local_path(name), "wb") as fh:
                fh.write(data)
            return
        if "/" in name:
            self.fs.create_dir(self.path(name.rsplit("/", 1)[0]), recursive=True)
        with self.fs.open_output_stream(self.path(name)) as dst:
            dst.write(data)

    def get(self, name: str, local: Path) -> Path:
        """Download ``name`` into the folder ``local`` (written whole or not at all)."""
        from transfusion.io import atomic_dir

        source = self.path(name)
        with atomic_dir(Path(local)) as tmp:
            for path in self.files(name):
                rel = path[len(source) :].lstrip("/")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(path) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        return Path(local)

    def delete(self, name: str | None = None) -> None:
        """Delete sub-folder ``name``, or (``None``) everything in this store."""
        target = self.root if name is None else self.path(name)
        try:
            self.fs.delete_dir(target)
        except (FileNotFoundError, OSError):
            pass
