"""Params: defaults, overrides, and one clear line (exit 2, nothing written) for bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from transfusion.config import Params, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_params_yaml_is_the_one_source_of_values(tmp_path):
    """Every key is required: an empty or truncated file stops naming what is missing; a preset
    overlays params.yaml with only what it changes."""
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    assert isinstance(load_params(REPO / "params.yaml"), Params)
    with pytest.raises(ParamsError, match=r"missing keys paths, tracking, data, .*, eval \(start from params.yaml\)"):
        load_params(write(tmp_path, ""))
    del full["train"]["probe"]["sampling"]["cfg_scale"], full["eval"]["seed"]
    with pytest.raises(ParamsError, match=r"missing keys train.probe.sampling.cfg_scale, eval.seed"):
        load_params(write(tmp_path, yaml.safe_dump(full)))
    preset = load_params([REPO / "params.yaml", REPO / "pipelines" / "cpu-tiny.yaml"])
    assert preset.train.steps != load_params(REPO / "params.yaml").train.steps


def test_presets_are_valid_overlays():
    for preset in sorted((REPO / "pipelines").glob("*.yaml")):
        load_params([REPO / "params.yaml", preset])


def test_overrides_parse_yaml_values():
    p = load_params(
        REPO / "params.yaml", ["vae.lr=0.5", "vae.block_out_channels=[16, 32, 32]", "vae.norm_num_groups=8"]
    )
    assert p.vae.lr == 0.5 and p.vae.block_out_channels == [16, 32, 32]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vae:\n  lrr: 0.1\n", "vae.lrr: unknown key"),
        ("vae:\n  lr: fast\n", "vae.lr: Input should be a valid number"),
        ("vae:\n  lr: -1\n", "vae.lr: Input should be greater than 0"),
        ("data:\n  scenes:\n    grid: 1\n", "data.scenes.grid: Input should be greater than or equal to 2"),
        ("data:\n  mnist:\n    local_path: /no/such/mnist.npz\n", "data.mnist.local_path"),
        ("data:\n  mnist:\n    archive:\n      sha256: abc\n", "data.mnist.archive"),
        ("data:\n  scenes:\n    canvas: 30\n    grid: 4\n", "canvas (30) must be divisible by grid (4)"),
        (
            "data:\n  scenes:\n    canvas: 34\n    grid: 2\n",
            "data.scenes.canvas (34) must equal vae.downsample (4) x latents.size (8)",
        ),
        ("vae:\n  block_out_channels: [16, 32]\n", "block_out_channels: 2 blocks downsample by 2, but downsample is 4"),
        ("model:\n  patch_size: 3\n", "model.patch_size (3) must divide latents.size (8)"),
        (
            "data:\n  scenes: {canvas: 256}\nlatents:\n  size: 64\nmodel:\n  patch_size: 4\n",
            "model.max_length (256) must exceed an image's 256 patches + BOI/EOI (latents.size 64 / model.patch_size 4",
        ),
        ("data:\n  source: parquet\n", "source is parquet but stream.urls is empty"),
        ("data:\n  max_bad_fraction: 2\n", "data.max_bad_fraction: Input should be less than or equal to 1"),
        ("data:\n  scenes:\n    categories: {sculpture: 1}\n", "data.scenes.categories.sculpture"),
        ("diffusion:\n  objective: ddpm\n", "sampling: sampler 'flow_euler' does not fit a model trained with 'ddpm'"),
        (
            "eval:\n  sampling: {sampler: ddim}\n",
            "eval.sampling: sampler 'ddim' does not fit a model trained with 'flow'",
        ),
        ("vae: [1, 2\n", "not valid YAML (line 2)"),
        ("- just\n- a list\n", "expected a mapping of sections"),
    ],
)
def test_bad_files_name_the_key(tmp_path, text, expected):
    with pytest.raises(ParamsError) as err:
        load_params([REPO / "params.yaml", write(tmp_path, text)])
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and str(tmp_path / "params.yaml") in message


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_bytes(b"vae:\n  lr: \xff\xfe\n")
    with pytest.raises(ParamsError, match=r"params.yaml: not UTF-8 text \(byte 11"):
        load_params([REPO / "params.yaml", bad])


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="expected section.key=value"):
        load_params(REPO / "params.yaml", ["vae.lr"])
    with pytest.raises(ParamsError, match=r"nosuch: unknown key"):
        load_params(REPO / "params.yaml", ["nosuch.key=1"])
    with pytest.raises(ParamsError, match="vae.lr is not a section"):
        load_params(REPO / "params.yaml", ["vae.lr.x=1"])


def test_sampling_is_written_once_and_overridden_by_key():
    """``eval.sampling`` / ``train.probe.sampling`` / ``train.sampling`` change only what they
    set; null keys read ``sampling``."""
    p = load_params(
        REPO / "params.yaml", ["sampling.cfg_scale=3.5", "eval.sampling.steps=7", "train.sampling.steps=null"]
    )
    ev = p.sampling_for("eval.sampling")
    assert ev.steps == 7 and p.sampling.steps != 7
    assert (ev.sampler, ev.cfg_scale, ev.cfg_interval) == (p.sampling.sampler, 3.5, p.sampling.cfg_interval)
    assert p.sampling_for("train.sampling") == p.sampling and p.sampling_for("sampling") is p.sampling
    moved = load_params(REPO / "params.yaml", ["sampling.cfg_interval=[0.1, 0.9]"])
    assert moved.sampling_for("train.probe.sampling").cfg_interval == (0.1, 0.9)


def test_digest_follows_values():
    p = load_params(REPO / "params.yaml")
    assert p.digest() == load_params(REPO / "params.yaml").digest()
    assert p.digest() != load_params(REPO / "params.yaml", ["vae.lr=0.5"]).digest()


@pytest.mark.parametrize("command", ["data", "tokenizer", "vae", "latents", "params"])
def test_cli_bad_params_exit_2_and_write_nothing(tmp_path, monkeypatch, command):
    from cli import app

    monkeypatch.chdir(tmp_path)
    bad = write(tmp_path, yaml.safe_dump({"paths": {"vae": str(tmp_path / "out")}, "vae": {"steps": 0}}))
    result = CliRunner().invoke(app, [command, "--params", str(REPO / "params.yaml"), "--params", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {REPO / 'params.yaml'} + {bad}: vae.steps: Input should be greater than 0 (got 0)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("text", ["", "paths:\n  cache: .cache\n"])
def test_cli_empty_or_truncated_params_exit_2_naming_what_is_missing(tmp_path, monkeypatch, text):
    from cli import app

    monkeypatch.chdir(tmp_path)
    params = write(tmp_path, text)
    result = CliRunner().invoke(app, ["data", "--params", str(params)])
    assert result.exit_code == 2
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith(f"error: {params}: missing keys ") and "tracking, data" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_cli_override_flag(tmp_path, monkeypatch):
    from cli import app

    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["params", "-S", "vae.steps=7", "-S", "data.scenes.n_test=5"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["vae"]["steps"] == 7 and shown["data"]["scenes"]["n_test"] == 5


@pytest.mark.parametrize(
    ("canvas", "blocks", "latent", "patch", "max_length"),
    [(64, [8, 16, 16], 16, 4, 256), (128, [8, 16, 16, 16], 16, 2, 512), (256, [8, 16, 16, 16], 32, 4, 256)],
)
def test_resolution_keys_for_64_128_and_256_px(canvas, blocks, latent, patch, max_length):
    """Image size, VAE downsampling, latent size and patch size set together load as one
    consistent resolution (the README's 64 and 256 px settings among them)."""
    overrides = [
        f"data.scenes.canvas={canvas}",
        f"vae.block_out_channels={blocks}",
        f"vae.downsample={2 ** (len(blocks) - 1)}",
        f"latents.size={latent}",
        f"model.patch_size={patch}",
        f"model.max_length={max_length}",
    ]
    p = load_params(REPO / "params.yaml", overrides)
    assert p.data.scenes.canvas == p.vae.downsample * p.latents.size
    assert (p.latents.size // p.model.patch_size) ** 2 + 2 < p.model.max_length
