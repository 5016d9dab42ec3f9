"""Training checkpoints: safetensors tensors + JSON state, written atomically, verified on load.

A checkpoint is a folder ``step-00001234/`` under ``paths.checkpoints``::

    model.safetensors      the (unwrapped) model
    ema.safetensors        the EMA of the weights (when enabled)
    optimizer.safetensors  optimizer tensors (moments, step counts) + the torch RNG state
    trainer.json           step, optimizer param groups, LR schedule, data position, loss history
    manifest.json          size and sha256 of every file above (written last)

A folder whose manifest is missing, or whose files are missing, truncated or altered, is refused
with a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from transfusion.errors import UserError
from transfusion.io import atomic_dir, sha256_of

MANIFEST = "manifest.json"
PREFIX = "step-"


class CheckpointError(UserError):
    """A checkpoint folder is incomplete or corrupt."""


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                rest.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": rest}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, ema, trainer_state: dict, keep: int) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically, then keep only the newest ``keep``."""
    target = Path(root) / f"{PREFIX}{step:08d}"
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if ema is not None:
            save_model(ema, str(tmp / "ema.safetensors"))
        tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **trainer_state}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)} for name in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> dict:
    """The manifest of ``path`` after checking every file's size and hash."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint folder here")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path}: missing or unreadable {MANIFEST} (an interrupted write?)") from None
    for name, want in manifest.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated or altered ({size} bytes, expected {want['bytes']})")
        if sha256_of(file) != want["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its sha256 in {MANIFEST}")
    return manifest


def load_weights(path: Path, model, ema: bool) -> dict:
    """The trained weights of checkpoint ``path`` into ``model``: its EMA when ``ema`` (the
    checkpoint must have one), else the raw weights. Returns trainer.json."""
    from torch.optim.swa_utils import AveragedModel

    path = Path(path)
    verify_checkpoint(path)
    if ema:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"{path}: no ema.safetensors (was the run trained with train.ema_decay 0?)")
        averaged = AveragedModel(model, use_buffers=True)  # the layout the EMA was saved in (a copy)
        load_model(averaged, str(path / "ema.safetensors"), strict=True)
        model.load_state_dict(averaged.module.state_dict())
    else:
        load_model(model, str(path / "model.safetensors"), strict=True)
    return json.loads((path / "trainer.json").read_text())


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None, ema=None) -> dict:
    """Restore into the given objects (after :func:`verify_checkpoint`); returns trainer.json."""
    path = Path(path)
    verify_checkpoint(path)
    state = json.loads((path / "trainer.json").read_text())
    load_model(model, str(path / "model.safetensors"), strict=True)
    if ema is not None and (path / "ema.safetensors").is_file():
        load_model(ema, str(path / "ema.safetensors"), strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return state


RUN_FILE = "mlflow_run.json"  # beside the checkpoints: the MLflow run they belong to


def prepare_run(root: Path, resume: bool | Path) -> str | None:
    """Set up ``root`` for a run. Fresh (``resume`` false): empty it; returns None. Resume: the
    newest checkpoint (or the checkpoint ``resume`` names, which becomes the newest) must verify;
    returns the MLflow run id recorded beside it (None if there is none)."""
    root = Path(root)
    if not resume:
        shutil.rmtree(root, ignore_errors=True)
        return None
    if isinstance(resume, Path):  # an explicit checkpoint: make it the newest one
        verify_checkpoint(resume)
        if resume.resolve().parent != root.resolve():
            raise CheckpointError(f"{resume}: --resume PATH must be a checkpoint under {root}")
        for newer in (p for p in list_checkpoints(root) if p.name > resume.name):
            shutil.rmtree(newer)
    found = latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"{root}: no checkpoint to resume from")
    verify_checkpoint(found)
    run_file = root / RUN_FILE
    return json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None


def record_run(root: Path, run_id: str) -> None:
    """Write the MLflow run id beside the checkpoints (``--resume`` continues that run)."""
    from transfusion.io import write_json

    Path(root).mkdir(parents=True, exist_ok=True)
    write_json(Path(root) / RUN_FILE, {"run_id": run_id})
