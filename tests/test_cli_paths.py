"""The CLI's advertised options, each shown to do what its help says (the exported tiny model:
DDPM-trained, random weights, 8x8 latents <-> 32x32 images)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, sampling_config

P = str(REPO / "params.yaml")


def _cli(*args: str):
    from cli import app

    return CliRunner().invoke(app, list(args))


def _generate(model, out, *args: str) -> np.ndarray:
    r = _cli("generate", "a red 4", "-n", "1", "--steps", "3", "--out", str(out), "-m", str(model), "-p", P, *args)
    assert r.exit_code == 0, r.output
    return np.asarray(Image.open(out).convert("RGB"), dtype=int)


def test_generate_seed_cfg_scale_sampler_and_no_cache(exported_model, tmp_path):
    base = _generate(exported_model, tmp_path / "a.png", "--seed", "1")
    np.testing.assert_array_equal(base, _generate(exported_model, tmp_path / "b.png", "--seed", "1"))
    assert np.abs(base - _generate(exported_model, tmp_path / "c.png", "--seed", "2")).max() > 0
    assert np.abs(base - _generate(exported_model, tmp_path / "d.png", "--seed", "1", "--cfg-scale", "1")).max() > 0
    ddim = _generate(exported_model, tmp_path / "e.png", "--seed", "1", "--sampler", "ddim")
    assert np.abs(base - ddim).max() > 0  # another sampler of the same model: another image
    # the reference sampler (the whole sequence every step) draws the cached sampler's image
    uncached = _generate(exported_model, tmp_path / "f.png", "--seed", "1", "--no-cache")
    assert np.abs(base - uncached).max() <= 2 and np.abs(base - uncached).mean() < 0.1


def test_complete_top_k_one_is_greedy(exported_model):
    def complete(*args: str) -> str:
        r = _cli("complete", "to be or", "--max-tokens", "6", "-m", str(exported_model), "-p", P, *args)
        assert r.exit_code == 0, r.output
        return r.output

    greedy = complete("--temperature", "0")
    assert complete("--temperature", "1.0", "--top-k", "1", "--seed", "3") == greedy
    sampled = {complete("--temperature", "5.0", "--top-k", "0", "--top-p", "1.0", "--seed", str(s)) for s in range(4)}
    assert len(sampled) > 1  # without the filter a hot temperature samples different texts


def test_interleave_images_guidance_temperature_and_sampler(exported_model, tmp_path):
    none = tmp_path / "none"
    r = _cli(
        "interleave", "to be", "--max-images", "0", "--max-tokens", "6", "--out", str(none), "-m", str(exported_model)
    )
    assert r.exit_code == 0, r.output
    assert not list(none.glob("*.png")) and "[image:" not in r.output
    one = tmp_path / "one"
    r = _cli(
        "interleave", "to be", "--force-image", "--max-images", "1", "--max-tokens", "6", "--steps", "2",
        "--cfg-scale", "2", "--temperature", "0.7", "--sampler", "ddim", "--out", str(one), "-m", str(exported_model),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [p.name for p in one.glob("*.png")] == ["image-0.png"] and r.output.count("[image:") == 1
    assert Image.open(one / "image-0.png").size == (128, 128)  # written 4x enlarged


def test_set_overrides_reach_the_command(exported_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _cli("params", "-p", P, "-S", "sampling.steps=7", "-S", "eval.sampling.cfg_scale=2.5")
    assert r.exit_code == 0, r.output
    assert "  steps: 7\n" in r.output and "cfg_scale: 2.5" in r.output
    out = tmp_path / "g.png"
    r = _cli(
        "generate", "a 7", "-n", "1", "--steps", "2", "--out", str(out), "-p", P, "-S", f"paths.model={exported_model}"
    )
    assert r.exit_code == 0 and out.is_file(), r.output  # the model found through the override alone
    r = _cli("generate", "a 7", "-p", P, "-S", "sampling.nosuch=1")
    assert r.exit_code == 2 and r.output.strip().endswith("sampling.nosuch: unknown key")


def test_a_named_eval_sampler_samples_as_the_default_when_it_is_the_models(exported_model):
    """``eval.sampling.sampler`` set to the model's own sampler gives the images the model's
    default gives; another valid sampler gives others."""
    from transfusion.eval.evaluate import sample_many
    from transfusion.pipeline import TransfusionPipeline

    pipe = TransfusionPipeline.from_pretrained(exported_model)
    captions = ["a red 4", "a 7", "two 5s"]
    own = sampling_config("ddpm", steps=3)
    named = sample_many(pipe, captions, 5, own, batch_size=2)
    default = pipe.sample_images(captions[:2], steps=3, cfg_scale=own.cfg_scale, cfg_interval=own.cfg_interval, seed=5)
    np.testing.assert_array_equal(named[:2], default)
    other = sample_many(pipe, captions, 5, own.model_copy(update={"sampler": "ddim"}), batch_size=2)
    assert np.abs(named.astype(int) - other.astype(int)).max() > 0
