"""DVC stage ``vae``: train diffusers' AutoencoderKL on the scene images (or take the team's own,
``vae.pretrained``); report reconstruction PSNR on the test split and the latent scaling factor."""

from __future__ import annotations

import numpy as np

from transfusion.config import Params

PSNR_IMAGES = 2000  # images per split that the PSNR is measured on (a streamed split can be huge)


def _train(params: Params, run):
    """A fresh AutoencoderKL trained on the train split; returns it and its logged curve."""
    from tqdm import tqdm

    from transfusion.data.prepare import load_image_split
    from transfusion.vae import build_vae, train_vae

    cfg = params.vae
    train = load_image_split(params.paths.scenes, "train")
    vae = build_vae(cfg, image_size=train.images.shape[1])
    bar = tqdm(total=cfg.steps, desc="vae", unit="step", mininterval=2.0)

    def on_log(entry) -> None:
        bar.update(entry.step - bar.n)
        bar.set_postfix(loss=f"{entry.loss:.4f}", mse=f"{entry.mse:.4f}")
        run.log_metrics({"loss": entry.loss, "mse": entry.mse, "kl": entry.kl, "lr": entry.lr}, step=entry.step)

    history = train_vae(vae, train.images, cfg, on_log=on_log)
    bar.close()
    return vae, history


def run(params: Params) -> dict[str, float]:
    from transfusion import tracking
    from transfusion.data.prepare import load_image_split
    from transfusion.images import render_grid
    from transfusion.io import atomic_dir, atomic_file, write_json
    from transfusion.vae import computed_scaling_factor, load_pretrained, psnr, reconstruct

    paths, cfg = params.paths, params.vae
    test = load_image_split(paths.scenes, "test", PSNR_IMAGES)
    with tracking.stage_run(params, "vae") as run:
        if cfg.pretrained is None:
            vae, history = _train(params, run)
        else:
            vae, history = load_pretrained(cfg, params.data.scenes.canvas), []
        recon = reconstruct(vae, test.images)
        train = load_image_split(paths.scenes, "train", PSNR_IMAGES).images
        metrics = {
            "test_psnr": psnr(test.images, recon),
            "train_psnr": psnr(train, reconstruct(vae, train)),
            "parameters": sum(p.numel() for p in vae.parameters()),
            "pretrained": float(cfg.pretrained is not None),
            "scaling_factor_computed": computed_scaling_factor(vae, train),  # the latents stage's, on these images
        } | ({"final_loss": history[-1].loss} if history else {})
        if cfg.pretrained is not None and getattr(vae.config, "scaling_factor", None) is not None:
            metrics["scaling_factor_config"] = float(vae.config.scaling_factor)
        with atomic_dir(paths.vae) as tmp:
            vae.save_pretrained(str(tmp), safe_serialization=True)
        with atomic_file(paths.vae_loss_plot) as fh:
            fh.write("step,loss,mse,kl\n")
            fh.writelines(f"{e.step},{e.loss:.6f},{e.mse:.6f},{e.kl:.6f}\n" for e in history)
        n = min(cfg.n_reconstructions, len(test.images))
        pairs = np.stack([test.images[:n], recon[:n]], axis=1).reshape(-1, *test.images.shape[1:])
        render_grid(pairs, [s for i in range(n) for s in ("real", "reconstruction")], paths.vae_reconstructions, cols=8)
        write_json(paths.vae_metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(paths.vae_reconstructions)
        run.log_artifact(paths.vae_loss_plot)
    return metrics
