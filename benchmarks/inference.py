"""Inference latency with and without the KV cache, on this machine.

    python benchmarks/inference.py [--model artifacts/model] [--steps 50] [--tokens 64]

Image sampling: seconds per image for batch 1 and 16 (DDPM, CFG on, i.e. 2 rows per image),
cached (caption prefix run once, each step runs only the image tokens) vs uncached (each step
re-runs caption + image). Text: tokens/s decoding with and without the cache. Guidance in an
interval: a batch of 64 guided at every noise level (2 rows per image at every step) against
guided only in the default ``sampling.cfg_interval`` (the conditional rows alone elsewhere).
Uses the exported model when given (random tiny weights otherwise: speed does not depend on
them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def load(model_dir: str | None):
    if model_dir:
        from transfusion.pipeline import TransfusionPipeline

        pipe = TransfusionPipeline.from_pretrained(model_dir)
        return pipe.model, pipe.tokenizer
    from transfusion.config import load_params
    from transfusion.data.tokenizer import train_bpe
    from transfusion.model import TransfusionModel

    tok = train_bpe(
        ["a red 4 and a blue 3 to the left of a 7", "To be, or not to be, that is the question"] * 200, 4096
    )
    torch.manual_seed(0)
    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")  # the default model
    return TransfusionModel.from_params(p.model, p.diffusion, p.sampling, tok, (4, 8, 8)).eval(), tok


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def guidance_interval_row(model, caption: list[int], steps: int, sampler: str) -> None:
    """Seconds per image guided at every level against guided in the eval's default interval."""
    from transfusion.config import load_params
    from transfusion.diffusion import build_scheduler
    from transfusion.sampling import sample_latents

    sched = build_scheduler(model.config.diffusion, sampler)
    interval = tuple(load_params(Path(__file__).resolve().parents[1] / "params.yaml").sampling.cfg_interval)
    caps = [caption] * 64
    every = timed(lambda: sample_latents(model, caps, sched, steps, 5.0, cfg_interval=(0.0, 1.0))) / 64
    inside = timed(lambda: sample_latents(model, caps, sched, steps, 5.0, cfg_interval=interval)) / 64
    print()
    print(f"| image sampling, batch 64, {steps} steps, CFG 5 | every level | in {list(interval)} | speed-up |")
    print("|---|---|---|---|")
    print(f"| s/image | {every:.4f} | {inside:.4f} | {every / inside:.2f}x |")


def main() -> None:
    from transfusion.diffusion import build_scheduler
    from transfusion.sampling import generate_text, sample_latents

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    model, tok = load(args.model)
    caption = tok("a blue 3 to the left of a yellow 8", add_special_tokens=False)["input_ids"]
    prompt = tok("To be, or not to be, that is the question: whether 'tis nobler", add_special_tokens=False)[
        "input_ids"
    ]

    sampler = model.config.sampling.sampler  # the default model's
    sched = build_scheduler(model.config.diffusion, sampler)
    print(
        f"threads={torch.get_num_threads()} denoising steps={args.steps} ({sampler}, CFG scale 3) "
        f"text tokens={args.tokens}"
    )
    print("| task | batch | no cache | KV cache | speed-up |")
    print("|---|---|---|---|---|")
    sample_latents(model, [caption], sched, 2, 3.0)  # warm-up
    for batch in (1, 16):
        caps = [caption] * batch
        slow = timed(lambda caps=caps: sample_latents(model, caps, sched, args.steps, 3.0, use_cache=False)) / batch
        fast = timed(lambda caps=caps: sample_latents(model, caps, sched, args.steps, 3.0, use_cache=True)) / batch
        print(f"| image sampling (s/image) | {batch} | {slow:.3f} | {fast:.3f} | {slow / fast:.2f}x |")
    long_context = (prompt * 20)[:200] + caption  # e.g. an interleaved document before the image
    slow = timed(lambda: sample_latents(model, [long_context] * 4, sched, args.steps, 3.0, use_cache=False)) / 4
    fast = timed(lambda: sample_latents(model, [long_context] * 4, sched, args.steps, 3.0, use_cache=True)) / 4
    print(f"| image sampling after a 200-token context (s/image) | 4 | {slow:.3f} | {fast:.3f} | {slow / fast:.2f}x |")
    for batch in (1, 8):
        prompts = [prompt] * batch
        kw = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        slow = timed(lambda prompts=prompts, kw=kw: generate_text(model, prompts, use_cache=False, **kw))
        fast = timed(lambda prompts=prompts, kw=kw: generate_text(model, prompts, use_cache=True, **kw))
        n = args.tokens * batch
        print(f"| text decoding (tokens/s) | {batch} | {n / slow:.0f} | {n / fast:.0f} | {slow / fast:.2f}x |")
    guidance_interval_row(model, caption, 20, sampler)


if __name__ == "__main__":
    main()
