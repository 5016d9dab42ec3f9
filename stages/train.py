"""DVC stage ``train``: the Transfusion model on the latents + text, through Ray Train.

A fresh run empties ``paths.checkpoints`` and opens a new MLflow run; ``resume`` keeps the
checkpoints and reopens the MLflow run recorded beside them, so the step count and the run
continue. Rank 0 logs metrics and sample grids into that run; this stage adds the params, the
final metrics, the loss curve and the exported model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transfusion.config import Params

RUN_FILE = "mlflow_run.json"


def run(params: Params, resume: bool | Path = False, address: str | None = None) -> dict[str, float]:
    from transfusion import tracking
    from transfusion.io import write_json
    from transfusion.train.checkpoint import latest_checkpoint, verify_checkpoint
    from transfusion.train.loop import LoopConfig, train_loop

    paths, tc = params.paths, params.train
    run_id = None
    if resume:
        if isinstance(resume, Path):  # an explicit checkpoint: make it the newest one
            verify_checkpoint(resume)
            if resume.resolve().parent != paths.checkpoints.resolve():
                raise ValueError(f"{resume}: --resume PATH must be a checkpoint under {paths.checkpoints}")
            for newer in sorted(p for p in paths.checkpoints.iterdir() if p.name > resume.name):
                shutil.rmtree(newer)
        found = latest_checkpoint(paths.checkpoints)
        if found is None:
            raise FileNotFoundError(f"{paths.checkpoints}: no checkpoint to resume from")
        verify_checkpoint(found)
        run_file = paths.checkpoints / RUN_FILE
        run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    else:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        shutil.rmtree(paths.runs / "samples", ignore_errors=True)

    with tracking.stage_run(params, "train", run_id=run_id) as mlrun:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        write_json(paths.checkpoints / RUN_FILE, {"run_id": mlrun.run_id})
        config = LoopConfig(params=params.with_absolute_paths(), tracking_uri=tracking.tracking_uri(params.tracking), run_id=mlrun.run_id)
        if tc.use_ray:
            from transfusion.train.ray_train import fit

            metrics = fit(config, address)
        else:
            metrics = train_loop(config)
        metrics["resumed"] = float(run_id is not None)
        write_json(paths.train_metrics, metrics)
        mlrun.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
        mlrun.log_artifact(paths.train_loss_plot)
        mlrun.log_artifact(paths.train_samples)
        mlrun.log_artifact(paths.train_probes)
        mlrun.log_artifact(paths.model, "model")
        metrics["mlflow_run_id"] = mlrun.run_id
    return metrics
