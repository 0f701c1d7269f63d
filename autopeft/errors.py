"""Errors a user can cause. Each carries a message that names where the problem is and what is allowed.

Tracebacks are for bugs: the CLI prints these exceptions as one message and exits with code 2.
"""

from __future__ import annotations

from typing import Any


class AutoPeftError(Exception):
    """Base class of every error autopeft reports to a user without a traceback."""


class SpecError(AutoPeftError):
    """A spec value is wrong: names the file, the key path, the bad value and what is allowed."""

    def __init__(self, file: str | None, key: str, value: Any, allowed: str) -> None:
        self.file = file
        self.key = key
        self.value = value
        self.allowed = allowed
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: got {value!r}; {allowed}")


class SpecErrors(AutoPeftError):
    """Several spec problems found at once, reported together in one message."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        if len(errors) == 1:
            message = str(errors[0])
        else:
            message = f"{len(errors)} problems in the spec:\n" + "\n".join(f"  - {e}" for e in errors)
        super().__init__(message)


class ModelNotFoundError(AutoPeftError):
    """No source could provide the model; the message lists every place that was tried."""


class DataError(AutoPeftError):
    """The data cannot be read or does not have what the spec asks for."""


class PluginError(AutoPeftError):
    """A plugin could not be loaded or declared something invalid."""


class RunDirError(AutoPeftError):
    """A run folder is missing, incomplete, or belongs to a different spec."""


class TrialFailed(Exception):
    """A trial could not finish; ``reason`` is recorded in the study and the search goes on."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
