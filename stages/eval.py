"""DVC stage ``eval``: GenEval-style score, FID/KID (torch-fidelity), captioning accuracy and text
bits per byte of the model ``align`` left (``paths.aligned_model``: aligned, or the trained one
passed through) (``transfusion.eval.evaluate``); GenEval-style on the combinations ``align``
never saw apart, and by the second reader too; metrics to ``paths.eval_metrics``, plots under
``paths.eval_plots``, everything in an MLflow run tagged with the training run's id."""

from __future__ import annotations

import json

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    from tqdm import tqdm

    from transfusion import tracking
    from transfusion.eval.evaluate import EvalInputs, evaluate, write_outputs
    from transfusion.pipeline import TransfusionPipeline

    paths, cfg = params.paths, params.eval
    from transfusion.eval.geneval import held_out

    pipe = TransfusionPipeline.from_pretrained(paths.aligned_model)
    palette = dict(params.data.scenes.palette)
    inputs = EvalInputs(
        judge_path=paths.judge,
        judge_accuracy=json.loads(paths.judge_metrics.read_text())["scene_exact_match"],
        judge_min_accuracy=params.judge.min_accuracy,
        scenes=paths.scenes,
        text=paths.text,
        palette=palette,
        text_length=params.mixture.text_length,
        grid=params.data.scenes.grid,
        reader_path=paths.reader,
        held_out=held_out(list(palette), params.data.scenes.grid, params.align.held_out_fraction),
    )
    with tracking.stage_run(params, "eval") as run:
        run.set_tags({"train_run_id": pipe.run_id or "unknown", "aligned": str(params.align.enabled).lower()})
        sampling = params.sampling_for("eval.sampling")
        result = evaluate(pipe, cfg, sampling, inputs, progress=lambda it, desc: tqdm(it, desc=desc, unit="batch"))
        write_outputs(result, cfg, paths)
        run.log_metrics(result.metrics)
        for path in (paths.eval_plots, paths.geneval_plot, paths.cfg_sweep_plot):
            run.log_artifact(path, "plots")
    return result.metrics
