"""Where a study lives: the run folder's SQLite file, or a study shared by several workers.

A shared study is named by a URL:

- a database Optuna's RDB storage supports, e.g. ``postgresql+psycopg2://user@host:5432/db`` or ``mysql://...``;
  workers on several machines share it, and a dead worker's trial is found by Optuna's heartbeat;
- ``journal:PATH``: an Optuna journal file, for several workers on one host (a dead worker is found by its pid).

SQLite is never shared: several processes writing one SQLite study lose and duplicate enqueued trials, so a
``sqlite:`` URL is refused for workers (a single search keeps its SQLite study under the run-folder lock).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from autopeft.errors import AutoPeftError

if TYPE_CHECKING:
    import optuna

JOURNAL_PREFIX = "journal:"


class StorageError(AutoPeftError):
    """A study storage URL that is not allowed, or a database that cannot be reached."""


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def is_journal(url: str) -> bool:
    return url.startswith(JOURNAL_PREFIX)


def check_shared_url(url: str, where: str = "--storage") -> None:
    """Refuse a URL that several workers cannot share safely, with what to use instead."""
    if url.startswith("sqlite"):
        raise StorageError(
            f"{where}: got {redact(url)!r}; SQLite cannot be shared by several workers (they lose and repeat queued "
            "trials). Use a database server (postgresql+psycopg2://user@host/db) or, on one host, journal:PATH; "
            "for a single process, run `autopeft search` instead"
        )
    if not is_journal(url) and "://" not in url:
        raise StorageError(f"{where}: got {redact(url)!r}; a storage is a database URL (postgresql+psycopg2://user@host/db) or journal:PATH")


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    create: bool = True,
) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; with ``heartbeat_interval``, running trials that stop beating for
    ``grace_period`` seconds are failed by the next worker that looks, and ``on_stale`` is called for each.
    ``create=False`` opens an existing database without creating tables (for readers)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if is_journal(url):
            path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
            if not create and not path.is_file():
                raise StorageError(f"{url}: no such journal file")
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=optuna.storages.journal.JournalFileOpenLock(str(path)))
            return optuna.storages.JournalStorage(backend)
        kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}, "skip_table_creation": not create}
        if heartbeat_interval:
            kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period, heartbeat_stale_trial_callback=on_stale)
        return _rdb_storage(url, kwargs)
    except StorageError:
        raise
    except Exception as exc:  # a wrong URL, a missing driver, a server that does not answer
        first_line = (str(exc).splitlines() or [""])[0]
        raise StorageError(f"cannot open the study storage {redact(url)}: {type(exc).__name__}: {first_line[:300]}") from None


def _rdb_storage(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage. Workers started together race to create the schema; the losers find it made."""
    import time
    import warnings

    import optuna
    import sqlalchemy.exc

    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            attempt += 1
            if attempt == 5:
                raise
            time.sleep(0.5 * attempt)
