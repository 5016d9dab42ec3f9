"""Conditioning probes, run while training: does the model use its captions and its images?

On held-out (``val``) latents, for any weights (the training stage probes raw and EMA):

1. **Caption -> image.** Validation diffusion loss per noise-level bucket, with the caption and
   with it dropped (the same images, noise and timesteps): ``diffusion_cond_b{k}`` and
   ``diffusion_uncond_b{k}``, bucket k of ``BUCKETS`` (noise level 0 = clean, 1 = pure noise).
   A model that uses its caption has a lower conditional loss at high noise; none at all is a bug.
2. **Image -> caption.** Teacher-forced caption loss (nats per caption token) after the true
   image and after another scene's image (``caption_loss`` / ``caption_loss_shuffled``).
3. **Binding** (``transfusion.eval.binding``): on ``binding_scenes`` val scenes per
   compositional category, is the true caption ranked above its relation-flipped or
   colour-swapped twin, reading (caption NLL) and writing (diffusion loss per noise bucket)?
   (``binding_read_<category>``, ``binding_write_<category>[_b<k>]``; chance is 0.5.)
4. **A quick evaluation.** ``prompts_per_category`` prompts of each GenEval category from val
   captions, one image each through the pipeline (``TransfusionPipeline.sample_images``), read
   by the judge (``quick_geneval_*`` by
   GenEval's rule, ``quick_scene_match_overall``), and greedy captions of ``captions`` val
   scenes (``quick_caption_exact``). Needs scenes with structured content and a judge.

Everything runs under ``torch.no_grad`` with its own generators: probing does not change the
training's random streams.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from transfusion.config import ProbeConfig, SamplingConfig
from transfusion.data.collate import image_to_caption
from transfusion.eval.binding import BUCKETS, binding_scores, diffusion_mse
from transfusion.sampling import example_collator


@dataclass
class ProbeData:
    """What the probes read, loaded once: val latents with their records, a judge (optional)."""

    latents: torch.Tensor  # (N, C, h, w) scaled val latents
    records: list[dict]
    captions: list[list[int]]  # token ids per record
    judge: object | None  # transfusion.eval.judge.Judge, or None: no quick evaluation
    palette: dict

    def head(self, n: int) -> ProbeData:
        """The first ``n`` rows (the loss probes read ``val_examples``, captioning ``captions``)."""
        return replace(self, latents=self.latents[:n], records=self.records[:n], captions=self.captions[:n])


def load_probe_data(latents_root: Path, tokenizer, n: int, judge_path: Path | None, palette: dict) -> ProbeData:
    """The first ``n`` val latents; the judge when the scenes carry structured content."""
    from transfusion.data.latents import LatentReader
    from transfusion.eval.judge import Judge

    reader = LatentReader(latents_root, "val", shuffle=False, repeat=False)
    rows = []
    for latent, record in reader:
        rows.append((torch.as_tensor(latent), record))
        if len(rows) == n:
            break
    latents = torch.stack([r[0] for r in rows])
    records = [r[1] for r in rows]
    captions = [tokenizer(r["caption"], add_special_tokens=False)["input_ids"] for r in records]
    judged = (
        judge_path is not None
        and (Path(judge_path) / "config.json").is_file()
        and all(r.get("content") for r in records)
    )
    return ProbeData(
        latents=latents,
        records=records,
        captions=captions,
        judge=Judge.load(judge_path) if judged else None,
        palette=dict(palette),
    )


@torch.no_grad()
def diffusion_losses(model, data: ProbeData, seed: int = 0) -> dict[str, float]:
    """Validation diffusion MSE per noise bucket, with and without the caption (the same noisy
    images for both)."""
    out = {}
    for name, captions in (("cond", data.captions), ("uncond", [[] for _ in data.captions])):
        per_bucket = diffusion_mse(model, data.latents, captions, BUCKETS, seed).mean(1)  # (K,)
        out |= {f"diffusion_{name}_b{k}": float(v) for k, v in enumerate(per_bucket)}
        out[f"diffusion_{name}"] = float(per_bucket.mean())
    return out


@torch.no_grad()
def caption_losses(model, data: ProbeData) -> dict[str, float]:
    """Teacher-forced caption loss after the true clean image and after a shuffled one."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = {}
    for name, shift in (("caption_loss", 0), ("caption_loss_shuffled", 1)):
        images = data.latents.roll(shift, dims=0).to(device)
        batch = example_collator(model)([image_to_caption(z, c) for z, c in zip(images, data.captions)]).to(device)
        hidden, _ = model(batch, images, torch.zeros(len(images), device=device))
        targets = batch.labels != -100
        out[name] = float(F.cross_entropy(model.text_logits(hidden[targets]).float(), batch.labels[targets]))
    return out


@torch.no_grad()
def quick_eval(pipe, data: ProbeData, cfg: ProbeConfig, sampling: SamplingConfig, seed: int = 0) -> dict[str, float]:
    """A small GenEval-style run sampled as ``sampling`` says and captioning accuracy, through
    the pipeline, judged."""
    from transfusion.eval import geneval
    from transfusion.eval.captioning import caption_scores
    from transfusion.pipeline import sampling_kwargs

    if data.judge is None:
        return {}
    prompts = geneval.prompts_from_records(data.records, cfg.prompts_per_category, seed)
    images = pipe.sample_images([p.text() for p in prompts], seed=seed, **sampling_kwargs(sampling))
    scores = geneval.score([[c] for c in data.judge.read(images)], prompts)
    out = {f"quick_{k}": v for k, v in scores.items() if k.startswith("geneval_") or k == "scene_match_overall"}
    n = min(cfg.captions, len(data.latents))
    texts = pipe.caption_latents(data.latents[:n])
    out["quick_caption_exact"] = caption_scores(data.records[:n], texts, data.palette)["caption_exact"]
    return out


def probe_rows(cfg: ProbeConfig) -> int:
    """Val rows the loss probes, captioning and the quick evaluation read (the first ones)."""
    return max(cfg.val_examples, cfg.captions)


def run_probes(pipe, data: ProbeData, cfg: ProbeConfig, sampling: SamplingConfig, seed: int = 0) -> dict[str, float]:
    """All four probes on ``pipe.model`` (put in eval mode for the duration) as ``cfg`` (the
    ``train.probe`` section) says, the quick evaluation sampled as ``sampling``. The loss probes
    read the first ``val_examples`` rows of ``data``, binding every row it holds
    (``load_probe_data`` with ``n`` of at least :func:`probe_rows`)."""
    model = pipe.model
    was_training = model.training
    model.eval()
    try:
        out = diffusion_losses(model, data.head(cfg.val_examples), seed)
        out |= caption_losses(model, data.head(cfg.val_examples))
        if cfg.binding_scenes:  # needs parseable captions, not a judge
            binding = binding_scores(model, pipe.tokenizer, data.latents, data.records, cfg.binding_scenes, seed)
            out |= {k: v for k, v in binding.items() if not k.endswith("_se") and "scenes" not in k}
        out |= quick_eval(pipe, data.head(probe_rows(cfg)), cfg, sampling, seed)
    finally:
        model.train(was_training)
    return out


__all__ = [
    "BUCKETS",
    "ProbeData",
    "caption_losses",
    "diffusion_losses",
    "load_probe_data",
    "probe_rows",
    "quick_eval",
    "run_probes",
]
