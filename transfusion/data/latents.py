"""Precomputed VAE latents: scaling, shards on disk, and the streaming reader training uses.

Layout under ``paths.latents``::

    meta.json                      {"scaling_factor", "latent_shape", "vae", "raw_std", ...}
    <split>/latents-00000.safetensors   scaled latents (N, C, h, w) float32
    <split>/index.jsonl            caption + structured content of each row

Stored latents are already multiplied by ``scaling_factor`` (unit variance on train); divide by
it before ``vae.decode``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from transfusion.errors import DataError
from transfusion.data.prepare import ImageSplit
from transfusion.data.shards import check_shards, iter_shards, num_shards, write_shards
from transfusion.data.sources import SPLITS
from transfusion.io import atomic_dir

META = "meta.json"
KEY = "latents"


def scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the (train) latents, so that scaled latents have unit variance."""
    return float(1.0 / latents.float().std())


def encode_splits(vae, splits: dict[str, ImageSplit], batch_size: int) -> dict[str, torch.Tensor]:
    from transfusion.vae import encode

    return {s: encode(vae, splits[s].images, batch_size) for s in SPLITS}


def save_latents(
    root: Path, raw: dict[str, torch.Tensor], splits: dict[str, ImageSplit], vae_path: Path, shard_size: int
) -> dict:
    """Scale the raw latents by the train split's factor and write shards + ``meta.json``."""
    scale = scaling_factor(raw["train"])
    meta = {
        "scaling_factor": scale,
        "latent_shape": list(raw["train"].shape[1:]),
        "raw_mean": float(raw["train"].mean()),
        "raw_std": float(raw["train"].std()),
        "vae": str(vae_path),
        "splits": {s: len(raw[s]) for s in SPLITS},
        "shard_size": shard_size,
    }
    with atomic_dir(root) as tmp:
        for s in SPLITS:
            records = [{k: v for k, v in r.items() if k not in ("shard", "row")} for r in splits[s].records]
            write_shards(tmp / s, KEY, (raw[s] * scale).numpy().astype(np.float32), records, shard_size)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_meta(root: Path) -> dict:
    path = Path(root) / META
    if not path.is_file():
        raise DataError(f"{path}: missing; run the latents stage first")
    return json.loads(path.read_text())


def check_latents(root: Path) -> None:
    """Every latent shard of every split checked against ``meta.json`` and the index from its
    header and size (``check_shards``) before training starts: a bad shard is named now, not when
    training reaches it hours later. Reads no latents."""
    meta = load_meta(root)
    for split, count in meta["splits"].items():
        rows = check_shards(Path(root) / split, KEY, list(meta["latent_shape"]))
        if rows != count:
            raise DataError(f"{Path(root) / split}: {rows} rows in its shards, {META} says {count}")


class LatentReader(torch.utils.data.IterableDataset):
    """Stream ``(latent, record)`` pairs of one split, one shard in memory at a time.

    ``rank``/``world_size`` give each data-parallel worker its own rows (every
    ``world_size``-th row); ``shuffle`` permutes shard order and rows within a shard per epoch;
    ``repeat`` cycles forever (epoch counter in the shuffle seed).
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
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.repeat = shuffle, seed, repeat
        self.n_shards = num_shards(self.folder)

    def __len__(self) -> int:
        total = self.meta["splits"][self.folder.name]
        return len(range(self.rank, total, self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        epoch = 0
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.n_shards) if self.shuffle else np.arange(self.n_shards)
            yield from self._epoch(order.tolist(), rng)
            epoch += 1
            if not self.repeat:
                return

    def _epoch(self, order: list[int], rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, dict]]:
        for array, recs in iter_shards(self.folder, KEY, order):
            size = self.meta["shard_size"]
            rows = [i for i, r in enumerate(recs) if (r["shard"] * size + r["row"]) % self.world_size == self.rank]
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
            for i in rows:
                yield torch.from_numpy(array[i]), recs[i]

