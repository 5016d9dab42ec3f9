"""Precomputed VAE latents: one latent shard per data shard, their scaling, and the streaming
reader training uses.

Layout::

    paths.latents/meta.json             {"scaling_factor", "latent_shape", "location", "splits", ...}
    paths.latents/<split>/index.jsonl   the data shards' index: caption + content of each row
    paths.latents/<split>/records-00000.jsonl   the same rows, one file per shard (what readers load)
    <location>/<split>/latents-00000.safetensors   raw posterior means (N, C, h, w) float32

``location`` is ``paths.latents`` itself (``latents.storage: null``) or a storage URI. Shards hold
the VAE's raw latents; readers multiply by ``scaling_factor`` (unit variance on train) and
``vae.decode`` takes latents divided by it again.

``encode_shard`` is the one unit of work (read one data shard, encode it, write its latent shard,
return its sums); ``transfusion.latents_ray`` runs it on Ray Data actors, ``encode_here`` in
this process. A shard already written is read back instead of encoded, so a re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from transfusion.data.shards import INDEX, check_shards, index_groups, shard_name
from transfusion.data.sources import SPLITS
from transfusion.errors import DataError
from transfusion.io import atomic_dir, read_jsonl, sha256_of, write_jsonl
from transfusion.storage import Store, is_uri, join

META = "meta.json"
KEY = "latents"


# ---------------------------------------------------------------------------------------------
# writing: one shard at a time
# ---------------------------------------------------------------------------------------------
def fingerprint(scenes: Path, vae_path: Path) -> str:
    """What the latents depend on: the VAE's files and the data shards' indexes and sizes."""
    digest = hashlib.sha256()
    for folder in (Path(vae_path), Path(scenes)):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
            if folder == Path(vae_path) or path.name == INDEX:  # the data shards: by size
                digest.update(bytes.fromhex(sha256_of(path)))
    return digest.hexdigest()[:16]


def shard_tasks(scenes: Path) -> list[tuple[str, int]]:
    """``(split, shard)`` for every data shard."""
    return [
        (split, s) for split in SPLITS for s in range(len(list((Path(scenes) / split).glob("images-*.safetensors"))))
    ]


def _shard_bytes(latents: np.ndarray) -> bytes:
    from safetensors.numpy import save

    return save({KEY: np.ascontiguousarray(latents, dtype=np.float32)})


def _load_shard(blob: bytes, where: str) -> np.ndarray:
    from safetensors.numpy import load

    try:
        return load(blob)[KEY]
    except Exception as err:  # noqa: BLE001 - any unreadable shard is one line
        raise DataError(f"{where}: unreadable latent shard ({err})") from None


def encode_shard(vae, scenes: Path, split: str, shard: int, out: Store, batch_size: int) -> dict:
    """Encode data shard ``split/shard`` into ``out`` (or read it back if a whole one is there);
    returns its row count, sum and sum of squares (float64) and whether it was encoded."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from transfusion.vae import encode

    start, name = time.perf_counter(), f"{split}/{shard_name(KEY, shard)}"
    source = Path(scenes) / split / shard_name("images", shard)
    with safe_open(str(source), "np") as fh:
        rows = fh.get_slice("images").get_shape()[0]
    blob = out.read(name)
    latents = _load_shard(blob, out.path(name)) if blob is not None else None
    encoded = latents is None or len(latents) != rows
    if encoded:
        images = load_file(str(source))["images"]
        latents = encode(vae, images, batch_size).numpy()
        out.write(name, _shard_bytes(latents))
    x = latents.astype(np.float64)
    return {"split": split, "shard": shard, "rows": len(x), "sum": float(x.sum()), "sumsq": float((x * x).sum()),
            "encoded": encoded, "seconds": time.perf_counter() - start}  # fmt: skip


def encode_here(vae_path: Path, scenes: Path, out: Store, batch_size: int, tasks: list[tuple[str, int]]) -> list[dict]:
    """``encode_shard`` over ``tasks`` in this process (what each Ray Data actor does for its own)."""
    from transfusion.vae import load_vae

    vae = load_vae(vae_path)
    return [encode_shard(vae, scenes, split, shard, out, batch_size) for split, shard in tasks]


def work_location(storage: str | None, runs: Path, fp: str) -> str:
    """Where shards are written while the stage runs: ``<storage>/<fingerprint>`` or, locally,
    ``<paths.runs>/latents/<fingerprint>`` (kept across failed runs: a re-run resumes)."""
    return join(storage, fp) if storage else str(Path(runs) / "latents" / fp)


def finish(root: Path, scenes: Path, vae_path: Path, location: str, results: list[dict]) -> dict:
    """``meta.json``, the index and per-shard records under ``root``; local shards move in
    beside them. The scaling factor is 1 / std of every train latent (from the shards' sums)."""
    train = [r for r in results if r["split"] == "train"]
    shape = _latent_shape(Store(location), results)
    per_row = math.prod(shape)
    n = sum(r["rows"] for r in train) * per_row
    mean = sum(r["sum"] for r in train) / n
    var = (sum(r["sumsq"] for r in train) - n * mean * mean) / (n - 1)
    meta = {
        "scaling_factor": 1.0 / math.sqrt(var),
        "latent_shape": shape,
        "raw_mean": mean,
        "raw_std": math.sqrt(var),
        "vae": str(vae_path),
        "splits": {s: sum(r["rows"] for r in results if r["split"] == s) for s in SPLITS},
        "shard_rows": {s: [r["rows"] for r in sorted(results, key=_order) if r["split"] == s] for s in SPLITS},
        "location": location if is_uri(location) else None,
    }
    meta["shard_size"] = meta["shard_rows"]["train"][0]
    with atomic_dir(root) as tmp:
        for split in SPLITS:
            (tmp / split).mkdir()
            shutil.copy(Path(scenes) / split / INDEX, tmp / split / INDEX)
            for shard, rows in index_groups(Path(scenes) / split):
                write_jsonl(tmp / split / records_name(shard), rows)
            if not is_uri(location):
                for shard in sorted((Path(location) / split).glob(f"{KEY}-*.safetensors")):
                    shard.rename(tmp / split / shard.name)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
    return meta


def _latent_shape(store: Store, results: list[dict]) -> list[int]:
    first = next(r for r in results if r["rows"])
    name = f"{first['split']}/{shard_name(KEY, first['shard'])}"
    return list(_load_shard(store.read(name), store.path(name)).shape[1:])


def _order(result: dict) -> tuple[int, int]:
    return SPLITS.index(result["split"]), result["shard"]


def records_name(shard: int) -> str:
    return f"records-{shard:05d}.jsonl"


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def load_meta(root: Path) -> dict:
    path = Path(root) / META
    if not path.is_file():
        raise DataError(f"{path}: missing; run the latents stage first")
    return json.loads(path.read_text())


def shard_store(root: Path, split: str, meta: dict | None = None) -> Store:
    """The folder (local or a URI) that holds ``split``'s latent shards."""
    location = (meta or load_meta(root)).get("location")
    return Store(join(location, split) if location else Path(root) / split)


def check_latents(root: Path) -> None:
    """Every latent shard of every split checked against ``meta.json`` and the index from its
    header and size (``check_shards``) before training starts: a bad shard is named now, not when
    training reaches it hours later. Reads no latents."""
    meta = load_meta(root)
    for split, count in meta["splits"].items():
        store = shard_store(root, split, meta)
        rows = check_shards(store, KEY, list(meta["latent_shape"]), meta["shard_rows"][split])
        if rows != count:
            raise DataError(f"{Path(root) / split}: {rows} rows in its shards, {META} says {count}")


class LatentReader(torch.utils.data.IterableDataset):
    """Stream ``(scaled latent, record)`` pairs of one split, one shard in memory at a time, from
    local disk or the storage URI the shards were written to.

    ``rank``/``world_size`` give each data-parallel worker its own data: whole shards (shard
    ``s`` goes to worker ``s % world_size``) when there are at least as many shards as workers,
    else every ``world_size``-th row. ``shuffle`` permutes shard order and rows within a shard per
    epoch; ``repeat`` cycles forever (epoch counter in the shuffle seed).
    """

    def __init__(
        self,
        root: Path,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        repeat: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.folder = Path(root) / split
        self.meta = load_meta(root)
        self.store = shard_store(root, split, self.meta)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.repeat = shuffle, seed, repeat
        self.rows = self.meta["shard_rows"][split]  # per shard; records are read with their shard
        self.by_shard = len(self.rows) >= world_size > 1
        self.shards = [s for s in range(len(self.rows)) if not self.by_shard or s % world_size == rank]

    def __len__(self) -> int:
        if self.by_shard:
            return sum(self.rows[s] for s in self.shards)
        return len(range(self.rank, sum(self.rows), self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
            yield from self._epoch([self.shards[i] for i in order], rng)
            epoch += 1
            if not self.repeat:
                return

    def _shard(self, s: int) -> tuple[np.ndarray, list[dict]]:
        name = shard_name(KEY, s)
        blob = self.store.read(name)
        if blob is None:
            raise DataError(f"{self.store.path(name)}: missing latent shard")
        array = _load_shard(blob, self.store.path(name))
        records = read_jsonl(self.folder / records_name(s))
        if not len(array) == len(records) == self.rows[s]:
            raise DataError(
                f"{self.store.path(name)}: {len(array)} rows, {len(records)} records, {META} says {self.rows[s]}"
            )
        return array, records

    def _epoch(self, order: list[int], rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, dict]]:
        scale, size = float(self.meta["scaling_factor"]), self.meta["shard_size"]
        for s in order:
            array, recs = self._shard(s)
            rows = list(range(len(recs)))
            if not self.by_shard:
                rows = [i for i in rows if (s * size + recs[i]["row"]) % self.world_size == self.rank]
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            for i in rows:
                yield torch.from_numpy(array[i]) * scale, recs[i]
