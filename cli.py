"""The ``transfusion`` command: one subcommand per pipeline stage (and tools around them).

Stages are imported inside their command so that ``transfusion --help`` stays instant.
Every command takes ``--params FILE`` (repeatable: later files override earlier ones) and
``-S section.key=value`` overrides. Bad params exit with code 2 and one line naming the key;
bad inputs (missing data, corrupt archives, ...) exit with code 1 and one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

for _var, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_var, _value)

app = typer.Typer(
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


def _load(params: list[Path] | None, overrides: list[str] | None):
    from transfusion.config import ParamsError, load_params

    try:
        return load_params(params or [Path("params.yaml")], overrides or [])
    except ParamsError as err:
        _fail(str(err), 2)


def _run_stage(name: str, params: list[Path] | None, overrides: list[str] | None, **kwargs) -> None:
    import importlib
    import json
    import time

    cfg = _load(params, overrides)
    module = importlib.import_module(f"stages.{name}")
    from transfusion.data.archives import DataError
    from transfusion.train.checkpoint import CheckpointError
    from transfusion.train.loop import TrainingDiverged, TrainingFailed

    start = time.perf_counter()
    try:
        metrics = module.run(cfg, **kwargs)
    except (DataError, CheckpointError, TrainingDiverged, TrainingFailed, FileNotFoundError, ValueError) as err:
        _fail(str(err).splitlines()[0] if str(err) else type(err).__name__, 1)
    typer.echo(f"{name}: done in {time.perf_counter() - start:.1f}s")
    if metrics:
        typer.echo(json.dumps(metrics, indent=2, sort_keys=True, default=str))


@app.command()
def data(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Stage data: fetch pinned archives, compose MNIST scenes, split the text."""
    _run_stage("data", params, set_)


@app.command()
def tokenizer(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Stage tokenizer: train the byte-level BPE (or load a local pretrained one)."""
    _run_stage("tokenizer", params, set_)


@app.command()
def vae(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Stage vae: train the AutoencoderKL on the scene images, report test PSNR."""
    _run_stage("vae", params, set_)


@app.command()
def latents(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Stage latents: encode every scene, scale to unit variance, write latent shards."""
    _run_stage("latents", params, set_)


@app.command()
def train(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="With --resume: the checkpoint folder to continue from.", show_default=False)
    ] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint (or CHECKPOINT).")] = False,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")] = None,
) -> None:
    """Stage train: the Transfusion model on Ray Train (resumable, tracked in MLflow).

    transfusion train                         a fresh run
    transfusion train --resume [CHECKPOINT]   continue the interrupted run (same MLflow run)
    """
    if checkpoint is not None and not resume:
        _fail(f"{checkpoint}: a checkpoint argument needs --resume", 2)
    _run_stage("train", params, set_, resume=checkpoint if checkpoint is not None else resume, address=address)


@app.command("params")
def show_params(params: ParamsOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved params (files + overrides + defaults) as YAML, after validation."""
    import yaml

    cfg = _load(params, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def runs(
    params: ParamsOpt = None,
    set_: SetOpt = None,
    stage: Annotated[str | None, typer.Option(help="Only runs of this stage.")] = None,
) -> None:
    """List the MLflow runs of the experiment (newest first) with their metrics."""
    from transfusion.tracking import find_runs

    cfg = _load(params, set_)
    for r in find_runs(cfg.tracking, stage):
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))
        typer.echo(f"{r['run_id']}  {r['name']:<10} {r['status']:<9} {shown}")


def main() -> None:  # pragma: no cover - `python cli.py`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
