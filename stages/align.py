"""DVC stage ``align``: post-training the exported model against the judged GenEval reward.

Reads ``paths.model``; writes ``paths.aligned_model`` in the same format (what ``eval`` reads),
``paths.align_metrics``, the per-iteration curve ``paths.align_plot`` (reward, KL, clip fraction,
learning rate) and ``paths.align_grid`` (the same prompts and noise before and after). The loop
(``transfusion.align_loop``) runs on a Ray Train worker like training (``align.use_ray``); one
MLflow run holds every iteration's row, the grids and the quick GenEval-style scores before and
after (seen and held-out combinations apart). ``align.enabled: false`` copies the trained
model through unchanged. ``resume`` continues from the newest checkpoint in
``paths.align_checkpoints`` and reopens its MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from transfusion.config import Params

GRID_PER_CATEGORY = 2  # prompts per category in the before / after grid


def run(params: Params, resume: bool = False, address: str | None = None) -> dict[str, float]:
    from transfusion import tracking
    from transfusion.align_loop import AlignRun

    if not params.align.enabled:
        if resume:
            from transfusion.errors import UserError

            raise UserError("align --resume: align.enabled is false: no align run to resume")
        return _pass_through(params)
    align_run = AlignRun.from_params(params)
    run_id = _resumed_run_id(align_run.store) if resume else None
    if not resume:
        align_run.store.clear()
    with tracking.stage_run(params, "align", run_id=run_id) as mlrun:
        uri = tracking.tracking_uri(params.tracking)
        align_run = align_run.model_copy(update={"resume": resume, "run_id": mlrun.run_id, "tracking_uri": uri})
        metrics = _align(params, align_run, mlrun, address)
        metrics["mlflow_run_id"] = mlrun.run_id
    return metrics


def _align(params: Params, run, mlrun, address: str | None) -> dict[str, float]:
    from transfusion.align_loop import load_aligned, quick_scores
    from transfusion.errors import UserError
    from transfusion.eval.judge import Judge
    from transfusion.io import write_csv, write_json
    from transfusion.pipeline import TransfusionPipeline

    paths = params.paths
    if (paths.judge / "no-judge.json").is_file():
        raise UserError(f"{paths.judge}: no judge for this data, so no reward: set align.enabled: false")
    pipe, judge = TransfusionPipeline.from_pretrained(paths.model), Judge.load(paths.judge)
    before, prompts, images_before = quick_scores(pipe, judge, run)
    result = _fit(run, address)
    load_aligned(run, pipe.model)
    after, _, images_after = quick_scores(pipe, judge, run)
    metrics = {"enabled": 1.0} | result.metrics
    metrics |= {f"before_{k}": v for k, v in before.items()} | {f"after_{k}": v for k, v in after.items()}
    pipe.save_pretrained(paths.aligned_model)
    write_csv(paths.align_plot, result.rows)
    _grid(prompts, {"before": images_before, "after": images_after}, paths.align_grid)
    write_json(paths.align_metrics, metrics)
    mlrun.log_metrics(metrics)
    for path in (paths.align_plot, paths.align_grid):
        mlrun.log_artifact(path)
    mlrun.log_artifact(paths.aligned_model, "model")
    return metrics


def _fit(run, address: str | None):
    """The align loop here, or on a Ray Train worker (``align.use_ray``; ``address``: a
    cluster); the aligned weights are its final checkpoint."""
    from transfusion.align_loop import AlignResult, align_loop, summary

    if run.align.use_ray:
        from transfusion.align_ray import align_on_ray

        rows = align_on_ray(run, address)
    else:
        rows = align_loop(run)
    return AlignResult(rows, summary(rows))


def _grid(prompts: list, rows: dict, path: Path) -> None:
    """The first image of ``GRID_PER_CATEGORY`` prompts per category, one band per entry of
    ``rows`` (label -> images (N, k, H, W, 3) of ``prompts``): before above after."""
    import numpy as np

    from transfusion.images import render_grid

    picks, per = [], dict.fromkeys({p.category for p in prompts}, 0)
    for i, prompt in enumerate(prompts):
        if per[prompt.category] < GRID_PER_CATEGORY:
            per[prompt.category] += 1
            picks.append(i)
    images = np.concatenate([imgs[picks, 0] for imgs in rows.values()])
    captions = [f"{label}: {prompts[i].text()}" for label in rows for i in picks]
    render_grid(images, captions, path, cols=len(picks))


def _pass_through(params: Params) -> dict[str, float]:
    """``align.enabled: false``: the trained model, unchanged, where eval reads (a copy, so that
    DVC tracks which model eval read), its quick scores and grid, and metrics that say so."""
    import shutil

    from transfusion import tracking
    from transfusion.align_loop import AlignRun, quick_scores
    from transfusion.eval.judge import Judge
    from transfusion.io import atomic_dir, write_csv, write_json
    from transfusion.pipeline import TransfusionPipeline

    paths = params.paths
    with atomic_dir(paths.aligned_model) as tmp:
        shutil.copytree(paths.model, tmp, dirs_exist_ok=True)
    write_csv(paths.align_plot, [], ["iteration", "reward", "kl", "clip_fraction", "lr"])
    metrics = {"enabled": 0.0}
    if not (paths.judge / "no-judge.json").is_file():
        pipe, judge = TransfusionPipeline.from_pretrained(paths.model), Judge.load(paths.judge)
        scores, prompts, images = quick_scores(pipe, judge, AlignRun.from_params(params))
        metrics |= {f"before_{k}": v for k, v in scores.items()}
        _grid(prompts, {"trained": images}, paths.align_grid)
    else:  # no judge, no prompts to score: the sample captions' grid
        pipe = TransfusionPipeline.from_pretrained(paths.model)
        pipe.sample_grid(params.train.sample_captions, paths.align_grid, params.sampling_for("eval.sampling"))
    with tracking.stage_run(params, "align") as mlrun:
        mlrun.set_tags({"aligned": "false"})
        write_json(paths.align_metrics, metrics)
        mlrun.log_metrics(metrics)
    return metrics


def _resumed_run_id(store) -> str | None:
    """The MLflow run of the newest align checkpoint (verified); a clear error without one."""
    import json

    from transfusion.errors import UserError

    name = store.latest()
    if name is None:
        raise UserError(f"{store.location}: no align checkpoint to resume from (run `transfusion align` first)")
    return json.loads((store.fetch(name) / "trainer.json").read_text()).get("run_id")
