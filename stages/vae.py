"""DVC stage ``vae``: train diffusers' AutoencoderKL on the scene images; report test PSNR."""

from __future__ import annotations

import numpy as np

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    from tqdm import tqdm

    from transfusion import tracking
    from transfusion.data.prepare import load_image_split
    from transfusion.images import render_grid
    from transfusion.io import atomic_dir, atomic_file, write_json
    from transfusion.vae import build_vae, psnr, reconstruct, train_vae

    paths, cfg = params.paths, params.vae
    train = load_image_split(paths.scenes, "train")
    test = load_image_split(paths.scenes, "test")
    with tracking.stage_run(params, "vae") as run:
        vae = build_vae(cfg, image_size=train.images.shape[1])
        bar = tqdm(total=cfg.steps, desc="vae", unit="step", mininterval=2.0)

        def on_log(entry) -> None:
            bar.update(entry.step - bar.n)
            bar.set_postfix(loss=f"{entry.loss:.4f}", mse=f"{entry.mse:.4f}")
            run.log_metrics({"loss": entry.loss, "mse": entry.mse, "kl": entry.kl, "lr": entry.lr}, step=entry.step)

        history = train_vae(vae, train.images, cfg, on_log=on_log)
        bar.close()

        recon = reconstruct(vae, test.images)
        metrics = {
            "test_psnr": psnr(test.images, recon),
            "train_psnr": psnr(train.images[:2000], reconstruct(vae, train.images[:2000])),
            "final_loss": history[-1].loss,
            "parameters": sum(p.numel() for p in vae.parameters()),
        }
        with atomic_dir(paths.vae) as tmp:
            vae.save_pretrained(str(tmp), safe_serialization=True)
        with atomic_file(paths.vae_loss_plot) as fh:
            fh.write("step,loss,mse,kl\n")
            fh.writelines(f"{e.step},{e.loss:.6f},{e.mse:.6f},{e.kl:.6f}\n" for e in history)
        n = cfg.n_reconstructions
        pairs = np.stack([test.images[:n], recon[:n]], axis=1).reshape(-1, *test.images.shape[1:])
        render_grid(pairs, [s for i in range(n) for s in ("real", "reconstruction")], paths.vae_reconstructions, cols=8)
        write_json(paths.vae_metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(paths.vae_reconstructions)
        run.log_artifact(paths.vae_loss_plot)
    return metrics
