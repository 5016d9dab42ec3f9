"""Post-training against the judged reward: Flow-GRPO's pieces (Liu et al. 2025).

The reward is ``transfusion.eval.geneval.reward`` (GenEval's rule on the judge's reading, the
same rule evaluation scores). Flow-GRPO turns the flow sampler into an SDE with the same
marginals (``transfusion.diffusion.flow_sde_step``), so every denoising step is a Gaussian
policy step with a log-probability:

- :func:`sample_trajectories` samples images with the SDE sampler and keeps every step's latent
  and log-probability under the sampling weights (no gradient);
- :func:`trajectory_logprobs` re-scores recorded steps under the current weights, with gradient
  (the policy ratio of GRPO's clipped objective is ``exp(new - old)``).

Flow models only: a DDPM model's ancestral step would need its own log-probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transfusion.diffusion import build_scheduler, flow_sde_step
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


def trajectory_logprobs(
    model,
    traj: Trajectory,
    cfg_scale: float,
    noise_level: float,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    steps: Sequence[int] | None = None,
) -> torch.Tensor:
    """Log-probabilities (len(steps), N) of the recorded ``steps`` (default: all) of ``traj``
    under ``model``'s current weights, differentiable (the whole sequence runs at each step)."""
    predict = image_predictor(model, traj.captions, cfg_scale, use_cache=False)
    sigmas = traj.sigmas
    out = []
    for i in range(len(sigmas) - 1) if steps is None else steps:
        x, x_next = traj.latents[i], traj.latents[i + 1]
        v = _velocity(model, predict, x, sigmas[i], cfg_scale, cfg_interval)
        out.append(flow_sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level, sigmas[1], x_next=x_next)[1])
    return torch.stack(out)
