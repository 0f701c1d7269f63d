"""Errors a user can cause. Each carries a message that names where the problem is and what is allowed.

Tracebacks are for bugs: the CLI prints these exceptions as one message and exits with code 2.
"""

from __future__ import annotations

from typing import Any

MAX_VALUE_CHARS = 120
"""Longest rendering of a user's value (or key) in a message; a hostile spec must not make a huge message."""
MAX_ALLOWED_CHARS = 1000
"""Longest 'what is allowed' part of a message (lists of names fit; a value echoed inside it is cut)."""
MAX_LISTED_ERRORS = 10
"""Problems spelled out in one :class:`SpecErrors` message; the rest are counted."""


def shorten(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` on one readable line: control characters escaped, and cut to ``limit`` characters with an
    ellipsis and the original length when longer."""
    # Escaping only lengthens text, so the first limit + 1 characters decide; a 200 KB value costs no more.
    shown = _printable(text[: limit + 1])
    if len(shown) <= limit:
        return shown
    return shown[:limit] + f"… ({len(text)} characters)"


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def show(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """A user's value as it appears in messages: its ``repr``, shortened by :func:`shorten`."""
    try:
        text = repr(value)
    except Exception:  # a value from a plugin may have a broken __repr__
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


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
        super().__init__(f"{where}{shorten(str(key))}: got {show(value)}; {shorten(str(allowed), MAX_ALLOWED_CHARS)}")


class SpecErrors(AutoPeftError):
    """Several spec problems found at once, reported together in one message."""

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        if len(errors) == 1:
            message = str(errors[0])
        else:
            listed = "\n".join(f"  - {e}" for e in errors[:MAX_LISTED_ERRORS])
            more = len(errors) - MAX_LISTED_ERRORS
            message = f"{len(errors)} problems in the spec:\n{listed}" + (f"\n  - … and {more} more" if more > 0 else "")
        super().__init__(message)


class ModelNotFoundError(AutoPeftError):
    """No source could provide the model; the message lists every place that was tried."""


class DataError(AutoPeftError):
    """The data cannot be read or does not have what the spec asks for."""


class PluginError(AutoPeftError):
    """A plugin could not be loaded or declared something invalid."""


class RunDirError(AutoPeftError):
    """A run folder is missing, incomplete, or belongs to a different spec."""


class ExportError(AutoPeftError):
    """An export's target folder cannot be written without deleting something autopeft did not write."""


class TrialFailed(Exception):
    """A trial could not finish; ``reason`` is recorded in the study and the search goes on."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class RunLocked(RunDirError):
    """Another live process is searching in the same run folder."""


class OutOfSpace(AutoPeftError):
    """The disk filled up. The search stops (finished trials are kept) instead of blaming the configuration."""

    def __init__(self, where: Any, error: BaseException) -> None:
        self.error = error
        super().__init__(
            f"no space left on the device while writing to {where} ({type(error).__name__}: {str(error)[:200]}). "
            "Finished trials are kept and the interrupted one is run again: free some space and run the same command again."
        )


_OUT_OF_SPACE_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded", "storagefull", "os error 28")


def is_out_of_space(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) means the disk or quota is full.

    Covers ``OSError`` with ``ENOSPC``/``EDQUOT``, SQLite's "database or disk is full" (as SQLAlchemy wraps it)
    and libraries that only keep the operating system's message (safetensors, torch.save).
    """
    import errno

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error).lower() for text in _OUT_OF_SPACE_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False
