"""DVC stage ``judge``: the cell classifier that reads generated scenes; reports its whole-scene
exact match on real test scenes (evaluation refuses judge scores below ``judge.min_accuracy``).

Data without structured scene content (``data.source: caption_folder``) have nothing a judge
could learn: the stage then writes a judge folder that says so and ``judge_available: 0``, and
evaluation runs without the judge (FID/KID on Inception features, captions, text).

The ``reader`` stage trains a second reader the same way from its own section (another seed and
shape: no weights shared with the judge): post-training optimises the judge's reading, so
evaluation also reports what an independent reader sees."""

from __future__ import annotations

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    return fit_reader(params, "judge")


def fit_reader(params: Params, name: str) -> dict[str, float]:
    """Train the cell classifier of section ``name`` (``judge`` or ``reader``) into
    ``paths.<name>``, its test-scene exact match into ``paths.<name>_metrics``."""
    import torch

    from transfusion import tracking
    from transfusion.data.prepare import load_image_split
    from transfusion.data.scenes import compose_scenes
    from transfusion.data.sources import load_mnist
    from transfusion.eval.judge import scene_exact_match, train_judge, training_cells
    from transfusion.io import write_json

    paths, cfg, scenes = params.paths, getattr(params, name), params.data.scenes
    out, metrics_path = getattr(paths, name), getattr(paths, f"{name}_metrics")
    test = load_image_split(paths.scenes, "test")
    if not all(r.get("content") for r in test.records):  # a caption folder or a stream: no scenes
        return _no_judge(params, name)
    train = load_image_split(paths.scenes, "train")
    if not all(r.get("content") for r in train.records):
        return _no_judge(params, name)
    with tracking.stage_run(params, name) as run:
        x, y = training_cells(train.images, train.records, scenes.grid, cfg.empty_fraction, cfg.seed)
        if cfg.extra_scenes and params.data.source == "mnist_scenes":
            digits = load_mnist(params.data.mnist, paths.cache)["train"]
            extra_cfg = scenes.model_copy(update={"categories": {"counting": 1.0}})
            images, records = compose_scenes(digits, cfg.extra_scenes, extra_cfg, seed=cfg.seed + 7919)
            ex, ey = training_cells(images, records, scenes.grid, cfg.empty_fraction, cfg.seed + 1)
            x, y = torch.cat([x, ex]), torch.cat([y, ey])

        def on_log(epoch: int, loss: float) -> None:
            print(f"[{name}] epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}", flush=True)
            run.log_metrics({"loss": loss}, step=epoch + 1)

        judge = train_judge(x, y, cfg, scenes, on_log)
        judge.save(out)
        metrics = scene_exact_match(judge, test.images, test.records)
        metrics["training_cells"] = len(y)
        metrics["judge_available"] = 1.0
        metrics["meets_minimum"] = float(metrics["scene_exact_match"] >= cfg.min_accuracy)
        write_json(metrics_path, metrics)
        run.log_metrics(metrics)
    return metrics


def _no_judge(params: Params, name: str) -> dict[str, float]:
    """The judge's outputs for data without scene content: a folder saying why, no scores."""
    import json

    from transfusion import tracking
    from transfusion.io import atomic_dir, write_json

    paths = params.paths
    reason = f"data.source {params.data.source}: the records carry no scene content to train a judge on"
    print(f"[{name}] no {name}: {reason}", flush=True)
    with atomic_dir(getattr(paths, name)) as tmp:
        (tmp / "no-judge.json").write_text(json.dumps({"reason": reason}, indent=2) + "\n")
    metrics = {"judge_available": 0.0, "scene_exact_match": 0.0, "meets_minimum": 0.0}
    with tracking.stage_run(params, name) as run:
        write_json(getattr(paths, f"{name}_metrics"), metrics)
        run.log_metrics(metrics)
    return metrics
