"""Stage runs: each stage run is one MLflow run in the experiment named by ``tracking.experiment``;
its name is the stage; its tags carry the git commit (and whether the tree was dirty), the DVC
stage and the params hash; its inputs are MLflow datasets; under DVC it nests in its pipeline
run's parent (:mod:`transfusion.tracking.parents`). The tracking URI is ``$MLFLOW_TRACKING_URI``
when set, else ``tracking.tracking_uri`` (``sqlite:///mlflow.db``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transfusion import env
from transfusion.config import Params, TrackingConfig
from transfusion.errors import BadInput, MissingInput, UserError
from transfusion.lineage import flatten
from transfusion.tracking import parents
from transfusion.tracking.store import existing, log_metrics, log_params, open_store, read_store, use

env.apply()


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
        log_metrics(self.client, self.run_id, metrics, step or 0)

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


TRAINING_STAGES = {"vae", "train", "judge", "reader", "align"}  # system metrics on these runs


@contextmanager
def stage_run(params: Params, stage: str, run_id: str | None = None) -> Iterator[StageRun]:
    """Open (or, with ``run_id``, resume) the MLflow run of ``stage`` with params, lineage tags
    and input datasets, nested under its pipeline run's parent when DVC runs it; the parent gets
    the stage's end status."""
    mlflow, client, exp_id = open_store(params.tracking)
    parent = parents.open_parent(client, exp_id, params)
    tags = parents.run_tags(params) | {"dvc_stage": stage, parents.ROLE_TAG: "stage"}
    if parent is not None:
        tags[parents.PARENT_TAG] = parent
    system = params.tracking.system_metrics and stage in TRAINING_STAGES
    if system:
        mlflow.set_system_metrics_sampling_interval(params.tracking.system_metrics_interval_s)
    status = "FAILED"
    try:
        with mlflow.start_run(
            run_id=run_id,
            experiment_id=None if run_id else exp_id,
            run_name=stage,
            tags=tags,
            log_system_metrics=system,
        ) as run:
            if run_id is None:
                log_params(client, run.info.run_id, flatten(params.model_dump(mode="json")))
                parents.log_inputs(mlflow, [stage], params)
            try:
                yield StageRun(client.tracking_uri, run)
            except KeyboardInterrupt:  # stopped by the user, not failed
                status = "KILLED"
                mlflow.end_run(status)
                raise
        status = "FINISHED"
    finally:
        if parent is not None:
            client.set_terminated(parent, status)


def find_runs(cfg: TrackingConfig, stage: str | None = None) -> list[dict[str, Any]]:
    """Runs of the experiment (newest first) as plain dicts: id, name, status, metrics, tags.
    Reads only: a sqlite database that is not there is an error, not a new empty database."""
    if stage is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", stage):  # it goes into a filter string
        raise BadInput(f"--stage {stage!r}: a stage name is letters, digits, '_', '-' or '.'")
    _, client, exp = read_store(cfg)
    if exp is None:
        return []
    query = f"tags.dvc_stage = '{stage}'" if stage else ""
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
    if stage:  # the stage's own runs, not the markers of pipeline runs in which DVC skipped it
        runs = [r for r in runs if r.data.tags.get(parents.ROLE_TAG) != "cached"]
    return [as_dict(r) for r in runs]


def as_dict(r) -> dict[str, Any]:
    """An MLflow run as a plain dict: id, name, status, metrics, tags, params, artifact URI."""
    return {
        "run_id": r.info.run_id,
        "name": r.info.run_name,
        "status": r.info.status,
        "metrics": dict(r.data.metrics),
        "tags": dict(r.data.tags),
        "params": dict(r.data.params),
        "artifact_uri": r.info.artifact_uri,
    }


def download_artifacts(uri: str, tracking_uri_: str) -> Path:
    """A local copy of an MLflow artifact URI (``runs:/<id>/model``, ``models:/<name>@<alias>``
    ...) from the tracking server or database at ``tracking_uri_`` (see :func:`tracking_uri`);
    for a registered pyfunc model, the pipeline folder inside it."""
    import mlflow

    use(mlflow, existing(tracking_uri_, uri))  # read only: never a new empty database
    try:
        return pipeline_folder(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)))
    except Exception as err:  # MlflowException and friends
        if isinstance(err, UserError):
            raise
        raise MissingInput(f"{uri}: cannot fetch this MLflow artifact ({str(err).splitlines()[0]})") from None


MLMODEL = "MLmodel"


def pipeline_folder(model_dir: Path) -> Path:
    """The pipeline folder inside a downloaded MLflow model (``MLmodel``'s pyfunc ``data``, as
    :mod:`transfusion.tracking.registry` logs it), or ``model_dir`` itself when it is a plain
    exported folder (``runs:/<id>/model``)."""
    import yaml

    mlmodel = Path(model_dir) / MLMODEL
    if not mlmodel.is_file():
        return Path(model_dir)
    try:
        data = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]["data"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise BadInput(f"{mlmodel}: not a transfusion MLflow model (no python_function data folder)") from None
    return Path(model_dir) / data
