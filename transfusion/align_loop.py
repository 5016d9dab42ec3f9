"""The ``align`` stage's loop: post-training an exported pipeline against the judged reward.

``align_loop(run)`` runs ``align.iterations`` iterations of the chosen method
(``transfusion.align``: Flow-GRPO's :func:`grpo_step` or RAFT's :func:`raft_step`) on prompts
drawn from the training captions' templates, minus the held-out combinations
(``geneval.held_out``: the same set evaluation reports apart). Iteration i draws its prompts and
noise from ``(align.seed, i)`` alone, and a checkpoint (weights, optimizer moments, the rows so
far) goes into the run's store every ``checkpoint_every`` iterations, so a resumed run -- by
``--resume`` or by Ray Train restarting a failed worker -- repeats the uninterrupted one's
rewards. The reward is ``geneval.reward`` on the judge's reading: the rule evaluation scores.
The stage runs the loop here or on a Ray Train worker (``align.use_ray``:
``transfusion.align_ray`` wraps this loop); :func:`load_aligned` reads the final weights back.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from transfusion import stopping
from transfusion.config import AlignConfig, DiffusionConfig, MixtureConfig, Params, PathsConfig, SamplingConfig


class AlignRun(BaseModel):
    """One align run: the params sections it reads (paths absolute: a Ray worker runs
    elsewhere), the MLflow run it logs into, whether it resumes. Travels to Ray as JSON."""

    model_config = ConfigDict(extra="forbid")

    paths: PathsConfig
    align: AlignConfig
    sampling: SamplingConfig  # the eval sampling: its guidance scale and interval while aligning
    diffusion: DiffusionConfig  # RAFT's loss: lambda, the image-first noise cap, caption dropout
    mixture: MixtureConfig  # RAFT's replay of the training mixture
    max_length: int  # tokens per RAFT training row
    palette: list[str]
    grid: int
    resume: bool = False  # continue from the newest checkpoint in the store
    run_id: str | None = None  # kept in checkpoints: a resumed stage reopens its MLflow run
    tracking_uri: str | None = None

    @classmethod
    def from_params(cls, params: Params) -> AlignRun:
        p = params.with_absolute_paths()
        return cls(
            paths=p.paths,
            align=p.align,
            sampling=p.sampling_for("eval.sampling"),
            diffusion=p.diffusion,
            mixture=p.mixture,
            max_length=p.model.max_length,
            palette=list(p.data.scenes.palette),
            grid=p.data.scenes.grid,
        )

    @cached_property
    def store(self):
        """The run's :class:`~transfusion.train.checkpoint.CheckpointStore` (``paths.align_checkpoints``)."""
        from transfusion.train.checkpoint import CheckpointStore

        root = self.paths.align_checkpoints
        return CheckpointStore(root, root, self.align.keep_checkpoints)


@dataclass
class AlignResult:
    rows: list[dict] = field(default_factory=list)  # one per iteration
    metrics: dict[str, float] = field(default_factory=dict)


def load_aligned(run: AlignRun, model) -> None:
    """The final align checkpoint's weights into ``model`` (verified first)."""
    from transfusion.train.checkpoint import checkpoint_name, load_weights

    load_weights(run.store.fetch(checkpoint_name(run.align.iterations)), model, ema=False)


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


def align_loop(run: AlignRun, runtime=None) -> list[dict]:
    """Align the exported model of ``run`` as the module docstring says; returns the rows.
    ``runtime``: where it runs (``transfusion.train.loop.Runtime``: here; Ray's on a worker)."""
    from transfusion.align import judged_reward
    from transfusion.eval.judge import Judge
    from transfusion.pipeline import TransfusionPipeline
    from transfusion.train.checkpoint import load_checkpoint
    from transfusion.train.loop import Runtime

    rt, cfg = runtime or Runtime(), run.align
    pipe, judge = TransfusionPipeline.from_pretrained(run.paths.model), Judge.load(run.paths.judge)
    model = pipe.model.to(rt.device)
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.method == "grpo" and cfg.kl_weight > 0 else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant; kept for checkpoints
    rows: list[dict] = []
    name = rt.restored() or (run.store.latest() if run.resume else None)
    if name is not None:
        rows = load_checkpoint(run.store.fetch(name), model, optimizer, schedule)["history"]
        sys.stderr.write(f"[align] resuming after iteration {len(rows)} ({run.store.describe(name)})\n")
    pool, log, text_ids = prompt_pool(cfg, run.palette, run.grid), _row_logger(run), _training_text(run, pipe.tokenizer)
    with stopping.deferred(cfg.preempt_checkpoint):  # a SIGTERM is acted on after the iteration in flight
        for it in range(len(rows), cfg.iterations):
            start = time.perf_counter()
            prompts = iteration_prompts(pool, cfg.prompts_per_iteration, cfg.seed, it)
            reward_fn = judged_reward(pipe, judge, prompts, cfg.group_size)
            stats = _step(run, pipe, reference, optimizer, prompts, reward_fn, it, text_ids)
            rows.append({"iteration": it + 1, "lr": cfg.lr} | stats | {"seconds": time.perf_counter() - start})
            log(rows[-1])
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations or stopping.requested():
                state = {"history": rows, "run_id": run.run_id}
                staged = run.store.save(len(rows), model, optimizer, schedule, None, state) if rt.rank == 0 else None
                rt.commit(run.store, staged, len(rows))
            stopping.stop_if_requested("iteration", it + 1)  # preempted: this iteration's checkpoint is saved
    return rows


def _row_logger(run: AlignRun):
    """Each row as one progress line on stderr and into the MLflow run (``transfusion.tracking``),
    rows a resumed run repeats logged once."""
    from transfusion.tracking import NullLogger, RunLogger

    logger = RunLogger(run.tracking_uri, run.run_id) if run.run_id and run.tracking_uri else NullLogger()
    logged = logger.last_step("reward")

    def log(row: dict) -> None:
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "iteration")
        sys.stderr.write(f"[align] iteration {row['iteration']}/{run.align.iterations} {shown}\n")
        sys.stderr.flush()
        if row["iteration"] > logged:
            logger.log_metrics({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    return log


def _step(run: AlignRun, pipe, reference, optimizer, prompts: list, reward_fn, it: int, text_ids) -> dict[str, float]:
    """One iteration of ``align.method`` with iteration ``it``'s noise (``text_ids``: RAFT's replay text)."""
    from transfusion.align import grpo_step, raft_step

    cfg, tok, model = run.align, pipe.tokenizer, pipe.model
    captions = [tok(p.text(), add_special_tokens=False)["input_ids"] for p in prompts]
    seed = (cfg.seed * 100_003 + it) * 10_000
    common = {
        "group_size": cfg.group_size,
        "steps": cfg.steps,
        "cfg_scale": run.sampling.cfg_scale,
        "cfg_interval": tuple(run.sampling.cfg_interval),
        "seed": seed,
        "grad_clip": cfg.grad_clip,
    }
    if cfg.method == "grpo":
        return grpo_step(
            model, reference, optimizer, captions, reward_fn, noise_level=cfg.noise_level, clip=cfg.clip,
            kl_weight=cfg.kl_weight, **common,
        )  # fmt: skip
    return raft_step(
        model, optimizer, captions, reward_fn, _collator(run, model, seed), _scheduler(run, model),
        updates=cfg.raft_steps, batch_size=cfg.raft_batch, loss_weight=run.diffusion.loss_weight,
        noise_limit=run.diffusion.noise_limit, replay=_replay(run, tok, text_ids, seed), **common,
    )  # fmt: skip


def _replay(run: AlignRun, tokenizer, text_ids, seed: int):
    """``align.raft_replay`` examples of the training mixture (text, caption->image,
    image->caption from the training latents) per call, drawn from a stream seeded by the
    iteration's seed: RAFT's batches keep what the model was trained on beside its own samples."""
    from transfusion.data.mixture import ExampleStream

    n = run.align.raft_replay
    if n == 0:
        return None
    stream = ExampleStream(run.paths.latents, text_ids, tokenizer, run.mixture, run.mixture.text_length, seed)
    return lambda: stream.take(n)


def _training_text(run: AlignRun, tokenizer):
    """The training text's token ids (RAFT's replay draws text chunks from them), or None."""
    from transfusion.data.mixture import tokenize_corpus
    from transfusion.data.prepare import read_text_split

    if run.align.method != "raft" or run.align.raft_replay == 0:
        return None
    return tokenize_corpus(tokenizer, read_text_split(run.paths.text, "train"))


def _scheduler(run: AlignRun, model):
    """RAFT's sampler: evaluation's (``sampling.sampler`` with eval's changes)."""
    from transfusion.diffusion import build_scheduler

    return build_scheduler(model.config.diffusion, run.sampling.sampler)


def _collator(run: AlignRun, model, seed: int):
    """RAFT's batches, packed as in training (caption dropout from ``diffusion``)."""
    from transfusion.data.collate import Collator

    return Collator(
        model.special,
        model.config.patches_per_image,
        run.max_length,
        time_token=model.config.time_conditioning == "token",
        caption_dropout=run.diffusion.caption_dropout,
        seed=seed,
    )


def summary(rows: list[dict], window: int = 10) -> dict[str, float]:
    """Reward (and KL, kept share) over the first and the last ``window`` iterations, wall time."""
    out: dict[str, float] = {"iterations": float(len(rows)), "align_s": sum(r["seconds"] for r in rows)}
    for key in ("reward", "kl", "clip_fraction", "kept"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"{key}_first"] = float(np.mean(values[:window]))
            out[f"{key}_last"] = float(np.mean(values[-window:]))
    return out


def quick_scores(pipe, judge, run: AlignRun):
    """GenEval-style scores of ``quick_prompts`` balanced prompts per category (4 images each,
    the eval sampler, noise from ``align.seed``), overall and on the seen and held-out
    combinations apart; returns them with the prompts and the images (N, 4, H, W, 3)."""
    from transfusion.eval import geneval
    from transfusion.eval.evaluate import sample_many

    cfg, k = run.align, 4
    prompts = geneval.balanced_prompts(cfg.quick_prompts, run.palette, cfg.seed + 17, run.grid)
    images = sample_many(pipe, [p.text() for p in prompts for _ in range(k)], cfg.seed, run.sampling, batch_size=256)
    hidden = geneval.held_out(run.palette, run.grid, cfg.held_out_fraction)
    scores = geneval.split_scores(judge.read(images), prompts, k, hidden)
    return scores, prompts, images.reshape(len(prompts), k, *images.shape[1:])
