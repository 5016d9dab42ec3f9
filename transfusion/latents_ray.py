"""Ray Data around ``encode_shard``: the data shards as a dataset, ``map_batches`` on a pool of
``latents.workers`` encoder actors (one GPU each with ``latents.use_gpu``), each loading the VAE
once and writing its shards straight to their location (a local folder or a storage URI).

On one machine this starts a local Ray (``transfusion.ray_session``); on a cluster the same code
runs against ``latents.address`` or ``RAY_ADDRESS``. Ray Data draws its progress bar on stderr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transfusion.config import LatentsConfig
from transfusion.ray_session import ensure_ray


class ShardEncoder:
    """One Ray Data actor: the VAE loaded once, then one data shard per call."""

    def __init__(self, vae_path: str, scenes: str, location: str, batch_size: int, threads: int) -> None:
        import torch

        from transfusion.storage import Store
        from transfusion.vae import load_vae

        torch.set_num_threads(threads)
        self.vae = load_vae(Path(vae_path)).to("cuda" if torch.cuda.is_available() else "cpu")
        self.scenes, self.store, self.batch_size = Path(scenes), Store(location), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from transfusion.data.latents import encode_shard

        out = [
            encode_shard(self.vae, self.scenes, str(split), int(shard), self.store, self.batch_size)
            for split, shard in zip(batch["split"], batch["shard"])
        ]
        return {key: np.array([row[key] for row in out]) for key in out[0]}


def encode_on_ray(
    vae_path: Path, scenes: Path, location: str, cfg: LatentsConfig, tasks: list[tuple[str, int]], runs: Path
) -> list[dict]:
    """``encode_shard`` for every task on Ray Data actors; their results, one dict per shard."""
    import ray

    ensure_ray(cfg.address, Path(runs) / "ray", num_cpus=None)
    items = [{"split": split, "shard": shard} for split, shard in tasks]
    results = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            ShardEncoder,
            fn_constructor_kwargs={
                "vae_path": str(Path(vae_path).resolve()),
                "scenes": str(Path(scenes).resolve()),
                "location": location,
                "batch_size": cfg.batch_size,
                "threads": cfg.cpus_per_worker,
            },
            batch_size=1,
            concurrency=cfg.workers,
            num_cpus=cfg.cpus_per_worker,
            num_gpus=1 if cfg.use_gpu else 0,
        )
        .take_all()
    )
    return [{k: v.item() if hasattr(v, "item") else v for k, v in row.items()} for row in results]
