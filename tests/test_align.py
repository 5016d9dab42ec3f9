"""Post-training pieces (Flow-GRPO): SDE trajectories and their log-probabilities."""

from __future__ import annotations

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
    from transfusion.align import sample_trajectories, trajectory_logprobs

    model = build_tiny_model(text_tokenizer, diffusion=FLOW)
    caps = [ids(text_tokenizer, "a 7"), ids(text_tokenizer, "three 5s")]
    traj = sample_trajectories(model, caps, 6, 2.0, noise_level=0.7, seed=1, use_cache=False)
    again = trajectory_logprobs(model, traj, 2.0, 0.7, steps=[0, 2, 5])
    torch.testing.assert_close(again.detach(), traj.logprobs[[0, 2, 5]], rtol=0, atol=1e-5)
    again.sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.patch_out.parameters())
    other = build_tiny_model(text_tokenizer, seed=1, diffusion=FLOW)
    with torch.no_grad():
        assert (trajectory_logprobs(other, traj, 2.0, 0.7) - traj.logprobs).abs().max() > 1e-3


def test_ddpm_models_are_refused_with_one_line(text_tokenizer):
    from transfusion.align import sample_trajectories
    from transfusion.errors import BadInput

    model = build_tiny_model(text_tokenizer, diffusion=section("diffusion", objective="ddpm"))
    with pytest.raises(BadInput, match="Flow-GRPO samples flow models; this one is trained with 'ddpm'"):
        sample_trajectories(model, [[]], 4, 1.0, noise_level=0.7)
