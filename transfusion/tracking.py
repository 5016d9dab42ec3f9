"""MLflow tracking: the only module of the library that imports mlflow.

Each stage run is one MLflow run in the experiment named by ``tracking.experiment``; its name is
the stage and its tags carry the git commit, the DVC stage and the params hash. The tracking URI
is ``$MLFLOW_TRACKING_URI`` when set, else ``tracking.tracking_uri`` (``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transfusion import env
from transfusion.config import Params, TrackingConfig
from transfusion.errors import BadInput, MissingInput

env.apply()


def tracking_uri(cfg: TrackingConfig) -> str:
    """``$MLFLOW_TRACKING_URI`` or the params' URI; a relative sqlite path made absolute, so
    that processes started elsewhere (Ray workers) write to the same database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    db = sqlite_path(uri)
    return SQLITE + str(db.resolve()) if db is not None and not db.is_absolute() else uri


SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len(SQLITE) :]) if uri.startswith(SQLITE) else None


def _use(mlflow, uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect of exporting MLFLOW_TRACKING_URI
    (which would make the next run in this process ignore its own params)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"vae": {"lr": 1e-3}}`` -> ``{"vae.lr": 1e-3}`` (lists and None as strings)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class NullLogger:
    """The logger interface, dropping everything: a run that tracks nothing (tests, a training
    loop started without an MLflow run)."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def last_step(self, key: str) -> int:
        """The highest step at which ``key`` was logged in this run (0: never)."""
        return 0


class RunLogger(NullLogger):
    """Logs into an existing MLflow run by id (no active run needed: a training worker)."""

    def __init__(self, tracking_uri_: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri_)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def last_step(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=0)


class StageRun(RunLogger):
    """The MLflow run of a stage (opened by :func:`stage_run`): a :class:`RunLogger` with its
    experiment and tags."""

    def __init__(self, tracking_uri_: str, run) -> None:
        super().__init__(tracking_uri_, run.info.run_id)
        self.experiment_id: str = run.info.experiment_id

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)


def artifact_location(cfg: TrackingConfig, uri: str) -> str | None:
    """Where a new experiment in the store at ``uri`` keeps its artifacts:

    - a URI (``s3://...``) as given;
    - a tracking server (``http(s)://``): None, the server's own ``--artifacts-destination``
      (artifacts travel through the server, so every machine reaches them); a local folder
      would exist on one machine only;
    - a local folder with a sqlite store: resolved beside the database file, so runs of a
      database elsewhere never write into the current folder; with any other store, against
      the current folder.
    """
    location = cfg.artifact_location
    if not location or "://" in location:
        return location or None
    if uri.startswith(("http://", "https://")):
        return None
    db = sqlite_path(uri)
    base = db.parent if db is not None else Path.cwd()
    return (base / location).resolve().as_uri()


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, an inter-process lock beside the database: MLflow creates the schema
    on first use, and two stages starting at once on a fresh file would both try
    (``duplicate column name``); ``dvc queue start -j 2`` on a fresh clone does exactly that."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        yield


def _experiment_id(mlflow, cfg: TrackingConfig, uri: str) -> str:
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg, uri))


@contextmanager
def stage_run(params: Params, stage: str, run_id: str | None = None) -> Iterator[StageRun]:
    """Open (or, with ``run_id``, resume) the MLflow run of ``stage`` with params and tags."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(params.tracking)
    _use(mlflow, uri)
    with _first_use_lock(uri):  # a fresh sqlite file: one process creates the schema and experiment
        exp_id = _experiment_id(mlflow, params.tracking, uri)
    tags = {"git_commit": git_commit(), "dvc_stage": stage, "params_hash": params.digest()}
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=stage, tags=tags) as run:
        if run_id is None:
            flat = flatten(params.model_dump(mode="json"))
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                mlflow.log_params(dict(items[i : i + 100]))
        try:
            yield StageRun(uri, run)
        except KeyboardInterrupt:  # stopped by the user, not failed
            mlflow.end_run("KILLED")
            raise


def find_runs(cfg: TrackingConfig, stage: str | None = None) -> list[dict[str, Any]]:
    """Runs of the experiment (newest first) as plain dicts: id, name, status, metrics, tags.
    Reads only: a sqlite database that is not there is an error, not a new empty database."""
    import mlflow

    if stage is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", stage):  # it goes into a filter string
        raise BadInput(f"--stage {stage!r}: a stage name is letters, digits, '_', '-' or '.'")
    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise MissingInput(f"{uri}: no tracking database there (a typo? runs are tracked in tracking.tracking_uri)")
    _use(mlflow, uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return []
    client = mlflow.MlflowClient()
    query = f"tags.dvc_stage = '{stage}'" if stage else ""
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "metrics": dict(r.data.metrics),
            "tags": dict(r.data.tags),
            "params": dict(r.data.params),
            "artifact_uri": r.info.artifact_uri,
        }
        for r in runs
    ]


def download_artifacts(uri: str, tracking_uri_: str) -> Path:
    """A local copy of an MLflow artifact URI (``runs:/<id>/model`` ...) from the tracking
    server or database at ``tracking_uri_`` (see :func:`tracking_uri`)."""
    import mlflow

    db = sqlite_path(tracking_uri_)
    if db is not None and not db.is_file():  # read only: never a new empty database
        raise MissingInput(f"{uri}: no tracking database at {tracking_uri_} to read it from")
    _use(mlflow, tracking_uri_)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:  # MlflowException and friends
        raise MissingInput(f"{uri}: cannot fetch this MLflow artifact ({str(err).splitlines()[0]})") from None
