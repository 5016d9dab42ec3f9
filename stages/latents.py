"""DVC stage ``latents``: encode every scene with the trained VAE, scale to unit variance,
write latent shards; check that decoding them gives the images back."""

from __future__ import annotations

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    import torch

    from transfusion import tracking
    from transfusion.data.latents import encode_splits, save_latents
    from transfusion.data.prepare import load_image_split
    from transfusion.data.shards import read_shards
    from transfusion.data.sources import SPLITS
    from transfusion.io import write_json
    from transfusion.vae import decode, load_vae, psnr

    paths, cfg = params.paths, params.latents
    vae = load_vae(paths.vae)
    splits = {s: load_image_split(paths.scenes, s) for s in SPLITS}
    with tracking.stage_run(params, "latents") as run:
        raw = encode_splits(vae, splits, cfg.batch_size)
        meta = save_latents(paths.latents, raw, splits, paths.vae, cfg.shard_size)
        scale = meta["scaling_factor"]
        stored, _ = read_shards(paths.latents / "test", "latents")
        scaled_train = raw["train"] * scale
        metrics = {
            "scaling_factor": scale,
            "scaled_train_std": float(scaled_train.std()),
            "scaled_train_mean": float(scaled_train.mean()),
            # decode what was written, read back from disk
            "decode_test_psnr": psnr(
                splits["test"].images, decode(vae, torch.from_numpy(stored) / scale, cfg.batch_size)
            ),
        }
        write_json(paths.latents_metrics, metrics)
        run.log_metrics(metrics)
    return metrics
