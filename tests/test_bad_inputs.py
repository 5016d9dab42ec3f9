"""Bad input, table-driven: every case exits non-zero with one line ``error: ...`` naming what
was wrong (2 for a bad argument or params value, 1 for a bad file or input), no traceback, and
nothing written -- neither in the working folder nor next to the inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import REPO, png_claiming
from transfusion.io import write_manifest

P = str(REPO / "params.yaml")
LONG = "zq" * 2500  # a 5000-character caption

CASES = [
    # params files and overrides
    ("override-type", ["params", "-p", P, "-S", "vae.lr=fast"], 2, "vae.lr: Input should be a valid number"),
    ("override-unknown", ["params", "-p", P, "-S", "nosuch.key=1"], 2, "nosuch: unknown key"),
    ("override-syntax", ["params", "-p", P, "-S", "vae.lr"], 2, "expected section.key=value"),
    ("override-not-section", ["params", "-p", P, "-S", "vae.lr.x=1"], 2, "vae.lr is not a section"),
    ("params-missing", ["params", "-p", "{inputs}/missing.yaml"], 2, "params file not found"),
    ("params-not-utf8", ["params", "-p", "{inputs}/notutf8.yaml"], 2, "not UTF-8 text"),
    ("params-empty", ["params", "-p", "{inputs}/empty.yaml"], 2, "missing keys"),
    ("params-list", ["params", "-p", "{inputs}/list.yaml"], 2, "expected a mapping of sections"),
    ("params-bad-yaml", ["params", "-p", "{inputs}/bad.yaml"], 2, "not valid YAML"),
    ("params-alias-bomb", ["params", "-p", "{inputs}/alias-bomb.yaml"], 2, "aliases expand to more than 100000"),
    ("params-deep", ["params", "-p", "{inputs}/deep.yaml"], 2, "nested too deeply"),
    (
        "override-alias-bomb",
        [
            "params",
            "-p",
            P,
            "-S",
            "train.steps="
            + "[&a [1,1,1,1,1,1,1,1,1,1],"
            + "".join(f"&{c} [{','.join(['*' + p] * 10)}]," for p, c in zip("abcdef", "bcdefg"))
            + "*g]",
        ],
        2,
        "override train.steps: its YAML aliases expand",
    ),
    ("override-inf", ["params", "-p", P, "-S", "train.lr=1e400"], 2, "train.lr: Input should be a finite number"),
    ("override-nan", ["params", "-p", P, "-S", "vae.lr=.nan"], 2, "vae.lr: Input should be a finite number"),
    ("override-neg-inf", ["params", "-p", P, "-S", "diffusion.loss_weight=-.inf"], 2, "finite number"),
    ("data-grid", ["data", "-p", P, "-S", "data.scenes.grid=1"], 2, "data.scenes.grid"),
    ("data-source", ["data", "-p", P, "-S", "data.source=flickr"], 2, "data.source"),
    ("data-folder-unset", ["data", "-p", P, "-S", "data.source=caption_folder"], 2, "caption_folder is not set"),
    ("vae-steps", ["vae", "-p", P, "-S", "vae.steps=0"], 2, "vae.steps: Input should be greater than 0"),
    ("train-steps", ["train", "-p", P, "-S", "train.steps=0"], 2, "train.steps"),
    ("train-warmup", ["train", "-p", P, "-S", "train.warmup_steps=5000"], 2, "warmup_steps (5000) must be < steps"),
    ("train-precision", ["train", "-p", P, "-S", "train.precision=fp16"], 2, "train.precision"),
    ("train-ema", ["train", "-p", P, "-S", "train.ema_decay=1.5"], 2, "train.ema_decay"),
    ("train-backbone", ["train", "-p", P, "-S", "model.backbone=gpt2"], 2, "model.backbone"),
    ("eval-images", ["eval", "-p", P, "-S", "eval.images_per_prompt=0"], 2, "eval.images_per_prompt"),
    ("eval-sampler-fit", ["eval", "-p", P, "-S", "eval.sampling.sampler=ddim"], 2, "eval.sampling: sampler 'ddim'"),
    ("sampling-interval", ["params", "-p", P, "-S", "sampling.cfg_interval=[0.9, 0.1]"], 2, "low end above high end"),
    ("tokenizer-vocab", ["tokenizer", "-p", P, "-S", "tokenizer.vocab_size=10"], 2, "tokenizer.vocab_size"),
    ("latents-batch", ["latents", "-p", P, "-S", "latents.batch_size=0"], 2, "latents.batch_size"),
    ("judge-epochs", ["judge", "-p", P, "-S", "judge.epochs=0"], 2, "judge.epochs"),
    ("eval-weights", ["eval", "-p", P, "-S", "eval.inception_weights=/no/such.pt"], 2, "eval.inception_weights"),
    ("reader-epochs", ["reader", "-p", P, "-S", "reader.epochs=0"], 2, "reader.epochs"),
    ("align-method", ["align", "-p", P, "-S", "align.method=ppo"], 2, "align.method: Input should be 'grpo' or 'raft'"),
    ("align-held-out", ["align", "-p", P, "-S", "align.held_out_fraction=1"], 2, "align.held_out_fraction"),
    (
        "align-grpo-ddpm",
        ["align", "-p", P, "-S", "align.enabled=true", "-S", "diffusion.objective=ddpm", "-S", "sampling.sampler=ddpm"],
        2,
        "align.method: grpo samples flow models' SDE",
    ),
    ("align-resume-off", ["align", "--resume", "-p", P], 1, "align.enabled is false: no align run to resume"),
    (
        "align-resume-nothing",
        ["align", "--resume", "-p", P, "-S", "align.enabled=true", "-S", "paths.align_checkpoints=ck"],
        1,
        "no align checkpoint to resume from",
    ),
    # training's own arguments
    ("train-path-no-resume", ["train", "somewhere", "-p", P], 2, "somewhere: a checkpoint argument needs --resume"),
    (
        "train-resume-nothing",
        ["train", "--resume", "-p", P, "-S", "paths.checkpoints=ck"],
        1,
        "no checkpoint to resume",
    ),
    ("train-resume-foreign", ["train", "{inputs}/junk.png", "--resume", "-p", P], 1, "must be a checkpoint under"),
    ("train-storage-uri", ["train", "-p", P, "-S", "train.storage=nosuchscheme://x"], 1, "not a storage URI"),
    # generate: the model
    ("model-missing", ["generate", "a 7", "-m", "{inputs}/nowhere"], 1, "no model folder here"),
    ("model-not-exported", ["generate", "a 7", "-m", "{inputs}/empty-model"], 1, "not an exported model"),
    ("model-pipeline-json", ["generate", "a 7", "-m", "{inputs}/bad-pipeline"], 1, "expected JSON with vae and"),
    ("model-config-types", ["generate", "a 7", "-m", "{inputs}/bad-types"], 1, "latent_size: Input should be a valid"),
    ("model-config-json", ["generate", "a 7", "-m", "{inputs}/bad-config"], 1, "invalid model config"),
    ("model-config-inf", ["generate", "a 7", "-m", "{inputs}/bad-inf"], 1, "cfg_scale: Input should be a finite"),
    (
        "model-tampered",
        ["generate", "a 7", "-m", "{inputs}/tampered"],
        1,
        "tampered: model.safetensors does not match its sha256 in manifest.json",
    ),
    ("model-vae-cut", ["generate", "a 7", "-m", "{inputs}/vae-cut"], 1, "vae/config.json is truncated or altered"),
    ("model-no-manifest", ["generate", "a 7", "-m", "{inputs}/no-manifest"], 1, "no readable manifest.json"),
    (
        "model-runs-uri-typo",
        ["generate", "a 7", "-m", "runs:/0123/model", "-p", P, "-S", "tracking.tracking_uri=sqlite:///typo.db"],
        1,
        "no tracking database",
    ),  # fmt: skip
    # generate: the arguments
    ("generate-n-0", ["generate", "a 7", "-n", "0", "-m", "{model}"], 2, "Invalid value for '-n'"),
    ("generate-n-huge", ["generate", "a 7", "-n", "1000", "-m", "{model}"], 2, "Invalid value for '-n'"),
    ("generate-steps-0", ["generate", "a 7", "--steps", "0", "-m", "{model}"], 2, "Invalid value for '--steps'"),
    ("generate-cfg", ["generate", "a 7", "--cfg-scale", "-1", "-m", "{model}"], 2, "greater than or equal to 0"),
    (
        "generate-interval",
        ["generate", "a 7", "--cfg-interval", "0.6", "0.2", "-m", "{model}"],
        2,
        "0 <= LO <= HI <= 1",
    ),
    ("generate-sampler", ["generate", "a 7", "--sampler", "euler9", "--steps", "2", "-m", "{model}"], 2, "euler9"),
    (
        "generate-sampler-fit",
        ["generate", "a 7", "--sampler", "flow_euler", "--steps", "2", "-m", "{model}"],
        2,
        "does not fit a model trained with 'ddpm'",
    ),  # fmt: skip
    ("generate-out-folder", ["generate", "a 7", "--out", "{inputs}", "-m", "{model}"], 2, "a folder; give the PNG"),
    ("generate-long-caption", ["generate", LONG, "--steps", "2", "-m", "{model}"], 2, "exceeds the model's"),
    (
        "generate-cfg-inf",
        ["generate", "a 7", "--cfg-scale", "inf", "-m", "{model}"],
        2,
        "Invalid value for '--cfg-scale'",
    ),
    (
        "generate-steps-huge",
        ["generate", "a 7", "--steps", "100000", "-m", "{model}"],
        2,
        "Invalid value for '--steps'",
    ),
    ("complete-temperature-inf", ["complete", "to be", "--temperature", "inf", "-m", "{model}"], 2, "'--temperature'"),
    ("complete-tokens-huge", ["complete", "to be", "--max-tokens", "10000000", "-m", "{model}"], 2, "'--max-tokens'"),
    ("generate-seed", ["generate", "a 7", "--seed", "abc", "-m", "{model}"], 2, "Invalid value for '--seed'"),
    ("generate-no-caption", ["generate", "-m", "{model}"], 2, "Missing argument"),
    # caption: the images
    ("caption-junk", ["caption", "{inputs}/junk.png", "-m", "{model}"], 1, "junk.png: cannot read image"),
    ("caption-missing", ["caption", "{inputs}/missing.png", "-m", "{model}"], 1, "no such image file"),
    ("caption-size", ["caption", "{inputs}/big.png", "-m", "{model}"], 1, "expected a 32x32 image"),
    ("caption-not-multiple", ["caption", "{inputs}/odd.png", "-m", "{model}"], 1, "got 100x100"),
    ("caption-header-bomb", ["caption", "{inputs}/bomb.png", "-m", "{model}"], 1, "100000x100000 pixels, more than"),
    ("caption-13000", ["caption", "{inputs}/huge.png", "-m", "{model}"], 1, "13000x13000 pixels, more than"),
    ("caption-truncated", ["caption", "{inputs}/truncated.png", "-m", "{model}"], 1, "cannot read image"),
    ("caption-folder", ["caption", "{inputs}/folder.png", "-m", "{model}"], 1, "cannot read image"),
    # complete, interleave
    ("complete-tokens", ["complete", "to be", "--max-tokens", "0", "-m", "{model}"], 2, "'--max-tokens'"),
    ("complete-top-p", ["complete", "to be", "--top-p", "2", "-m", "{model}"], 2, "'--top-p'"),
    ("complete-temperature", ["complete", "to be", "--temperature", "-1", "-m", "{model}"], 2, "'--temperature'"),
    (
        "interleave-out-file",
        ["interleave", "to be", "--out", "{inputs}/junk.png", "-m", "{model}"],
        2,
        "a file; give the folder",
    ),  # fmt: skip
    ("interleave-images", ["interleave", "to be", "--max-images", "-1", "-m", "{model}"], 2, "'--max-images'"),
    (
        "interleave-sampler-fit",
        ["interleave", "to be", "--force-image", "--sampler", "flow_euler", "--steps", "2", "-m", "{model}"],
        2,
        "does not fit a model trained with 'ddpm'",
    ),  # fmt: skip
    # runs, and the command line itself
    ("runs-stage-injection", ["runs", "-p", P, "--stage", "x' OR '1'='1"], 2, "a stage name is"),
    (
        "runs-sqlite-typo",
        ["runs", "-p", P, "-S", "tracking.tracking_uri=sqlite:///typo.db"],
        2,
        "no tracking database there",
    ),  # fmt: skip
    (
        "runs-compare-typo",
        ["runs", "-p", P, "-S", "tracking.tracking_uri=sqlite:///typo.db", "--compare"],
        2,
        "no tracking database there",
    ),
    (
        "promote-sqlite-typo",
        ["promote", "-p", P, "-S", "tracking.tracking_uri=sqlite:///typo.db"],
        1,
        "no tracking database there",
    ),
    (
        "ui-sqlite-typo",
        ["ui", "-p", P, "-S", "tracking.tracking_uri=sqlite:///typo.db"],
        1,
        "no tracking database there",
    ),
    ("ui-port", ["ui", "-p", P, "--port", "0"], 2, "'--port'"),
    (
        "track-model-name",
        ["track", "-p", P, "-S", "tracking.registered_model=my model"],
        2,
        "tracking.registered_model",
    ),
    ("plan-gpu", ["plan", "-p", P, "--gpu", "v100"], 2, "--gpu: expected one of h200"),
    ("plan-mfu", ["plan", "-p", P, "--mfu", "0"], 2, "'--mfu'"),
    (
        "plan-measure-7b",
        ["plan", "-p", P, "-p", str(REPO / "pipelines" / "cluster-7b.yaml"), "--measure", "--json", "plan.json"],
        1,
        "too large to run on this CPU",
    ),
    ("unknown-command", ["nosuch"], 2, "No such command 'nosuch'"),
    ("unknown-option", ["generate", "a 7", "--nosuch"], 2, "No such option: --nosuch"),
]


# nine levels of aliases under a real key: 9**9 values once expanded (the "billion laughs")
ALIAS_BOMB = (
    "".join(
        f"{a}: &{a} [{', '.join([('*' + b) if b else 'lol'] * 9)}]\n" for a, b in zip("abcdefghi", ["", *"abcdefgh"])
    )
    + "train: {steps: *i}\n"
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, exported_model) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "junk.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 48)).save(root / "big.png")
    Image.new("RGB", (100, 100)).save(root / "odd.png")
    (root / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (root / "huge.png").write_bytes(png_claiming(13_000, 13_000))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "whole.png")
    data = (root / "whole.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "folder.png").mkdir()
    (root / "notutf8.yaml").write_bytes(b"vae:\n  lr: \xff\xfe\n")
    (root / "empty.yaml").write_text("")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "bad.yaml").write_text("vae: [1, 2\n")
    (root / "alias-bomb.yaml").write_text(ALIAS_BOMB)
    (root / "deep.yaml").write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "empty-model").mkdir()
    for name, edit in {
        "bad-pipeline": lambda d: (d / "pipeline.json").write_text("{}"),
        "bad-types": lambda d: (d / "config.json").write_text(
            json.dumps(json.loads((d / "config.json").read_text()) | {"latent_size": "big"})
        ),
        "bad-config": lambda d: (d / "config.json").write_text("{"),
        "bad-inf": lambda d: (d / "config.json").write_text(
            json.dumps(_with_cfg_scale(json.loads((d / "config.json").read_text()), float("inf")))
        ),
    }.items():  # wrong files under a manifest that matches them: the parsing is what refuses them
        shutil.copytree(exported_model, root / name)
        edit(root / name)
        write_manifest(root / name)
    for name, edit in {
        "tampered": _flip_4096_bytes,
        "vae-cut": lambda d: (d / "vae" / "config.json").write_text("{}"),
        "no-manifest": lambda d: (d / "manifest.json").unlink(),
    }.items():  # files that no longer match the manifest exported with them
        shutil.copytree(exported_model, root / name)
        edit(root / name)
    return root


def _with_cfg_scale(config: dict, value: float) -> dict:
    return config | {"sampling": config["sampling"] | {"cfg_scale": value}}  # json writes inf as Infinity


def _flip_4096_bytes(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    weights.write_bytes(bytes(data))


def test_a_tampered_export_loads_only_when_told_not_to_verify(inputs):
    from transfusion.errors import BadInput
    from transfusion.pipeline import TransfusionPipeline

    with pytest.raises(BadInput, match="model.safetensors does not match its sha256"):
        TransfusionPipeline.from_pretrained(inputs / "tampered")
    pipe = TransfusionPipeline.from_pretrained(inputs / "tampered", verify=False)  # the user's call
    assert pipe.model.config.latent_size > 0


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_every_command_has_a_bad_input_case():
    """A command added to the CLI without a row here fails this test; names are unique ids."""
    from cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert commands <= {args[0] for _, args, _, _ in CASES}, commands - {args[0] for _, args, _, _ in CASES}
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "args", "code", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(
    name, args, code, expected, inputs, exported_model, tmp_path, monkeypatch
):
    from cli import app

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _snapshot(inputs)
    argv = [a.format(inputs=inputs, model=exported_model) for a in args]
    if argv[0] in ("generate", "caption", "complete", "interleave") and "-p" not in argv:
        argv += ["-p", P]  # the working folder has no params.yaml
    result = CliRunner().invoke(app, argv)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert list(work.iterdir()) == [], "written: " + ", ".join(p.name for p in work.iterdir())
    assert _snapshot(inputs) == before


def test_caption_reads_back_what_generate_and_interleave_wrote(exported_model, tmp_path):
    """The CLI's round trip: `generate` writes a 4x enlarged PNG, `caption` scales it back."""
    import numpy as np
    from PIL import Image

    from cli import app
    from transfusion.images import read_images
    from transfusion.pipeline import TransfusionPipeline

    one = tmp_path / "one.png"
    r = CliRunner().invoke(app, ["generate", "a red 3", "-n", "1", "--steps", "2", "--out", str(one), "-m",
                                 str(exported_model)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert Image.open(one).size == (128, 128)
    r = CliRunner().invoke(app, ["caption", str(one), "-m", str(exported_model)])
    assert r.exit_code == 0 and r.output.startswith(f"{one}\t"), r.output

    # the scaled-down image is exactly what was generated (the enlargement is nearest-neighbour)
    pipe = TransfusionPipeline.from_pretrained(exported_model)
    native = pipe.sample_images(["a red 3"], steps=2, seed=0)[0]
    np.testing.assert_array_equal(read_images([one], 32)[0], native)
    assert r.output.strip().split("\t")[1] == pipe.caption(native[None])[0]

    folder = tmp_path / "il"
    r = CliRunner().invoke(app, ["interleave", "to be", "--force-image", "--steps", "2", "--max-tokens", "2",
                                 "--out", str(folder), "-m", str(exported_model)])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["caption", str(folder / "image-0.png"), "-m", str(exported_model)])
    assert r.exit_code == 0, r.output


def _mode_cases(root: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """Image files in modes ``convert("RGB")`` reads wrong, each with the RGB pixels it shows."""
    from PIL import Image

    cases = {}

    def case(name, im, expected, **save):
        path = root / name
        im.save(path, **save)
        cases[name] = (path, np.asarray(expected, dtype=np.uint8))

    grey16 = np.tile(np.array([0, 257 * 100, 65535, 32768], dtype=np.uint16), (32, 8))  # (32, 32)
    case("grey16.png", Image.fromarray(grey16), np.repeat((grey16 / 257).round()[..., None], 3, -1))
    grey_f = np.tile(np.array([0.0, 0.5, 1.0, 0.25], dtype=np.float32), (32, 8))
    case("float.tiff", Image.fromarray(grey_f), np.repeat((grey_f * 255).round()[..., None], 3, -1))
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))
    cmyk.paste((0, 0, 0, 255), (0, 0, 16, 32))
    rgb = np.zeros((32, 32, 3)) + [255, 0, 0]
    rgb[:, :16] = 0
    case("cmyk.tiff", cmyk, rgb)
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)  # 0: white, transparent; 1: red
    pal.paste(1, (0, 0, 32, 8))
    rgb = np.zeros((32, 32, 3))
    rgb[:8] = [255, 0, 0]
    case("palette.png", pal, rgb, transparency=0)
    rgba = np.full((32, 32, 4), [255, 255, 255, 0], dtype=np.uint8)  # white, fully transparent
    rgba[16:] = [200, 100, 50, 255]
    rgb = np.zeros((32, 32, 3))
    rgb[16:] = [200, 100, 50]
    case("rgba.png", Image.fromarray(rgba), rgb)
    stored = np.full((32, 32, 3), [0, 0, 255], dtype=np.uint8)
    stored[:, :16] = [255, 0, 0]  # stored: left red, right blue; orientation 6 turns it 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = np.zeros((32, 32, 3)) + [0, 0, 255]
    rgb[:16] = [255, 0, 0]
    case("exif-rotated.png", Image.fromarray(stored), rgb, exif=exif)
    return cases


MODES = ["grey16.png", "float.tiff", "cmyk.tiff", "palette.png", "rgba.png", "exif-rotated.png"]


@pytest.mark.parametrize("name", MODES)
def test_image_modes_convert_to_the_pixels_they_show(tmp_path, name):
    from transfusion.images import read_images

    path, expected = _mode_cases(tmp_path)[name]
    np.testing.assert_array_equal(read_images([path], 32)[0], expected)


def test_an_image_that_is_no_picture_is_refused_with_one_line(tmp_path):
    from PIL import Image

    from transfusion.errors import BadInput
    from transfusion.images import read_images

    Image.fromarray(np.full((32, 32), 7.5, dtype=np.float32)).save(tmp_path / "radiance.tiff")
    with pytest.raises(BadInput, match=r"radiance.tiff: a float image is read as 0..1"):
        read_images([tmp_path / "radiance.tiff"], 32)
