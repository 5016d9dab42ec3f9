"""DVC stage ``tokenizer``: byte-level BPE on the training text + captions (or a local
pretrained tokenizer with <boi>/<eoi> added), saved for transformers."""

from __future__ import annotations

from transfusion.config import Params


def run(params: Params) -> dict[str, float]:
    from transfusion import tracking
    from transfusion.data.prepare import read_text_split
    from transfusion.data.shards import read_index
    from transfusion.data.tokenizer import build_tokenizer
    from transfusion.io import atomic_dir, write_json

    paths = params.paths
    with tracking.stage_run(params, "tokenizer") as run:
        text = read_text_split(paths.text, "train")
        captions = [r["caption"] for r in read_index(paths.scenes / "train")]
        corpus = [line for line in text.splitlines() if line.strip()] + captions
        tokenizer = build_tokenizer(params.tokenizer, corpus)
        with atomic_dir(paths.tokenizer) as tmp:
            tokenizer.save_pretrained(str(tmp))

        val = read_text_split(paths.text, "val")
        n_tokens = len(tokenizer(val, add_special_tokens=False)["input_ids"])
        metrics = {
            "vocab_size": len(tokenizer),
            "val_bytes_per_token": len(val.encode()) / max(1, n_tokens),
            "caption_tokens_mean": sum(
                len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions[:2000]
            )
            / max(1, min(len(captions), 2000)),
        }
        write_json(paths.tokenizer_metrics, metrics)
        run.log_metrics(metrics)
    return metrics
