"""DVC stage ``data``: image-caption splits (MNIST scenes from the pinned archive, a caption
folder, or a WebDataset / Parquet set streamed shard by shard) + text splits."""

from __future__ import annotations

from collections import Counter

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    from transfusion import tracking
    from transfusion.data.prepare import load_image_split, prepare_data, save_images, save_stream, save_text, text_stats
    from transfusion.data.sources import load_text_works
    from transfusion.images import render_grid
    from transfusion.io import write_json

    paths, cfg = params.paths, params.data
    with tracking.stage_run(params, "data") as run:
        if cfg.streamed:  # one shard per split in memory, whatever the dataset's size
            text = load_text_works(cfg.text, paths.cache, cfg.seed)
            report = save_stream(cfg, paths.scenes)
            metrics, extra = report.stats() | text_stats(text), {"bad_records_first": report.bad.first}
            run.set_tags({"bad_records_first": " | ".join(report.bad.first)[:5000]})
        else:
            data = prepare_data(cfg, paths.cache)
            text = data.text
            save_images(data, paths.scenes, cfg.scenes.shard_size)
            categories = Counter((r["content"] or {}).get("category", "none") for r in data.images["train"].records)
            metrics, extra = data.stats() | {f"train_category_{k}": v for k, v in sorted(categories.items())}, {}
        save_text(text, paths.text)

        examples = load_image_split(paths.scenes, "train", cfg.scenes.n_examples)
        render_grid(examples.images, [r["caption"] for r in examples.records], paths.data_examples)
        write_json(paths.data_metrics, metrics | extra)
        run.log_metrics(metrics)
        run.log_artifact(paths.data_examples)
    return metrics
