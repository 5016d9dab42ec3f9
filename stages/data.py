"""DVC stage ``data``: pinned raw archives -> MNIST scenes (image-caption splits) + text splits."""

from __future__ import annotations

from collections import Counter

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    from transfusion import tracking
    from transfusion.data.prepare import prepare_data, save_data
    from transfusion.images import render_grid
    from transfusion.io import write_json

    paths, cfg = params.paths, params.data
    with tracking.stage_run(params, "data") as run:
        data = prepare_data(cfg, paths.cache)
        save_data(data, paths.scenes, paths.text, cfg.scenes.shard_size)

        train = data.images["train"]
        n = min(cfg.scenes.n_examples, len(train.images))
        render_grid(train.images[:n], [r["caption"] for r in train.records[:n]], paths.data_examples)

        metrics = data.stats()
        categories = Counter((r["content"] or {}).get("category", "none") for r in train.records)
        metrics.update({f"train_category_{k}": v for k, v in sorted(categories.items())})
        write_json(paths.data_metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(paths.data_examples)
    return metrics
