"""Post-training against the judged reward: Flow-GRPO's pieces (Liu et al. 2025).

The reward is ``transfusion.eval.geneval.reward`` (GenEval's rule on the judge's reading, the
same rule evaluation scores). Flow-GRPO turns the flow sampler into an SDE with the same
marginals (``transfusion.diffusion.flow_sde_step``), so every denoising step is a Gaussian
policy step with a log-probability:

- :func:`sample_trajectories` samples images with the SDE sampler and keeps every step's latent
  and log-probability under the sampling weights (no gradient);
- :func:`step_moments` gives the Gaussian of recorded steps under the current weights, with
  gradient: :func:`step_logprobs` scores the recorded steps with it (the policy ratio of
  GRPO's clipped objective is ``exp(new - old)``) and :func:`step_kl` compares it with a frozen
  reference's;
- :func:`group_advantages` and :func:`grpo_loss`: GRPO's group-normalised advantages and its
  clipped objective with a KL penalty; :func:`grpo_step` is one iteration.

:func:`raft_step` is the other method: reward-ranked fine-tuning (RAFT, Dong et al. 2023) --
sample, keep what the judge passes, and train on it with the usual Transfusion loss.

Flow-GRPO needs a flow model; RAFT samples with the model's own sampler (any objective).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transfusion.diffusion import build_scheduler, flow_sde_moments, flow_sde_step, gaussian_logprob
from transfusion.errors import BadInput
from transfusion.sampling import generators, guidance_at, guided, image_predictor, initial_noise, latent_shape


@dataclass
class Trajectory:
    """Sampled images with their denoising steps."""

    captions: list[list[int]]  # token ids per image
    sigmas: list[float]  # (T + 1,) noise levels, 1 (pure noise) -> 0
    latents: torch.Tensor  # (T + 1, N, C, H, W): pure noise first, the sampled scaled latents last
    logprobs: torch.Tensor  # (T, N): each step's log-probability under the sampling weights


def flow_sigmas(model, steps: int) -> list[float]:
    """The noise levels of ``steps`` flow-Euler steps for ``model`` (its schedule's shift)."""
    schedule = model.config.diffusion
    if schedule.objective != "flow":
        raise BadInput(f"Flow-GRPO samples flow models; this one is trained with {schedule.objective!r}")
    scheduler = build_scheduler(schedule, "flow_euler")
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas]


def _velocity(model, predict, x: torch.Tensor, sigma: float, cfg_scale: float, interval) -> torch.Tensor:
    """The guided velocity at noise level ``sigma`` (guidance only inside ``interval``)."""
    scale = guidance_at(sigma, cfg_scale, interval)
    x_in = torch.cat([x, x]) if scale != 1.0 else x
    time = torch.full((len(x_in),), sigma * model.config.diffusion.train_steps, device=x.device)
    return guided(predict(x_in, time).float(), scale)


@torch.no_grad()
def sample_trajectories(
    model,
    captions: list[list[int]],
    steps: int,
    cfg_scale: float,
    noise_level: float,
    seed: int = 0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    use_cache: bool = True,
) -> Trajectory:
    """One SDE-sampled image per caption (``noise_level``: Flow-GRPO's ``a``; 0 is the ODE
    sampler), with every step kept; image i draws its noise from ``seed + i``."""
    sigmas = flow_sigmas(model, steps)
    device = next(model.parameters()).device
    predict = image_predictor(model, captions, cfg_scale, use_cache)
    gens = generators(seed, len(captions))
    x = initial_noise(gens, latent_shape(model), device)
    xs, logprobs = [x], []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = _velocity(model, predict, x, sigma, cfg_scale, cfg_interval)
        noise = initial_noise(gens, latent_shape(model), device)
        x, logp = flow_sde_step(x, v, sigma, sigma_next, noise_level, sigmas[1], noise=noise)
        xs.append(x)
        logprobs.append(logp)
    return Trajectory([list(c) for c in captions], sigmas, torch.stack(xs), torch.stack(logprobs))


def step_moments(
    model,
    traj: Trajectory,
    cfg_scale: float,
    noise_level: float,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    steps: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """The SDE step's mean (S, N, C, H, W) and standard deviation (S,) at the recorded ``steps``
    (default: all) of ``traj`` under ``model``'s current weights, differentiable (the whole
    sequence runs at each step)."""
    predict = image_predictor(model, traj.captions, cfg_scale, use_cache=False)
    sigmas = traj.sigmas
    means, stds = [], []
    for i in range(len(sigmas) - 1) if steps is None else steps:
        v = _velocity(model, predict, traj.latents[i], sigmas[i], cfg_scale, cfg_interval)
        mean, std = flow_sde_moments(traj.latents[i], v, sigmas[i], sigmas[i + 1], noise_level, sigmas[1])
        means.append(mean)
        stds.append(std)
    return torch.stack(means), stds


def step_logprobs(traj: Trajectory, means: torch.Tensor, stds: list[float], steps: Sequence[int] | None = None):
    """Log-probabilities (S, N) of the recorded ``steps`` (default: all) of ``traj`` under the
    Gaussians :func:`step_moments` gave for the same steps."""
    chosen = range(len(traj.sigmas) - 1) if steps is None else steps
    nexts = traj.latents[[i + 1 for i in chosen]]
    return torch.stack([gaussian_logprob(x, m, torch.full_like(m, s)) for x, m, s in zip(nexts, means, stds)])


def step_kl(means: torch.Tensor, reference_means: torch.Tensor, stds: list[float]) -> torch.Tensor:
    """KL (S, N) between the policy's and the reference's Gaussian steps of equal std, per
    element averaged over each image (Flow-GRPO's KL term)."""
    std = torch.tensor(stds, device=means.device).view(-1, 1)
    return (means - reference_means).pow(2).flatten(2).mean(2) / (2 * std**2)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards of consecutive groups of ``group_size`` samples of one prompt -> (N,)
    advantages, normalised within each group (GRPO); a group that scored alike gets zeros."""
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).flatten()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    kl: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's clipped objective over steps (S, N) with per-image ``advantages`` (N,), plus
    ``kl_weight`` times the mean ``kl`` (S, N) to the reference; returns the loss and its
    statistics (policy loss, clip fraction, KL)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    policy = torch.maximum(unclipped, clipped).mean()
    kl_term = kl.mean() if kl is not None else torch.zeros((), device=logprobs.device)
    stats = {
        "policy_loss": float(policy.detach()),
        "clip_fraction": float(((ratio - 1.0).abs() > clip).float().mean()),
        "kl": float(kl_term.detach()),
    }
    return policy + kl_weight * kl_term, stats


def judged_reward(pipe, judge, prompts: list, group_size: int):
    """``reward_fn`` for :func:`grpo_step` on GenEval-style ``prompts`` (each sampled
    ``group_size`` times, in order): the latents decoded by ``pipe``'s VAE, read by ``judge``,
    scored by ``geneval.reward`` (GenEval's rule, the one evaluation uses)."""
    from transfusion.eval.geneval import reward

    def reward_fn(latents: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        read = judge.read(pipe.decode_latents(latents))
        return torch.tensor([reward(content, prompts[i // group_size]) for i, content in enumerate(read)])

    return reward_fn


def grpo_step(
    model,
    reference,
    optimizer,
    captions: list[list[int]],
    reward_fn,
    *,
    group_size: int,
    steps: int,
    noise_level: float,
    cfg_scale: float,
    clip: float,
    kl_weight: float,
    seed: int,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    grad_clip: float = 1.0,
) -> dict[str, float]:
    """One Flow-GRPO iteration on ``model``: ``group_size`` SDE samples per caption, their
    rewards (``reward_fn(latents (N, C, H, W), captions) -> (N,)``), group-normalised
    advantages, and one optimizer step on the clipped objective over every denoising step, with
    a KL penalty to the frozen ``reference``. Returns the iteration's statistics."""
    rows = [list(c) for c in captions for _ in range(group_size)]
    was_training = model.training
    model.eval()  # sampling and scoring see the same network (no dropout either way)
    traj = sample_trajectories(model, rows, steps, cfg_scale, noise_level, seed, cfg_interval)
    rewards = reward_fn(traj.latents[-1], rows).float()
    advantages = group_advantages(rewards, group_size).to(traj.latents.device)
    with torch.no_grad():
        old = step_logprobs(traj, *step_moments(model, traj, cfg_scale, noise_level, cfg_interval))  # ratio 1
        ref_means = step_moments(reference, traj, cfg_scale, noise_level, cfg_interval)[0] if kl_weight > 0 else None
    optimizer.zero_grad(set_to_none=True)
    means, stds = step_moments(model, traj, cfg_scale, noise_level, cfg_interval)
    logprobs = step_logprobs(traj, means, stds)
    kl = step_kl(means, ref_means, stds) if ref_means is not None else None
    loss, stats = grpo_loss(logprobs, old, advantages, clip, kl, kl_weight)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    model.train(was_training)
    return stats | {"reward": float(rewards.mean()), "grad_norm": float(grad_norm)}


def raft_step(
    model,
    optimizer,
    captions: list[list[int]],
    reward_fn,
    collate,
    scheduler,
    *,
    group_size: int,
    steps: int,
    cfg_scale: float,
    updates: int,
    batch_size: int,
    loss_weight: float,
    noise_limit: float,
    seed: int,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    grad_clip: float = 1.0,
    replay=None,
) -> dict[str, float]:
    """One RAFT iteration: ``group_size`` samples per caption (``steps`` of ``scheduler``, image i
    from noise ``seed + i``), the ones ``reward_fn`` passes kept, then ``updates`` steps of
    :func:`_raft_update` on ``batch_size`` of them (plus ``replay()``'s training examples).
    Returns the iteration's statistics (``loss`` NaN when nothing was kept)."""
    from transfusion.data.collate import caption_to_image
    from transfusion.sampling import sample_latents

    rows = [list(c) for c in captions for _ in range(group_size)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        latents = sample_latents(model, rows, scheduler, steps, cfg_scale, seed, cfg_interval=cfg_interval)
    rewards = reward_fn(latents, rows).float()
    kept = torch.nonzero(rewards > 0).flatten()
    stats = {"reward": float(rewards.mean()), "kept": float(len(kept)) / len(rows), "loss": float("nan")}
    if len(kept) == 0:
        model.train(was_training)
        return stats
    model.train()
    kept_examples = [caption_to_image(rows[i], latents[i].cpu()) for i in kept.tolist()]
    gen = torch.Generator().manual_seed(seed)
    losses = [
        _raft_update(
            model, optimizer, collate, kept_examples, batch_size, replay, gen, loss_weight, noise_limit, grad_clip
        )
        for _ in range(updates)
    ]
    model.train(was_training)
    return stats | {"loss": sum(losses) / len(losses)}


def _raft_update(
    model, optimizer, collate, kept: list, batch_size: int, replay, gen, loss_weight, noise_limit, grad_clip
):
    """One optimizer step on ``batch_size`` of the ``kept`` examples (their images' diffusion
    loss only) and, when given, ``replay()``'s training examples (the full loss); its loss."""
    device = next(model.parameters()).device

    def loss_of(batch):
        return model.loss(batch.to(device), gen, loss_weight=loss_weight, noise_limit=noise_limit).total

    own = collate([kept[i] for i in torch.randint(len(kept), (batch_size,), generator=gen).tolist()])
    # the prompts are not data: no LM target on them (learning them narrows the text model)
    own = dataclasses.replace(own, labels=torch.full_like(own.labels, -100))
    optimizer.zero_grad(set_to_none=True)
    total = loss_of(own) + (loss_of(collate(replay())) if replay is not None else 0.0)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    return float(total.detach())
