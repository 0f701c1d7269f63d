"""The run folder: where a search keeps its study, its resolved spec, its trial table and its adapters.

::

    RUN_DIR/
      study.db            Optuna study (SQLite); the single source of truth about trials
      spec.yaml           the resolved spec (defaults filled in)
      trials.csv          one row per trial, rewritten after every trial
      adapters/trial-N/   adapters that may still be exported (the best so far); others are deleted
      logs/trial-N.log    the traceback of a failed trial
      best/               the exported best adapter (PEFT folder + autopeft.json + README.md)
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from autopeft.errors import RunDirError
from autopeft.spec import Spec, load_spec

if TYPE_CHECKING:
    import optuna

STUDY_NAME = "autopeft"
# Keys that may change between invocations on the same run folder (to extend or shorten a search).
RESUMABLE_KEYS = {("search", "n_trials"), ("search", "timeout"), ("output", "dir"), ("training", "threads")}


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.study_db.resolve()}"

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def trials_csv(self) -> Path:
        return self.path / "trials.csv"

    @property
    def best(self) -> Path:
        return self.path / "best"

    def adapter(self, number: int) -> Path:
        return self.path / "adapters" / f"trial-{number}"

    def log(self, number: int) -> Path:
        return self.path / "logs" / f"trial-{number}.log"

    # ----------------------------------------------------------------------------------------------------------

    def start(self, spec: Spec) -> None:
        """Create the folder, or check that an existing one holds a run of the same spec, then save the spec."""
        if self.spec_file.is_file():
            previous = yaml.safe_load(self.spec_file.read_text())
            changed = _differences(previous, spec.model_dump(mode="json"))
            if changed:
                raise RunDirError(
                    f"{self.path} holds a run of a different spec (changed: {', '.join(changed)}). "
                    "Resuming would mix incomparable trials: set output.dir to a new folder, or delete this one."
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self.spec_file.write_text(spec.to_yaml())

    def load_spec(self) -> Spec:
        """The spec this run was started with. Raises :class:`RunDirError` when the folder is not a run."""
        if not self.spec_file.is_file() or not self.study_db.is_file():
            raise RunDirError(f"{self.path} is not an autopeft run folder (it needs spec.yaml and study.db)")
        return load_spec(self.spec_file)

    def keep_adapters(self, numbers: set[int]) -> None:
        """Delete saved adapters of trials that can no longer be exported as best."""
        folder = self.path / "adapters"
        if folder.is_dir():
            for child in folder.iterdir():
                if child.name.startswith("trial-") and int(child.name.split("-")[1]) not in numbers:
                    shutil.rmtree(child, ignore_errors=True)


def _differences(old: Any, new: Any, prefix: tuple[str, ...] = ()) -> list[str]:
    if prefix in RESUMABLE_KEYS:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), prefix + (key,))
        return out
    return [".".join(prefix)] if old != new else []


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One flat row per trial: number, state, variant, parameters, metrics, cost, seconds, failure reason."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        row: dict[str, Any] = {"number": trial.number, "state": trial.state.name, "variant": attrs.get("variant", "")}
        row.update({f"param_{k}": v for k, v in trial.params.items()})
        row.update({f"val_{k}": v for k, v in attrs.get("metrics", {}).items()})
        row.update({k: v for k, v in attrs.get("costs", {}).items() if k not in ("trainable_params", "train_seconds")})
        row["trainable_params"] = attrs.get("trainable_params")
        row["steps"] = attrs.get("steps")
        row["seconds"] = round(trial.duration.total_seconds(), 2) if trial.duration else None
        row["failure_reason"] = attrs.get("failure_reason", "") or attrs.get("pruned_reason", "")
        rows.append(row)
    return rows


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """Rewrite ``trials.csv`` from the study (written to a temporary file first, so a crash never truncates it)."""
    rows = trial_rows(study)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    leading = ["number", "state", "variant"]
    trailing = ["trainable_params", "steps", "seconds", "failure_reason"]
    middle = sorted(c for c in columns if c not in leading + trailing)
    temporary = path.with_suffix(".csv.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=leading + middle + trailing)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


# --------------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------------


def open_study(run_dir: RunDir, direction: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create or load the run's study; without a sampler, only load an existing one (for reading)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler is None:
        if not run_dir.study_db.is_file():
            raise RunDirError(f"{run_dir.path} has no study.db: it is not an autopeft run folder")
        return optuna.load_study(study_name=STUDY_NAME, storage=run_dir.storage_url)
    return optuna.create_study(
        study_name=STUDY_NAME, storage=run_dir.storage_url, sampler=sampler, direction=direction, load_if_exists=True
    )


def interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    import optuna

    return trial.state == optuna.trial.TrialState.RUNNING or (
        trial.state == optuna.trial.TrialState.FAIL and "failure_reason" not in trial.user_attrs
    )


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: complete, pruned, or failed for a reason of their own."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done) if not interrupted(t))


def trial_record(study: optuna.Study, number: int) -> dict[str, Any]:
    """What ``autopeft.json`` says about the trial: number, variant, parameters, allocation, costs, seed."""
    trial = study.trials[number]
    config = trial.user_attrs["config"]
    return {
        "trial": number,
        "variant": config["variant"],
        "params": config["params"],
        "base_bits": config.get("base_bits", 16),
        "trainable_params": trial.user_attrs.get("trainable_params"),
        "costs": trial.user_attrs.get("costs", {}),
        "seed": trial.user_attrs.get("seed"),
        "config": config,
        "n_trials": finished_trials(study),
    }
