"""Binding diagnostics: does the model read and write *which* object is where, and which colour?

Sampling mixes many failures together; these ask the model directly, teacher-forced, on real
scenes of the two compositional categories. Each scene's true caption is paired with the same
caption made false by one swap:

- ``position``: the relation flipped ("a 2 to the left of a 9" -> "... to the right of ...",
  "above" <-> "below");
- ``color_attr``: the two colours swapped between the objects ("a blue 3 and a yellow 8" ->
  "a yellow 3 and a blue 8").

Two rankings, each an accuracy against the 0.5 of a model that does not bind:

- **read** (understanding): the caption's negative log-likelihood after the clean image, summed
  over its tokens: is the true caption the likelier one? (``binding_read_<category>``)
- **write** (generation): the diffusion loss of the true image, same noise and timestep, under
  each caption: does the true caption explain the image better? Per noise bucket
  (``binding_write_<category>_b<k>``, ``BUCKETS``) and over all of them
  (``binding_write_<category>``).

Ties count a half. ``*_se`` are binomial standard errors over scenes (per bucket for write; the
mean over buckets reuses the scenes, so its error is taken per scene on the bucket-averaged
loss difference).
"""

from __future__ import annotations

import numpy as np
import torch

from transfusion.data.collate import caption_to_image, image_to_caption
from transfusion.data.scenes import Prompt, parse_caption
from transfusion.sampling import example_collator

BUCKETS = (0.125, 0.375, 0.625, 0.875)  # noise levels (0 clean, 1 pure noise): centres of 4 buckets
CATEGORIES = ("position", "color_attr")
FLIP = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


def flipped(prompt: Prompt) -> Prompt | None:
    """The same caption made false by one swap (relation, or the two colours); None for others."""
    if prompt.category == "position":
        return Prompt("position", prompt.digits, (), FLIP[prompt.relation])  # type: ignore[index]
    if prompt.category == "color_attr" and prompt.colors[0] != prompt.colors[1]:
        return Prompt("color_attr", prompt.digits, prompt.colors[::-1])
    return None


def pairs(records: list[dict], per_category: int) -> dict[str, list[tuple[int, str, str]]]:
    """Per category, up to ``per_category`` (row, true caption, flipped caption) of ``records``."""
    out: dict[str, list[tuple[int, str, str]]] = {c: [] for c in CATEGORIES}
    for i, record in enumerate(records):
        prompt = parse_caption(record["caption"])
        if prompt is None or prompt.category not in out or len(out[prompt.category]) >= per_category:
            continue
        flip = flipped(prompt)
        if flip is not None:
            out[prompt.category].append((i, prompt.text(), flip.text()))
    return out


@torch.no_grad()
def caption_nll(model, latents: torch.Tensor, captions: list[list[int]], batch_size: int = 128) -> torch.Tensor:
    """Summed NLL (nats) of each caption (+ ``<eos>``) after its clean image  (N,)."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(captions), batch_size):
        z = latents[s : s + batch_size].to(device)
        batch = example_collator(model)([image_to_caption(x, c) for x, c in zip(z, captions[s : s + batch_size])])
        batch = batch.to(device)
        hidden, _ = model(batch, z, torch.zeros(len(z), device=device))
        logits = model.text_logits(hidden).float()  # (B, L, V)
        targets = batch.labels.clamp_min(0)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        # only the caption's own tokens and <eos>: labels after <eoi>
        after_image = (batch.labels != -100) & (batch.input_ids != model.special.boi)
        after_image &= torch.cumsum(batch.input_ids == model.special.eoi, 1) > 0
        out.append((nll * after_image).sum(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def diffusion_mse(
    model, latents: torch.Tensor, captions: list[list[int]], levels=BUCKETS, seed: int = 0, batch_size: int = 256
) -> torch.Tensor:
    """Diffusion MSE of each image under its caption at each noise level  (K, N); the noise is
    drawn from ``seed`` so two calls with other captions see the same noisy images."""
    device = next(model.parameters()).device
    objective = model.objective
    K, N = len(levels), len(latents)
    x0 = latents.repeat(K, 1, 1, 1)  # (K*N, C, h, w)
    t = objective.timesteps_at(torch.tensor(levels).repeat_interleave(N))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for s in range(0, K * N, batch_size):
        sl = slice(s, s + batch_size)
        rows = [caption_to_image(captions[i % N], x0[i]) for i in range(s, min(s + batch_size, K * N))]
        batch = example_collator(model)(rows).to(device)
        predict = lambda x_t, time, batch=batch: model(batch, x_t.to(device), time.to(device))[1].cpu()  # noqa: E731
        mse = objective.training_losses(predict, x0[sl], noise[sl], t[sl], reduction="none")  # (n, C, h, w)
        out.append(mse.flatten(1).mean(1))
    return torch.cat(out).view(K, N)


def _rank(better: torch.Tensor) -> tuple[float, float]:
    """Accuracy and binomial standard error of a (N,) win (1) / tie (0.5) / loss (0) vector."""
    acc = float(better.float().mean())
    return acc, float(np.sqrt(max(acc * (1 - acc), 1e-12) / max(len(better), 1)))


def _wins(true: torch.Tensor, false: torch.Tensor) -> torch.Tensor:
    """1 where the true caption's loss is lower, 0.5 on a tie, 0 where higher."""
    return (true < false).float() + 0.5 * (true == false).float()


def binding_scores(
    model, tokenizer, latents: torch.Tensor, records: list[dict], per_category: int, seed: int = 0
) -> dict[str, float]:
    """Read and write rankings per category (module docstring) on ``records`` with their clean
    scaled ``latents`` (N, C, h, w); at most ``per_category`` scenes each."""
    was_training = model.training
    model.eval()
    tok = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    out: dict[str, float] = {}
    try:
        for category, rows in pairs(records, per_category).items():
            if not rows:
                continue
            z = latents[[i for i, _, _ in rows]].float()
            true, false = [tok(t) for _, t, _ in rows], [tok(f) for _, _, f in rows]
            name = f"binding_read_{category}"
            out[name], out[f"{name}_se"] = _rank(_wins(caption_nll(model, z, true), caption_nll(model, z, false)))
            mse_true, mse_false = diffusion_mse(model, z, true, seed=seed), diffusion_mse(model, z, false, seed=seed)
            for k in range(len(BUCKETS)):
                name = f"binding_write_{category}_b{k}"
                out[name], out[f"{name}_se"] = _rank(_wins(mse_true[k], mse_false[k]))
            name = f"binding_write_{category}"
            out[name], out[f"{name}_se"] = _rank(_wins(mse_true.mean(0), mse_false.mean(0)))
            out[f"binding_scenes_{category}"] = float(len(rows))
    finally:
        model.train(was_training)
    return out


__all__ = ["BUCKETS", "binding_scores", "caption_nll", "diffusion_mse", "flipped", "pairs"]
