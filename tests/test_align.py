"""Post-training pieces (Flow-GRPO): SDE trajectories and their log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny_model, diffusion_config, section

FLOW = diffusion_config("flow")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_the_ode_end_of_the_sde_sampler_is_the_flow_sampler(text_tokenizer):
    """At noise level 0 the SDE trajectory ends where the flow-Euler sampler does (same seed)."""
    from transfusion.align import sample_trajectories
    from transfusion.diffusion import build_scheduler
    from transfusion.sampling import sample_latents

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    caps = [ids(text_tokenizer, "a red 4"), ids(text_tokenizer, "a 2 to the left of a 9")]
    traj = sample_trajectories(model, caps, 8, 3.0, noise_level=0.0, seed=4)
    ode = sample_latents(model, caps, build_scheduler(model.config.diffusion, "flow_euler"), 8, 3.0, seed=4)
    assert traj.latents.shape == (9, 2, 4, 8, 8) and traj.logprobs.shape == (8, 2)
    torch.testing.assert_close(traj.latents[-1], ode, rtol=0, atol=1e-4)
    noisy = sample_trajectories(model, caps, 8, 3.0, noise_level=0.7, seed=4)
    assert (noisy.latents[-1] - ode).abs().max() > 1e-2  # the SDE explores around it
    torch.testing.assert_close(noisy.latents[0], traj.latents[0])  # from the same starting noise


def test_rescored_steps_have_the_sampling_log_probabilities_and_gradients(text_tokenizer):
    """Re-scoring a recorded trajectory under the weights that sampled it gives its log-
    probabilities back (the GRPO ratio starts at 1), with gradients to the image decoder; other
    weights score it differently."""
    from transfusion.align import sample_trajectories, step_logprobs, step_moments

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    caps = [ids(text_tokenizer, "a 7"), ids(text_tokenizer, "three 5s")]
    traj = sample_trajectories(model, caps, 6, 2.0, noise_level=0.7, seed=1, use_cache=False)
    again = step_logprobs(traj, *step_moments(model, traj, 2.0, 0.7, steps=[0, 2, 5]), steps=[0, 2, 5])
    torch.testing.assert_close(again.detach(), traj.logprobs[[0, 2, 5]], rtol=0, atol=1e-5)
    again.sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.patch_out.parameters())
    other = build_tiny_model(text_tokenizer, seed=1, diffusion=FLOW)
    with torch.no_grad():
        assert (step_logprobs(traj, *step_moments(other, traj, 2.0, 0.7)) - traj.logprobs).abs().max() > 1e-3


def test_ddpm_models_are_refused_with_one_line(text_tokenizer):
    from transfusion.align import sample_trajectories
    from transfusion.errors import BadInput

    model = build_tiny_model(text_tokenizer, diffusion=section("diffusion", objective="ddpm"))
    with pytest.raises(BadInput, match="Flow-GRPO samples flow models; this one is trained with 'ddpm'"):
        sample_trajectories(model, [[]], 4, 1.0, noise_level=0.7)


def test_group_advantages_are_normalised_within_each_prompt():
    from transfusion.align import group_advantages

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, 4).view(3, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), rtol=0, atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # all passed: nothing to learn from this prompt
    assert adv[0, 0] > 0 > adv[0, 1] and adv[0, 0] == pytest.approx(3**0.5, rel=1e-3)  # 1 of 4: +sqrt(3)
    torch.testing.assert_close(adv[2].abs(), torch.ones(4), rtol=1e-3, atol=0)  # 2 of 4: +-1


def test_grpo_loss_clips_the_ratio_and_weighs_the_kl():
    from transfusion.align import grpo_loss

    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    same, stats = grpo_loss(old.clone(), old, adv, clip=0.2)
    assert float(same) == pytest.approx(-float(adv.mean())) and stats["clip_fraction"] == 0.0
    # a ratio of e^1 on every step: clipped at 1.2 for positive advantages, not for negative ones
    up, stats = grpo_loss(old + 1.0, old, adv, clip=0.2)
    assert float(up) == pytest.approx(float((-(1.2 * 1.0) + math.e * 1.0 - 1.2 * 2.0) / 3), rel=1e-5)
    assert stats["clip_fraction"] == 1.0
    kl = torch.full((2, 3), 0.5)
    with_kl, stats = grpo_loss(old.clone(), old, adv, clip=0.2, kl=kl, kl_weight=0.1)
    assert float(with_kl) == pytest.approx(float(same) + 0.05) and stats["kl"] == pytest.approx(0.5)
    # the gradient pushes the log-probability of positive-advantage steps up, negative down
    logp = old.clone().requires_grad_(True)
    grpo_loss(logp, old, adv, clip=0.2)[0].backward()
    assert (logp.grad[:, adv > 0] < 0).all() and (logp.grad[:, adv < 0] > 0).all()


def test_kl_to_itself_is_zero_and_grows_with_the_mean_gap(text_tokenizer):
    from transfusion.align import sample_trajectories, step_kl, step_moments

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    other = build_tiny_model(text_tokenizer, seed=1, diffusion=FLOW)
    traj = sample_trajectories(model, [ids(text_tokenizer, "a 7")], 4, 1.0, noise_level=0.7, use_cache=False)
    with torch.no_grad():
        means, stds = step_moments(model, traj, 1.0, 0.7)
        assert torch.equal(step_kl(means, means, stds), torch.zeros(4, 1))
        far, _ = step_moments(other, traj, 1.0, 0.7)
        kl = step_kl(means, far, stds)
    want = (means - far).pow(2).flatten(2).mean(2) / (2 * torch.tensor(stds).view(-1, 1) ** 2)
    torch.testing.assert_close(kl, want)
    assert (kl > 0).all()


def test_grpo_raises_a_reward_on_a_tiny_model(text_tokenizer):
    """Flow-GRPO iterations on a tiny flow model raise a toy reward (the mean of the sampled
    latent), judged on fresh ODE samples before and after; the KL to the reference grows from 0."""
    import copy

    from transfusion.align import grpo_step, sample_trajectories

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    reference = copy.deepcopy(model).requires_grad_(False)
    caps = [ids(text_tokenizer, "a red 4"), ids(text_tokenizer, "a 7")]

    def reward(latents, rows):
        return latents.mean(dim=(1, 2, 3))

    def held_out_reward() -> float:
        return float(reward(sample_trajectories(model, caps * 4, 6, 1.0, 0.0, seed=100).latents[-1], None).mean())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    before = held_out_reward()
    kw = dict(group_size=4, steps=6, noise_level=0.7, cfg_scale=1.0, clip=0.2, kl_weight=0.01)
    stats = [grpo_step(model, reference, optimizer, caps, reward, seed=10 * i, **kw) for i in range(8)]
    assert held_out_reward() > before + 0.5, (before, [s["reward"] for s in stats])
    assert stats[0]["kl"] == 0.0 and stats[-1]["kl"] > 0.0
    assert all(s["clip_fraction"] == 0.0 for s in stats)  # one on-policy update per batch: the ratio is 1
