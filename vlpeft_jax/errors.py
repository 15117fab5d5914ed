"""Exceptions raised for user errors.

Every user-facing failure raises a subclass of :class:`VLPeftError` whose message names the offending
key, path or value and what would be valid. The command line turns these into one readable line and a
non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class VLPeftError(Exception):
    """Base class of all user-facing errors of vlpeft_jax."""


class ConfigError(VLPeftError, ValueError):
    """A configuration key or value is invalid."""


class CheckpointError(VLPeftError):
    """A checkpoint (Hugging Face or our own) is missing, incomplete or has wrong shapes."""


class OfflineError(VLPeftError):
    """Something would need the network (e.g. a hub id instead of a local directory)."""


class InputError(VLPeftError, ValueError):
    """A model or data input has the wrong shape, dtype or content."""
