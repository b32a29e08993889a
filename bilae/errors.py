"""One error family for everything a user can get wrong, so the CLI can answer with one clear line.

Usage errors (a bad value, an unknown name, a missing file the user pointed at) exit with code 2;
runtime failures (non-finite loss, a full disk) exit with code 1.
"""

from __future__ import annotations

from collections.abc import Iterable


class BilaeError(Exception):
    """Base class of every error bilae raises on purpose."""

    exit_code = 1


class UsageError(BilaeError, ValueError):
    """The user asked for something invalid: the message names the value and what would be valid."""

    exit_code = 2


class CheckpointError(UsageError):
    """A checkpoint is missing, corrupt or does not match what it is loaded into."""


class DataError(UsageError):
    """The data is empty, too short or otherwise unusable."""


class TrainingError(BilaeError):
    """Training could not go on (for example a non-finite loss); the last good checkpoint is kept."""


def choices(valid: Iterable[object]) -> str:
    """Format valid choices for an error message: ``'a', 'b' or 'c'``."""
    items = [repr(v) for v in valid]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def unknown(what: str, value: object, valid: Iterable[object]) -> UsageError:
    """The standard error for an unknown name: names the value and lists the valid ones."""
    return UsageError(f"unknown {what} {value!r}; valid: {choices(sorted(valid, key=str))}")
