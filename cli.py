"""The ``transfusion`` command: one subcommand per pipeline stage (and tools around them).

Stages are imported inside their command so that ``transfusion --help`` stays instant.
Every command takes ``--params FILE`` (repeatable: later files override earlier ones) and
``-S section.key=value`` overrides. Bad params exit with code 2 and one line naming the key;
bad inputs (missing data, corrupt archives, ...) exit with code 1 and one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.core

from transfusion import env
from transfusion.errors import Terminated, UserError
from transfusion.stopping import sigterm_stops

env.apply()


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (a bad option value, an unknown command) as one line ``error: ...`` with
    exit code 2, like every other error of this CLI, instead of click's boxed usage text."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        click = typer.core._click  # typer vendors click; its exceptions live there

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:
            typer.echo(err.ctx.get_help())
            code = 0
        except click.exceptions.UsageError as err:
            typer.secho(f"error: {err.format_message()}", fg=typer.colors.RED, err=True)
            code = 2
        except typer.Abort:
            typer.secho("error: aborted", fg=typer.colors.RED, err=True)
            code = 1
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Train and evaluate Transfusion models (text by next-token prediction, images by diffusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[
    list[Path],
    typer.Option("--params", "-p", help="Params YAML file(s); later files override earlier ones."),
]
SetOpt = Annotated[
    list[str],
    typer.Option("--set", "-S", help="Override one param: section.key=value (repeatable)."),
]


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _check_interval(interval: tuple[float, float] | None) -> None:
    if interval is not None and not 0.0 <= interval[0] <= interval[1] <= 1.0:
        _fail(f"--cfg-interval: expected 0 <= LO <= HI <= 1, got {interval[0]:g} {interval[1]:g}", 2)


RESUMABLE = {"train": "a training run", "align": "an align run"}  # stages with --resume


def _guard(call, code: int | None = None, stage: str | None = None):
    """``call()``; a :class:`UserError` becomes its one line and exit code (``code``: the
    arguments are all that can be wrong, a usage error)."""
    hint = f" ({RESUMABLE[stage]} continues with `transfusion {stage} --resume`)" if stage in RESUMABLE else ""
    try:
        with sigterm_stops():
            return call()
    except Terminated as err:  # SIGTERM (a scheduler, a preemption): 128 + 15; the run KILLED as on Ctrl-C
        _fail(f"{err or 'terminated by SIGTERM'}{hint}", 143)
    except KeyboardInterrupt:  # Ctrl-C: the conventional 128 + SIGINT; MLflow marks the run KILLED
        _fail(f"interrupted{hint}", 130)
    except UserError as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__, err.exit_code if code is None else code)


def _load(params: list[Path] | None, overrides: list[str] | None):
    from transfusion.config import load_params

    return _guard(lambda: load_params(params or [Path("params.yaml")], overrides or []))


def _run_stage(name: str, params: list[Path] | None, overrides: list[str] | None, **kwargs) -> None:
    import importlib
    import json
    import time

    cfg = _load(params, overrides)
    module = importlib.import_module(f"stages.{name}")
    start = time.perf_counter()
    metrics = _guard(lambda: module.run(cfg, **kwargs), stage=name)
    typer.echo(f"{name}: done in {time.perf_counter() - start:.1f}s")
    if metrics:
        typer.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))


STAGES = {  # the stages without options of their own: name -> help
    "data": "Stage data: fetch pinned archives, compose MNIST scenes, split the text.",
    "tokenizer": "Stage tokenizer: train the byte-level BPE (or load a local pretrained one).",
    "vae": "Stage vae: train the AutoencoderKL on the scene images, report test PSNR.",
    "latents": "Stage latents: encode every scene, scale to unit variance, write latent shards.",
    "judge": "Stage judge: train the cell classifier that reads scenes; report its test exact match.",
    "reader": "Stage reader: train the second reader (another seed and shape) that checks the judge.",
    "eval": "Stage eval: GenEval-style score, FID/KID, captioning accuracy, text bits per byte.",
    "track": "Stage track: close the pipeline run's MLflow parent run and register its model (latest).",
}


def _stage_command(name: str, help_: str) -> None:
    def command(params: ParamsOpt = None, set_: SetOpt = None) -> None:
        _run_stage(name, params, set_)

    app.command(name, help=help_)(command)


for _name, _help in STAGES.items():
    _stage_command(_name, _help)


@app.command()
def train(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="With --resume: the checkpoint folder to continue from.", show_default=False)
    ] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint (or CHECKPOINT).")
    ] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")] = None,
) -> None:
    """Stage train: the Transfusion model on Ray Train (resumable, tracked in MLflow).

    transfusion train                         a fresh run
    transfusion train --resume [CHECKPOINT]   continue the interrupted run (same MLflow run)
    """
    if checkpoint is not None and not resume:
        _fail(f"{checkpoint}: a checkpoint argument needs --resume", 2)
    _run_stage("train", params, set_, resume=checkpoint if checkpoint is not None else resume, address=address)


@app.command()
def align(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest align checkpoint.")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")] = None,
) -> None:
    """Stage align: post-train the exported model against the judged GenEval reward.

    transfusion align              a fresh run (align.method: grpo | raft; align.enabled: false copies)
    transfusion align --resume     continue the interrupted run (same MLflow run, same rewards)
    """
    _run_stage("align", params, set_, resume=resume, address=address)


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model folder or MLflow URI (runs:/<id>/model, models:/transfusion@champion). Default: paths.model.",
    ),
]
IntervalOpt = Annotated[
    tuple[float, float] | None,
    typer.Option(
        metavar="LO HI", help="Noise levels (0 clean .. 1 pure noise) where guidance applies (default: the model's)."
    ),
]
# bounds past which a number gives only garbage or a crash deep inside (inf is a float to click)
MAX_STEPS, MAX_CFG, MAX_TEMPERATURE, MAX_TOKENS = 1000, 100.0, 100.0, 4096
SeedOpt = Annotated[int, typer.Option(help="Random seed (every mode is deterministic given it).")]
SamplerOpt = Annotated[str | None, typer.Option(help="ddpm | ddim | dpmpp | flow_euler (default: the model's).")]


def _pipeline(model: str | None, params: list[Path] | None, overrides: list[str] | None):
    from transfusion.pipeline import TransfusionPipeline
    from transfusion.tracking import tracking_uri

    cfg = _load(params, overrides)
    target = model or str(cfg.paths.model)
    return _guard(lambda: TransfusionPipeline.from_uri(target, tracking_uri(cfg.tracking)))


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="step", leave=False)


@app.command()
def generate(
    caption: Annotated[str, typer.Argument(help="What to draw, e.g. 'a red 3 to the left of a blue 7'.")],
    n: Annotated[int, typer.Option("-n", min=1, max=256, help="Images to sample.")] = 4,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write (a grid when n > 1).")] = Path("generated.png"),
    steps: Annotated[
        int | None, typer.Option(min=1, max=MAX_STEPS, help="Denoising steps (default: the model's sampling.steps).")
    ] = None,
    cfg_scale: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=MAX_CFG, help="Classifier-free guidance scale (default: the model's sampling.cfg_scale)."
        ),
    ] = None,
    sampler: SamplerOpt = None,
    cfg_interval: IntervalOpt = None,
    seed: SeedOpt = 0,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the caption every step (slow).")] = False,
    model: ModelOpt = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample images for a caption (the prefix runs once into the KV cache)."""
    from transfusion.images import render_grid, save_png

    if out.is_dir():
        _fail(f"--out {out}: a folder; give the PNG file to write", 2)
    _check_interval(cfg_interval)
    pipe = _pipeline(model, params, set_)
    images = _guard(
        lambda: pipe.sample_images(
            [caption] * n,
            steps=steps,
            cfg_scale=cfg_scale,
            sampler=sampler,
            cfg_interval=cfg_interval,
            seed=seed,
            use_cache=not no_cache,
            progress=_progress("denoising"),
        ),
        code=2,
    )
    if n == 1:
        save_png(images[0], out, scale=4)
    else:
        render_grid(images, [f"{caption} (seed {seed + i})" for i in range(n)], out)
    typer.echo(f"wrote {out}")


@app.command("caption")
def caption_cmd(
    images: Annotated[list[Path], typer.Argument(help="Image files (the model's canvas size, e.g. 32x32).")],
    model: ModelOpt = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Caption images: clean latents in context after <boi> ... <eoi>, then text."""
    from transfusion.images import read_images

    pipe = _pipeline(model, params, set_)
    pixels = _guard(lambda: read_images(images, pipe.image_size))
    for file, text in zip(images, _guard(lambda: pipe.caption(pixels))):
        typer.echo(f"{file}\t{text}")


@app.command()
def complete(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    max_tokens: Annotated[int, typer.Option(min=1, max=MAX_TOKENS, help="New tokens at most.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, max=MAX_TEMPERATURE, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0)] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Continue a text prompt (KV-cached decoding)."""
    pipe = _pipeline(model, params, set_)
    (text,) = _guard(
        lambda: pipe.generate_text(
            [prompt], max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        ),
        code=2,
    )
    typer.echo(prompt + text)


@app.command()
def interleave(
    prompt: Annotated[str, typer.Argument(help="Text to start from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the generated images.")] = Path("interleaved"),
    max_tokens: Annotated[int, typer.Option(min=1, max=MAX_TOKENS)] = 48,
    max_images: Annotated[int, typer.Option(min=0, max=64)] = 2,
    force_image: Annotated[bool, typer.Option(help="Start an image right after the prompt.")] = False,
    steps: Annotated[
        int | None, typer.Option(min=1, max=MAX_STEPS, help="Denoising steps (default: the model's).")
    ] = None,
    cfg_scale: Annotated[
        float | None, typer.Option(min=0.0, max=MAX_CFG, help="Guidance scale (default: the model's).")
    ] = None,
    sampler: SamplerOpt = None,
    cfg_interval: IntervalOpt = None,
    temperature: Annotated[float, typer.Option(min=0.0, max=MAX_TEMPERATURE)] = 0.0,
    seed: SeedOpt = 0,
    model: ModelOpt = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Mixed generation: text until <boi>, an image by diffusion, <eoi>, more text."""
    if out.exists() and not out.is_dir():
        _fail(f"--out {out}: a file; give the folder to write the images into", 2)
    _check_interval(cfg_interval)
    pipe = _pipeline(model, params, set_)
    parts = _guard(
        lambda: pipe.generate(
            prompt,
            max_new_tokens=max_tokens,
            max_images=max_images,
            force_image=force_image,
            steps=steps,
            cfg_scale=cfg_scale,
            sampler=sampler,
            cfg_interval=cfg_interval,
            temperature=temperature,
            seed=seed,
            progress=_progress("denoising"),
        ),
        code=2,
    )
    _echo_parts(prompt, parts, out)


def _echo_parts(prompt: str, parts: list, out: Path) -> None:
    """The prompt and the generated text in order, each image saved under ``out`` (4x) and named."""
    import numpy as np

    from transfusion.images import save_png

    k = 0
    typer.echo(prompt, nl=False)
    for part in parts:
        if isinstance(part, np.ndarray):
            path = out / f"image-{k}.png"
            save_png(part, path, scale=4)
            typer.echo(f" [image: {path}] ", nl=False)
            k += 1
        else:
            typer.echo(part, nl=False)
    typer.echo("")


@app.command("params")
def show_params(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved params (files + overrides + defaults) as YAML, after validation."""
    import yaml

    cfg = _load(params, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def plan(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    gpu: Annotated[str, typer.Option(help="The GPU a worker trains on: h200, h100, a100-80gb, a100-40gb.")] = "h200",
    mfu: Annotated[float, typer.Option(min=0.01, max=1.0, help="Assumed model FLOPs utilisation.")] = 0.4,
    measure: Annotated[
        bool, typer.Option("--measure", help="Also run one real training micro-step on this CPU and compare.")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan as JSON here.")] = None,
) -> None:
    """Parameters, FLOPs per step, memory per GPU and time per step of the params' training run,
    from the model built on the meta device (no weights, no memory): in seconds, 7B included."""
    from transfusion import plan as planning

    if gpu not in planning.GPUS:
        _fail(f"--gpu: expected one of {', '.join(planning.GPUS)}, got {gpu!r}", 2)
    cfg = _load(params, set_)
    made = _guard(lambda: planning.make_plan(cfg, planning.GPUS[gpu], mfu))
    checked = _guard(lambda: planning.check_against_cpu(cfg, made)) if measure else {}  # refused: one line
    typer.echo(planning.format_plan(made, cfg))
    if measure:
        typer.echo("check        one real micro-step on this CPU (sdpa), estimate / measured:")
        for what, (estimate, measured) in checked.items():
            typer.echo(f"  {what:<36} {estimate:>12.4g} {measured:>12.4g}   {estimate / measured:.3f}")
    if json_out is not None:
        import json

        from transfusion.io import atomic_file

        payload = made.to_dict() | ({"check": checked} if measure else {})
        with atomic_file(json_out) as fh:
            fh.write(json.dumps(payload, indent=2, default=str) + "\n")


@app.command()
def runs(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    stage: Annotated[str | None, typer.Option(help="Only runs of this stage.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Pipeline runs side by side: headline metrics, params that differ.")
    ] = False,
    run: Annotated[
        list[str] | None, typer.Option("--run", help="With --compare: a pipeline run's name or id (repeatable).")
    ] = None,
    last: Annotated[int, typer.Option(min=1, max=50, help="With --compare and no --run: the newest N.")] = 3,
) -> None:
    """List the MLflow runs of the experiment (newest first) with their metrics, or compare
    pipeline runs (one MLflow parent run per `dvc repro` / `dvc exp run`)."""
    from transfusion import tracking

    cfg = _load(params, set_)
    if compare:
        rows = _guard(lambda: tracking.compare(tracking.find_parents(cfg.tracking, run, last)), code=2)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        return
    for r in _guard(lambda: tracking.find_runs(cfg.tracking, stage), code=2):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))
        parent = r["tags"].get("mlflow.parentRunId")
        typer.echo(f"{r['run_id']}  {r['name']:<16} {r['status']:<9} {'  ' if parent else ''}{shown}")


@app.command()
def promote(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    run: Annotated[
        str | None, typer.Option("--run", help="The pipeline run (name or id) to promote; default: the best.")
    ] = None,
    metric: Annotated[str, typer.Option(help="The eval metric compared (on the pipeline runs).")] = "geneval_overall",
    lower_is_better: Annotated[bool, typer.Option("--lower-is-better", help="For losses, FID, bits/byte.")] = False,
    min_se: Annotated[
        float, typer.Option("--min-se", min=0.0, max=10.0, help="Standard errors of the gap a challenger must beat.")
    ] = 2.0,
) -> None:
    """Alias the registered model's version `champion` when its pipeline run's METRIC beats the
    current champion's by more than --min-se standard errors of the gap (models:/transfusion@champion)."""
    from transfusion import tracking

    cfg = _load(params, set_)
    out = _guard(lambda: tracking.promote(cfg.tracking, metric, not lower_is_better, run, min_se))
    name = cfg.tracking.registered_model
    if out["promoted"]:
        typer.echo(f"{name}@champion -> version {out['champion']} ({metric} {out['score']:.4g})")
    else:
        typer.echo(
            f"{name}@champion stays version {out['champion']} ({metric} {out['champion_score']:.4g}; "
            f"candidate version {out['candidate']}: {out['score']:.4g}, not better by more than "
            f"{out['needed']:.2g} = {min_se:g} standard errors of the gap)"
        )


@app.command()
def ui(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    host: Annotated[str, typer.Option(help="Address to serve on (loopback: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 5000,
) -> None:
    """MLflow's UI on the tracking store (`mlflow ui`), after printing the link that opens on this
    experiment's runs table; with a tracking server, only the link."""
    import subprocess

    from transfusion import tracking

    cfg = _load(params, set_)
    uri, exp_id = _guard(lambda: tracking.experiment(cfg.tracking))
    if uri.startswith(("http://", "https://")):
        typer.echo(f"runs: {tracking.ui_url(uri, exp_id)}")
        return
    typer.echo(f"runs: {tracking.ui_url(f'http://{host}:{port}', exp_id)}")
    sys.stdout.flush()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    raise typer.Exit(_guard(lambda: subprocess.run(cmd).returncode))


def main() -> None:  # pragma: no cover - `python cli.py`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
