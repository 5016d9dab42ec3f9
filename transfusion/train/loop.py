"""The plain training loop: ``train_loop(config)`` runs in one process, or on every Ray worker.

What varies between the two is a :class:`Runtime` (rank, world size, device, how the model is
wrapped for data parallelism); the Ray wrapper passes its own,
tests and ``train.use_ray: false`` use the default. The loop trains; it writes nothing but
checkpoints and the MLflow run (the training stage writes the outputs):

The run itself is a :class:`~transfusion.train.run.TrainRun` (its params sections, MLflow run,
checkpoint store, checkpoint names and sample grids), the same object the training stage and
the Ray wrapper hold. The loop:

1. builds a :class:`TrainState`: tokenizer, tokenized corpus, this rank's share of the latents,
   the mixture stream, the collator, the model, AdamW, warm-up + cosine schedule, the EMA;
2. resumes from a checkpoint of the run's :class:`~transfusion.train.checkpoint.CheckpointStore`: the
   one Ray Train hands a restarted worker (``ray.train.get_checkpoint()``), else the one the
   training stage chose (``resume_from``: ``--resume``), else none (a fresh run);
3. trains ``train.steps`` optimizer steps (gradient accumulation, clipping, bf16 autocast where
   it pays) and stops with :class:`TrainingDiverged` on a non-finite loss or gradient, before
   the bad update, so the last checkpoint stays good; checkpoints every ``checkpoint_every``
   steps and at the end (each rank's data position and caption-dropout RNG included, so a
   resumed run repeats the uninterrupted run's losses);
4. on rank 0 (:class:`_Watch`): logs metrics to the MLflow run, runs the conditioning probes
   (``transfusion.eval.probe``) on raw and EMA weights every ``eval_every`` steps and draws a
   sample grid every ``sample_every`` steps (``TrainRun.draw_samples``; the training stage draws
   the final one with it, from the exported weights);
5. returns its final metrics (Ray hands rank 0's to the driver). :func:`load_trained` reads the
   final checkpoint back as a :class:`TrainResult` (EMA weights, loss and probe rows) for the
   stage to export.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from transfusion import stopping
from transfusion.config import DiffusionConfig, TrainConfig
from transfusion.errors import UserError
from transfusion.optim import warmup_cosine
from transfusion.train.run import TrainRun

WINDOW = ("loss", "lm", "diffusion", "tokens", "images", "n", "grad_norm")  # sums between log lines


class TrainingDiverged(UserError):
    """The loss or the gradient became NaN / infinite."""


class TrainingFailed(UserError):
    """A (Ray) worker failed and no retry was left; the message names the cause."""


class Runtime:
    """Single process; the Ray wrapper subclasses this."""

    rank, world_size = 0, 1

    def __init__(self, use_gpu: bool = False) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.device)

    def restored(self) -> str | None:
        """The checkpoint the runtime hands a restarted worker (Ray); the plain loop has none."""
        return None

    def commit(self, store, staged: Path | None, step: int) -> None:
        """Store the checkpoint rank 0 staged (``None`` on other ranks)."""
        if staged is not None:
            store.commit(staged)


class _LossStep(nn.Module):
    """``forward`` = ``model.loss`` so that DDP sees (and synchronises) the training pass."""

    def __init__(self, model: nn.Module, diffusion: DiffusionConfig) -> None:
        super().__init__()
        self.model = model
        self.loss_weight, self.noise_limit = diffusion.loss_weight, diffusion.noise_limit

    def forward(self, batch, generator):
        out = self.model.loss(batch, generator, loss_weight=self.loss_weight, noise_limit=self.noise_limit)
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
    """``AveragedModel``'s multi_avg_fn: exponential moving average; with ``warmup`` the decay is
    diffusers' ``EMAModel`` schedule, min(decay, (1 + n) / (10 + n)) after n updates, so early
    averages follow the weights instead of lagging ~1/(1 - decay) steps behind the random init."""
    from diffusers.training_utils import EMAModel

    schedule = EMAModel([], decay=decay)  # the schedule only: no parameters to shadow

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        d = schedule.get_decay(int(num_averaged) + 1) if warmup else decay  # optimisation step n + 1
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    return update


def adamw(params: list[nn.Parameter], tc: TrainConfig, shard: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``params`` as ``train`` says; weight decay on tensors of 2 or more dimensions
    only (not on norms and biases). ``shard``: ZeRO-1 over the process group, each rank keeping
    the moments of its share of the parameters (the update is the same, then broadcast)."""
    decay = [q for q in params if q.dim() >= 2]
    no_decay = [q for q in params if q.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=tc.lr, betas=tc.betas, eps=tc.eps)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, eps=tc.eps)


def consolidate(optimizer: torch.optim.Optimizer) -> None:
    """Gather a sharded optimizer's state on rank 0 (every rank calls it) so that rank 0's
    checkpoint holds the whole state; a plain optimizer has it already."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)


class TrainState:
    """What one rank trains with: data, model, optimizer, schedule, EMA; its step, loss and probe
    history and images seen (restored by :meth:`resume`)."""

    def __init__(self, cfg: TrainRun, rt: Runtime) -> None:
        from transfusion.data.collate import Collator
        from transfusion.data.latents import load_meta
        from transfusion.data.mixture import ExampleStream, tokenize_corpus
        from transfusion.data.prepare import read_text_split
        from transfusion.data.tokenizer import load_tokenizer
        from transfusion.model import TransfusionModel

        paths, tc = cfg.paths, cfg.train
        self.tokenizer = load_tokenizer(paths.tokenizer)
        meta = load_meta(paths.latents)
        text_ids = tokenize_corpus(self.tokenizer, read_text_split(paths.text, "train"))
        shape = tuple(meta["latent_shape"])
        self.model = TransfusionModel.from_params(cfg.model, cfg.diffusion, cfg.sampling, self.tokenizer, shape)
        self.stream = ExampleStream(
            paths.latents,
            text_ids,
            self.tokenizer,
            cfg.mixture,
            cfg.mixture.text_length,
            tc.seed,
            rt.rank,
            rt.world_size,
        )
        self.collate = Collator(
            self.model.special,
            self.model.config.patches_per_image,
            cfg.model.max_length,
            time_token=cfg.model.time_conditioning == "token",
            caption_dropout=cfg.diffusion.caption_dropout,
            seed=tc.seed * 1000 + rt.rank,
        )
        self.model.to(rt.device)
        self.step_module = rt.prepare(_LossStep(self.model, cfg.diffusion))
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.optimizer = adamw(self.params, tc, shard=tc.shard_optimizer and rt.world_size > 1)
        self.scheduler = warmup_cosine(self.optimizer, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
        self.ema = None
        if tc.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(tc.ema_decay, tc.ema_warmup), use_buffers=True)
        self.bf16 = resolve_precision(tc.precision, rt.device)
        self.step, self.history, self.probes, self.seen = 0, [], [], 0

    @property
    def trained(self) -> nn.Module:
        """The weights that are exported and sampled: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def resume(self, path: Path, rank: int) -> None:
        from transfusion.train.checkpoint import load_checkpoint

        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.ema)
        self.step, self.history = state["step"], state.get("history", [])
        self.probes, self.seen = state.get("probes", []), int(state.get("images_seen", 0))
        data = state["data"].get(str(rank), {"drawn": 0})
        self.stream.load_state(data)
        if "collate" in data:
            self.collate.load_state(data["collate"])

    def data_state(self) -> dict:
        """This rank's position in its data: the stream's and the caption-dropout RNG's."""
        return self.stream.state() | {"collate": self.collate.state()}


def train_loop(cfg: TrainRun, runtime: Runtime | None = None) -> dict:
    """Train the run ``cfg`` and return rank 0's final metrics; the trained weights are the
    final checkpoint (:func:`load_trained` reads them)."""
    tc = cfg.train
    rt = runtime or Runtime(tc.use_gpu)
    is_main = rt.rank == 0
    torch.manual_seed(tc.seed + rt.rank)
    t_setup = time.perf_counter()

    # 1. data, model, optimizer; resumed where a checkpoint says; what rank 0 watches with
    st = TrainState(cfg, rt)
    start = _resume(st, cfg, rt)
    watch = _Watch(cfg, st) if is_main else None

    # 2. steps
    window = dict.fromkeys(WINDOW, 0.0)
    t_window = t_start = time.perf_counter()
    setup = t_start - t_setup
    with stopping.deferred(tc.preempt_checkpoint):  # a SIGTERM is acted on after the step in flight
        for step in range(start + 1, tc.steps + 1):
            _inject_faults(tc.fault, step, start, rt)
            for key, value in _optimizer_step(st, cfg, rt, step).items():
                window[key] += value
            st.step = step
            window["n"] += 1
            if step % tc.log_every == 0 or step == tc.steps:
                st.history.append(_log_row(window, step, st.scheduler.get_last_lr()[0], time.perf_counter() - t_window))
                window, t_window = dict.fromkeys(WINDOW, 0.0), time.perf_counter()
                if is_main:
                    watch.log(st.history[-1])
            if is_main and (step % tc.eval_every == 0 or step == tc.steps):
                st.probes.append(watch.probe(st))
            if step % tc.checkpoint_every == 0 or step == tc.steps or stopping.requested():
                _checkpoint(st, cfg, rt)
            stopping.stop_if_requested("step", step)  # preempted: the checkpoint of this step is saved
            if is_main and step % tc.sample_every == 0 and step < tc.steps:  # the final grid: the training stage
                watch.sample_grid(st, step)
    # 3. the run's metrics (Ray hands rank 0's to the driver)
    metrics = _final_metrics(st.history, time.perf_counter() - t_start, tc.steps - start)
    metrics |= {"images_seen": st.seen, "setup_s": setup, "resumed_at_step": start}
    metrics["optimizer_shards"] = getattr(st.optimizer, "world_size", 1)  # ZeRO-1: the workers sharing AdamW's state
    metrics |= {k: v for k, v in (st.probes[-1] if st.probes else {}).items() if k not in ("step", "images_seen")}
    return metrics


def _resume(st: TrainState, cfg: TrainRun, rt: Runtime) -> int:
    """Restore the checkpoint Ray hands a restarted worker (unless ``--resume PATH`` removed it
    since), else the stage's choice, else none; returns the step training continues after."""
    store = cfg.store
    name = rt.restored()
    if name is None or name not in store.names():
        name = cfg.resume_from
    if name is not None:
        st.resume(store.fetch(name, rt.rank), rt.rank)
        _say(rt.rank == 0, f"resumed from {store.describe(name)} at step {st.step}")
    return st.step


def _inject_faults(fault, step: int, start: int, rt: Runtime) -> None:
    """``train.fault``: deliberate failures for the recovery tests (first attempt only)."""
    if start > 0:
        return
    if fault.crash_at_step == step:
        raise RuntimeError(f"injected crash at step {step} (train.fault.crash_at_step)")
    if fault.kill_at_step == step and rt.rank == rt.world_size - 1:
        import os
        import signal

        _say(True, f"rank {rt.rank}: killing this worker at step {step} (train.fault.kill_at_step)")
        os.kill(os.getpid(), signal.SIGKILL)


def _optimizer_step(st: TrainState, cfg: TrainRun, rt: Runtime, step: int) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; stops before a non-finite update.
    Returns the step's sums for the log window (losses, tokens, images, gradient norm)."""
    tc = cfg.train
    sums = dict.fromkeys(("loss", "lm", "diffusion", "tokens", "images"), 0.0)
    st.step_module.train()
    for micro in range(tc.grad_accum):
        batch = st.collate(st.stream.take(tc.batch_size)).to(rt.device)
        gen = torch.Generator().manual_seed(hash((tc.seed, rt.rank, step, micro)) & 0x7FFFFFFF)
        with torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16, enabled=st.bf16):
            total, lm, diff = st.step_module(batch, gen)
        if tc.fault.nan_at_step == step:
            total = total * float("nan")
        (total / tc.grad_accum).backward()
        sums["loss"] += total.item() / tc.grad_accum
        sums["lm"] += lm.item() / tc.grad_accum
        sums["diffusion"] += diff.item() / tc.grad_accum
        sums["tokens"] += int(batch.valid.sum()) * rt.world_size
        sums["images"] += len(batch.images) * rt.world_size
        st.seen += len(batch.images) * rt.world_size
    grad_norm = torch.nn.utils.clip_grad_norm_(st.params, tc.grad_clip)
    if not math.isfinite(total.item()) or not torch.isfinite(grad_norm):
        raise TrainingDiverged(
            f"non-finite loss or gradient at step {step} (loss {total.item()}, grad norm {float(grad_norm)}); "
            f"last good checkpoint: {cfg.store.describe(cfg.store.latest())}"
        )
    st.optimizer.step()
    st.scheduler.step()
    st.optimizer.zero_grad(set_to_none=True)
    if st.ema is not None:
        st.ema.update_parameters(st.model)
    return sums | {"grad_norm": float(grad_norm)}


def _log_row(window: dict, step: int, lr: float, dt: float) -> dict:
    n = window["n"]
    return {
        "step": step,
        "loss": window["loss"] / n,
        "lm_loss": window["lm"] / n,
        "diffusion_loss": window["diffusion"] / n,
        "lr": lr,
        "grad_norm": window["grad_norm"] / n,
        "tokens_per_s": window["tokens"] / dt,
        "images_per_s": window["images"] / dt,
    }


def _checkpoint(st: TrainState, cfg: TrainRun, rt: Runtime) -> None:
    """Rank 0 stages the checkpoint (every rank's data state gathered), the runtime stores it."""
    data_states = _gather_data_states(st.data_state(), rt)
    consolidate(st.optimizer)
    staged = None
    if rt.rank == 0:
        trainer_state = {
            "history": st.history,
            "data": data_states,
            "run_id": cfg.run_id,
            "probes": st.probes,
            "images_seen": st.seen,
        }
        staged = cfg.store.save(st.step, st.model, st.optimizer, st.scheduler, st.ema, trainer_state)
    rt.commit(cfg.store, staged, st.step)


@dataclass
class TrainResult:
    """A finished run: the trained weights (EMA when enabled), rank 0's metrics, the loss rows
    (every ``log_every`` steps) and the probe rows (every ``eval_every`` steps)."""

    model: nn.Module
    metrics: dict
    history: list[dict]
    probes: list[dict]


def load_trained(cfg: TrainRun, metrics: dict) -> TrainResult:
    """The final checkpoint of the run ``cfg`` describes, as a :class:`TrainResult`."""
    from transfusion.data.latents import load_meta
    from transfusion.data.tokenizer import load_tokenizer
    from transfusion.model import TransfusionModel
    from transfusion.train.checkpoint import CheckpointError, load_weights

    store, name = cfg.store, cfg.final_checkpoint
    final = store.fetch(name) if name in store.names() else None
    model = TransfusionModel.from_params(
        cfg.model,
        cfg.diffusion,
        cfg.sampling,
        load_tokenizer(cfg.paths.tokenizer),
        tuple(load_meta(cfg.paths.latents)["latent_shape"]),
    )
    state = load_weights(final, model, ema=cfg.train.ema_decay > 0) if final is not None else {"step": None}
    if state["step"] != cfg.train.steps:
        raise CheckpointError(f"{store.location}: no checkpoint of step {cfg.train.steps} (the run did not finish)")
    return TrainResult(model.eval(), metrics, state.get("history", []), state.get("probes", []))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _say(enabled: bool, message: str) -> None:
    """One progress line on stderr. Not ``print``: Ray Train patches it in its workers to go both
    to the stream and to its logger, which printed every line twice."""
    if enabled:
        sys.stderr.write(f"[train] {message}\n")
        sys.stderr.flush()


def _logger(cfg: TrainRun):
    """The MLflow run to log into (``transfusion.tracking``), or one that drops everything."""
    from transfusion.tracking import NullLogger, RunLogger

    if cfg.run_id is None or cfg.tracking_uri is None:
        return NullLogger()
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


PROBE_HEADLINE = (
    "ema_quick_geneval_overall",
    "ema_quick_caption_exact",
    "ema_diffusion_cond",
    "ema_diffusion_uncond",
    "ema_caption_loss",
    "ema_caption_loss_shuffled",
    "ema_binding_read_position",
    "ema_binding_write_position",
    "ema_binding_read_color_attr",
    "ema_binding_write_color_attr",
)


class _Watch:
    """Rank 0's view of the run: metrics and sample grids into the MLflow run, the probes; one
    pipeline (tokenizer, VAE, scheduler) around the raw or the EMA weights."""

    def __init__(self, cfg: TrainRun, st: TrainState) -> None:
        from transfusion.data.latents import load_meta
        from transfusion.eval.probe import load_probe_data, probe_rows
        from transfusion.pipeline import TransfusionPipeline
        from transfusion.vae import load_vae

        self.cfg = cfg
        self.logger = _logger(cfg)
        # a resumed run recomputes the steps between its checkpoint and the interruption, which
        # the run already logged: each step goes to MLflow once
        self.logged = {"loss": self.logger.last_step("loss"), "probe": self.logger.last_step("caption_loss")}
        pc = cfg.train.probe
        rows = max(probe_rows(pc), 7 * pc.binding_scenes)  # a sixth of val per category, with slack
        self.probe_data = load_probe_data(cfg.paths.latents, st.tokenizer, rows, cfg.paths.judge, cfg.palette)
        scaling_factor = float(load_meta(cfg.paths.latents)["scaling_factor"])
        self.pipe = TransfusionPipeline(st.model, st.tokenizer, load_vae(cfg.paths.vae), scaling_factor)

    def log(self, row: dict) -> None:
        if row["step"] > self.logged["loss"]:
            self.logger.log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
        _say(
            True,
            f"step {row['step']}/{self.cfg.train.steps} loss {row['loss']:.4f} (lm {row['lm_loss']:.3f}, "
            f"diff {row['diffusion_loss']:.4f}) {row['tokens_per_s']:.0f} tok/s {row['images_per_s']:.1f} img/s",
        )

    def probe(self, st: TrainState) -> dict:
        """Conditioning probes of the raw and the EMA weights (``ema_`` prefix), logged."""
        from transfusion.eval.probe import run_probes

        row: dict = {"step": st.step, "images_seen": st.seen}
        for prefix, net in (("", st.model), ("ema_", st.ema.module if st.ema is not None else None)):
            if net is not None:
                pipe, pc = self.pipe.with_model(net), self.cfg.train.probe
                out = run_probes(pipe, self.probe_data, pc, self.cfg.probe_sampling, self.cfg.train.seed)
                row |= {prefix + k: v for k, v in out.items()}
        if st.step > self.logged["probe"]:
            self.logger.log_metrics({k: v for k, v in row.items() if k != "step"}, st.step)
        _say(True, "probe " + ", ".join(f"{k} {row[k]:.3f}" for k in PROBE_HEADLINE if k in row))
        return row

    def sample_grid(self, st: TrainState, step: int) -> None:
        """The sample captions drawn by the trained (EMA) weights, into the MLflow run."""
        self.logger.log_artifact(self.cfg.draw_samples(self.pipe.with_model(st.trained), step), "samples")
