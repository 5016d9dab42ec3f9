"""Ray Train around the plain align loop: ``TorchTrainer`` runs ``align_loop`` on one worker.

The same machinery as training (``transfusion.train.ray_train``): Ray started quietly here or
joined (``address`` / RAY_ADDRESS), checkpoints reported with ``ray.train.report`` and stored in
the run's store (``paths.align_checkpoints``), a failed worker restarted ``align.max_failures``
times from ``ray.train.get_checkpoint()`` -- and, since iteration i's prompts and noise come from
``(align.seed, i)``, the restarted run repeats the rewards an uninterrupted one gets. Ctrl-C
stops Ray and reaches the stage as a KeyboardInterrupt (the MLflow run is marked KILLED).
"""

from __future__ import annotations

import os

from transfusion import env
from transfusion.align_loop import AlignRun, align_loop
from transfusion.train import ray_train
from transfusion.train.loop import TrainingFailed
from transfusion.train.ray_train import RayRuntime, ensure_ray, worker_tracking_uri

env.apply()  # before ray is imported: no usage stats, Train V2


def _worker(config: dict) -> dict:
    """What the Ray worker runs; its return value reaches the driver as ``Result.return_value``."""
    return {"rows": align_loop(AlignRun.model_validate(config), RayRuntime())}


def align_on_ray(run: AlignRun, address: str | None = None) -> list[dict]:
    """The align loop on one Ray Train worker; returns its rows."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = run.align
    run.store.forget_runtime_state()  # Ray's run folder is the store; resuming is the loop's
    parent, name = run.store.store.root.rstrip("/").rsplit("/", 1)
    ensure_ray(address, run.paths.runs / "ray", num_cpus=max(cfg.cpus_per_worker, os.cpu_count() or 1))
    run = run.model_copy(update={"tracking_uri": worker_tracking_uri(run.tracking_uri)})
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config=run.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=run.store.store.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    try:
        result = ray_train._fit_interruptibly(trainer)  # the same Ctrl-C handling as training
    except Exception as err:  # TrainingFailedError wraps the worker's exception
        cause = ray_train._root_cause(err)
        raise TrainingFailed(f"align failed on a Ray worker (after {cfg.max_failures} restarts): {cause}") from None
    return list(result.return_value["rows"])
