"""The errors a user can act on, under one root (torch-free: the serving client imports this module).

Library code raises a domain subclass of :class:`KaemError` for anything caused by inputs, files, data or the
environment (never a bare ``ValueError``/``KeyError``, which mean a bug here); every command runs under
:func:`training.cli.command`, which prints ``error: <message>`` and exits with code 2 for a ``KaemError`` and
lets anything else show its traceback. The errors of several modules (config, training, evaluation) are
defined here; the others live next to the one module that raises them (``CheckpointError`` in
training/checkpoint.py, ``ServingError`` in serving/client.py, ...).
"""

from __future__ import annotations


class KaemError(Exception):
    """A failure the user can act on; its message says what went wrong and what to do."""


class UserError(KaemError):
    """A mistake on the command line (raised by the commands in training/cli/, not by library code)."""


class ConfigError(KaemError):
    """A configuration that cannot be built: unknown preset, bad ``--set``, invalid values, unreadable schema."""


class TrainingError(KaemError):
    """A training run that cannot start or continue: an occupied run directory, a diverged loss, ..."""


class EvalError(KaemError):
    """An evaluation that cannot run: a missing or foreign feature classifier or Inception file, a bad component."""
