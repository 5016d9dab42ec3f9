"""A Flow-GRPO trial on a trained model, before the `align` stage exists (issue 20).

Runs ``--iterations`` of ``transfusion.align.grpo_step`` on the exported model with the judged
GenEval reward, on prompts of the chosen categories drawn at random from the templates, and
reports the GenEval-style score of fresh ODE samples (the eval sampler) on a fixed set of
balanced prompts before and after, with wall times. The aligned model is not saved.

    python scripts/grpo_trial.py --iterations 20 --categories position color_attr
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfusion.align import grpo_step, judged_reward  # noqa: E402
from transfusion.config import load_params  # noqa: E402
from transfusion.eval import geneval  # noqa: E402
from transfusion.eval.evaluate import judged, sample_many  # noqa: E402
from transfusion.eval.judge import Judge  # noqa: E402
from transfusion.pipeline import TransfusionPipeline  # noqa: E402


def score(pipe, judge, prompts, sampling, images_per_prompt: int) -> dict[str, float]:
    captions = [p.text() for p in prompts for _ in range(images_per_prompt)]
    images = sample_many(pipe, captions, 0, sampling, batch_size=256)
    return judged(judge.read(images), prompts, images_per_prompt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--categories", nargs="+", default=["position", "color_attr"])
    ap.add_argument("--prompts", type=int, default=8, help="prompts per iteration")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO's group)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps while aligning")
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl-weight", type=float, default=0.04)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--eval-prompts", type=int, default=32, help="balanced prompts per category for the score")
    args = ap.parse_args()
    params = load_params([Path("params.yaml")])
    paths, palette = params.paths, list(params.data.scenes.palette)
    pipe = TransfusionPipeline.from_pretrained(paths.model)
    judge = Judge.load(paths.judge)
    sampling = params.sampling_for("eval.sampling")
    eval_prompts = [
        p
        for p in geneval.balanced_prompts(args.eval_prompts, palette, 7, params.data.scenes.grid)
        if p.category in args.categories
    ]
    start = time.perf_counter()
    before = score(pipe, judge, eval_prompts, sampling, 4)
    took = time.perf_counter() - start
    print(f"before: {before['geneval_overall']:.3f} +- {before['geneval_overall_se']:.3f} ({took:.0f}s)")
    model = pipe.model
    reference = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    space = [p for c in args.categories for p in geneval.prompt_space(c, palette, params.data.scenes.grid)]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for it in range(args.iterations):
        prompts = [space[i] for i in rng.choice(len(space), args.prompts, replace=False)]
        captions = [pipe.tokenizer(p.text(), add_special_tokens=False)["input_ids"] for p in prompts]
        stats = grpo_step(
            model, reference, optimizer, captions, judged_reward(pipe, judge, prompts, args.group),
            group_size=args.group, steps=args.steps, noise_level=args.noise_level,
            cfg_scale=sampling.cfg_scale, cfg_interval=tuple(sampling.cfg_interval), clip=args.clip,
            kl_weight=args.kl_weight, seed=1000 * it,
        )  # fmt: skip
        print(f"iteration {it}: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
    wall = time.perf_counter() - start
    after = score(pipe, judge, eval_prompts, sampling, 4)
    print(f"after: {after['geneval_overall']:.3f} +- {after['geneval_overall_se']:.3f} (aligning {wall:.0f}s)")
    for c in args.categories:
        print(f"  {c}: {before[f'geneval_{c}']:.3f} -> {after[f'geneval_{c}']:.3f}")


if __name__ == "__main__":
    main()
