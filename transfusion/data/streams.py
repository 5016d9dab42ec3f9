"""Sharded image-caption datasets read as a stream: WebDataset tar shards and Parquet files.

Shards are opened through the storage layer (a local path or any URI pyarrow takes, ``s3://``
included), parsed by their own libraries (``webdataset`` groups a tar's files by key, ``pyarrow``
reads Parquet in record batches) and yielded one record at a time, so memory stays bounded by
one record batch whatever the dataset's size::

    webdataset   KEY.jpg|jpeg|png|webp  +  KEY.txt (or KEY.json with a caption field)
    parquet      an image column (bytes, or Hugging Face datasets' {"bytes", "path"} struct)
                 and a caption column

A record's split comes from the hash of its key, so it never changes with shard order, worker
count or dataset growth. A record that cannot be used is counted, not fatal
(:class:`BadRecords`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transfusion.config import DataConfig
from transfusion.errors import DataError, UserError
from transfusion.storage import Store

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
MAX_STREAM_PIXELS = 8192 * 8192  # per image, checked from its header before decoding
PARQUET_BATCH = 256  # rows per record batch read


@dataclass(frozen=True)
class Record:
    key: str
    image: bytes | None  # encoded image
    caption: str | None


@dataclass
class BadRecords:
    """Records skipped, with the first few keys and reasons (named in the stage's metrics)."""

    limit: int = 5
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, key: str, why: str) -> None:
        self.count += 1
        if len(self.first) < self.limit:
            self.first.append(f"{key}: {why}")

    def check(self, read: int, max_fraction: float, where: str) -> None:
        if self.count > max_fraction * max(read, 1):
            raise DataError(
                f"{where}: {self.count} of {read} records are bad, more than data.max_bad_fraction "
                f"({max_fraction}); first: {'; '.join(self.first)}"
            )


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """``train``, ``val`` or ``test`` from the first 8 bytes of sha256(key), as a share of 2**64."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


# ---------------------------------------------------------------------------------------------
# shard lists
# ---------------------------------------------------------------------------------------------
def expand_urls(urls: list[str], source: str) -> list[str]:
    """Every shard named by ``urls``: brace patterns expanded, folders listed (their ``*.tar`` or
    ``*.parquet`` files, sorted). A name that matches nothing is a ``DataError``."""
    import pyarrow.fs as pafs
    from braceexpand import braceexpand

    suffix, out = SUFFIX[source], []
    for url in (u for pattern in urls for u in braceexpand(pattern)):
        store = Store(url)
        kind = store.fs.get_file_info(store.root).type
        if kind == pafs.FileType.File:
            out.append(url)
            continue
        files = [p for p in store.files("") if p.endswith(suffix)] if kind == pafs.FileType.Directory else []
        if not files:
            raise DataError(f"data.stream.urls: {shown(url)} is neither a {suffix} file nor a folder holding some")
        base = url.partition("?")[0].rstrip("/")  # keeps a URI's scheme and credentials
        out += [f"{base}{p[len(store.root.rstrip('/')) :]}{_query(url)}" for p in files]
    return out


def _query(url: str) -> str:
    _, sep, query = url.partition("?")
    return f"{sep}{query}"


def _open(url: str, seekable: bool = False):
    store = Store(url)
    return store.fs.open_input_file(store.root) if seekable else store.fs.open_input_stream(store.root)


def shown(url: str) -> str:
    """``url`` as messages and metrics show it: without credentials (``s3://key:secret@...``)."""
    return re.sub(r"://[^/@]*@", "://", url)


# ---------------------------------------------------------------------------------------------
# readers: shard -> records
# ---------------------------------------------------------------------------------------------
def _caption(sample: dict, caption_key: str) -> str | None:
    if caption_key in sample:
        return sample[caption_key].decode("utf-8", errors="replace")
    if "json" in sample:
        try:
            value = json.loads(sample["json"]).get(caption_key)
        except (ValueError, AttributeError):
            return None
        return None if value is None else str(value)
    return None


def read_webdataset(url: str, caption_key: str) -> Iterator[Record]:
    """The records of one tar shard, grouped by key by ``webdataset``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with _open(url) as stream:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
            yield Record(sample["__key__"], image, _caption(sample, caption_key))


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        value = value.get("bytes")
    return value if isinstance(value, bytes) and value else None


def read_parquet(url: str, image_column: str, caption_column: str, key_column: str | None) -> Iterator[Record]:
    """The rows of one Parquet file, read ``PARQUET_BATCH`` rows at a time."""
    import pyarrow.parquet as pq

    with _open(url, seekable=True) as stream:
        pf = pq.ParquetFile(stream)
        columns = [image_column, caption_column] + ([key_column] if key_column else [])
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{shown(url)}: no column {missing} (columns: {pf.schema_arrow.names}); see data.stream")
        stem, row = Path(url.partition("?")[0]).stem, 0
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                key = str(data[key_column][i]) if key_column else f"{stem}/{row:08d}"
                caption = data[caption_column][i]
                yield Record(key, _image_bytes(data[image_column][i]), None if caption is None else str(caption))
                row += 1


def iter_records(cfg: DataConfig, bad: BadRecords) -> Iterator[Record]:
    """Every record of ``cfg.stream``'s shards in order (at most ``max_records``); a shard that
    stops reading part-way (truncated, corrupt) counts as one bad record and the next one starts."""
    stream, n = cfg.stream, 0
    for url in expand_urls(stream.urls, cfg.source):
        if cfg.source == "webdataset":
            records = read_webdataset(url, stream.caption_key)
        else:
            records = read_parquet(url, stream.image_column, stream.caption_key, stream.key_column)
        try:
            for record in records:
                yield record
                n += 1
                if stream.max_records is not None and n >= stream.max_records:
                    return
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - a bad shard is counted like a bad record
            bad.add(shown(url), f"shard unreadable after {n} records ({type(err).__name__}: {err})")


class _Named(io.BytesIO):
    """Encoded image bytes that ``open_rgb``'s messages name by the record's key."""

    def __init__(self, data: bytes, key: str) -> None:
        super().__init__(data)
        self.key = key

    def __str__(self) -> str:
        return self.key


def decode_record(record: Record, canvas: int) -> np.ndarray:
    """(canvas, canvas, 3) uint8: centre-cropped square, resized; ``UserError`` if unusable."""
    from PIL import Image

    from transfusion.images import open_rgb

    if record.image is None:
        raise DataError("no image")
    if not record.caption or not record.caption.strip():
        raise DataError("no caption")
    im = open_rgb(_Named(record.image, record.key), MAX_STREAM_PIXELS)
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((canvas, canvas), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def usable(records: Iterator[Record], canvas: int, bad: BadRecords) -> Iterator[tuple[Record, np.ndarray]]:
    """``(record, pixels)`` for the records that decode; the others go to ``bad``."""
    for record in records:
        try:
            yield record, decode_record(record, canvas)
        except UserError as err:
            why = re.sub(r"<[^>]* object at 0x[0-9a-f]+>", "the bytes", str(err))  # PIL names the buffer
            bad.add(record.key, why.removeprefix(f"{record.key}: "))
