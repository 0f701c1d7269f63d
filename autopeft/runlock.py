"""One search per run folder: an advisory lock held for as long as a search writes the folder's study.

The lock is ``RUN_DIR/.autopeft.lock``, locked with ``fcntl.flock`` and holding the owner's pid, host and start
time. The operating system releases a ``flock`` when its process dies however it dies (kill -9 included), so a
stale lock left by a dead process is simply taken over; the file itself is never deleted (deleting a lock file
lets two processes lock two different files).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import IO, Any

from autopeft.errors import RunLocked

LOCK_NAME = ".autopeft.lock"


class RunLock:
    """An exclusive lock on a run folder, taken before its study is created or opened."""

    def __init__(self, run_path: str | Path) -> None:
        self.run_path = Path(run_path)
        self.path = self.run_path / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunLocked` naming the process that holds it."""
        import fcntl

        self.run_path.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink():
            raise RunLocked(f"{self.path} is a symbolic link; autopeft only locks a plain file it created there")
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(handle)
            handle.close()
            raise RunLocked(
                f"{self.run_path} is in use by another autopeft search ({_describe(owner)}). "
                "Wait for it to finish, stop it, or give this search another output.dir (--output)."
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
            handle.flush()
        except BaseException:
            handle.close()  # closing releases the flock: a failed acquire holds nothing
            raise
        self._handle = handle

    def release(self) -> None:
        """Let go of the lock (closing the file releases the ``flock``)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_owner(handle: IO[str]) -> dict[str, Any]:
    try:
        handle.seek(0)
        return json.loads(handle.read() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "owner unknown"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
