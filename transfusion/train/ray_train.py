"""Ray Train around the plain loop: ``TorchTrainer`` runs ``train_loop`` on every worker.

The only module that imports ray. One machine: Ray is started here, quietly (no usage stats, no
dashboard server; Ray's per-node agent, ``ray::DashboardAgent``, runs in any Ray: it serves
metrics and runtime environments), with its temp files under ``paths.runs``. A cluster: ``train.address``, ``--address``
or ``RAY_ADDRESS`` (what ``ray job submit`` sets) connect to it instead.

Checkpoints go through Ray Train: rank 0 stages each one and reports it with
``ray.train.report(checkpoint=...)``; the upload puts it into the run's checkpoint store
(``paths.checkpoints``, or ``<train.storage>/checkpoints`` on a cluster). Worker failures are
retried ``train.max_failures`` times, and a restarted worker, on any node, resumes from
``ray.train.get_checkpoint()``. A divergence (NaN) is not a worker fault: it is not retried and
ends the run with its one line.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from transfusion import env
from transfusion.ray_session import ensure_ray
from transfusion.train.loop import Runtime, TrainingDiverged, TrainingFailed, train_loop
from transfusion.train.run import TrainRun

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

        # gradients as views into DDP's all-reduce buckets: no second copy of them (plan.py)
        ddp = {"find_unused_parameters": True, "gradient_as_bucket_view": True}
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp)

    def restored(self) -> str | None:
        """The newest checkpoint reported in this run, which Ray hands a restarted worker."""
        import ray.train

        found = ray.train.get_checkpoint()
        return PurePosixPath(found.path).name if found is not None else None

    def commit(self, store, staged: Path | None, step: int) -> None:
        """Every rank reports (a barrier); rank 0's staged checkpoint is uploaded into the store."""
        import ray.train

        from transfusion.train.checkpoint import checkpoint_name

        def upload(checkpoint, name: str):
            return ray.train.Checkpoint(store.commit(Path(checkpoint.path)), filesystem=store.store.fs)

        ray.train.report(
            {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(str(staged)) if staged is not None else None,
            checkpoint_dir_name=checkpoint_name(step),
            checkpoint_upload_fn=upload,
            delete_local_checkpoint_after_upload=False,
        )


def _worker(config: dict) -> dict:
    """What each Ray worker runs; rank 0's return value reaches the driver as
    ``Result.return_value`` (Train V2 fills ``Result.metrics`` only for reported checkpoints).
    A divergence comes back as a value, so that Ray does not retry it."""
    cfg = TrainRun.model_validate(config)
    if cfg.train.storage:  # a cluster: the inputs come from storage, scratch is this node's
        from transfusion.train.inputs import fetch

        cfg = cfg.model_copy(update={"paths": fetch(cfg.paths, cfg.train.storage)})
    try:
        return train_loop(cfg, RayRuntime())
    except TrainingDiverged as err:
        return {"diverged": str(err)}


def fit_on_ray(config: TrainRun, address: str | None = None) -> dict:
    """Run the loop on ``train.num_workers`` Ray workers; returns rank 0's final metrics (its
    return value) with Ray's own overhead added."""
    import time

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    paths, tc = config.paths, config.train
    cpus = tc.num_workers * tc.cpus_per_worker
    started = time.perf_counter()
    if tc.storage:
        from transfusion.train.inputs import publish

        publish(paths, tc.storage)
    # Ray Train's run folder is the checkpoint store itself (Ray accepts only checkpoints inside
    # its run folder); its state from an earlier fit there is dropped: resuming is the loop's
    config.store.forget_runtime_state()
    store = config.store.store
    parent, name = store.root.rstrip("/").rsplit("/", 1)
    ensure_ray(address or tc.address, paths.runs / "ray", num_cpus=max(cpus, os.cpu_count() or 1))
    config = config.model_copy(update={"tracking_uri": worker_tracking_uri(config.tracking_uri)})
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=store.fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    try:
        result = _fit_interruptibly(trainer)
    except Exception as err:  # TrainingFailedError wraps the worker's exception
        cause = _root_cause(err)
        raise TrainingFailed(f"training failed on a Ray worker (after {tc.max_failures} restarts): {cause}") from None
    metrics = dict(result.return_value)
    if "diverged" in metrics:
        raise TrainingDiverged(metrics["diverged"])
    # what Ray adds around the loop: starting (or joining) Ray, the workers, their process group
    metrics["ray_overhead_s"] = time.perf_counter() - started - metrics["wall_s"] - metrics["setup_s"]
    return metrics


def _fit_interruptibly(trainer):
    """``trainer.fit()`` with Ctrl-C as a ``KeyboardInterrupt`` here. Ray Train's own SIGINT
    handler (installed when ``fit`` runs in the main thread) aborts the run and then exits the
    process with status 1; in a helper thread it installs none, and the interrupt reaches this
    thread, which stops Ray -- the run's controller and workers belong to this driver -- and
    re-raises, so the stage marks the MLflow run KILLED and the CLI exits 130."""
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        import ray

        ray.shutdown()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def worker_tracking_uri(uri: str | None, nodes: int | None = None, node_ip: str | None = None) -> str | None:
    """The tracking URI as rank 0 must see it: a tracking server this driver names by loopback
    (``http://127.0.0.1:5000``) is this node's address on a multi-node cluster (start the server
    with ``--host 0.0.0.0``); on one node, and for any other URI, unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    if not uri or not uri.startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return uri
    if nodes is None or node_ip is None:
        import ray

        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        node_ip = ray.util.get_node_ip_address()
    if nodes <= 1:
        return uri
    netloc = node_ip + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _root_cause(err: BaseException) -> str:
    """One short line for a failed Ray Train run: the lowest failing rank and its exception
    (Ray's own message spans pages: tracebacks of every attempt)."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        return f"rank {rank}: {_describe(failures[rank])}"
    controller = getattr(err, "controller_failure", None)
    return _describe(controller if controller is not None else err)


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause, at most 300 characters."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 300 else text[:297] + "..."
