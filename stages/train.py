"""DVC stage ``train``: the Transfusion model on the latents + text, through Ray Train.

A fresh run empties the checkpoint store (``paths.checkpoints``, or ``<train.storage>`` on a
cluster) and opens a new MLflow run; ``resume`` continues from the newest checkpoint (or the
one named) and reopens the MLflow run it recorded, so the step count and the run continue.
The loop logs metrics, probes and sample grids into that run and leaves its final checkpoint;
this stage exports the pipeline from it and writes the metrics, the loss and probe curves and
the final sample grid, only once training has finished.
"""

from __future__ import annotations

import time
from pathlib import Path

from transfusion.config import Params


def run(params: Params, resume: bool | Path = False, address: str | None = None) -> dict[str, float]:
    from transfusion import tracking
    from transfusion.io import atomic_file, write_csv, write_json
    from transfusion.pipeline import TransfusionPipeline
    from transfusion.train.checkpoint import prepare_run
    from transfusion.train.fit import fit
    from transfusion.train.run import TrainRun

    paths, run = params.paths, TrainRun.from_params(params)
    resume_from, run_id = prepare_run(run.store, resume)  # the checkpoint and MLflow run to continue
    with tracking.stage_run(params, "train", run_id=run_id) as mlrun:
        uri = tracking.tracking_uri(params.tracking)
        run = run.model_copy(update={"tracking_uri": uri, "run_id": mlrun.run_id, "resume_from": resume_from})
        result = fit(run, address)

        t_export = time.perf_counter()
        pipe = TransfusionPipeline.from_parts(result.model, paths.tokenizer, paths.vae, paths.latents, mlrun.run_id)
        grid = run.draw_samples(pipe, params.train.steps)  # the loop draws the grids before the last
        pipe.save_pretrained(paths.model)
        resumed = resume_from is not None or result.metrics["resumed_at_step"] > 0  # --resume or a Ray restart
        metrics = result.metrics | {"export_s": time.perf_counter() - t_export, "resumed": float(resumed)}

        write_csv(paths.train_loss_plot, result.history)
        write_csv(paths.train_probes, result.probes)
        with atomic_file(paths.train_samples, "wb") as fh:
            fh.write(grid.read_bytes())
        write_json(paths.train_metrics, metrics)
        mlrun.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
        mlrun.log_artifact(grid, "samples")
        for path in (paths.train_loss_plot, paths.train_samples, paths.train_probes):
            mlrun.log_artifact(path)
        mlrun.log_artifact(paths.model, "model")
        metrics["mlflow_run_id"] = mlrun.run_id
    return metrics
