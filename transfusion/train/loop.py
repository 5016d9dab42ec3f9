"""The plain training loop: ``train_loop(config)`` runs in one process, or on every Ray worker.

What varies between the two is a :class:`Runtime` (rank, world size, device, how the model is
wrapped for data parallelism); the Ray wrapper passes its own, tests and ``train.use_ray: false``
use the default. The loop:

1. builds its data (tokenizer, tokenized corpus, this rank's share of the latents, the mixture
   stream, the collator) and the model, AdamW, warmup + cosine schedule and the EMA;
2. resumes from the newest checkpoint under ``paths.checkpoints`` if there is one (the training
   stage empties that folder for a fresh run and keeps it for ``--resume`` and Ray restarts);
3. trains ``train.steps`` optimizer steps (gradient accumulation, clipping, bf16 autocast where
   it pays) and stops with :class:`TrainingDiverged` on a non-finite loss or gradient, before
   the bad update, so the last checkpoint stays good;
4. on rank 0: logs metrics to the MLflow run, runs the conditioning probes
   (``transfusion.eval.probe``) on raw and EMA weights every ``eval_every`` steps, writes
   checkpoints every N steps, a sample grid every M steps, and at the end exports the model (EMA
   weights) with its tokenizer and VAE.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from transfusion.config import Params


WINDOW = ("loss", "lm", "diffusion", "tokens", "images", "n", "grad_norm")  # sums between log lines


class LoopConfig(BaseModel):
    """What a worker needs: the params and the MLflow run to log into."""

    model_config = ConfigDict(extra="forbid")

    params: Params
    tracking_uri: str | None = None
    run_id: str | None = None


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN / infinite."""


class TrainingFailed(RuntimeError):
    """A (Ray) worker failed and no retry was left; the message names the cause."""


class Runtime:
    """Single process; the Ray wrapper subclasses this."""

    rank, world_size = 0, 1

    def __init__(self, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)


class _LossStep(nn.Module):
    """``forward`` = ``model.loss`` so that DDP sees (and synchronises) the training pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, generator):
        out = self.model.loss(batch, generator)
        return out.total, out.lm, out.diffusion


def resolve_precision(setting: str, device: torch.device) -> bool:
    """True for bf16 autocast. ``auto``: CUDA with bf16, or a CPU with native bf16 (AMX /
    avx512_bf16); elsewhere bf16 convolutions and matmuls are slower than fp32."""
    if setting != "auto":
        return setting == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def ema_update(decay: float, warmup: bool):
    """``AveragedModel``'s multi_avg_fn: exponential moving average; with ``warmup`` the decay
    after n updates is min(decay, (1 + n) / (10 + n)), so early averages follow the weights
    instead of lagging ~1/(1 - decay) steps behind from the random init."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(config: dict | LoopConfig, runtime: Runtime | None = None) -> dict:
    """Train per ``config`` (a :class:`LoopConfig` or its dict); returns the final metrics."""
    from transfusion.data.collate import Collator
    from transfusion.data.latents import load_meta
    from transfusion.data.mixture import ExampleStream, tokenize_corpus
    from transfusion.data.prepare import read_text_split
    from transfusion.data.tokenizer import load_tokenizer
    from transfusion.model import TransfusionModel
    from transfusion.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    cfg = config if isinstance(config, LoopConfig) else LoopConfig.model_validate(config)
    p, tc = cfg.params, cfg.params.train
    rt = runtime or Runtime(tc.use_gpu)
    is_main = rt.rank == 0
    torch.manual_seed(tc.seed + rt.rank)
    t_setup = time.perf_counter()

    # 1. data and model
    tokenizer = load_tokenizer(p.paths.tokenizer)
    meta = load_meta(p.paths.latents)
    text_ids = tokenize_corpus(tokenizer, read_text_split(p.paths.text, "train"))
    model = TransfusionModel.from_params(p.model, p.diffusion, tokenizer, tuple(meta["latent_shape"]))
    stream = ExampleStream(p.paths.latents, text_ids, tokenizer, p.mixture, p.mixture.text_length, tc.seed, rt.rank, rt.world_size)
    collate = Collator(model.special, model.config.patches_per_image, p.model.max_length,
                       time_token=p.model.time_conditioning == "token", caption_dropout=p.diffusion.caption_dropout,
                       seed=tc.seed * 1000 + rt.rank)
    model.to(rt.device)
    step_module = rt.prepare(_LossStep(model))
    params = [q for q in model.parameters() if q.requires_grad]
    decay = [q for q in params if q.dim() >= 2]
    no_decay = [q for q in params if q.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=tc.betas, eps=tc.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
    )
    ema = None
    if tc.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(model, multi_avg_fn=ema_update(tc.ema_decay, tc.ema_warmup), use_buffers=True)
    bf16 = resolve_precision(tc.precision, rt.device)
    probe_data = _probe_data(p, tokenizer) if is_main else None

    # 2. resume
    start, history, probes, seen = 0, [], [], 0
    found = latest_checkpoint(p.paths.checkpoints)
    if found is not None:
        state = load_checkpoint(found, model, optimizer, scheduler, ema)
        start, history = state["step"], state.get("history", [])
        probes, seen = state.get("probes", []), int(state.get("images_seen", 0))
        stream.load_state(state["data"][str(rt.rank)] if str(rt.rank) in state["data"] else {"drawn": 0})
        _say(is_main, f"resumed from {found} at step {start}")
    logger = _logger(cfg) if is_main else None

    # 3. steps
    window = dict.fromkeys(WINDOW, 0.0)
    t_window = time.perf_counter()
    t_start = time.perf_counter()
    setup = t_start - t_setup
    for step in range(start + 1, tc.steps + 1):
        if tc.fault.crash_at_step == step and start == 0:
            raise RuntimeError(f"injected crash at step {step} (train.fault.crash_at_step)")
        step_module.train()
        for micro in range(tc.grad_accum):
            batch = collate(stream.take(tc.batch_size)).to(rt.device)
            gen = torch.Generator().manual_seed(hash((tc.seed, rt.rank, step, micro)) & 0x7FFFFFFF)
            with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=bf16):
                total, lm, diff = step_module(batch, gen)
            if tc.fault.nan_at_step == step:
                total = total * float("nan")
            (total / tc.grad_accum).backward()
            window["loss"] += total.item() / tc.grad_accum
            window["lm"] += lm.item() / tc.grad_accum
            window["diffusion"] += diff.item() / tc.grad_accum
            window["tokens"] += int(batch.valid.sum()) * rt.world_size
            window["images"] += len(batch.images) * rt.world_size
            seen += len(batch.images) * rt.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        if not math.isfinite(total.item()) or not torch.isfinite(grad_norm):
            kept = latest_checkpoint(p.paths.checkpoints)
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {step} (loss {total.item()}, grad norm {float(grad_norm)}); "
                f"last good checkpoint: {kept or 'none'}"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(model)
        window["grad_norm"] += float(grad_norm)
        window["n"] += 1

        if step % tc.log_every == 0 or step == tc.steps:
            dt = time.perf_counter() - t_window
            n = window["n"]
            row = {
                "step": step,
                "loss": window["loss"] / n,
                "lm_loss": window["lm"] / n,
                "diffusion_loss": window["diffusion"] / n,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": window["grad_norm"] / n,
                "tokens_per_s": window["tokens"] / dt,
                "images_per_s": window["images"] / dt,
            }
            history.append(row)
            window = dict.fromkeys(WINDOW, 0.0)
            t_window = time.perf_counter()
            if is_main:
                logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step)
                _say(True, f"step {step}/{tc.steps} loss {row['loss']:.4f} (lm {row['lm_loss']:.3f}, "
                           f"diff {row['diffusion_loss']:.4f}) {row['tokens_per_s']:.0f} tok/s {row['images_per_s']:.1f} img/s")
        if is_main and (step % tc.eval_every == 0 or step == tc.steps):
            probes.append(_probe(model, ema, tokenizer, probe_data, tc, step, seen))
            logger.log_metrics({k: v for k, v in probes[-1].items() if k != "step"}, step)
            _say(True, "probe " + ", ".join(f"{k} {probes[-1][k]:.3f}" for k in PROBE_HEADLINE if k in probes[-1]))
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            data_states = _gather_data_states(stream.state(), rt)
            if is_main:
                save_checkpoint(p.paths.checkpoints, step, model, optimizer, scheduler, ema,
                                {"history": history, "data": data_states, "run_id": cfg.run_id, "probes": probes,
                                 "images_seen": seen}, tc.keep_checkpoints)
        if is_main and (step % tc.sample_every == 0 or step == tc.steps):
            grid = p.paths.runs / "samples" / f"step-{step:08d}.png"
            _sample_grid(ema.module if ema is not None else model, tokenizer, p, grid)
            logger.log_artifact(grid, "samples")

    # 4. export
    wall = time.perf_counter() - t_start
    metrics = _final_metrics(history, wall, tc.steps - start) | {"images_seen": seen, "setup_s": setup}
    metrics |= {k: v for k, v in (probes[-1] if probes else {}).items() if k not in ("step", "images_seen")}
    if is_main:
        t_export = time.perf_counter()
        _export(ema.module if ema is not None else model, tokenizer, p, cfg.run_id)
        from transfusion.io import write_json

        metrics["export_s"] = time.perf_counter() - t_export
        write_json(p.paths.train_metrics, metrics)
        shutil.copyfile(p.paths.runs / "samples" / f"step-{tc.steps:08d}.png", _mk(p.paths.train_samples))
        _write_history(history, p.paths.train_loss_plot)
        _write_rows(probes, p.paths.train_probes)
    return metrics


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[train] {message}", file=sys.stderr, flush=True)


def _mk(path: Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Path(path)


def _logger(cfg: LoopConfig):
    from transfusion.tracking import RunLogger

    class _Null:
        def log_metrics(self, *a, **k):
            pass

        def log_artifact(self, *a, **k):
            pass

    if cfg.run_id is None or cfg.tracking_uri is None:
        return _Null()
    return RunLogger(cfg.tracking_uri, cfg.run_id)


def _gather_data_states(state: dict, rt: Runtime) -> dict:
    """Every rank's data position, gathered to all (each rank resumes its own stream)."""
    if rt.world_size == 1:
        return {"0": state}
    import torch.distributed as dist

    out: list = [None] * rt.world_size
    dist.all_gather_object(out, state)
    return {str(i): s for i, s in enumerate(out)}


def _final_metrics(history: list[dict], wall: float, steps_run: int) -> dict:
    last = history[-1] if history else {}
    tail = history[-max(1, len(history) // 5) :] if history else []
    mean = lambda k: sum(h[k] for h in tail) / len(tail) if tail else float("nan")  # noqa: E731
    return {
        "final_loss": last.get("loss", float("nan")),
        "final_lm_loss": mean("lm_loss"),
        "final_diffusion_loss": mean("diffusion_loss"),
        "tokens_per_s": mean("tokens_per_s"),
        "images_per_s": mean("images_per_s"),
        "steps": last.get("step", 0),
        "steps_this_run": steps_run,
        "wall_s": wall,
    }


def _write_history(history: list[dict], path: Path) -> None:
    keys = ["step", "loss", "lm_loss", "diffusion_loss", "lr", "grad_norm", "tokens_per_s", "images_per_s"]
    _write_rows([{k: row[k] for k in keys} for row in history], path)


def _write_rows(rows: list[dict], path: Path) -> None:
    """A CSV of ``rows`` (the first row's keys as columns); a header only when empty."""
    from transfusion.io import atomic_file

    keys = list(rows[0]) if rows else ["step"]
    with atomic_file(path) as fh:
        fh.write(",".join(keys) + "\n")
        for row in rows:
            fh.write(",".join(f"{row.get(k, float('nan')):.6g}" for k in keys) + "\n")


PROBE_HEADLINE = ("ema_quick_geneval_overall", "ema_quick_caption_exact", "ema_diffusion_cond", "ema_diffusion_uncond",
                  "ema_caption_loss", "ema_caption_loss_shuffled")


def _probe_data(p: Params, tokenizer):
    from transfusion.eval.probe import load_probe_data

    n = max(p.train.probe.val_examples, p.train.probe.captions)
    return load_probe_data(p.paths.latents, tokenizer, n, p.paths.judge, p.paths.vae, dict(p.data.scenes.palette))


def _probe(model, ema, tokenizer, data, tc, step: int, seen: int) -> dict:
    """Conditioning probes of the raw and the EMA weights (``ema_`` prefix)."""
    from transfusion.eval.probe import run_probes

    row: dict = {"step": step, "images_seen": seen}
    for prefix, net in (("", model), ("ema_", ema.module if ema is not None else None)):
        if net is not None:
            out = run_probes(net, tokenizer, data, tc.probe.val_examples, tc.probe.prompts_per_category, tc.probe.captions,
                             tc.probe.sample_steps, tc.probe.cfg_scale, seed=tc.seed)
            row |= {prefix + k: v for k, v in out.items()}
    return row


@torch.no_grad()
def _sample_grid(model, tokenizer, p: Params, path: Path) -> None:
    from transfusion.data.latents import load_meta
    from transfusion.data.scenes import render_grid
    from transfusion.vae import decode, load_vae

    tc = p.train
    was_training = model.training
    model.eval()
    captions = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in tc.sample_captions]
    latents = model.sample_images(captions, tc.sample_steps, tc.sample_cfg_scale, seed=tc.seed)  # the model's sampler
    images = decode(load_vae(p.paths.vae), latents.float().cpu() / load_meta(p.paths.latents)["scaling_factor"])
    render_grid(images, list(tc.sample_captions), _mk(path), cols=min(6, len(images)))
    model.train(was_training)


def _export(model, tokenizer, p: Params, run_id: str | None = None) -> None:
    """The final model folder: save_pretrained + tokenizer + the VAE and latent scaling."""
    from transfusion.data.latents import load_meta
    from transfusion.io import atomic_dir

    meta = load_meta(p.paths.latents)
    with atomic_dir(p.paths.model) as tmp:
        model.write_files(tmp, tokenizer)
        shutil.copytree(p.paths.vae, tmp / "vae")
        (tmp / "train_run.json").write_text(json.dumps({"run_id": run_id}) + "\n")
        (tmp / "latents.json").write_text(
            json.dumps({"scaling_factor": meta["scaling_factor"], "latent_shape": meta["latent_shape"], "vae": "vae"}, indent=2) + "\n"
        )
