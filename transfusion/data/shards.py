"""Sharded arrays on disk: ``<key>-00000.safetensors`` files plus one ``index.jsonl``.

Line ``i`` of the index describes row ``i`` of the split: ``{"shard": 0, "row": 12, ...record}``.
Scenes store uint8 images under ``images``; latents store float32 latents under ``latents``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from transfusion.errors import DataError
from transfusion.io import read_jsonl, write_jsonl

INDEX = "index.jsonl"


def shard_name(key: str, i: int) -> str:
    return f"{key}-{i:05d}.safetensors"


def write_shards(folder: Path, key: str, array: np.ndarray, records: list[dict], shard_size: int) -> None:
    """Write ``array`` (N, ...) in shards of ``shard_size`` rows and the index of ``records``."""
    if len(array) != len(records):
        raise ValueError(f"{len(array)} rows but {len(records)} records")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s, start in enumerate(range(0, len(array), shard_size)):
        save_file({key: np.ascontiguousarray(array[start : start + shard_size])}, str(folder / shard_name(key, s)))
        for r, rec in enumerate(records[start : start + shard_size]):
            rows.append({"shard": s, "row": r, **rec})
    write_jsonl(folder / INDEX, rows)


class ShardWriter:
    """``write_shards`` one row at a time into one preallocated shard buffer (``shard_size`` rows,
    reused for every shard, so memory does not grow with the dataset); index lines are appended as
    each shard is written (the index is complete when ``close`` returns)."""

    def __init__(self, folder: Path, key: str, shard_size: int) -> None:
        self.folder, self.key, self.shard_size = Path(folder), key, shard_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index = open(self.folder / INDEX, "w")  # noqa: SIM115 - closed by close()
        self.buffer: np.ndarray | None = None
        self.records: list[dict] = []
        self.shards = self.count = 0

    def add(self, row: np.ndarray, record: dict) -> None:
        if self.buffer is None:
            self.buffer = np.empty((self.shard_size, *row.shape), row.dtype)
        self.buffer[len(self.records)] = row
        self.records.append(record)
        if len(self.records) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self.records:
            return
        save_file({self.key: self.buffer[: len(self.records)]}, str(self.folder / shard_name(self.key, self.shards)))
        for r, rec in enumerate(self.records):
            self.index.write(json.dumps({"shard": self.shards, "row": r, **rec}, sort_keys=True) + "\n")
        self.count += len(self.records)
        self.shards += 1
        self.records = []

    def close(self) -> int:
        """Write the last shard; returns the number of rows."""
        self._flush()
        self.index.close()
        return self.count


def read_index(folder: Path) -> list[dict]:
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: no {INDEX}; run the stage that writes it first")
    return read_jsonl(path)


def index_groups(folder: Path) -> Iterator[tuple[int, list[dict]]]:
    """``(shard, rows)`` of the index of ``folder`` read line by line (the index lists shards in
    order), so that one shard's rows are in memory at a time."""
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: no {INDEX}; run the stage that writes it first")
    shard, rows = None, []
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if row["shard"] != shard and rows:
                yield shard, rows
                rows = []
            shard = row["shard"]
            rows.append(row)
    if rows:
        yield shard, rows


def _load(folder: Path, key: str, s: int, recs: list[dict]) -> np.ndarray:
    path = folder / shard_name(key, s)
    try:
        array = load_file(str(path))[key]
    except Exception as err:
        raise DataError(f"{path}: unreadable shard ({err})") from None
    if len(array) != len(recs):
        raise DataError(f"{path}: {len(array)} rows but {INDEX} lists {len(recs)}")
    return array


def read_shards(folder: Path, key: str, limit: int | None = None) -> tuple[np.ndarray, list[dict]]:
    """The whole split in memory (or its first ``limit`` rows, reading no more of the last shard
    than they need): (N, ...) array and its N records."""
    from safetensors import safe_open

    arrays, records, n = [], [], 0
    for s, recs in index_groups(folder):
        if limit is not None and n + len(recs) > limit:
            recs = recs[: limit - n]
            with safe_open(str(folder / shard_name(key, s)), "np") as fh:
                arrays.append(fh.get_slice(key)[: len(recs)])
        else:
            arrays.append(_load(folder, key, s, recs))
        records.extend(recs)
        n += len(recs)
        if limit is not None and n >= limit:
            break
    if not arrays:
        raise DataError(f"{folder}: empty split")
    return np.concatenate(arrays), records


MAX_HEADER = 1 << 20  # a shard's JSON header: a few hundred bytes; more is not a shard of ours


def shard_header(fs, path: str) -> tuple[dict, int]:
    """The safetensors header of file ``path`` on the pyarrow filesystem ``fs`` and the file size
    it implies (8 + header + data), read without loading the data."""
    try:
        with fs.open_input_file(path) as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(fh.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError) as err:
        raise DataError(f"{path}: not a readable shard ({err})") from None
    return header, 8 + length + end


def check_shards(files, key: str, row_shape: list[int], rows: list[int], dtype: str = "F32") -> int:
    """The shards ``<key>-00000.safetensors`` ... in ``files`` (a ``transfusion.storage.Store``:
    a local folder or a URI), checked from their headers alone before anything reads them:
    present, ``key`` of ``dtype`` with ``row_shape`` rows, ``rows[i]`` rows in shard ``i``, and
    exactly the file size the header implies (truncated or padded files fail). Returns the
    number of rows; the first bad file is a ``DataError`` naming it."""
    import pyarrow.fs as pafs

    for s, count in enumerate(rows):
        path = files.path(shard_name(key, s))
        info = files.fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise DataError(f"{path}: missing (expected {count} rows in it)")
        header, size = shard_header(files.fs, path)
        tensor = header.get(key) or {}
        want = [count, *row_shape]
        if tensor.get("dtype") != dtype or tensor.get("shape") != want:
            got = f"{tensor.get('dtype')} {tensor.get('shape')}"
            raise DataError(f"{path}: holds {key} {got}, expected {dtype} {want}")
        if info.size != size:
            raise DataError(f"{path}: {info.size} bytes, its header says {size} (truncated or altered)")
    return sum(rows)
