"""A search under faults, for real: separate processes, kill -9, a variant that kills its process, two searches on
one folder, a disk that fills up, and resumes after data or preset files changed behind the spec's back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from autopeft.cli import main
from autopeft.errors import RunDirError
from autopeft.rundir import RunDir
from autopeft.spec import load_spec
from conftest import write_spec

FAULTS = Path(__file__).parent / "fault_variants.py"
TRIAL_SPACE = {"learning_rate": {"low": 5e-3, "high": 2e-2}}


def autopeft(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """Start ``autopeft ARGS`` as its own process, as a user's shell would."""
    return subprocess.Popen(
        [sys.executable, "-m", "autopeft", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", **(env or {})}, **kwargs,
    )


def run(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    process = autopeft(*args, env=env)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def trials(run_dir: Path, searching: subprocess.Popen | None = None) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read as another process would while a search may be writing (SQLite can be busy).
    With ``searching`` (the search's process), a search that died before the study could be read is reported
    with its exit code and output instead of waiting out the deadline."""
    import sqlalchemy

    deadline = time.monotonic() + 90
    while True:
        try:
            # Opened as `autopeft status` opens it: no table creation, so the reader never takes a write lock.
            return optuna.load_study(study_name="autopeft", storage=RunDir(run_dir).open_storage()).get_trials(deepcopy=False)
        except (sqlalchemy.exc.OperationalError, KeyError, RunDirError) as exc:  # busy, or the study not made yet
            if searching is not None and searching.poll() is not None:
                out, err = searching.communicate()
                raise AssertionError(f"the search exited {searching.returncode} before its study could be read ({type(exc).__name__}: {exc}); it wrote:\n{out[-2000:]}\n{err[-4000:]}") from None
            if time.monotonic() > deadline:
                state = "still running" if searching is not None else "not watched"
                raise AssertionError(f"the study in {run_dir} stayed unreadable for 90 s (the search: {state}): {type(exc).__name__}: {exc}") from None
            time.sleep(0.2)


def configurations(run_dir: Path, states=("COMPLETE", "PRUNED")) -> list[dict]:
    """Parameters of every trial that trained to the end (or was stopped early by the pruner)."""
    return [t.params for t in trials(run_dir) if t.state.name in states]


def faulty_spec(tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, **search) -> Path:
    return write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        search={"variants": ["faulty"], "n_trials": 3, "seed": 0, "space": {**TRIAL_SPACE, "faulty.fault": ["none"]}, **search},
        plugins=[str(FAULTS)],
    )


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- no configuration run twice ---------------------------------------------------------------------------------


def test_extending_a_search_samples_new_configurations(classification_spec):
    """Catches: the sampler seeded the same way in every process (``offset`` dropped in ``make_sampler``), which
    made ``--n-trials 5`` after a 3-trial run replay trials 1 and 2."""
    assert main(["search", str(classification_spec), "--n-trials", "3"]) == 0
    assert main(["search", str(classification_spec), "--n-trials", "5"]) == 0
    done = configurations(classification_spec.parent / "run")
    assert len(done) == 5
    assert len({json.dumps(p, sort_keys=True) for p in done}) == 5
    # The sampler itself moved on: it did not propose old configurations that then had to be skipped.
    assert not any("duplicate_of" in t.user_attrs for t in trials(classification_spec.parent / "run"))


def test_a_small_space_is_never_run_twice(tmp_path, tiny_bert, sentiment_csv):
    """Catches: removing the duplicate check in ``Driver.ask``. With two possible configurations and
    ``n_trials: 4``, each runs once, the sampler's repeats are recorded as skipped duplicates, and the search stops
    when the space is exhausted instead of training the same configuration again."""
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=4, space={"learning_rate": [0.01], "faulty.fault": ["none"], "faulty.r": [2, 4]})
    assert main(["search", str(spec)]) == 0
    every = trials(tmp_path / "run")
    trained = [t.params for t in every if "duplicate_of" not in t.user_attrs]
    assert sorted(p["faulty.r"] for p in trained) == [2, 4]
    skipped = [t for t in every if "duplicate_of" in t.user_attrs]
    assert skipped and all(t.params == every[t.user_attrs["duplicate_of"]].params for t in skipped)
    import csv

    with open(tmp_path / "run" / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(every)
    assert {r["state"] for r in rows if int(r["number"]) in {t.number for t in skipped}} == {"SKIPPED"}
    assert all("skipped: the same configuration as trial" in r["failure_reason"] for r in rows if r["state"] == "SKIPPED")


def test_kill_minus_nine_then_resume_loses_and_repeats_nothing(tmp_path, tiny_bert, sentiment_csv):
    """Catches: a RUNNING trial left by a killed process not queued again, or the resumed sampler replaying the
    first configurations. kill -9 lands mid-trial (the trial sleeps in attach); the resumed search finishes every
    trial, runs the interrupted configuration again exactly once, and runs no other configuration twice."""
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=4, space={**TRIAL_SPACE, "faulty.fault": ["none", "slow"], "faulty.r": [2, 4, 8]})
    run_dir = tmp_path / "run"
    process = autopeft("search", str(spec), env={"AUTOPEFT_TEST_SLOW_SECONDS": "30"})
    # The baseline (fault none) finishes; the first sampled trial that is slow gets killed while it runs.
    wait_for(lambda: (run_dir / "study.db").is_file() and any(t.state.name == "RUNNING" and t.params.get("faulty.fault") == "slow" for t in trials(run_dir, process)) and any(t.state.name == "COMPLETE" for t in trials(run_dir, process)), what="a slow trial running after a finished one")
    killed = next(t for t in trials(run_dir) if t.state.name == "RUNNING")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    finished_before = [t.number for t in trials(run_dir) if t.state.name == "COMPLETE"]

    result = run("search", str(spec), env={"AUTOPEFT_TEST_SLOW_SECONDS": "0"})
    assert result.returncode == 0, result.stderr
    every = trials(run_dir)
    done = [t for t in every if t.state.name == "COMPLETE"]
    assert len(done) == 4
    assert set(finished_before) <= {t.number for t in done}
    retries = [t for t in done if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == 4


# -- one search per run folder ------------------------------------------------------------------------------------


def test_a_second_search_on_a_running_folder_is_refused_and_the_first_finishes(tmp_path, tiny_bert, sentiment_csv):
    """Catches: removing the run-folder lock. The second search exits 2 naming the other process; the first is
    not disturbed: every trial it ran is complete, none marked failed by the intruder."""
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=2, space={**TRIAL_SPACE, "faulty.fault": ["slow"]})
    run_dir = tmp_path / "run"
    first = autopeft("search", str(spec), env={"AUTOPEFT_TEST_SLOW_SECONDS": "4"})
    wait_for(lambda: (run_dir / "study.db").is_file() and any(t.state.name == "RUNNING" for t in trials(run_dir, first)), what="the first search's trial")
    second = run("search", str(spec))
    assert second.returncode == 2
    assert "in use by another autopeft search" in second.stderr and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert [t.state.name for t in trials(run_dir)] == ["COMPLETE", "COMPLETE"]


def test_two_searches_started_at_once_one_runs_one_is_refused(tmp_path, tiny_bert, sentiment_csv):
    """Catches: taking the lock after creating the study (both processes then race on ``CREATE TABLE``)."""
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=1)
    both = [autopeft("search", str(spec)) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in both]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another autopeft search" in refused and "Traceback" not in refused


def test_a_stale_lock_from_a_dead_process_is_taken_over(classification_spec):
    """Catches: treating the lock file's presence (not a live lock on it) as 'in use'."""
    run_dir = classification_spec.parent / "run"
    run_dir.mkdir()
    (run_dir / ".autopeft.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    assert main(["search", str(classification_spec)]) == 0
    assert json.loads((run_dir / ".autopeft.lock").read_text())["pid"] == os.getpid()


# -- a poison configuration does not block a run ---------------------------------------------------------------------


def test_a_configuration_that_kills_its_process_twice_is_recorded_failed(tmp_path, tiny_bert, sentiment_csv):
    """Catches: re-queueing a dead process's trial forever (the ``MAX_DEATHS`` rule in ``Driver._queue_work``).
    The baseline configuration calls ``os._exit``: two runs die in it, the third records it failed with the
    reason and finishes the search with the other configurations."""
    space = {"learning_rate": {"low": 5e-3, "high": 2e-2, "default": 5e-3}, "faulty.fault": ["os-exit-at-default"]}
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=3, space=space)
    env = {"AUTOPEFT_TEST_POISON_LR": "0.005"}
    assert run("search", str(spec), env=env).returncode == 3
    assert run("search", str(spec), env=env).returncode == 3
    third = run("search", str(spec), env=env)
    assert third.returncode == 0, third.stderr
    every = trials(tmp_path / "run")
    poisoned = [t for t in every if t.params["learning_rate"] == 0.005]
    # Two runs that died in it (interrupted, not counted), then the configuration recorded failed with its reason.
    assert [t.state.name for t in poisoned] == ["FAIL", "FAIL", "FAIL"]
    assert ["failure_reason" in t.user_attrs for t in poisoned] == [False, False, True]
    assert "died 2 times" in poisoned[-1].user_attrs["failure_reason"]
    assert sum(t.state.name == "COMPLETE" for t in every) == 2


def test_a_variant_calling_sys_exit_fails_its_trial_and_the_search_goes_on(tmp_path, tiny_bert, sentiment_csv):
    """Catches: letting ``SystemExit`` from a variant end the search (the process then exits in every resume)."""
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=3, space={**TRIAL_SPACE, "faulty.fault": {"choices": ["sys-exit", "none"], "default": "sys-exit"}})
    assert main(["search", str(spec)]) == 0
    every = trials(tmp_path / "run")
    assert len(every) == 3
    assert every[0].state.name == "FAIL" and "sys.exit(3)" in every[0].user_attrs["failure_reason"]
    assert all(t.state.name == "COMPLETE" for t in every if t.params["faulty.fault"] == "none")
    assert any(t.state.name == "COMPLETE" for t in every)


def test_a_sampling_error_is_a_failed_trial_not_a_crash(classification_spec, monkeypatch):
    """Catches: letting an exception raised while sampling escape ``Driver.ask`` (it crashed the search and left
    a RUNNING trial that blocked every resume)."""
    import autopeft.orchestrators.driver as driver

    real = driver.sample
    calls = []

    def sample_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("The value inf is not finite")
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "sample", sample_failing_once)
    assert main(["search", str(classification_spec), "--n-trials", "3"]) == 0
    every = trials(classification_spec.parent / "run")
    assert [t.state.name for t in every] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert every[1].user_attrs["failure_reason"] == "sampling failed: ValueError: The value inf is not finite"


# -- a full disk stops the search; it is not the configuration's fault ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB tmpfs, so writes fail with ENOSPC exactly as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_search_and_the_trial_runs_again_after_space_is_freed(tmp_path, tiny_bert, sentiment_csv, small_disk):
    """Catches: recording an ENOSPC failure as the configuration's own failure (``is_out_of_space`` check in
    ``Driver.settle`` and around the loop). The search stops with exit 2 and a message, no traceback; the trial
    that hit the full disk does not count; once space is freed the same command finishes every trial."""
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=3, space={**TRIAL_SPACE, "faulty.fault": ["none", "fill-disk"]})
    run_dir = small_disk / "run"
    filler = small_disk / "filler.bin"
    env = {"AUTOPEFT_TEST_FILLER": str(filler)}
    first = run("search", str(spec), "--output", str(run_dir), env=env)
    assert first.returncode == 2, first.stderr
    assert "no space left" in first.stderr and "free some space and run the same command again" in first.stderr
    assert "Traceback" not in first.stderr

    filler.unlink()
    second = run("search", str(spec), "--output", str(run_dir), env=env)
    assert second.returncode == 0, second.stderr
    every = trials(run_dir)
    assert sum(t.state.name == "COMPLETE" for t in every) == 3
    assert not any(t.user_attrs.get("failure_reason") for t in every)
    first_hit = next(t for t in every if t.params.get("faulty.fault") == "fill-disk")
    assert first_hit.state.name == "FAIL"
    retry = next(t for t in every if t.user_attrs.get("retry_of") == first_hit.number)
    assert retry.state.name == "COMPLETE" and retry.params == first_hit.params


def test_an_enospc_while_saving_an_adapter_is_not_the_configurations_failure(tmp_path, tiny_bert, sentiment_csv, capsys, monkeypatch):
    """Catches: removing the out-of-space check in ``Driver.settle``. The disk has room for the study but the
    adapter cannot be written: the trial is kept as interrupted (no failure reason, not counted), the search
    stops with exit 2, and the next run trains the same configuration again."""
    spec = faulty_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=2, space={**TRIAL_SPACE, "faulty.fault": ["enospc-once"]})
    monkeypatch.setenv("AUTOPEFT_TEST_ENOSPC_MARKER", str(tmp_path / "enospc-happened"))
    assert main(["search", str(spec)]) == 2
    assert "no space left on the device" in capsys.readouterr().err
    first, retry = trials(tmp_path / "run")
    assert retry.state.name == "WAITING" and retry.user_attrs["retry_of"] == first.number
    assert first.state.name == "FAIL" and "failure_reason" not in first.user_attrs
    assert first.user_attrs["interrupted"] == "out of disk space"
    assert main(["search", str(spec)]) == 0
    every = trials(tmp_path / "run")
    assert [t.state.name for t in every] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert every[1].user_attrs["retry_of"] == 0 and every[1].params == every[0].params


def test_sqlite_disk_full_is_recognised_as_out_of_space(tmp_path):
    """Catches: an out-of-space check that only knows ``OSError`` (SQLite reports a full disk as its own error)."""
    import sqlite3

    import sqlalchemy

    from autopeft.errors import is_out_of_space

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'full.db'}")
    with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
        with engine.begin() as connection:
            connection.exec_driver_sql("PRAGMA max_page_count = 2")
            connection.exec_driver_sql("CREATE TABLE t (x TEXT)")
            for _ in range(100):
                connection.exec_driver_sql("INSERT INTO t VALUES (?)", ("x" * 4000,))
    assert is_out_of_space(caught.value)
    assert not is_out_of_space(sqlite3.OperationalError("no such table: t"))


# -- resume refuses a changed space or changed data ------------------------------------------------------------------


@pytest.mark.parametrize(
    "before, after",
    [("lora.r: [2, 4]", "lora.r: [2, 4, 8]"), ("lora.dropout: {low: 0.0, high: 0.1}", "lora.dropout: {low: 0.0, high: 0.2}")],
    ids=["choices", "range"],
)
def test_resume_refuses_a_preset_file_whose_space_changed(tmp_path, classification_spec, capsys, before, after):
    """Catches: fingerprinting only the spec's own keys. A preset's changed range was silently mixed into the
    study; changed choices crashed in Optuna ('dynamic value space'). Both are refused, naming the parameter."""
    preset = tmp_path / "my-preset.yaml"
    preset.write_text(f"space:\n  {before}\n")
    spec = write_spec(tmp_path, model=_model(classification_spec), data=_data(classification_spec), search={"variants": ["lora"], "preset": str(preset), "n_trials": 1, "space": {"learning_rate": {"low": 5e-3, "high": 2e-2}}})
    assert main(["search", str(spec)]) == 0
    preset.write_text(f"space:\n  {after}\n")
    capsys.readouterr()
    assert main(["search", str(spec), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "search space" in err and before.split(":")[0] in err and "Traceback" not in err
    assert len(trials(tmp_path / "run")) == 1


def test_resume_refuses_changed_labels_in_the_data(tmp_path, classification_spec, capsys):
    """Catches: fingerprinting the data by file name or size only: flipping labels keeps both the same."""
    assert main(["search", str(classification_spec), "--n-trials", "1"]) == 0
    data = Path(_data(classification_spec)["source"])
    flipped = data.read_text().replace(",pos", ",tmp").replace(",neg", ",pos").replace(",tmp", ",neg")
    data.write_text(flipped)
    capsys.readouterr()
    assert main(["search", str(classification_spec), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "data" in err and "changed" in err and "train split (same size, different texts or labels)" in err.replace("\n", " ")
    assert len(trials(classification_spec.parent / "run")) == 1


def _model(spec_path: Path) -> dict:
    import yaml

    return yaml.safe_load(spec_path.read_text())["model"]


def _data(spec_path: Path) -> dict:
    import yaml

    return yaml.safe_load(spec_path.read_text())["data"]


# -- a reader never writes ------------------------------------------------------------------------------------------


def test_a_reader_never_writes_into_a_study_a_starting_search_is_still_creating(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches: removing the schema check in ``RunDir.open_storage``. Optuna's opener stamps the schema version
    into a database that lacks it, so ``autopeft status`` run while a starting search was creating ``study.db``
    wrote into it, and the search then failed on ``UNIQUE constraint failed: alembic_version`` (4 starts in 10
    with a reader polling, measured with Optuna alone). The reader is refused with a clear message instead, writes
    nothing, and reads the study once it is whole."""
    import sqlite3

    run_dir = RunDir(tmp_path / "run")
    run_dir.start(load_spec(write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)})))
    optuna.create_study(study_name="autopeft", storage=run_dir.storage_url)
    with sqlite3.connect(run_dir.study_db) as db:  # back to where a starting search is: tables made, not stamped
        version_row = db.execute("SELECT * FROM version_info").fetchall()
        stamp = db.execute("SELECT * FROM alembic_version").fetchall()
        db.execute("DELETE FROM version_info")
        db.execute("DROP TABLE alembic_version")
    before = run_dir.study_db.read_bytes()

    with pytest.raises(RunDirError, match="still being created"):
        run_dir.open_storage()
    assert main(["status", str(run_dir.path)]) == 2
    err = capsys.readouterr().err
    assert "still being created" in err and "Traceback" not in err
    assert run_dir.study_db.read_bytes() == before

    with sqlite3.connect(run_dir.study_db) as db:  # the search finishes creating it
        db.executemany("INSERT INTO version_info VALUES (?, ?, ?)", version_row)
        db.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        db.executemany("INSERT INTO alembic_version VALUES (?)", stamp)
    assert optuna.load_study(study_name="autopeft", storage=run_dir.open_storage()).trials == []


def test_a_trial_killed_before_its_configuration_was_sampled_is_not_run_again(tmp_path, tiny_bert, sentiment_csv):
    """Catches: removing the whole-configuration check in ``driver.requeue_dead``. A process killed
    between creating a trial and sampling all its parameters leaves a RUNNING trial with none or some; it ran nothing, so the
    next run must not queue a "retry" of it (an empty queued trial is a fresh sample labelled as a retry, and with
    n_trials reached it would sit queued for ever). That a trial killed after sampling is run again is covered by
    the tests above that kill a search mid-trial."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 2})
    assert main(["search", str(spec)]) == 0
    study = optuna.load_study(study_name="autopeft", storage=RunDir(tmp_path / "run").storage_url)
    unsampled = study.ask()  # what a process killed right after ask() leaves behind: RUNNING, no parameters
    half_sampled = study.ask()  # killed between two parameters: some sampled, no recorded configuration
    half_sampled.suggest_float("learning_rate", 5e-3, 2e-2, log=True)
    assert main(["search", str(spec)]) == 0
    every = trials(tmp_path / "run")
    for killed in (unsampled, half_sampled):
        assert every[killed.number].state.name == "FAIL" and "failure_reason" not in every[killed.number].user_attrs
        assert not [t for t in every if t.user_attrs.get("retry_of") == killed.number]
    assert [t.state.name for t in every] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
