"""User-facing errors: the CLI prints their one-line message and exits with code 2."""

from __future__ import annotations

__all__ = ["DistillError", "ConfigError", "DataError", "ModelError"]


class DistillError(Exception):
    """A mistake in the user's input: printed as one line, never as a traceback."""

    exit_code = 2


class ConfigError(DistillError):
    """A config key is unknown, has the wrong type, or is out of range."""


class DataError(DistillError):
    """A data file is missing, unreadable, or lacks the expected field."""


class ModelError(DistillError):
    """A model directory is missing, incompatible with its partner, or unsupported."""
