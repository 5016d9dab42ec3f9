"""Where a trained model's conditioning goes: caption loss on digit tokens vs template tokens,
and how much of the diffusion prediction survives without the transformer.

    python scripts/diagnose_patches.py LABEL=MODEL_DIR [LABEL=MODEL_DIR ...]

MODEL_DIR is an exported model (``artifacts/model`` or an MLflow run's ``artifacts/model``);
the val latents, tokenizer-free records and the VAE come from ``params.yaml``'s paths. Prints one
table row per model:

- caption loss after the true image, split into digit tokens and the rest (the template words
  and ``<eos>``), and after a shuffled image. A per-token mean hides near-chance digits
  (ln 10 = 2.30) under near-free template tokens;
- val diffusion loss per noise level with the transformer's patch outputs as trained and with
  them zeroed. A decoder that denoises almost as well without them (U-Net skips) has no need
  for the caption.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from transfusion.config import load_params
from transfusion.data.collate import caption_to_image, image_to_caption
from transfusion.eval.probe import BUCKETS, load_probe_data
from transfusion.pipeline import TransfusionPipeline
from transfusion.sampling import example_collator

N = 256


@torch.no_grad()
def caption_split(model, tokenizer, data) -> tuple[float, float, float]:
    """Mean CE on digit targets and on the other targets (true image), digits after a shuffled one."""
    out = []
    for shift in (0, 1):
        images = data.latents.roll(shift, dims=0)
        batch = example_collator(model)([image_to_caption(z, c) for z, c in zip(images, data.captions)])
        hidden, _ = model(batch, images, torch.zeros(len(images)))
        targets = batch.labels != -100
        labels = batch.labels[targets]
        ce = F.cross_entropy(model.text_logits(hidden[targets]).float(), labels, reduction="none")
        digit = torch.tensor([any(ch.isdigit() for ch in tokenizer.decode([i])) for i in labels.tolist()])
        out.append((float(ce[digit].mean()), float(ce[~digit].mean())))
    return out[0][0], out[0][1], out[1][0]


@torch.no_grad()
def bypass(model, data, seed: int = 0) -> list[tuple[float, float]]:
    """(loss as trained, loss with zeroed transformer outputs) at each probe noise level."""
    diffusion, x0 = model.objective, data.latents
    batch = example_collator(model)([caption_to_image(c, z) for z, c in zip(x0, data.captions)])
    rows = []
    for level in BUCKETS:
        t = diffusion.timesteps_at(torch.full((len(x0),), level))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        x_t, target = diffusion.add_noise(x0, noise, t), diffusion.target(x0, noise, t)
        _, pred = model(batch, x_t, diffusion.model_time(t))
        tokens, temb, skips = model.embed_images(x_t, diffusion.model_time(t))
        blind = model.predict_images(torch.zeros_like(tokens), temb, skips)
        rows.append((F.mse_loss(pred, target).item(), F.mse_loss(blind, target).item()))
    return rows


def main(args: list[str]) -> None:
    params = load_params([Path("params.yaml")])
    torch.manual_seed(0)
    head = "| model | CE digits | CE template | CE digits, shuffled image | " + " | ".join(
        f"diffusion @{lv} trained / zeroed" for lv in BUCKETS
    )
    print(head + " |")
    print("|" + "---|" * (4 + len(BUCKETS)))
    for arg in args:
        label, folder = arg.split("=", 1)
        pipe = TransfusionPipeline.from_pretrained(Path(folder))
        model, tok = pipe.model.float().eval(), pipe.tokenizer
        data = load_probe_data(Path(params.paths.latents), tok, N, None, params.data.scenes.palette)
        d, rest, shuffled = caption_split(model, tok, data)
        cells = [f"{a:.3f} / {b:.3f}" for a, b in bypass(model, data)]
        print(f"| {label} | {d:.2f} | {rest:.2f} | {shuffled:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
