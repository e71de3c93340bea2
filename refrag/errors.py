"""Errors raised at refrag's public boundary. Every message says what the user should do."""

from __future__ import annotations


class RefragError(Exception):
    """Base class for all refrag errors."""


class InputError(RefragError, ValueError):
    """Bad user input: empty context, k <= 0, a question that is too long, a wrong type."""


class ModelNotFoundError(RefragError, LookupError):
    """A model spec that is neither a built-in name, a local folder, nor a reachable Hugging Face id."""


class MissingPackageError(RefragError, ImportError):
    """An optional package is not installed; the message holds the exact pip command."""

    def __init__(self, what: str, pip_command: str) -> None:
        super().__init__(f"{what} needs a package that is not installed. Install it with:\n    {pip_command}")
        self.pip_command = pip_command


class CheckpointError(RefragError):
    """A checkpoint or index folder that is missing files, corrupt, or built for other models/settings."""
