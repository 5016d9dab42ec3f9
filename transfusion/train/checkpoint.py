"""Training checkpoints: safetensors tensors + JSON state, written atomically, verified on load.

A checkpoint is a folder ``step-00001234/`` in the run's :class:`CheckpointStore`
(``paths.checkpoints``, or ``<train.storage>/checkpoints`` on a cluster)::

    model.safetensors      the (unwrapped) model
    ema.safetensors        the EMA of the weights (when enabled)
    optimizer.safetensors  optimizer tensors (moments, step counts) + the torch RNG state
    trainer.json           step, optimizer param groups, LR schedule, each rank's data position and
                           caption-dropout RNG, loss and probe history, the MLflow run id
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
from transfusion.io import atomic_dir, verify_manifest, write_manifest

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


def checkpoint_name(step: int) -> str:
    """The folder name of step ``step``'s checkpoint (``step-00001234``; sorts by step)."""
    return f"{PREFIX}{step:08d}"


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, ema, trainer_state: dict, keep: int) -> Path:
    """Write ``root/step-XXXXXXXX`` atomically, then keep only the newest ``keep``."""
    target = Path(root) / checkpoint_name(step)
    with atomic_dir(target) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if ema is not None:
            save_model(ema, str(tmp / "ema.safetensors"))
        tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), **trainer_state}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1))
        write_manifest(tmp)
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
    return verify_manifest(path, CheckpointError, "missing or unreadable manifest.json (an interrupted write?)")


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


class CheckpointStore:
    """Where a run's checkpoints live: ``paths.checkpoints``, or ``<train.storage>/checkpoints``
    (any URI pyarrow understands: ``transfusion.storage``), so that a worker restarted on any
    node finds them. Checkpoints are written into the local ``staging`` folder
    (``paths.checkpoints``) and, for a remote store, uploaded from there (manifest last); the
    newest ``keep`` are kept in both."""

    def __init__(self, location: str | Path, staging: Path, keep: int) -> None:
        from transfusion.storage import Store

        self.store, self.staging, self.keep = Store(location), Path(staging), keep
        self.location = str(location)

    @classmethod
    def of(cls, paths, train) -> CheckpointStore:
        """The store of a run with params sections ``paths`` and ``train``."""
        from transfusion.storage import join

        location = join(train.storage, "checkpoints") if train.storage else paths.checkpoints
        return cls(location, paths.checkpoints, train.keep_checkpoints)

    def names(self) -> list[str]:
        return [n for n in self.store.names() if n.startswith(PREFIX)]

    def latest(self) -> str | None:
        found = self.names()
        return found[-1] if found else None

    def describe(self, name: str | None) -> str:
        """Where checkpoint ``name`` is, for messages."""
        from transfusion.storage import join

        if name is None:
            return "none"
        return self.store.path(name) if self.store.local else join(self.location, name)

    def save(self, step: int, model, optimizer, scheduler, ema, trainer_state: dict) -> Path:
        """Write checkpoint ``step`` into the local staging folder; :meth:`commit` stores it."""
        return save_checkpoint(self.staging, step, model, optimizer, scheduler, ema, trainer_state, self.keep)

    def commit(self, local: Path) -> str:
        """Store the staged checkpoint ``local`` (a remote store: upload it) and drop all but the
        newest ``keep``; returns its path in the store."""
        name = Path(local).name
        if not self.store.local:
            self.store.put(local, name)
            for old in self.names()[: -self.keep]:
                self.store.delete(old)
        return self.store.path(name)

    def local_path_of(self, name: str, rank: int = 0) -> Path:
        """Where checkpoint ``name`` is (local store) or is downloaded to (remote) on this node."""
        if self.store.local:
            return self.store.local_path(name)
        return (self.staging if rank == 0 else self.staging / f".rank-{rank}") / name

    def fetch(self, name: str, rank: int = 0) -> Path:
        """Checkpoint ``name`` as a verified local folder (a remote store: downloaded first)."""
        local = self.local_path_of(name, rank)
        if not self.store.local:
            self.store.get(name, local)
        verify_checkpoint(local)
        return local

    def drop_newer(self, name: str) -> None:
        for newer in (n for n in self.names() if n > name):
            self.store.delete(newer)
            shutil.rmtree(self.staging / newer, ignore_errors=True)

    def forget_runtime_state(self) -> None:
        """Delete everything in the store that is not a checkpoint: what Ray Train keeps beside
        them about an earlier fit (its run snapshot would name checkpoints since pruned, or
        dropped by ``--resume PATH``). The checkpoints are the durable state; each fit starts
        from the one the stage chose."""
        for entry in self.store.entries():
            if not entry.startswith(PREFIX):
                self.store.delete(entry)
                self.store.delete_file(entry)

    def clear(self) -> None:
        self.store.delete()
        shutil.rmtree(self.staging, ignore_errors=True)


def prepare_run(store: CheckpointStore, resume: bool | Path) -> tuple[str | None, str | None]:
    """Set up ``store`` for a run; returns (checkpoint to resume from, MLflow run id to continue).
    Fresh (``resume`` false): empty it; (None, None). Resume: the newest checkpoint, or the one
    ``resume`` names (which becomes the newest), must verify; the run id is the one it recorded."""
    if not resume:
        store.clear()
        return None, None
    if isinstance(resume, Path):  # an explicit checkpoint: verified, then made the newest one
        if store.store.local and resume.resolve().parent != store.staging.resolve():
            raise CheckpointError(f"{resume}: --resume PATH must be a checkpoint under {store.staging}")
        if resume.name not in store.names():
            raise CheckpointError(f"{resume}: no such checkpoint in {store.location} (there: {store.names()})")
        name, local = resume.name, store.fetch(resume.name)
        store.drop_newer(name)
    else:
        name = store.latest()
        if name is None:
            raise CheckpointError(f"{store.location}: no checkpoint to resume from")
        try:
            local = store.fetch(name)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; {_previous_good(store, name)}") from None
    state = json.loads((local / "trainer.json").read_text())
    return name, state.get("run_id")


def _previous_good(store: CheckpointStore, bad: str) -> str:
    """Where to resume from instead of the broken checkpoint ``bad``, in words."""
    for name in reversed([n for n in store.names() if n < bad]):
        try:
            store.fetch(name)
        except CheckpointError:
            continue
        return f"resume from the previous one: transfusion train --resume {store.describe(name)}"
    return "no earlier checkpoint verifies: start afresh with transfusion train"
