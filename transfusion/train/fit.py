"""One entry to training: the plain loop in this process or on Ray workers (``train.use_ray``),
then the finished run read back from its final checkpoint."""

from __future__ import annotations

from transfusion.train.loop import TrainResult, load_trained, train_loop
from transfusion.train.run import TrainRun


def fit(config: TrainRun, address: str | None = None) -> TrainResult:
    """Train per ``config``; ``address``: a Ray cluster (default ``train.address`` / RAY_ADDRESS).
    Every latent shard is checked (header and size) before anything starts."""
    from transfusion.data.latents import check_latents

    check_latents(config.paths.latents)
    if config.train.use_ray:
        from transfusion.train.ray_train import fit_on_ray

        metrics = fit_on_ray(config, address)
    else:
        metrics = train_loop(config)
    return load_trained(config, metrics)
