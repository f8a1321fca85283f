"""Exceptions of the checkpoint I/O and streaming layer.

Every error names the file and/or tensor it is about.  The CLI maps each class to its own exit code
(see :mod:`calm_fast.cli`), so scripts can tell a bad input from a bad configuration or a mismatch.
"""
from __future__ import annotations


class CalmFastIOError(Exception):
    """Base class of the errors raised by :mod:`calm_fast.io` and :mod:`calm_fast.streaming`."""

    exit_code = 1


class ConfigError(CalmFastIOError, ValueError):
    """An invalid merge configuration (unknown method or parameter, bad value, bad pattern)."""

    exit_code = 2


class CheckpointError(CalmFastIOError, ValueError):
    """A checkpoint cannot be read: missing file or shard, corrupt header, index naming a tensor that is
    not in its shard, unsupported format."""

    exit_code = 3


class MismatchError(CalmFastIOError, ValueError):
    """The models do not line up: missing or extra tensors, or shapes that differ (vocabulary size...)."""

    exit_code = 4


class NonFiniteError(CalmFastIOError, ValueError):
    """inf/NaN values in a task vector (``nonfinite='error'``)."""

    exit_code = 5


class OutputError(CalmFastIOError, OSError):
    """The output cannot be written (exists without ``overwrite``, disk full, ...)."""

    exit_code = 6
