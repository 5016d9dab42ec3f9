"""DVC stage ``judge``: the cell classifier that reads generated scenes; reports its whole-scene
exact match on real test scenes (evaluation refuses judge scores below ``judge.min_accuracy``)."""

from __future__ import annotations

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    import torch

    from transfusion import tracking
    from transfusion.data.prepare import load_image_split
    from transfusion.data.scenes import compose_scenes
    from transfusion.data.sources import load_mnist
    from transfusion.eval.judge import scene_exact_match, train_judge, training_cells
    from transfusion.io import write_json

    paths, cfg, scenes = params.paths, params.judge, params.data.scenes
    train = load_image_split(paths.scenes, "train")
    test = load_image_split(paths.scenes, "test")
    with tracking.stage_run(params, "judge") as run:
        x, y = training_cells(train.images, train.records, scenes.grid, cfg.empty_fraction, cfg.seed)
        if cfg.extra_scenes and params.data.source == "mnist_scenes":
            digits = load_mnist(params.data.mnist, paths.cache)["train"]
            extra_cfg = scenes.model_copy(update={"categories": {"counting": 1.0}})
            images, records = compose_scenes(digits, cfg.extra_scenes, extra_cfg, seed=cfg.seed + 7919)
            ex, ey = training_cells(images, records, scenes.grid, cfg.empty_fraction, cfg.seed + 1)
            x, y = torch.cat([x, ex]), torch.cat([y, ey])

        def on_log(epoch: int, loss: float) -> None:
            print(f"[judge] epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}", flush=True)
            run.log_metrics({"loss": loss}, step=epoch + 1)

        judge = train_judge(x, y, cfg, scenes, on_log)
        judge.save(paths.judge)
        metrics = scene_exact_match(judge, test.images, test.records)
        metrics["training_cells"] = len(y)
        metrics["meets_minimum"] = float(metrics["scene_exact_match"] >= cfg.min_accuracy)
        write_json(paths.judge_metrics, metrics)
        run.log_metrics(metrics)
    return metrics
