"""The MLflow store: which tracking URI, which experiment (created as a model-training one), and a
client on it. The other tracking modules open runs, parents and registered models through here."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transfusion import env
from transfusion.config import TrackingConfig
from transfusion.errors import MissingInput

env.apply()

SQLITE = "sqlite:///"
# MLflow 3's UI opens an experiment on its GenAI overview unless this tag says it trains models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(cfg: TrackingConfig) -> str:
    """``$MLFLOW_TRACKING_URI`` or the params' URI; a relative sqlite path made absolute, so
    that processes started elsewhere (Ray workers) write to the same database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    db = sqlite_path(uri)
    return SQLITE + str(db.resolve()) if db is not None and not db.is_absolute() else uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len(SQLITE) :]) if uri.startswith(SQLITE) else None


def use(mlflow, uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect of exporting MLFLOW_TRACKING_URI
    (which would make the next run in this process ignore its own params)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def existing(uri: str, what: str) -> str:
    """``uri``, checked to be readable: a sqlite file that is not there is an error (a typo),
    never a new empty database."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise MissingInput(
            f"{what}: no tracking database there ({uri}; a typo? runs are tracked in tracking.tracking_uri)"
        )
    return uri


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
def first_use_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, an inter-process lock beside the database: MLflow creates the schema
    on first use, and two stages starting at once on a fresh file would both try
    (``duplicate column name``); ``dvc queue start -j 2`` on a fresh clone does exactly that.
    Also held while a pipeline's parent run is looked up or created."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        yield


def experiment_id(mlflow, cfg: TrackingConfig, uri: str) -> str:
    """The experiment's id, created if new; tagged as model training (also one an older version
    of this project created), so that the UI opens on its runs."""
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(
            cfg.experiment, artifact_location=artifact_location(cfg, uri), tags=dict([EXPERIMENT_KIND])
        )
        return exp_id
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def open_store(cfg: TrackingConfig):
    """(mlflow, client, experiment id) on the params' store, the experiment created if new."""
    import mlflow

    uri = tracking_uri(cfg)
    use(mlflow, uri)
    with first_use_lock(uri):  # a fresh sqlite file: one process creates the schema and experiment
        exp_id = experiment_id(mlflow, cfg, uri)
    return mlflow, mlflow.MlflowClient(uri), exp_id


def read_store(cfg: TrackingConfig):
    """(mlflow, client, experiment or None) on an existing store, for reading."""
    import mlflow

    uri = existing(tracking_uri(cfg), "runs")
    use(mlflow, uri)
    return mlflow, mlflow.MlflowClient(uri), mlflow.get_experiment_by_name(cfg.experiment)


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Params into a run, as text, in MLflow's batches of at most 100."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Metrics into a run at ``step``, in one batch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
