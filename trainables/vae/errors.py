"""The VAE library's own errors: a problem the user can fix, with a message that says how.

The library raises these and nothing from `sweeper`; the `sweeper` CLI turns them (and its own
errors) into one message and an exit code, in one place.
"""

from __future__ import annotations


class VAEError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1


class DataError(VAEError):
    """A dataset is missing, corrupt, or cannot be downloaded."""


class ConfigError(VAEError):
    """A trial or model configuration is invalid."""

    exit_code = 2


class TrainingDiverged(VAEError):
    """The loss became NaN or infinite; the message names the epoch and the quantity."""
