"""The ``align`` stage's loop: post-training an exported pipeline against the judged reward.

``align_loop(job)`` runs ``align.iterations`` iterations of the chosen method
(``transfusion.align``: Flow-GRPO's :func:`grpo_step` or RAFT's :func:`raft_step`) on prompts
drawn from the training captions' templates, minus the held-out combinations
(``geneval.held_out``: the same set evaluation reports apart). Iteration i draws its prompts and
noise from ``(align.seed, i)`` alone, and a checkpoint (weights, optimizer moments, the rows so
far) is kept every ``checkpoint_every`` iterations, so a resumed run repeats the uninterrupted
one's rewards. The reward is ``geneval.reward`` on the judge's reading: the rule evaluation
scores. MLflow stays in the stage: every row goes to ``on_row``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transfusion.config import AlignConfig, DiffusionConfig, SamplingConfig


@dataclass
class AlignJob:
    """What one align run reads: the pipeline (its model is aligned in place), the judge, the
    params sections it needs and where its checkpoints go."""

    pipe: object  # a TransfusionPipeline
    judge: object  # a transfusion.eval.judge.Judge: the reward's reader
    align: AlignConfig
    sampling: SamplingConfig  # the eval sampling: its guidance scale and interval while aligning
    diffusion: DiffusionConfig  # RAFT's loss: lambda, the image-first noise cap, caption dropout
    max_length: int  # tokens per RAFT training row
    palette: list[str]
    grid: int
    checkpoints: Path
    resume: bool = False
    run_id: str | None = None  # kept in checkpoints: a resumed stage reopens its MLflow run


@dataclass
class AlignResult:
    rows: list[dict] = field(default_factory=list)  # one per iteration
    metrics: dict[str, float] = field(default_factory=dict)


def prompt_pool(cfg: AlignConfig, palette: list[str], grid: int) -> dict[str, list]:
    """The prompts ``align`` may draw, per category: the templates' space minus the held out."""
    from transfusion.eval import geneval

    hidden = geneval.held_out(palette, grid, cfg.held_out_fraction)
    return {c: [p for p in geneval.prompt_space(c, palette, grid) if p.text() not in hidden] for c in cfg.categories}


def iteration_prompts(pool: dict[str, list], n: int, seed: int, iteration: int) -> list:
    """``n`` prompts of iteration ``iteration``: a category at random, then a prompt of it."""
    rng = np.random.default_rng([seed, iteration])
    categories = sorted(pool)
    return [pool[c][rng.integers(len(pool[c]))] for c in (categories[i] for i in rng.integers(len(categories), size=n))]


def align_loop(job: AlignJob, on_row: Callable[[dict], None] | None = None) -> AlignResult:
    """Align ``job.pipe.model`` in place as the module docstring says; returns its rows."""
    from transfusion.align import judged_reward
    from transfusion.train.checkpoint import latest_checkpoint, load_checkpoint

    cfg, model = job.align, job.pipe.model
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.method == "grpo" and cfg.kl_weight > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant; kept for checkpoints
    rows: list[dict] = []
    found = latest_checkpoint(job.checkpoints) if job.resume else None
    if found is not None:
        rows = load_checkpoint(found, model, optimizer, schedule)["history"]
        sys.stderr.write(f"[align] resuming after iteration {len(rows)} ({found})\n")
    pool = prompt_pool(cfg, job.palette, job.grid)
    for it in range(len(rows), cfg.iterations):
        start = time.perf_counter()
        prompts = iteration_prompts(pool, cfg.prompts_per_iteration, cfg.seed, it)
        reward_fn = judged_reward(job.pipe, job.judge, prompts, cfg.group_size)
        stats = _step(job, model, reference, optimizer, prompts, reward_fn, it)
        row = {"iteration": it + 1, "lr": cfg.lr} | stats | {"seconds": time.perf_counter() - start}
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            _checkpoint(job, model, optimizer, schedule, rows)
    return AlignResult(rows, _summary(rows))


def _step(job: AlignJob, model, reference, optimizer, prompts: list, reward_fn, it: int) -> dict[str, float]:
    """One iteration of ``align.method`` with iteration ``it``'s noise."""
    from transfusion.align import grpo_step, raft_step

    cfg, tok = job.align, job.pipe.tokenizer
    captions = [tok(p.text(), add_special_tokens=False)["input_ids"] for p in prompts]
    seed = (cfg.seed * 100_003 + it) * 10_000
    common = {
        "group_size": cfg.group_size,
        "steps": cfg.steps,
        "cfg_scale": job.sampling.cfg_scale,
        "cfg_interval": tuple(job.sampling.cfg_interval),
        "seed": seed,
        "grad_clip": cfg.grad_clip,
    }
    if cfg.method == "grpo":
        return grpo_step(
            model, reference, optimizer, captions, reward_fn, noise_level=cfg.noise_level, clip=cfg.clip,
            kl_weight=cfg.kl_weight, **common,
        )  # fmt: skip
    return raft_step(
        model, optimizer, captions, reward_fn, _collator(job, seed), _scheduler(job), updates=cfg.raft_steps,
        batch_size=cfg.raft_batch, loss_weight=job.diffusion.loss_weight, noise_limit=job.diffusion.noise_limit,
        **common,
    )  # fmt: skip


def _scheduler(job: AlignJob):
    """RAFT's sampler: evaluation's (``sampling.sampler`` with eval's changes)."""
    from transfusion.diffusion import build_scheduler

    return build_scheduler(job.pipe.model.config.diffusion, job.sampling.sampler)


def _collator(job: AlignJob, seed: int):
    """RAFT's batches, packed as in training (caption dropout from ``diffusion``)."""
    from transfusion.data.collate import Collator

    model = job.pipe.model
    return Collator(
        model.special,
        model.config.patches_per_image,
        job.max_length,
        time_token=model.config.time_conditioning == "token",
        caption_dropout=job.diffusion.caption_dropout,
        seed=seed,
    )


def _checkpoint(job: AlignJob, model, optimizer, schedule, rows: list[dict]) -> None:
    from transfusion.train.checkpoint import save_checkpoint

    state = {"history": rows, "run_id": job.run_id}
    save_checkpoint(job.checkpoints, len(rows), model, optimizer, schedule, None, state, job.align.keep_checkpoints)


def _summary(rows: list[dict], window: int = 10) -> dict[str, float]:
    """Reward (and KL, kept share) over the first and the last ``window`` iterations, wall time."""
    out: dict[str, float] = {"iterations": float(len(rows)), "align_s": sum(r["seconds"] for r in rows)}
    for key in ("reward", "kl", "clip_fraction", "kept"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"{key}_first"] = float(np.mean(values[:window]))
            out[f"{key}_last"] = float(np.mean(values[-window:]))
    return out


def quick_scores(pipe, judge, cfg: AlignConfig, sampling: SamplingConfig, palette: list[str], grid: int):
    """GenEval-style scores of ``quick_prompts`` balanced prompts per category (4 images each,
    the eval sampler, noise from ``align.seed``), overall and on the seen and held-out
    combinations apart; returns them with the prompts and the images (N, 4, H, W, 3)."""
    from transfusion.eval import geneval
    from transfusion.eval.evaluate import sample_many

    prompts, k = geneval.balanced_prompts(cfg.quick_prompts, palette, cfg.seed + 17, grid), 4
    images = sample_many(pipe, [p.text() for p in prompts for _ in range(k)], cfg.seed, sampling, batch_size=256)
    hidden = geneval.held_out(palette, grid, cfg.held_out_fraction)
    scores = geneval.split_scores(judge.read(images), prompts, k, hidden)
    return scores, prompts, images.reshape(len(prompts), k, *images.shape[1:])
