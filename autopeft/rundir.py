"""The run folder: where a search keeps its study, its resolved spec, its trial table and its adapters.

::

    RUN_DIR/
      study.db            Optuna study (SQLite); the single source of truth about trials
      spec.yaml           the resolved spec (defaults filled in, paths absolute)
      trials.csv          one row per trial, rewritten after every trial
      adapters/trial-N/   adapters that may still be exported (the best so far); others are deleted
      logs/trial-N.log    the traceback of a failed trial
      best/               the exported best adapter (PEFT folder + autopeft.json + README.md)
      pareto/trial-N/     with several objectives: every exported adapter on the Pareto front

autopeft only ever deletes what it created: entries named exactly ``trial-<digits>`` in ``adapters/`` and
``pareto/``, and never through a symbolic link. Every file is written whole or not at all
(:func:`atomic_write_text`), so a crash or Ctrl-C never leaves a cut-short ``spec.yaml`` or ``trials.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from autopeft.errors import RunDirError, SpecError, SpecErrors
from autopeft.runlock import LOCK_NAME
from autopeft.spec import Spec, load_yaml, parse_spec

if TYPE_CHECKING:
    import optuna

STUDY_NAME = "autopeft"
# Keys that may change between invocations on the same run folder (to extend or shorten a search).
# Where trials run (search.backend, the ray section) does not change what they measure.
RESUMABLE_KEYS = {
    ("search", "n_trials"), ("search", "timeout"), ("output", "dir"), ("output", "keep"), ("training", "threads"),
    ("search", "backend"), ("ray",), ("storage",),
}
# The only names autopeft gives the folders it may delete in adapters/ and pareto/.
TRIAL_FOLDER = re.compile(r"trial-(0|[1-9][0-9]*)")  # exactly f"trial-{number}": no "trial-03", no other digits
# Folders in a run whose content autopeft deletes or replaces: never through a link, which may point anywhere.
MANAGED_FOLDERS = ("adapters", "best", "pareto", "logs")
# Everything an export writes; a folder holding anything else is not (only) an autopeft export.
EXPORT_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_bits.json", "autopeft.json", "test_predictions.csv", "README.md"}
)
# What trials.csv, the report and `autopeft status` say about a trial stopped by Ctrl-C or a killed process.
INTERRUPTED = "INTERRUPTED"
INTERRUPTED_REASON = "interrupted (Ctrl-C or the process was killed); run again to retry"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all.

    The text goes to a uniquely named temporary file in the same folder, is flushed and synced to disk, then
    renamed over ``path`` (``os.replace`` is atomic on one file system). A crash, Ctrl-C or full disk leaves the
    previous file intact and no temporary file behind; an existing link at ``path`` is replaced, never written
    through.
    """
    path = Path(path)
    data = text.encode("utf-8")
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            # O_EXCL: never reuse a name that exists, whoever made it; mode 0o666 lets the umask decide, as for open().
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_unique_folder(parent: Path, prefix: str) -> Path:
    """Create and return a new, empty folder ``parent/<prefix><random>`` that no one else can have made.

    Unlike ``tempfile.mkdtemp`` the folder gets the usual permissions (from the umask), so an export renamed
    from it into place is as readable as any folder the user makes.
    """
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def is_empty(folder: Path) -> bool:
    """Whether the folder ``folder`` has no entries at all."""
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is a real folder holding an autopeft export and nothing else: its ``autopeft.json``
    names a trial, and every entry is a plain file an export writes. Only such a folder may be replaced."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    info = folder / "autopeft.json"
    try:
        trial = json.loads(info.read_text()).get("trial") if info.is_file() and not info.is_symlink() else None
    except (OSError, ValueError, AttributeError):
        return False
    return trial is not None and not foreign_entries(folder)


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that an export does not write (or that are links or folders), sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.name not in EXPORT_FILES or not e.is_file(follow_symlinks=False))


def saved_spec(spec: Spec) -> dict[str, Any]:
    """The spec as ``RUN_DIR/spec.yaml`` stores it: defaults filled in, and every path to a local file or folder
    (``data.source``, ``plugins``, a file ``search.preset``, a local ``model.id``) made absolute against the
    folder of the spec file it was written in. The run folder is then usable from any working folder."""
    from autopeft.data import data_files
    from autopeft.plan import PRESET_FOLDER

    def absolute(path: str) -> str:
        return str((spec.base_dir / Path(path).expanduser()).resolve())

    out = spec.model_dump(mode="json")
    if data_files(spec) is not None:
        source = spec.data.source
        out["data"]["source"] = {split: absolute(p) for split, p in source.items()} if isinstance(source, dict) else absolute(source)
    out["plugins"] = [absolute(p) for p in spec.plugins]
    if (spec.base_dir / Path(spec.model.id).expanduser()).is_dir():
        out["model"]["id"] = absolute(spec.model.id)
    preset = spec.search.preset
    if preset and not (PRESET_FOLDER / f"{preset}.yaml").is_file() and (spec.base_dir / Path(preset).expanduser()).is_file():
        out["search"]["preset"] = absolute(preset)
    return out


class RunDir:
    """A run folder (see the module docstring). Paths are not resolved: they name what the user named."""

    def __init__(self, path: str | Path, storage: str | None = None) -> None:
        """``storage``: the URL of a study shared by workers (:mod:`autopeft.storage`); without it the study is
        this folder's ``study.db``."""
        self.path = Path(path)
        self.storage = storage

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.study_db.resolve()}"

    def has_study(self) -> bool:
        """Whether the run's study exists (a shared study is taken to exist; opening it says if not)."""
        return self.storage is not None or self.study_db.is_file()

    def open_storage(self) -> optuna.storages.BaseStorage:
        """The run's study storage, opened for reading without creating tables or changing a schema.

        Optuna's storage stamps the schema version into a database that lacks it, so a reader opening ``study.db``
        while a starting search is still creating it would write to it and can make that search fail. A
        ``study.db`` whose schema is not complete yet is refused (:class:`RunDirError`) before Optuna opens it.
        """
        from autopeft.storage import open_storage

        if not self.has_study():
            raise RunDirError(f"{self.path} has no study.db: it is not an autopeft run folder (or give --storage URL for a shared study)")
        if self.storage is None and not _sqlite_schema_complete(self.study_db):
            raise RunDirError(f"{self.study_db} is still being created by a search that is starting; try again in a moment")
        return open_storage(self.storage_url, create=False)

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def trials_csv(self) -> Path:
        return self.path / "trials.csv"

    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def pareto(self) -> Path:
        return self.path / "pareto"

    def adapter(self, number: int) -> Path:
        return self.path / "adapters" / f"trial-{number}"

    def log(self, number: int) -> Path:
        return self.path / "logs" / f"trial-{number}.log"

    # ----------------------------------------------------------------------------------------------------------

    def start(self, spec: Spec) -> None:
        """Create the folder, or check that an existing one holds a run of the same spec, then save the spec.

        Refuses (:class:`RunDirError`) a folder that is not empty and holds no study, a link in place of
        ``adapters/``, ``best/``, ``pareto/`` or ``logs/``, a ``best/`` holding files autopeft did not write, a
        ``spec.yaml`` that cannot be read, and a run of a spec that differs in a key that is not resumable.
        Paths are compared resolved (see :func:`saved_spec`), so a resume from another working folder matches.
        """
        current = saved_spec(spec)
        if self.path.exists() or self.path.is_symlink():
            if not self.path.is_dir():
                raise RunDirError(f"{self.path} is a file, not a folder: set output.dir (or --output) to a folder")
            self._check_managed_folders()
            if not self.has_study() and not self.study_db.exists():
                # The search's lock file is made before the folder is started.
                entries = sorted(e.name for e in os.scandir(self.path) if e.name != LOCK_NAME)
                if entries:
                    raise RunDirError(
                        f"{self.path} is not empty ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}) and holds no "
                        "autopeft run (no study.db); a search writes spec.yaml, trials.csv, best/ and more there: "
                        "set output.dir (or --output) to a new or empty folder"
                    )
            if self.spec_file.exists():
                previous = self._read_saved_spec(
                    f"autopeft cannot tell whether the trials in {self.study_db} match {spec.path or 'this spec'}. "
                    f"If they do, delete {self.spec_file} and run the same command again (finished trials are kept); "
                    "otherwise set output.dir to a new folder"
                )
                # A spec saved by an older autopeft kept relative paths: read them as the current spec file does.
                previous._path = spec.path
                changed = _differences(saved_spec(previous), current)
                if changed:
                    raise RunDirError(
                        f"{self.path} holds a run of a different spec (changed: {', '.join(changed)}). "
                        "Resuming would mix incomparable trials: set output.dir to a new folder, or delete this one."
                    )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.spec_file, yaml.safe_dump(current, sort_keys=False))

    def _check_managed_folders(self) -> None:
        for name in MANAGED_FOLDERS:
            folder = self.path / name
            if folder.is_symlink():
                raise RunDirError(
                    f"{folder} is a symbolic link (to {os.readlink(folder)}); autopeft deletes and replaces files in "
                    f"{name}/ and never does so through a link: replace it with a real folder, or set output.dir to a new folder"
                )
        if self.best.is_dir() and not is_export(self.best) and not is_empty(self.best):
            raise RunDirError(
                f"{self.best} holds files autopeft did not write ({', '.join(foreign_entries(self.best)[:5]) or 'no autopeft.json'}); "
                "the search replaces best/ with the best adapter: move it elsewhere, then run again"
            )

    def _read_saved_spec(self, remedy: str) -> Spec:
        """``spec.yaml`` as a :class:`Spec`; :class:`RunDirError` saying why and ``remedy`` when it cannot be read."""
        try:
            text = self.spec_file.read_text()
            if not text.strip():
                raise ValueError("it is empty")
            if not text.endswith("\n"):  # autopeft ends it with a newline: a file cut short usually stops mid-line
                raise ValueError("it stops in the middle of a line")
            # load_yaml reports YAML problems as SpecError, like the schema's.
            spec = parse_spec(load_yaml(text, str(self.spec_file)), str(self.spec_file))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            reason = str(exc)
        except (SpecError, SpecErrors) as exc:
            errors = exc.errors if isinstance(exc, SpecErrors) else [exc]
            reason = "; ".join(f"{e.key}: {e.allowed}" for e in errors[:3])
        else:
            spec._path = self.spec_file.resolve()
            return spec
        raise RunDirError(f"{self.spec_file} is unreadable ({reason}); it was written by autopeft and may have been cut short: {remedy}")

    def load_spec(self) -> Spec:
        """The spec this run was started with. Raises :class:`RunDirError` when the folder is not a run."""
        if not self.spec_file.is_file() or not self.has_study():
            raise RunDirError(f"{self.path} is not an autopeft run folder (it needs spec.yaml and study.db, or --storage URL for a shared study)")
        return self._read_saved_spec(
            f"delete it and run `autopeft search` with this run's spec file and --output {self.path} to write it again "
            "(the trials in study.db are kept and not repeated)"
        )

    def saved_adapter(self, number: int) -> Path | None:
        """The adapter the search kept for trial ``number``, or None (export then trains it again).

        An adapter reached through a link is not one the search saved, so it is not used.
        """
        folder = self.adapter(number)
        if folder.parent.is_symlink() or folder.is_symlink() or not (folder / "adapter_config.json").is_file():
            return None
        return folder

    def write_log(self, number: int, text: str) -> Path:
        """Write (atomically) the log of trial ``number``, creating ``logs/``; returns its path."""
        path = self.log(number)
        if path.parent.is_symlink():
            raise RunDirError(f"{path.parent} is a symbolic link; autopeft writes no log through a link: replace it with a real folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        return path

    def keep_adapters(self, numbers: set[int]) -> None:
        """Delete saved adapters (``adapters/trial-N``) of trials that can no longer be exported as best.

        Nothing else in ``adapters/`` is touched, and nothing is deleted through a link.
        """
        for child, number in _trial_folders(self.path / "adapters"):
            if number not in numbers:
                shutil.rmtree(child, ignore_errors=True)

    def prune_pareto(self, keep: set[int]) -> None:
        """Delete ``pareto/trial-N`` exports whose trial left the Pareto front.

        Only a folder that is still exactly an autopeft export is deleted: one a user added files to, a link, or
        any other name stays.
        """
        for child, number in _trial_folders(self.pareto):
            if number not in keep and is_export(child):
                shutil.rmtree(child)


def _trial_folders(folder: Path) -> list[tuple[Path, int]]:
    """The real folders named exactly ``trial-N`` in ``folder`` with their numbers; none when ``folder`` is a
    link or missing (a link may point anywhere, so nothing is listed through it)."""
    if folder.is_symlink() or not folder.is_dir():
        return []
    out = []
    for entry in os.scandir(folder):
        match = TRIAL_FOLDER.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            out.append((Path(entry.path), int(match.group(1))))
    return out


def _differences(old: Any, new: Any, prefix: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ, leaving out resumable keys; never an empty name."""
    if prefix in RESUMABLE_KEYS:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), prefix + (str(key),))
        return out
    return [".".join(prefix) or "(the whole spec)"] if old != new else []


def trial_state(trial: optuna.trial.FrozenTrial) -> str:
    """The state trials.csv, the report and ``autopeft status`` show: Optuna's, except that a trial stopped
    from outside (Ctrl-C, a killed process) is ``INTERRUPTED`` rather than ``FAIL``, and a configuration the
    sampler proposed again after it had run is ``SKIPPED`` (never trained)."""
    import optuna

    if trial.state == optuna.trial.TrialState.FAIL and interrupted(trial):
        return INTERRUPTED
    if duplicate(trial):
        return "SKIPPED"
    return trial.state.name


def interrupted_reason(trial: optuna.trial.FrozenTrial) -> str:
    """Why an interrupted trial stopped, as trials.csv and ``autopeft status`` say it."""
    why = trial.user_attrs.get("interrupted")
    if isinstance(why, str) and why and why != "interrupted":
        return f"interrupted ({why}); run again to retry"  # a cause the search recorded, e.g. a full disk
    return INTERRUPTED_REASON


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per trial: number, state, variant, parameters, metrics, cost, seconds, failure reason."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        state = trial_state(trial)
        row: dict[str, Any] = {"number": trial.number, "state": state, "variant": attrs.get("variant", "")}
        row.update({f"param_{k}": v for k, v in trial.params.items()})
        row.update({f"val_{k}": v for k, v in attrs.get("metrics", {}).items()})
        row.update({k: v for k, v in attrs.get("costs", {}).items() if k not in ("trainable_params", "train_seconds")})
        row["trainable_params"] = attrs.get("trainable_params")
        row["steps"] = attrs.get("steps")
        row["seconds"] = round(trial.duration.total_seconds(), 2) if trial.duration else None
        row["failure_reason"] = (
            interrupted_reason(trial) if state == INTERRUPTED
            else f"skipped: the same configuration as trial {attrs['duplicate_of']}, already run" if duplicate(trial)
            else attrs.get("failure_reason", "") or attrs.get("pruned_reason", "")
        )
        rows.append(row)
    return rows


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """Rewrite ``trials.csv`` from the study, atomically (a crash never truncates it)."""
    rows = trial_rows(study)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    leading = ["number", "state", "variant"]
    trailing = ["trainable_params", "steps", "seconds", "failure_reason"]
    middle = sorted(c for c in columns if c not in leading + trailing)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=leading + middle + trailing)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


# --------------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------------

# Written last when Optuna creates a database: tables, then the version row, then alembic's stamp.
SCHEMA_MARKERS = ("version_info", "alembic_version")


def _sqlite_schema_complete(path: Path) -> bool:
    """Whether Optuna has finished creating the SQLite study database at ``path`` (read through a read-only
    connection, so looking never writes). A database that cannot be read this way (busy, not a database, or a
    journal left by a killed search that only a writable connection rolls back) counts as complete: Optuna's own
    opener then waits, recovers or says what is wrong, as it does for any reader."""
    import contextlib
    import sqlite3
    from urllib.parse import quote

    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=5)) as db:
            return all(db.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()[0] for table in SCHEMA_MARKERS)
    except sqlite3.DatabaseError as exc:
        return "no such table" not in str(exc)


def read_study(run_dir: RunDir) -> optuna.Study:
    """Load the run's existing study for reading (:meth:`RunDir.open_storage`); safe while a search writes to it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=run_dir.open_storage())
    except KeyError:
        raise RunDirError(f"{run_dir.storage_url if run_dir.storage else run_dir.study_db} holds no study named {STUDY_NAME!r}") from None


def open_study(run_dir: RunDir, direction: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create or load the run's study; without a sampler, only load an existing one (:func:`read_study`)."""
    import optuna

    if sampler is None:
        return read_study(run_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=STUDY_NAME, storage=run_dir.storage_url, sampler=sampler, direction=direction, load_if_exists=True
    )


def duplicate(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial skipped because the sampler proposed a configuration that had already run (never trained)."""
    return "duplicate_of" in trial.user_attrs


def interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that did not finish for a reason outside its configuration (Ctrl-C, a killed process, a full disk)."""
    import optuna

    return trial.state == optuna.trial.TrialState.RUNNING or (
        trial.state == optuna.trial.TrialState.FAIL and "failure_reason" not in trial.user_attrs and not duplicate(trial)
    )


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: complete, pruned, or failed for a reason of their own."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not interrupted(t) and not duplicate(t))


def trial_record(study: optuna.Study, number: int) -> dict[str, Any]:
    """What ``autopeft.json`` says about the trial: number, variant, parameters, allocation, costs, seed, and the
    validation metrics of its last evaluation."""
    trial = study.trials[number]
    config = trial.user_attrs["config"]
    return {
        "trial": number,
        "variant": config["variant"],
        "params": config["params"],
        "base_bits": config.get("base_bits", 16),
        "trainable_params": trial.user_attrs.get("trainable_params"),
        "costs": trial.user_attrs.get("costs", {}),
        "validation": trial.user_attrs.get("metrics", {}),
        "seed": trial.user_attrs.get("seed"),
        "config": config,
        "n_trials": finished_trials(study),
    }
