"""DVC stage ``track`` (always run, last): close this pipeline run's MLflow parent run. Stages DVC
skipped are linked to the runs that produced their outputs, every stage run gets its ``dvc.lock``
hashes, the parent gets the headline metrics, and the model ``eval`` scored is registered as a new
version (``models:/transfusion@latest``) (``transfusion.tracking.close_pipeline``). Writes no file: a ``dvc repro`` in
which nothing ran makes no new parent and leaves the workspace as it was."""

from __future__ import annotations

from transfusion.config import Params


def run(params: Params) -> dict:
    from transfusion import tracking

    return tracking.close_pipeline(params)
