"""The one error type the user acts on.

Every problem that is the user's to fix — bad params, missing or corrupt inputs, a checkpoint
that does not verify, a diverged or failed training run — is a :class:`UserError` with a
one-line message naming the file or key and what was expected. The CLI prints that line and
exits with ``exit_code``; anything else is a bug and keeps its traceback.

``MissingInput`` and ``BadInput`` are also ``FileNotFoundError`` / ``ValueError``, so library
callers can catch them the usual way.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is one line."""

    exit_code = 1


class MissingInput(UserError, FileNotFoundError):
    """A file or folder that a stage or command reads is not there."""


class BadInput(UserError, ValueError):
    """A file, argument or value is there but cannot be used."""


class DataError(UserError):
    """Raw data is missing, corrupt or unsafe; the message says what to provide."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (Kubernetes, Slurm, a spot preemption): a stop the user did not ask for
    at the keyboard, handled as one. Being a ``KeyboardInterrupt``, it takes Ctrl-C's paths (the
    MLflow run marked KILLED, Ray stopped); the CLI exits 143 (128 + SIGTERM). Raised by the
    handler of :mod:`transfusion.stopping`."""
