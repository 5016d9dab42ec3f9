"""Training-step throughput of the tiny Transfusion config on this machine: fp32 vs bf16 autocast.

    python benchmarks/train_step.py [--steps 20] [--batch 16] [--device cpu]

Forward + backward + AdamW step on one packed batch shaped like the default mixture
(4 caption->image : 1 image->caption : 1 text chunk). Prints a table; ratios are within one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from transfusion.config import load_params
from transfusion.data.collate import Collator, caption_to_image, image_to_caption, text_example
from transfusion.data.tokenizer import train_bpe
from transfusion.model import TransfusionModel

DEFAULTS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")


def make_batch(model, tok, n: int, max_length: int):
    g = torch.Generator().manual_seed(0)
    caption = tok("a blue 3 to the left of a 7", add_special_tokens=False)["input_ids"]
    text = (
        tok("To be, or not to be, that is the question: whether 'tis nobler in the mind", add_special_tokens=False)[
            "input_ids"
        ]
        * 8
    )[:120]
    examples = []
    for i in range(n):
        z = torch.randn(4, 8, 8, generator=g)
        kind = i % 6
        examples.append(
            text_example(text)
            if kind == 5
            else image_to_caption(z, caption)
            if kind == 4
            else caption_to_image(caption, z)
        )
    return Collator(model.special, model.config.patches_per_image, max_length)(examples)


def bench(model, batch, steps: int, bf16: bool, device: str) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for i in range(steps + 3):
        if i == 3:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = model.loss(batch, generator=torch.Generator().manual_seed(i), loss_weight=5.0, noise_limit=0.5)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="examples per packed batch")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    tok = train_bpe(
        ["a red 4 and a blue 3 to the left of a 7", "To be, or not to be, that is the question"] * 200, 4096
    )
    rows = []
    for patch_encoder in ("linear", "unet"):
        torch.manual_seed(0)
        levels = DEFAULTS.model.patch_size.bit_length() - 1  # a U-Net level per halving: patch 4 -> 2
        unet = {"unet_channels": [64] * levels} if patch_encoder == "unet" else {}
        model_cfg = DEFAULTS.model.model_copy(update={"patch_encoder": patch_encoder, **unet})
        model = TransfusionModel.from_params(model_cfg, DEFAULTS.diffusion, DEFAULTS.sampling, tok, (4, 8, 8))
        model.to(args.device).train()
        batch = make_batch(model, tok, args.batch, args.max_length).to(args.device)
        tokens, images = int(batch.valid.sum()), len(batch.images)
        for bf16 in (False, True):
            dt = bench(model, batch, args.steps, bf16, args.device)
            rows.append((patch_encoder, "bf16 autocast" if bf16 else "fp32", dt, tokens / dt, images / dt))
    print(
        f"device={args.device} threads={torch.get_num_threads()} batch={args.batch} examples, "
        f"{tokens} tokens, {images} images per step, {args.steps} timed steps"
    )
    print("| patch encoder | precision | step (ms) | tokens/s | images/s | vs fp32 |")
    print("|---|---|---|---|---|---|")
    for i, (pe, prec, dt, tps, ips) in enumerate(rows):
        base = rows[i - (i % 2)][2]
        print(f"| {pe} | {prec} | {dt * 1e3:.1f} | {tps:,.0f} | {ips:,.1f} | {base / dt:.2f}x |")


if __name__ == "__main__":
    main()
