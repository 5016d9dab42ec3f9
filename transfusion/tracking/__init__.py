"""MLflow tracking: the only package of the library that imports mlflow.

- :mod:`.store`: the tracking URI and the experiment (a model-training one);
- :mod:`.runs`: one run per stage (:func:`stage_run`), loggers for the training loop, reading runs;
- :mod:`.parents`: one parent run per pipeline run, stage runs nested, lineage;
- :mod:`.registry`: the registered model: a version per pipeline run (``@latest``), ``@champion``.

This module holds the commands' entry points (``track``, ``promote``, ``runs --compare``).
"""

from __future__ import annotations

from typing import Any

from transfusion.config import Params, TrackingConfig
from transfusion.errors import BadInput, MissingInput
from transfusion.lineage import flatten
from transfusion.tracking import parents, registry
from transfusion.tracking.runs import (
    NullLogger,
    RunLogger,
    StageRun,
    as_dict,
    download_artifacts,
    find_runs,
    stage_run,
)
from transfusion.tracking.store import artifact_location, open_store, read_store, sqlite_path, tracking_uri

__all__ = [
    "NullLogger",
    "RunLogger",
    "StageRun",
    "artifact_location",
    "close_pipeline",
    "compare",
    "download_artifacts",
    "experiment",
    "find_parents",
    "find_runs",
    "flatten",
    "promote",
    "sqlite_path",
    "stage_run",
    "tracking_uri",
    "ui_url",
]


def close_pipeline(params: Params) -> dict[str, Any]:
    """The ``track`` stage: close this pipeline run's parent (link cached stages, lineage tags,
    headline metrics) and register the model ``eval`` scored as a new version (``@latest``)."""
    mlflow, client, exp_id = open_store(params.tracking)
    result = parents.close_pipeline(mlflow, client, exp_id, params)
    if result["unchanged"]:  # DVC ran nothing: no new pipeline run
        return result
    parent, folder = result["pipeline_run"], params.paths.aligned_model
    try:
        if folder.is_dir():
            result["model_version"] = registry.register(
                mlflow, client, params.tracking.registered_model, parent, folder, _summary(result)
            )
    finally:
        client.set_terminated(parent, "FINISHED")
    return result


def _summary(result: dict[str, Any]) -> str:
    """A version's description: its pipeline run and headline scores."""
    shown = ("geneval_overall", "caption_exact", "fid_judge", "text_bits_per_byte")
    scores = ", ".join(f"{k} {result['metrics'][k]:.4g}" for k in shown if k in result.get("metrics", {}))
    return f"pipeline run {result['name']}" + (f": {scores}" if scores else "")


def promote(
    cfg: TrackingConfig, metric: str, higher: bool = True, run: str | None = None, z: float = 2.0
) -> dict[str, Any]:
    """Alias ``champion`` to the registered version whose pipeline run has the best ``metric``
    (or ``run``'s version) if it beats the current champion by more than ``z`` standard errors."""
    _, client, _ = read_store(cfg)
    return registry.promote(client, cfg.registered_model, metric, higher, run, z)


def find_parents(cfg: TrackingConfig, names: list[str] | None = None, last: int = 3) -> list[dict[str, Any]]:
    """Pipeline runs (parents), newest first: those named (run name or id), else the ``last``."""
    _, client, exp = read_store(cfg)
    if exp is None:
        return []
    query = f"tags.`{parents.ROLE_TAG}` = 'pipeline'"
    runs = [as_dict(r) for r in client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"])]
    if not names:
        return runs[:last]
    picked = []
    for name in names:
        match = [r for r in runs if name in (r["name"], r["run_id"])]
        if not match:
            raise MissingInput(f"--compare {name}: no pipeline run of that name or id in {cfg.experiment!r}")
        picked.append(match[0])
    return picked


def compare(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the side-by-side table: a header of run names, then each headline metric, then
    each param that differs between the runs (or from params.yaml)."""
    if not runs:
        raise BadInput("runs --compare: no pipeline runs yet (a `dvc repro` makes one)")
    rows = [["", *(r["name"] for r in runs)]]
    metrics = sorted({k for r in runs for k in r["metrics"] if not k.endswith("_se")})
    for key in metrics:
        cells = []
        for r in runs:
            value, se = r["metrics"].get(key), r["metrics"].get(f"{key}_se")
            cells.append("-" if value is None else f"{value:.4g}" + (f" ±{se:.2g}" if se is not None else ""))
        rows.append([key, *cells])
    keys = sorted({k for r in runs for k in r["params"]})
    for key in keys:
        values = [r["params"].get(key, "(params.yaml)") for r in runs]
        if len(set(values)) > 1 or all(v != "(params.yaml)" for v in values):
            rows.append([f"param {key}", *values])
    return rows


def ui_url(base: str, experiment_id: str) -> str:
    """The link to the experiment's runs table in MLflow's UI at ``base``. MLflow 3's UI picks its
    landing page from a GenAI / Model training switch kept in the browser (GenAI until a user
    flips it), whatever the experiment's kind tag says; this link sets the switch."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def experiment(cfg: TrackingConfig) -> tuple[str, str]:
    """(tracking URI, experiment id) of the params' existing store and experiment."""
    _, client, exp = read_store(cfg)
    if exp is None:
        raise MissingInput(
            f"experiment {cfg.experiment!r}: not in {client.tracking_uri} yet (a `dvc repro` creates it)"
        )
    return client.tracking_uri, exp.experiment_id
