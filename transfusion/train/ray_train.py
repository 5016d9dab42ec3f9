"""Ray Train around the plain loop: ``TorchTrainer`` runs ``train_loop`` on every worker.

The only module that imports ray. One machine: Ray is started here, quietly (no usage stats, no
dashboard), with its temp files under ``paths.runs``. A cluster: ``train.address``, ``--address``
or ``RAY_ADDRESS`` (what ``ray job submit`` sets) connect to it instead. Worker failures are
retried ``train.max_failures`` times; the loop resumes each retry from the newest checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from transfusion import env
from transfusion.train.loop import LoopConfig, Runtime, TrainingFailed, train_loop

env.apply()  # before ray is imported: no usage stats, Train V2


class RayRuntime(Runtime):
    """Rank, world and device from the Ray Train context; DDP through ``prepare_model``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, module):
        import ray.train.torch

        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True})


def _worker(config: dict) -> dict:
    """What each Ray worker runs; rank 0's return value reaches the driver as
    ``Result.return_value`` (Train V2 fills ``Result.metrics`` only for reported checkpoints)."""
    return train_loop(config, RayRuntime())


def ensure_ray(address: str | None, temp_dir: Path, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a quiet local Ray; reuse if running."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    temp_dir = short_temp_dir(Path(temp_dir))
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=num_cpus,
        _temp_dir=str(temp_dir),
        configure_logging=True,
        logging_level="warning",
        # Ray's own actors log at ERROR only (Train's placement-group monitor warns every few
        # seconds when the state API is not served); our workers' progress lines are prints.
        logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
        log_to_driver=True,
    )


def short_temp_dir(wanted: Path, limit: int = 48) -> Path:
    """``wanted`` if short enough, else a stable short folder in the system temp dir: Ray puts
    unix sockets under its temp dir, and socket paths may not exceed 107 bytes."""
    import hashlib
    import tempfile

    wanted = wanted.resolve()
    if len(str(wanted)) <= limit:
        return wanted
    tag = hashlib.sha1(str(wanted).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"ray-{tag}"


def fit_on_ray(config: LoopConfig, address: str | None = None) -> dict:
    """Run the loop on ``train.num_workers`` Ray workers; returns rank 0's final metrics (its
    return value) with Ray's own overhead added."""
    import time

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    paths, tc = config.paths, config.train
    cpus = tc.num_workers * tc.cpus_per_worker
    started = time.perf_counter()
    ensure_ray(address or tc.address, paths.runs / "ray", num_cpus=max(cpus, os.cpu_count() or 1))
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="transfusion-train",
            storage_path=str((paths.runs / "ray_results").resolve()),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # TrainingFailedError wraps the worker's exception
        cause = _root_cause(err)
        raise TrainingFailed(f"training failed on a Ray worker: {cause}") from None
    metrics = dict(result.return_value)
    # what Ray adds around the loop: starting (or joining) Ray, the workers, their process group
    metrics["ray_overhead_s"] = time.perf_counter() - started - metrics["wall_s"] - metrics["setup_s"]
    return metrics


def _root_cause(err: BaseException) -> str:
    text = str(err)
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and ("Error" in line or "error" in line or "Diverged" in line):
            return line
    return text.splitlines()[-1] if text else type(err).__name__
