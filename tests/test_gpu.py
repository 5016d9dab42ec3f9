"""GPU paths, run where CUDA is (``bash benchmarks/gpu_check.sh`` runs them first): FlexAttention
equals the dense sdpa mask forward and backward, bf16 training steps learn, and sampling (KV-cached
or not, flex or sdpa) agrees on the GPU. The forward and the cached sampler are also checked on CPU
in test_flex_cpu.py."""

from __future__ import annotations

import pytest
import torch

from conftest import LATENT, assert_twins_agree, attention_twins, mixed_rows
from transfusion.data.tokenizer import train_bpe
from transfusion.diffusion import build_scheduler
from transfusion.sampling import sample_latents

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["a red 4 and a blue 3 to the left of a 7", "to be or not to be"] * 50, vocab_size=300)


@pytest.mark.parametrize("patch_encoder", ["linear", "unet"])
def test_flex_attention_matches_dense_sdpa_forward_and_backward(tok, patch_encoder):
    dense, flex = attention_twins(tok, patch_encoder, device="cuda")
    batch = mixed_rows(tok, dense, 128).to("cuda")
    assert_twins_agree(dense, flex, batch, tol=1e-3)
    grads = []
    for model in (dense, flex):  # the same loss draw on both: the gradients must agree
        model.train().zero_grad()
        model.loss(batch, torch.Generator().manual_seed(3), loss_weight=5.0, noise_limit=0.5).total.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():  # per tensor, relative to its norm (flex may compute fp32 in tf32)
        error = (grads[1][name] - g).norm() / g.norm().clamp_min(1e-12)
        assert error < 1e-2, (name, float(error))


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_bf16_training_steps_learn_on_cuda(tok, attention):
    dense, flex = attention_twins(tok, device="cuda")
    model = (dense if attention == "sdpa" else flex).train()
    batch = mixed_rows(tok, model, 128).to("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):  # one batch again and again, the same noise: the loss must fall
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.loss(batch, torch.Generator().manual_seed(0), loss_weight=5.0, noise_limit=0.5)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_sampling_on_cuda_cached_equals_uncached(tok, attention):
    dense, flex = attention_twins(tok, device="cuda")
    model = dense if attention == "sdpa" else flex
    captions = [tok(c, add_special_tokens=False)["input_ids"] for c in ("a red 4", "a 2 to the left of a 9")]
    sched = build_scheduler(model.config.diffusion, model.config.sampling.sampler)
    runs = [
        sample_latents(model, captions, sched, 6, 3.0, seed=1, use_cache=c, cfg_interval=(0.5, 1.0))
        for c in (True, False)
    ]
    assert runs[0].device.type == "cuda" and runs[0].shape == (2, *LATENT)
    assert torch.isfinite(runs[0]).all()
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-3, atol=1e-3)
