"""DVC stage ``latents``: every data shard encoded by the VAE on Ray Data actors into a latent
shard (locally or at ``latents.storage``), the train split's scaling factor, and a check that
decoding what was written gives the test images back."""

from __future__ import annotations

from transfusion.config import Params

CHECK_IMAGES = 2000  # test images decoded back from the written latents


def run(params: Params) -> dict[str, float]:
    import time
    from itertools import islice

    import torch

    from transfusion import tracking
    from transfusion.data.latents import LatentReader, fingerprint, finish, shard_tasks, work_location
    from transfusion.data.prepare import load_image_split
    from transfusion.io import write_json
    from transfusion.latents_ray import encode_on_ray
    from transfusion.vae import decode, load_vae, psnr

    paths, cfg = params.paths, params.latents
    location = work_location(cfg.storage, paths.runs.resolve(), fingerprint(paths.scenes, paths.vae))
    with tracking.stage_run(params, "latents") as run:
        start = time.perf_counter()
        results = encode_on_ray(paths.vae, paths.scenes, location, cfg, shard_tasks(paths.scenes), paths.runs)
        wall = time.perf_counter() - start
        meta = finish(paths.latents, paths.scenes, paths.vae, location, results)

        test = load_image_split(paths.scenes, "test", CHECK_IMAGES)
        stored = torch.stack([z for z, _ in islice(LatentReader(paths.latents, "test"), len(test.images))])
        encoded = [r for r in results if r["encoded"]]
        metrics = {
            "scaling_factor": meta["scaling_factor"],
            "scaled_train_mean": meta["raw_mean"] * meta["scaling_factor"],
            "scaled_test_std": float(stored.std()),  # through the reader: unit variance carries to held-out images
            "images": sum(meta["splits"].values()),
            "shards_encoded": len(encoded),
            "shards_resumed": len(results) - len(encoded),
            "workers": cfg.workers,
            "wall_s": wall,  # Ray and the actors' start included
            "images_per_s": sum(r["rows"] for r in encoded) / wall,
            # decode what was written, read back through the reader training uses
            "decode_test_psnr": psnr(test.images, decode(load_vae(paths.vae), stored / meta["scaling_factor"])),
        }
        write_json(paths.latents_metrics, metrics)
        run.log_metrics(metrics)
    return metrics
