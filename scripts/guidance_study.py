"""GenEval-style score and blank rate of one model under several sampling settings, with errors.

    python scripts/guidance_study.py [--model artifacts/model] [--prompts 112] [--images 4] \\
        "cfg=3" "cfg=3,interval=0.3-1" "cfg=1" "cfg=3,steps=25" ...

Each setting samples the evaluation's balanced prompts (``geneval.balanced_prompts``, the same
prompts and seeds for every setting) with the eval stage's sampler code, reads the images with the
judge and prints GenEval's rule per category, the overall with its standard error, and the share
of empty canvases. Keys: ``cfg`` (scale), ``interval`` (noise levels ``lo-hi`` where guidance
applies), ``steps``. Reads params.yaml for paths, palette and the eval seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from transfusion.config import load_params
from transfusion.eval import geneval
from transfusion.eval.evaluate import SEED_GENEVAL, judged, sample_many
from transfusion.eval.judge import Judge
from transfusion.pipeline import TransfusionPipeline


def parse_setting(text: str, default_steps: int) -> dict:
    out = {"cfg_scale": 3.0, "cfg_interval": (0.0, 1.0), "steps": default_steps}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key == "cfg":
            out["cfg_scale"] = float(value)
        elif key == "interval":
            lo, hi = value.split("-")
            out["cfg_interval"] = (float(lo), float(hi))
        elif key == "steps":
            out["steps"] = int(value)
        else:
            raise SystemExit(f"error: setting {text!r}: unknown key {key!r} (cfg, interval, steps)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--prompts", type=int, default=None, help="prompts per category (default: eval's)")
    ap.add_argument("--images", type=int, default=None, help="images per prompt (default: eval's)")
    args = ap.parse_args()
    params = load_params([args.params])
    cfg, paths = params.eval, params.paths
    pipe = TransfusionPipeline.from_pretrained(args.model or paths.model)
    judge = Judge.load(paths.judge)
    k = args.images or cfg.images_per_prompt
    prompts = geneval.balanced_prompts(
        args.prompts or cfg.prompts_per_category, list(params.data.scenes.palette), cfg.seed, params.data.scenes.grid
    )
    captions = [p.text() for p in prompts for _ in range(k)]
    cats = list(geneval.TAGS)
    print(f"{len(prompts)} prompts x {k} images; GenEval's rule per category, overall +- se, blank rate")
    print(f"{'setting':32s} " + " ".join(f"{c[:8]:>8s}" for c in cats) + "  overall     se   blank  wall")
    sampling = params.sampling_for("eval.sampling")
    for text in args.settings:
        how = sampling.model_copy(update=parse_setting(text, sampling.steps))
        start = time.perf_counter()
        images = sample_many(pipe, captions, cfg.seed + SEED_GENEVAL, how, batch_size=cfg.batch_size)
        wall = time.perf_counter() - start
        got = judged(judge.read(images), prompts, k)
        row = " ".join(f"{got[f'geneval_{c}']:8.3f}" for c in cats)
        print(
            f"{text:32s} {row}  {got['geneval_overall']:7.3f} {got['geneval_overall_se']:6.3f} "
            f"{got['blank_rate']:7.3f} {wall:4.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
