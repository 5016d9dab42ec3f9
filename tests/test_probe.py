"""Conditioning probes (transfusion.eval.probe) and the EMA warm-up: equivalences that must hold
whatever the weights, and the probes' record in a training run."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, diffusion_config, pipeline_around, sampling_config, section
from transfusion.eval.probe import BUCKETS, ProbeData, caption_losses, diffusion_losses


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def probe_data(tok, latents, captions) -> ProbeData:
    return ProbeData(
        latents=latents,
        records=[{"caption": c} for c in captions],
        captions=[ids(tok, c) for c in captions],
        judge=None,
        palette={},
    )


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_noise_buckets_map_to_their_levels(objective):
    from transfusion.diffusion import build_objective

    obj = build_objective(diffusion_config(objective))
    t = obj.timesteps_at(torch.tensor(BUCKETS))
    torch.testing.assert_close(obj.model_time(t) / 1000, torch.tensor(BUCKETS), rtol=0, atol=2e-3)


def test_caption_gap_is_zero_without_captions_and_not_with_them(text_tokenizer):
    model = build_tiny_model(text_tokenizer, diffusion=diffusion_config("flow"))
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    empty = diffusion_losses(model, probe_data(text_tokenizer, latents, [""] * 6))
    for k in range(len(BUCKETS)):
        assert empty[f"diffusion_cond_b{k}"] == empty[f"diffusion_uncond_b{k}"]
    captioned = diffusion_losses(model, probe_data(text_tokenizer, latents, ["a red 4", "a 7", "two 5s"] * 2))
    assert any(captioned[f"diffusion_cond_b{k}"] != captioned[f"diffusion_uncond_b{k}"] for k in range(len(BUCKETS)))
    assert captioned["diffusion_cond"] == pytest.approx(sum(captioned[f"diffusion_cond_b{k}"] for k in range(4)) / 4)
    again = diffusion_losses(model, probe_data(text_tokenizer, latents, ["a red 4", "a 7", "two 5s"] * 2))
    assert again == captioned  # fixed noise: a probe is repeatable


def test_shuffled_images_change_the_caption_loss_only_when_images_differ(text_tokenizer):
    model = build_tiny_model(text_tokenizer)
    captions = ["a red 4", "a 7", "two 5s", "a 3 and a 7"]
    same = caption_losses(model, probe_data(text_tokenizer, torch.ones(4, 4, 8, 8), captions))
    assert same["caption_loss"] == pytest.approx(same["caption_loss_shuffled"], abs=1e-6)
    different = caption_losses(model, probe_data(text_tokenizer, torch.randn(4, 4, 8, 8) * 3, captions))
    assert different["caption_loss"] != pytest.approx(different["caption_loss_shuffled"], abs=1e-6)


def test_ema_warmup_follows_early_weights():
    from torch.optim.swa_utils import AveragedModel

    from transfusion.train.loop import ema_update

    net = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    plain = AveragedModel(net, multi_avg_fn=ema_update(0.99, warmup=False), use_buffers=True)
    warm = AveragedModel(net, multi_avg_fn=ema_update(0.99, warmup=True), use_buffers=True)
    expect_plain, expect_warm = 0.0, 0.0
    for n in range(1, 30):
        with torch.no_grad():
            net.weight.fill_(float(n))
        plain.update_parameters(net)
        warm.update_parameters(net)
        # AveragedModel copies the first update; later ones decay (n - 1 averages before this one)
        d = min(0.99, n / (n + 9))
        expect_plain = n if n == 1 else 0.99 * expect_plain + 0.01 * n
        expect_warm = n if n == 1 else d * expect_warm + (1 - d) * n
    assert plain.module.weight[0, 0].item() == pytest.approx(expect_plain, rel=1e-5)
    assert warm.module.weight[0, 0].item() == pytest.approx(expect_warm, rel=1e-5)
    assert warm.module.weight[0, 0].item() > 2 * plain.module.weight[0, 0].item()  # the plain EMA lags far behind


def test_loss_probes_read_only_val_examples_rows(text_tokenizer):
    from transfusion.eval.probe import run_probes

    model = build_tiny_model(text_tokenizer, diffusion=diffusion_config("flow"))
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    data = probe_data(text_tokenizer, latents, ["a red 4", "a 7", "two 5s", "a 1", "a 2", "a 3"])
    probe = section("train").probe.model_copy(update={"val_examples": 2, "prompts_per_category": 1})
    out = run_probes(pipeline_around(model, text_tokenizer), data, probe, sampling_config("flow", steps=2))
    head = diffusion_losses(model, data.head(2)) | caption_losses(model, data.head(2))
    assert out == head  # no judge: no quick evaluation, only the two loss probes over 2 rows
    assert out != diffusion_losses(model, data) | caption_losses(model, data)


def test_binding_probes_run_without_a_judge(text_tokenizer):
    """The binding rankings need captions that parse (position, colour attribution), not a judge:
    a run whose judge missed its bar still gets its read/write curves."""
    from transfusion.eval.probe import run_probes

    model = build_tiny_model(text_tokenizer, diffusion=diffusion_config("flow"))
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    captions = ["a 2 to the left of a 9", "a 3 above a 1", "a red 4 and a blue 7", "a 7"]
    data = probe_data(text_tokenizer, latents, captions)
    assert data.judge is None
    probe = section("train").probe.model_copy(update={"val_examples": 4, "binding_scenes": 10})
    sampling = sampling_config("flow", steps=2)
    out = run_probes(pipeline_around(model, text_tokenizer), data, probe, sampling)
    assert 0.0 <= out["binding_read_position"] <= 1.0 and 0.0 <= out["binding_write_color_attr"] <= 1.0
    assert "quick_geneval_overall" not in out
    off = run_probes(
        pipeline_around(model, text_tokenizer), data, probe.model_copy(update={"binding_scenes": 0}), sampling
    )
    assert not any(k.startswith("binding_") for k in off)
