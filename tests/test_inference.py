"""Inference: KV cache equivalence, CFG, batching, interleaving, and the CLI on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tiny_model, diffusion_config, pipeline_around, sampling_config
from transfusion.diffusion import build_scheduler
from transfusion.sampling import caption_latents, generate_interleaved, generate_text, sample_latents


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def sample(model, captions, steps, cfg_scale, sampler, **kw):
    """``sample_latents`` with a fresh scheduler of ``sampler`` for ``model``'s schedule."""
    return sample_latents(model, captions, build_scheduler(model.config.diffusion, sampler), steps, cfg_scale, **kw)


@pytest.mark.parametrize("backbone", ["llama", "qwen2"])
def test_cached_and_uncached_text_decoding_agree(text_tokenizer, backbone):
    model = build_tiny_model(text_tokenizer, backbone=backbone)
    prompts = [ids(text_tokenizer, "to be or"), ids(text_tokenizer, "a red 4 and a blue 3")]  # different lengths
    a, la = generate_text(model, prompts, max_new_tokens=12, use_cache=True, return_logits=True)
    b, lb = generate_text(model, prompts, max_new_tokens=12, use_cache=False, return_logits=True)
    assert a == b
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-4)
    sampled = generate_text(model, prompts, max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    assert sampled == generate_text(model, prompts, max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=3)


@pytest.mark.parametrize(
    ("patch_encoder", "time_conditioning", "objective"),
    [("linear", "add", "ddpm"), ("unet", "token", "ddpm"), ("linear", "add", "flow")],
)
def test_cached_and_uncached_image_samples_agree(text_tokenizer, patch_encoder, time_conditioning, objective):
    model = build_tiny_model(
        text_tokenizer,
        patch_encoder=patch_encoder,
        time_conditioning=time_conditioning,
        diffusion=diffusion_config(objective),
    )
    sampler = "flow_euler" if objective == "flow" else "ddpm"
    caps = [ids(text_tokenizer, "a red 4"), ids(text_tokenizer, "a 3 and a 7 to the left of")]
    cached = sample(model, caps, 12, 3.0, sampler, seed=5, use_cache=True)
    uncached = sample(model, caps, 12, 3.0, sampler, seed=5, use_cache=False)
    assert cached.shape == (2, 4, 8, 8)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    ("objective", "sampler", "steps", "prediction"),
    [
        ("ddpm", "ddpm", 50, "epsilon"),
        ("ddpm", "ddim", 20, "epsilon"),
        ("ddpm", "dpmpp", 20, "epsilon"),
        ("ddpm", "ddim", 20, "v_prediction"),
        ("ddpm", "dpmpp", 20, "v_prediction"),
        ("flow", "flow_euler", 20, "epsilon"),
    ],
)
def test_samplers_recover_the_image_from_an_exact_predictor(objective, sampler, steps, prediction):
    """With the exact epsilon (or v, or flow velocity) of one clean latent x0 at every step, each
    sampler must end at x0: the sampling loop, the schedulers' time grids, the prediction type
    and the guidance all agree."""
    from transfusion.diffusion import build_objective
    from transfusion.sampling import denoise, generators

    cfg = diffusion_config(objective, prediction_type=prediction)
    sched = build_scheduler(cfg, sampler)
    sched.set_timesteps(steps)  # alphas_cumprod below; denoise sets the steps again
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def predict(x, time):
        if objective == "flow":
            return (x - x0) / (time[:, None, None, None] / cfg.train_steps)  # v = noise - x0
        abar = sched.alphas_cumprod[time.long()][:, None, None, None]
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        if prediction == "v_prediction":  # the training target of the objective, for this x0 and eps
            return build_objective(cfg.schedule).target(x0.expand_as(x), eps, time.long())
        return eps

    out = denoise(sched, steps, predict, generators(1, 2), (4, 8, 8), "cpu", 1.0)
    # DDIM ends at alphas_cumprod[0] < 1 (set_alpha_to_one=False): a trace of noise, ~0.006 sigma
    torch.testing.assert_close(out, x0, rtol=0, atol=4e-2)
    assert (out - x0).abs().mean() < 1e-2


@pytest.mark.parametrize("noise_level", [0.0, 0.7])
def test_flow_sde_sampler_recovers_the_image_from_the_exact_velocity(noise_level):
    """The SDE form of the flow sampler (Flow-GRPO) keeps the ODE's marginals: driven by the
    exact velocity of one clean latent x0, it ends at x0 from any noise; at noise level 0 each
    step is the Euler step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from transfusion.diffusion import flow_sde_step

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(20)
    sigmas = sched.sigmas.tolist()  # 1 -> 0
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = (x - x0) / sigma  # the exact velocity (noise - x0) of a point mass at x0
        noise = torch.randn(x.shape, generator=gen)
        x_next, _ = flow_sde_step(x, v, sigma, sigma_next, noise_level, sigmas[1], noise=noise)
        if noise_level == 0:
            torch.testing.assert_close(x_next, x + (sigma_next - sigma) * v)
        x = x_next
    err = (x - x0).abs()
    if noise_level == 0:
        assert err.max() < 1e-3
    else:  # the last step still injects noise of std ~ a * its sigma
        assert err.mean() < 0.03 and err.max() < 0.25, (err.mean(), err.max())


def test_flow_sde_step_log_probability_is_the_density_that_drew_it():
    """The step's log-probability is the Gaussian density of the drawn sample (torch's Normal,
    averaged per image), for a fresh draw and for a recorded one re-scored."""
    from transfusion.diffusion import flow_sde_step

    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    sigma, sigma_next, a = 0.8, 0.7, 0.7
    x_next, logp = flow_sde_step(x, v, sigma, sigma_next, a, 0.95, noise=noise)
    std = a * (sigma / (1 - sigma)) ** 0.5
    mean = x * (1 + std**2 / (2 * sigma) * -0.1) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * -0.1
    scale = std * 0.1**0.5
    torch.testing.assert_close(x_next, mean + scale * noise, rtol=1e-5, atol=1e-6)
    want = torch.distributions.Normal(mean, scale).log_prob(x_next).flatten(1).mean(1)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    _, again = flow_sde_step(x, v, sigma, sigma_next, a, 0.95, x_next=x_next)  # a recorded step, re-scored
    torch.testing.assert_close(again, logp)
    # on average over its own draws, the policy that drew a step scores it higher than another
    # policy does (Gibbs' inequality): the signal a policy-gradient ratio is built on
    xs, vs = x.repeat(64, 1, 1, 1), v.repeat(64, 1, 1, 1)
    draws, own = flow_sde_step(xs, vs, sigma, sigma_next, a, 0.95, noise=torch.randn(xs.shape, generator=gen))
    _, other = flow_sde_step(xs, vs * 1.1, sigma, sigma_next, a, 0.95, x_next=draws)
    assert own.mean() > other.mean()


def test_cfg_scale_one_is_the_conditional_sample_and_zero_the_unconditional(text_tokenizer):
    """Scale 1 (no unconditional rows at all) equals the CFG path at ~1; scale 0 through the
    CFG path equals sampling the empty caption alone: the two branches are what they claim."""
    model = build_tiny_model(text_tokenizer)
    caps = [ids(text_tokenizer, "a red 4")]
    conditional = sample(model, caps, 10, 1.0, "ddim", seed=2)  # no unconditional rows at all
    almost_one = sample(model, caps, 10, 1.0 + 1e-6, "ddim", seed=2)  # CFG path, mixed at ~1
    strong = sample(model, caps, 10, 5.0, "ddim", seed=2)
    torch.testing.assert_close(conditional, almost_one, rtol=0, atol=1e-4)
    assert (conditional - strong).abs().max() > 1e-2
    unconditional = sample(model, [[]], 10, 1.0, "ddim", seed=2)  # the caption-less prefix alone
    torch.testing.assert_close(sample(model, caps, 10, 0.0, "ddim", seed=2), unconditional, rtol=0, atol=1e-4)
    assert (unconditional - conditional).abs().max() > 1e-2


def test_guidance_interval_guides_only_inside_it(text_tokenizer):
    """An empty interval is the conditional sample; the full interval is plain CFG; guidance only
    at high noise differs from both; the cached and uncached samplers agree on it."""
    from transfusion.sampling import guidance_at

    model = build_tiny_model(text_tokenizer, diffusion=diffusion_config("flow"))
    caps = [ids(text_tokenizer, "a red 4")]
    kw = dict(steps=10, sampler="flow_euler", seed=2)
    conditional = sample(model, caps, cfg_scale=1.0, **kw)
    never = sample(model, caps, cfg_scale=4.0, cfg_interval=(2.0, 3.0), **kw)
    always = sample(model, caps, cfg_scale=4.0, **kw)
    full = sample(model, caps, cfg_scale=4.0, cfg_interval=(0.0, 1.0), **kw)
    high = sample(model, caps, cfg_scale=4.0, cfg_interval=(0.5, 1.0), **kw)
    torch.testing.assert_close(never, conditional, rtol=0, atol=1e-4)
    assert torch.equal(always, full)
    assert (high - always).abs().max() > 1e-3 and (high - conditional).abs().max() > 1e-3
    uncached = sample(model, caps, cfg_scale=4.0, cfg_interval=(0.5, 1.0), use_cache=False, **kw)
    torch.testing.assert_close(high, uncached, rtol=0, atol=2e-3)
    assert guidance_at(0.7, 4.0, (0.5, 1.0)) == 4.0 and guidance_at(0.3, 4.0, (0.5, 1.0)) == 1.0


def test_steps_outside_the_guidance_interval_run_only_the_conditional_rows():
    """The unconditional half of the batch runs only where guidance applies: a flow sampler of
    10 steps guided in [0.5, 1] runs 2N rows at the 5 noisiest steps and N at the rest."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from transfusion.sampling import denoise, generators

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    seen: list[tuple[int, float]] = []

    def predict(x, time):
        seen.append((len(x), float(time[0]) / 1000))
        return torch.zeros_like(x)

    denoise(sched, 10, predict, generators(0, 3), (4, 8, 8), "cpu", 4.0, cfg_interval=(0.5, 1.0))
    assert [rows for rows, _ in seen] == [6 if level >= 0.5 else 3 for _, level in seen]
    assert sum(rows == 6 for rows, _ in seen) == 5


def test_a_model_samples_with_its_saved_guidance_interval(text_tokenizer):
    """The pipeline's ``sample_images`` without an interval uses the one the model was trained
    with (what ``transfusion generate`` does without ``--cfg-interval``)."""
    sampling = sampling_config("flow", cfg_scale=4.0, cfg_interval=(0.5, 1.0))
    model = build_tiny_model(text_tokenizer, diffusion=diffusion_config("flow"), sampling=sampling)
    pipe = pipeline_around(model, text_tokenizer)
    caps = [ids(text_tokenizer, "a red 4")]
    own = pipe.sample_images(["a red 4"], steps=10, seed=2)
    saved = pipe.decode_latents(sample(model, caps, 10, 4.0, "flow_euler", seed=2, cfg_interval=(0.5, 1.0)))
    np.testing.assert_array_equal(own, saved)
    everywhere = pipe.decode_latents(sample(model, caps, 10, 4.0, "flow_euler", seed=2))
    assert np.abs(own.astype(int) - everywhere.astype(int)).max() > 0


def test_a_batch_equals_one_by_one(text_tokenizer):
    model = build_tiny_model(text_tokenizer)
    caps = [ids(text_tokenizer, t) for t in ("a 7", "a blue 3 and a red 4", "two 5s")]
    batch = sample(model, caps, 10, 3.0, "ddpm", seed=10)
    single = torch.cat([sample(model, [c], 10, 3.0, "ddpm", seed=10 + i) for i, c in enumerate(caps)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-4)
    again = sample(model, caps, 10, 3.0, "ddpm", seed=10)
    assert torch.equal(batch, again)  # seeds make it deterministic


def test_denoising_never_grows_the_cache(text_tokenizer):
    from transfusion.sampling import Context

    model = build_tiny_model(text_tokenizer)
    ctx = Context.prefill(model, [[1, 2, 3], [1, 4]])
    before = ctx.cache.get_seq_length()
    for t in (900.0, 500.0, 10.0):
        ctx.image_prediction(torch.randn(2, 4, 8, 8), torch.full((2,), t))
    assert ctx.cache.get_seq_length() == before == ctx.length


def test_interleaved_draws_an_image_when_boi_is_forced_and_continues(text_tokenizer):
    model = build_tiny_model(text_tokenizer)
    s = model.special
    parts = generate_interleaved(
        model,
        ids(text_tokenizer, "to be"),
        max_new_tokens=8,
        max_images=1,
        steps=5,
        force_image=True,
        min_new_tokens=4,
        cfg_scale=2.0,
        scheduler=build_scheduler(model.config.diffusion, "ddpm"),
    )
    assert torch.is_tensor(parts[0]) and parts[0].shape == (4, 8, 8)
    assert isinstance(parts[1], list) and len(parts[1]) >= 4
    assert not {s.boi, s.eoi, s.eos} & set(parts[1])
    captions = caption_latents(model, torch.stack([parts[0]]), max_new_tokens=5)
    assert len(captions) == 1 and len(captions[0]) <= 5


def test_the_image_changes_the_text_after_it(text_tokenizer):
    """Text after <eoi> is conditioned on the image (clean latents at t=0 stay in the cache)."""
    from transfusion.sampling import Context

    model = build_tiny_model(text_tokenizer)
    s = model.special
    logits = []
    for seed in (0, 1):
        ctx = Context.prefill(model, [[s.bos, s.boi]])
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        ctx.image_prediction(latent, torch.zeros(1), keep=True)
        ctx.append_tokens(torch.tensor([s.eoi]))
        logits.append(model.text_logits(ctx.last_hidden))
    assert (logits[0] - logits[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# the pipeline and the CLI
# ---------------------------------------------------------------------------------------------
def test_pipeline_round_trip(exported_model):
    from transfusion.pipeline import TransfusionPipeline

    pipe = TransfusionPipeline.from_pretrained(exported_model)
    images = pipe.sample_images(["a red 4", "a 7"], steps=4, cfg_scale=2.0, seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert len(pipe.caption(images, max_new_tokens=4)) == 2
    (text,) = pipe.generate_text(["to be"], max_new_tokens=5)
    (new,) = generate_text(pipe.model, [ids(pipe.tokenizer, "to be")], max_new_tokens=5)  # the library, directly
    assert 0 < len(new) <= 5 and text == pipe.tokenizer.decode(new, skip_special_tokens=True)
    with pytest.raises(ValueError, match=r"uint8 \(N, 32, 32, 3\)"):
        pipe.caption(np.zeros((1, 16, 16, 3), np.uint8))


def test_pipeline_saves_what_it_loads(exported_model, tmp_path):
    """save_pretrained writes exactly what from_pretrained reads: the same samples, captions,
    text, scaling and run id come back from the copy."""
    from transfusion.pipeline import TransfusionPipeline

    pipe = TransfusionPipeline.from_pretrained(exported_model)
    pipe.run_id = "abc123"
    pipe.save_pretrained(tmp_path / "copy")
    copy = TransfusionPipeline.from_pretrained(tmp_path / "copy")
    assert (copy.scaling_factor, copy.run_id, copy.model.config) == (pipe.scaling_factor, "abc123", pipe.model.config)
    a = pipe.sample_images(["a red 4"], steps=3, seed=1)
    np.testing.assert_array_equal(a, copy.sample_images(["a red 4"], steps=3, seed=1))
    assert pipe.caption(a, max_new_tokens=4) == copy.caption(a, max_new_tokens=4)
    assert pipe.generate_text(["to be"], max_new_tokens=4) == copy.generate_text(["to be"], max_new_tokens=4)
    (tmp_path / "copy" / "pipeline.json").write_text("{}")
    with pytest.raises(ValueError, match="copy: pipeline.json is truncated or altered"):  # the manifest first
        TransfusionPipeline.from_pretrained(tmp_path / "copy")
    with pytest.raises(ValueError, match="pipeline.json: expected JSON with vae and scaling_factor"):
        TransfusionPipeline.from_pretrained(tmp_path / "copy", verify=False)


def _cli(*args):
    from cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_modes_write_their_outputs(exported_model, tmp_path):
    grid = tmp_path / "grid.png"
    r = _cli(
        "generate",
        "a red 3 to the left of a blue 7",
        "-n",
        "2",
        "--steps",
        "3",
        "--out",
        str(grid),
        "-m",
        str(exported_model),
    )
    assert r.exit_code == 0, r.output
    assert grid.read_bytes()[:4] == b"\x89PNG"
    one = tmp_path / "one.png"
    assert (
        _cli("generate", "a 7", "-n", "1", "--steps", "2", "--out", str(one), "-m", str(exported_model)).exit_code == 0
    )

    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(small)
    r = _cli("caption", str(small), str(small), "-m", str(exported_model))
    assert r.exit_code == 0 and r.output.count(str(small)) == 2

    r = _cli("complete", "To be, or not", "--max-tokens", "4", "-m", str(exported_model))
    assert r.exit_code == 0 and r.output.startswith("To be, or not")

    r = _cli(
        "interleave",
        "to be",
        "--force-image",
        "--steps",
        "2",
        "--max-tokens",
        "4",
        "--out",
        str(tmp_path / "il"),
        "-m",
        str(exported_model),
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "il" / "image-0.png").is_file() and "[image:" in r.output


def test_cli_bad_inputs_exit_non_zero_with_one_line(exported_model, tmp_path):
    from PIL import Image

    r = _cli("generate", "a 7", "-m", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and r.output.strip() == f"error: {tmp_path / 'nowhere'}: no model folder here"

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    r = _cli("caption", str(junk), "-m", str(exported_model))
    assert r.exit_code == 1 and r.output.strip().startswith(f"error: {junk}: cannot read image")

    big = tmp_path / "big.png"
    Image.new("RGB", (64, 48)).save(big)
    r = _cli("caption", str(big), "-m", str(exported_model))
    assert r.exit_code == 1
    assert r.output.strip() == f"error: {big}: expected a 32x32 image (or a square multiple up to 16x), got 64x48"

    r = _cli("caption", str(tmp_path / "missing.png"), "-m", str(exported_model))
    assert r.exit_code == 1 and "no such image file" in r.output

    r = _cli("generate", "a 7", "--sampler", "flow_euler", "--steps", "2", "-m", str(exported_model))
    assert r.exit_code == 2 and "does not fit a model trained with 'ddpm'" in r.output

    r = _cli("generate", "a 7", "-n", "0", "-m", str(exported_model))
    assert r.exit_code == 2

    r = _cli("generate", "a 7", "--cfg-scale", "-1", "-m", str(exported_model))
    assert r.exit_code == 2 and "greater than or equal to 0" in r.output
    r = _cli("generate", "a 7", "--out", str(tmp_path), "-m", str(exported_model))
    assert r.exit_code == 2 and r.output.strip() == f"error: --out {tmp_path}: a folder; give the PNG file to write"
