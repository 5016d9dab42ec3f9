"""SIGTERM as a graceful stop.

Kubernetes, Slurm and spot preemptions send SIGTERM, then SIGKILL after a grace period. Within
:func:`sigterm_stops` (the CLI wraps every command in it) SIGTERM raises
:class:`~transfusion.errors.Terminated` where the main thread is -- the step in flight is
abandoned, the last checkpoint kept, the MLflow run marked KILLED, the CLI exits 143 with one
line. A loop that can save a checkpoint at once (``train.preempt_checkpoint``) asks for the
signal to be deferred instead (:func:`deferred`): the handler only records it, the loop polls
:func:`requested` after each step, saves, and raises ``Terminated`` itself. A second SIGTERM
never waits.

Ray's driver installs its own native SIGTERM handler (a stack dump, exit 134) when it starts:
call :func:`reinstall` after ``ray.init``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from transfusion.errors import Terminated

_state = {"installed": False, "deferring": 0, "requested": False}


def _on_sigterm(signum, frame) -> None:
    if _state["deferring"] and not _state["requested"]:
        _state["requested"] = True  # the polling loop checkpoints, then stops
        return
    raise Terminated("terminated by SIGTERM")


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` inside the block (main thread only; elsewhere a no-op); the
    previous handler comes back after it."""
    if threading.current_thread() is not threading.main_thread() or _state["installed"]:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _state.update(installed=True, requested=False)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _state.update(installed=False, requested=False)


def reinstall() -> None:
    """Take SIGTERM back from a native handler installed since (``ray.init``'s)."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def deferred(enabled: bool = True) -> Iterator[None]:
    """Inside the block (when ``enabled``) a first SIGTERM is only recorded: the caller polls
    :func:`requested` at points where it can stop cleanly."""
    if not enabled:
        yield
        return
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1


def requested() -> bool:
    """Whether a deferred SIGTERM waits to be acted on."""
    return bool(_state["requested"])


def stop_if_requested(unit: str, n: int) -> None:
    """Act on a deferred SIGTERM, once the checkpoint of ``unit`` ``n`` (step 12, iteration 5)
    is saved: ``Terminated``, its message naming that checkpoint."""
    if requested():
        raise Terminated(f"terminated by SIGTERM after saving the checkpoint of {unit} {n}")
