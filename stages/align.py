"""DVC stage ``align``: post-training the exported model against the judged GenEval reward.

Reads ``paths.model``; writes ``paths.aligned_model`` in the same format (what ``eval`` reads),
``paths.align_metrics``, the per-iteration curve ``paths.align_plot`` (reward, KL, clip fraction,
learning rate) and ``paths.align_grid`` (the same prompts and noise before and after). The loop
is ``transfusion.align_loop``; one MLflow run holds every iteration's row, the grids and
the quick GenEval-style scores before and after (seen and held-out combinations apart).
``align.enabled: false`` copies the trained model through unchanged. ``resume`` continues from
the newest checkpoint in ``paths.align_checkpoints`` and reopens its MLflow run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transfusion.config import Params

GRID_PER_CATEGORY = 2  # prompts per category in the before / after grid


def run(params: Params, resume: bool = False) -> dict[str, float]:
    from transfusion import tracking

    if not params.align.enabled:
        return _pass_through(params)
    run_id = _resumed_run_id(params.paths.align_checkpoints) if resume else None
    if not resume:
        _clear(params.paths.align_checkpoints)
    with tracking.stage_run(params, "align", run_id=run_id) as mlrun:
        metrics = _align(params, mlrun, resume)
        metrics["mlflow_run_id"] = mlrun.run_id
    return metrics


def _align(params: Params, mlrun, resume: bool) -> dict[str, float]:
    from transfusion.align_loop import AlignJob, align_loop, quick_scores
    from transfusion.errors import UserError
    from transfusion.eval.judge import Judge
    from transfusion.io import write_csv, write_json
    from transfusion.pipeline import TransfusionPipeline

    paths, cfg = params.paths, params.align
    if (paths.judge / "no-judge.json").is_file():
        raise UserError(f"{paths.judge}: no judge for this data, so no reward: set align.enabled: false")
    pipe, judge = TransfusionPipeline.from_pretrained(paths.model), Judge.load(paths.judge)
    sampling = params.sampling_for("eval.sampling")
    palette, grid = list(params.data.scenes.palette), params.data.scenes.grid
    before, prompts, images_before = quick_scores(pipe, judge, cfg, sampling, palette, grid)
    job = AlignJob(
        pipe, judge, cfg, sampling, params.diffusion, params.model.max_length, palette, grid,
        paths.align_checkpoints, resume, mlrun.run_id,
    )  # fmt: skip

    def on_row(row: dict) -> None:
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "iteration")
        sys.stderr.write(f"[align] iteration {row['iteration']}/{cfg.iterations} {shown}\n")  # as [train]
        sys.stderr.flush()
        mlrun.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    result = align_loop(job, on_row)
    after, _, images_after = quick_scores(pipe, judge, cfg, sampling, palette, grid)
    metrics = {"enabled": 1.0} | result.metrics
    metrics |= {f"before_{k}": v for k, v in before.items()} | {f"after_{k}": v for k, v in after.items()}
    pipe.save_pretrained(paths.aligned_model)
    write_csv(paths.align_plot, result.rows)
    _grid(prompts, {"before": images_before, "after": images_after}, paths.align_grid)
    write_json(paths.align_metrics, metrics)
    mlrun.log_metrics({k: v for k, v in metrics.items() if not k.startswith(("reward_", "kl_"))})
    for path in (paths.align_plot, paths.align_grid):
        mlrun.log_artifact(path)
    mlrun.log_artifact(paths.aligned_model, "model")
    return metrics


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
    from transfusion.align_loop import quick_scores
    from transfusion.eval.judge import Judge
    from transfusion.io import atomic_dir, write_csv, write_json
    from transfusion.pipeline import TransfusionPipeline

    paths, cfg = params.paths, params.align
    with atomic_dir(paths.aligned_model) as tmp:
        shutil.copytree(paths.model, tmp, dirs_exist_ok=True)
    write_csv(paths.align_plot, [], ["iteration", "reward", "kl", "clip_fraction", "lr"])
    metrics = {"enabled": 0.0}
    if not (paths.judge / "no-judge.json").is_file():
        pipe, judge = TransfusionPipeline.from_pretrained(paths.model), Judge.load(paths.judge)
        palette, grid = list(params.data.scenes.palette), params.data.scenes.grid
        scores, prompts, images = quick_scores(pipe, judge, cfg, params.sampling_for("eval.sampling"), palette, grid)
        metrics |= {f"before_{k}": v for k, v in scores.items()}
        _grid(prompts, {"trained": images}, paths.align_grid)
    with tracking.stage_run(params, "align") as mlrun:
        mlrun.set_tags({"aligned": "false"})
        write_json(paths.align_metrics, metrics)
        mlrun.log_metrics(metrics)
    return metrics


def _resumed_run_id(root: Path) -> str | None:
    """The MLflow run of the newest align checkpoint (verified); a clear error without one."""
    import json

    from transfusion.errors import UserError
    from transfusion.train.checkpoint import latest_checkpoint, verify_checkpoint

    found = latest_checkpoint(root)
    if found is None:
        raise UserError(f"{root}: no align checkpoint to resume from (run `transfusion align` first)")
    verify_checkpoint(found)
    return json.loads((found / "trainer.json").read_text()).get("run_id")


def _clear(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)
