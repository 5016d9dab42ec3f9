"""The model registry: each pipeline run's model (what ``eval`` scored) logged as an MLflow pyfunc
model on the parent run (the pipeline folder as its data, loaded by ``transfusion.serving``: no
pickle) and registered under ``tracking.registered_model``, one version per pipeline run, so
``models:/transfusion@latest`` (MLflow's reserved alias: the highest version) is the newest
pipeline run's model. :func:`promote` moves ``champion`` by comparing the parents' eval metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transfusion.errors import BadInput, MissingInput
from transfusion.io import MANIFEST, sha256_of

WEIGHTS_TAG, RUN_TAG = "weights_sha256", "pipeline_run"


def register(mlflow, client, name: str, parent: str, folder: Path, description: str = "") -> str:
    """A new version of ``name`` for the pipeline run ``parent`` (MLflow's reserved alias
    ``latest`` is always the highest version: this one). Weights registered before (same
    manifest sha256) are not uploaded again: the version points at their logged model."""
    weights = sha256_of(Path(folder) / MANIFEST)
    same = [v for v in _versions(client, name) if v.tags.get(WEIGHTS_TAG) == weights]
    tags = {WEIGHTS_TAG: weights, RUN_TAG: parent}
    if same:
        old = same[0]
        version = client.create_model_version(
            name, old.source, run_id=parent, tags=tags, model_id=getattr(old, "model_id", None)
        ).version
    else:
        with mlflow.start_run(run_id=parent):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module="transfusion.serving",
                data_path=str(folder),
                pip_requirements=["transfusion"],
                registered_model_name=name,
            )
        version = str(info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, str(version), description=description)
    client.set_tag(parent, "model_version", f"{name}/{version}")
    return str(version)


def _versions(client, name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return []
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def promote(client, name: str, metric: str, higher: bool, run: str | None = None, z: float = 2.0) -> dict[str, Any]:
    """Alias ``champion`` to the version of ``run`` (a parent run id or name; None: the best
    version) when its ``metric`` beats the current champion's by more than ``z`` standard errors
    of the gap (``<metric>_se`` on both runs; a gap under two of them is noise), or there is none."""
    versions = _versions(client, name)
    if not versions:
        raise MissingInput(f"registered model {name!r}: no versions (a `dvc repro` registers one)")
    runs = {v.version: _pipeline_run(client, v) for v in versions}
    scored = [(v, _score(runs[v.version], metric)) for v in versions]
    if run is not None:
        scored = [(v, s) for v, s in scored if run in (runs[v.version].info.run_id, runs[v.version].info.run_name)]
        if not scored:
            raise MissingInput(f"--run {run}: no version of {name!r} was registered by that run")
    scored = [(v, s) for v, s in scored if s[0] is not None]
    if not scored:
        raise BadInput(f"--metric {metric}: no registered version's run has this metric")
    sign = 1.0 if higher else -1.0
    candidate, (score, se) = max(scored, key=lambda vs: sign * vs[1][0])
    current = _alias(client, name, "champion")
    held, held_se = _score(_pipeline_run(client, current), metric) if current else (None, None)
    needed = z * math.hypot(se, held_se) if se is not None and held_se is not None else 0.0
    promoted = held is None or sign * (score - held) > needed
    if promoted:
        client.set_registered_model_alias(name, "champion", candidate.version)
    return {
        "promoted": promoted,
        "candidate": str(candidate.version),
        "score": score,
        "needed": needed,
        "champion": str(candidate.version if promoted else current.version),
        "champion_score": score if promoted else held,
    }


def _pipeline_run(client, version):
    """The pipeline run (parent) that registered ``version``."""
    return client.get_run(version.tags.get(RUN_TAG, version.run_id))


def _score(run, metric: str) -> tuple[float | None, float | None]:
    """(metric, its standard error or None) on a pipeline run."""
    return run.data.metrics.get(metric), run.data.metrics.get(f"{metric}_se")


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
