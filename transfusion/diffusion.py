"""Diffusion maths over diffusers' schedulers, kept apart from the network (as in DiT).

Two objectives share one small interface; ``training_losses(predict, x0, noise, t)`` (DiT's
name) is the diffusion loss, used by ``TransfusionModel.loss`` and by the probes:

- ``sample_timesteps(capped, noise_limit, generator)``: one training timestep per image; an
  image that precedes its caption (``capped``) draws only from the low-noise part, noise level
  <= ``noise_limit`` (paper: t <= 500 of 1000).
- ``add_noise(x0, noise, t)`` -> x_t, ``target(x0, noise, t)`` -> what the network predicts,
  ``model_time(t)`` -> the value fed to the timestep embedding (0..T, T = most noise);
  ``timesteps_at(levels)`` -> the timesteps at noise levels in [0, 1] (probes and tests).

DDPM: ``DDPMScheduler`` with the cosine (``squaredcos_cap_v2``) schedule, 1000 steps,
epsilon prediction (the paper) or v-prediction (``prediction_type: v_prediction``; the samplers
read the same setting). Flow matching: rectified flow ``x_t = (1 - s) x0 + s eps`` on the sigma table
of ``FlowMatchEulerDiscreteScheduler``, velocity target ``eps - x0``.

``build_scheduler(schedule, sampler)`` is the one scheduler factory: the objectives' training
schedulers and every sampler's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from transfusion.config import ScheduleConfig, sampler_misfit
from transfusion.errors import BadInput


def build_scheduler(schedule: ScheduleConfig, sampler: str):
    """The diffusers scheduler of ``sampler`` for a model trained on ``schedule`` (``ddpm`` or
    ``flow_euler``: the objective's own); a sampler that does not fit the objective is refused."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    misfit = sampler_misfit(schedule.objective, sampler)
    if misfit:
        raise BadInput(misfit)
    T, betas, prediction = schedule.train_steps, schedule.beta_schedule, schedule.prediction_type
    if sampler == "flow_euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=schedule.flow_shift)
    if sampler == "dpmpp":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=T, beta_schedule=betas, prediction_type=prediction, algorithm_type="dpmsolver++"
        )
    if sampler == "ddim":
        return DDIMScheduler(
            num_train_timesteps=T,
            beta_schedule=betas,
            prediction_type=prediction,
            clip_sample=False,
            set_alpha_to_one=False,
        )
    return DDPMScheduler(num_train_timesteps=T, beta_schedule=betas, prediction_type=prediction, clip_sample=False)


Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, model time) -> prediction


class Objective:
    """What both objectives share: the diffusion loss from their own noising and target."""

    cfg: ScheduleConfig

    def training_losses(
        self, predict: Predict, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """MSE of ``predict(x_t, model_time(t))`` against the target, for clean ``x0`` noised with
        ``noise`` at timesteps ``t`` (N,); ``reduction="none"`` keeps it per element."""
        x_t = self.add_noise(x0, noise, t)  # (N, C, H, W)
        pred = predict(x_t, self.model_time(t))
        return F.mse_loss(pred.float(), self.target(x0, noise, t).float(), reduction=reduction)


class DDPMObjective(Objective):
    name = "ddpm"

    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        self.scheduler = build_scheduler(cfg, "ddpm")

    def sample_timesteps(
        self, capped: torch.Tensor, noise_limit: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(N,) bool -> (N,) long timesteps in [0, T) ([0, noise_limit * T] where capped)."""
        limit = int(round(noise_limit * self.cfg.train_steps))
        u = torch.rand(capped.shape, generator=generator)
        high = torch.where(
            capped, torch.tensor(min(limit + 1, self.cfg.train_steps)), torch.tensor(self.cfg.train_steps)
        )
        return (u * high).long().clamp_max(self.cfg.train_steps - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t.to(x0.device))

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.prediction_type == "v_prediction":  # sqrt(abar) eps - sqrt(1 - abar) x0
            return self.scheduler.get_velocity(x0, noise, t.to(x0.device))
        return noise

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def timesteps_at(self, levels: torch.Tensor) -> torch.Tensor:
        return (levels * self.cfg.train_steps).long().clamp(0, self.cfg.train_steps - 1)


class FlowMatchingObjective(Objective):
    name = "flow"

    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        self.scheduler = build_scheduler(cfg, "flow_euler")
        self.sigmas = self.scheduler.sigmas[: cfg.train_steps].float()  # descending, 1 -> ~1/T

    def sample_timesteps(
        self, capped: torch.Tensor, noise_limit: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(N,) bool -> (N,) indices into the sigma table (capped: sigma <= noise_limit)."""
        n, n_capped = len(self.sigmas), int((self.sigmas <= noise_limit).sum())  # the low-noise tail
        u = torch.rand(capped.shape, generator=generator)
        full = (u * n).long().clamp_max(n - 1)
        tail = n - 1 - (u * n_capped).long().clamp_max(n_capped - 1)
        return torch.where(capped, tail, full)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t.cpu()].to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t.cpu()] * self.cfg.train_steps

    def timesteps_at(self, levels: torch.Tensor) -> torch.Tensor:
        return (self.sigmas[None, :] - levels.float()[:, None]).abs().argmin(1)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over all but the first dimension  (N,)."""
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, x.dim())))


def flow_sde_moments(
    x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float, noise_level: float, sigma_max: float
) -> tuple[torch.Tensor, float]:
    """Mean (N, C, H, W) and standard deviation of one step of the flow sampler in its SDE form
    (Flow-GRPO, Liu et al. 2025, eq. 9): from ``x`` at noise level ``sigma`` to ``sigma_next``
    < ``sigma`` with the predicted ``velocity`` (noise - x0). Its marginals are the ODE's;
    ``noise_level`` (their ``a``) scales the injected noise, 0 gives the Euler step; at
    ``sigma`` 1 the SDE's scale reads ``sigma_max`` (the schedule's next level, as Flow-GRPO
    does) instead of dividing by zero."""
    dt = sigma_next - sigma  # < 0: towards clean
    std = noise_level * math.sqrt(sigma / (1 - (sigma_max if sigma >= 1 else sigma)))  # sigma_t of the SDE
    mean = x * (1 + std**2 / (2 * sigma) * dt) + velocity * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std * math.sqrt(-dt)


def flow_sde_step(
    x: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise_level: float,
    sigma_max: float,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDE step (:func:`flow_sde_moments`): the next sample, drawn with ``noise`` (or
    ``x_next`` when given, to score a recorded step), and its Gaussian log-probability (N,)."""
    mean, std = flow_sde_moments(x, velocity, sigma, sigma_next, noise_level, sigma_max)
    if x_next is None:
        x_next = mean + std * (noise if noise is not None else torch.randn_like(mean))
    if noise_level == 0:
        return x_next, torch.zeros(len(x), device=x.device)
    return x_next, gaussian_logprob(x_next, mean, torch.full_like(mean, std))


def build_objective(cfg: ScheduleConfig) -> DDPMObjective | FlowMatchingObjective:
    return DDPMObjective(cfg) if cfg.objective == "ddpm" else FlowMatchingObjective(cfg)
