"""Starting or joining Ray, once per process: the one place where ``ray.init`` is called (Ray Train
in ``transfusion.train.ray_train``, Ray Data in ``transfusion.latents_ray``).

One machine: a quiet local Ray (no usage stats, no dashboard server) with its temp files under
the pipeline's ``paths.runs``. A cluster: an address (params, ``--address`` or ``RAY_ADDRESS``,
which ``ray job submit`` sets) connects to it instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from transfusion import env, stopping

env.apply()  # before ray is imported: no usage stats, Train V2


def ensure_ray(address: str | None, temp_dir: Path, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a quiet local Ray; reuse if running."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        temp_dir = short_temp_dir(Path(temp_dir))
        temp_dir.mkdir(parents=True, exist_ok=True)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=str(temp_dir),
            configure_logging=True,
            logging_level="warning",
            # Ray's own actors log at ERROR only (Train's placement-group monitor warns every few
            # seconds when the state API is not served); our workers' progress lines are prints.
            logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"),
            log_to_driver=True,
        )
    stopping.reinstall()  # ray.init's native SIGTERM handler dumps a stack and exits 134


def short_temp_dir(wanted: Path, limit: int = 36) -> Path:
    """``wanted`` if short enough, else a stable short folder in the system temp dir: Ray puts
    unix sockets under its temp dir, and socket paths may not exceed 107 bytes (Ray adds up to
    ~64: ``/session_<date>_<time>_<us>_<pid>/sockets/plasma_store``)."""
    import hashlib
    import tempfile

    wanted = wanted.resolve()
    if len(str(wanted)) <= limit:
        return wanted
    tag = hashlib.sha1(str(wanted).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"ray-{tag}"
