"""Sharded arrays on disk: ``<key>-00000.safetensors`` files plus one ``index.jsonl``.

Line ``i`` of the index describes row ``i`` of the split: ``{"shard": 0, "row": 12, ...record}``.
Scenes store uint8 images under ``images``; latents store float32 latents under ``latents``.
"""

from __future__ import annotations

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


def read_index(folder: Path) -> list[dict]:
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"{folder}: no {INDEX}; run the stage that writes it first")
    return read_jsonl(path)


def iter_shards(folder: Path, key: str, shard_ids: list[int] | None = None) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """Yield ``(array, records)`` one shard at a time (only one shard in memory)."""
    index = read_index(folder)
    by_shard: dict[int, list[dict]] = {}
    for row in index:
        by_shard.setdefault(row["shard"], []).append(row)
    for s in shard_ids if shard_ids is not None else sorted(by_shard):
        path = folder / shard_name(key, s)
        try:
            array = load_file(str(path))[key]
        except Exception as err:
            raise DataError(f"{path}: unreadable shard ({err})") from None
        recs = by_shard.get(s, [])
        if len(array) != len(recs):
            raise DataError(f"{path}: {len(array)} rows but {INDEX} lists {len(recs)}")
        yield array, recs


def read_shards(folder: Path, key: str) -> tuple[np.ndarray, list[dict]]:
    """The whole split in memory: (N, ...) array and its N records."""
    arrays, records = [], []
    for array, recs in iter_shards(folder, key):
        arrays.append(array)
        records.extend(recs)
    if not arrays:
        raise DataError(f"{folder}: empty split")
    return np.concatenate(arrays), records


def num_shards(folder: Path) -> int:
    return len({row["shard"] for row in read_index(folder)})
