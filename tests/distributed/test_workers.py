"""`autopeft worker`: several processes share one study in PostgreSQL (or a journal file), for real.

One worker runs in its own UTS namespace with another host name, so it looks like a second machine: when it is
killed with SIGKILL, only Optuna's heartbeat can tell the others that its trial is dead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna

from autopeft.cli import main
from conftest import plain_peft_test_predictions, write_spec

FAULTS = Path(__file__).parents[1] / "reliability" / "fault_variants.py"
FAST_HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "4"]


def worker(spec: Path, storage: str, output: Path, *extra: str, host: str | None = None, slow: float = 3) -> subprocess.Popen:
    """Start ``autopeft worker`` as its own process; with ``host``, in a UTS namespace of that host name."""
    command = [sys.executable, "-m", "autopeft", "worker", str(spec), "--storage", storage, "--output", str(output), *FAST_HEARTBEAT, *extra]
    if host:
        command = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AUTOPEFT_TEST_SLOW_SECONDS": str(slow), "COLUMNS": "120"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def load(storage: str) -> list[optuna.trial.FrozenTrial]:
    from autopeft.storage import open_storage

    return optuna.load_study(study_name="autopeft", storage=open_storage(storage, create=False)).get_trials(deepcopy=False)


def wait_for(condition, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (KeyError, Exception) as exc:  # the study may not exist yet
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {exc}") from exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def slow_spec(tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, n_trials: int = 4) -> Path:
    return write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        search={"variants": ["faulty"], "n_trials": n_trials, "seed": 0, "space": {"learning_rate": {"low": 5e-3, "high": 2e-2}, "faulty.fault": ["slow"], "faulty.r": [2, 4, 8]}},
        plugins=[str(FAULTS)],
    )


def check_study(trials: list[optuna.trial.FrozenTrial], n_trials: int) -> None:
    """The study reached its count, nothing is left running, and no configuration trained to the end twice."""
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == n_trials
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == n_trials


def test_two_workers_share_a_postgres_study_and_a_dead_machines_trial_runs_again(tmp_path, tiny_bert, sentiment_csv, postgres_url):
    """Catches: no heartbeat thread while a trial runs (the live worker's own trial would be failed as stale), and
    no re-queue of a stale trial (the killed worker's configuration would be lost, the study short of its count).
    The 'remote' worker, in a namespace with another host name, is killed with SIGKILL in the middle of a trial."""
    spec = slow_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=4)
    remote = worker(spec, postgres_url, tmp_path / "remote", host="remote-node")
    local = worker(spec, postgres_url, tmp_path / "local")
    wait_for(lambda: any(t.state.name == "RUNNING" and t.user_attrs.get("worker", {}).get("host") == "remote-node" for t in load(postgres_url)), what="a trial running on the remote worker")
    [killed] = [t for t in load(postgres_url) if t.state.name == "RUNNING" and t.user_attrs.get("worker", {}).get("host") == "remote-node"]
    remote.send_signal(signal.SIGKILL)
    remote.wait(timeout=30)
    out, err = local.communicate(timeout=300)
    assert local.returncode == 0, err[-3000:]

    trials = load(postgres_url)
    check_study(trials, 4)
    assert next(t for t in trials if t.number == killed.number).state.name == "FAIL"
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE" and retries[0].params == killed.params
    hosts = {t.user_attrs["worker"]["host"] for t in trials if "worker" in t.user_attrs}
    assert "remote-node" in hosts and len(hosts) == 2
    # The last worker out exported best/, which plain PEFT loads with the predictions it recorded.
    best = tmp_path / "local" / "best"
    predictions, recorded = plain_peft_test_predictions(best, tiny_bert, spec)
    assert predictions == recorded


def test_two_workers_run_at_once_and_split_the_work(tmp_path, tiny_bert, sentiment_csv, postgres_url, capsys):
    """Catches: workers that do not share the study's count (each would run n_trials) or sample the same
    configurations (no per-worker seed / constant liar). Then reads the shared study with status and report."""
    spec = slow_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=4)
    workers = [worker(spec, postgres_url, tmp_path / f"w{i}", slow=2) for i in range(2)]
    for process in workers:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    trials = load(postgres_url)
    check_study(trials, 4)
    pids = {t.user_attrs["worker"]["pid"] for t in trials if t.state.name == "COMPLETE"}
    assert pids == {p.pid for p in workers}
    # Exactly one worker exports best/: the one that ran the best trial.
    assert sorted((tmp_path / f"w{i}" / "best").is_dir() for i in range(2)) == [False, True]
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials if t.state.name == "COMPLETE")
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:])), "no two trials ran at the same time"

    capsys.readouterr()
    assert main(["status", str(tmp_path / "w0"), "--storage", postgres_url, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["trials"]["complete"] == 4 and status["finished"] == 4
    assert main(["report", str(tmp_path / "w0"), "--storage", postgres_url]) == 0
    assert (tmp_path / "w0" / "report.html").is_file()


def test_workers_on_a_journal_file_find_a_dead_workers_trial_by_its_pid(tmp_path, tiny_bert, sentiment_csv):
    """Catches: removing the same-host pid check in ``reap_dead_trials`` (a journal file has no heartbeat, so the
    killed worker's trial would stay RUNNING and the study would never reach its count)."""
    spec = slow_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=3)
    storage = f"journal:{tmp_path / 'study.journal'}"
    doomed = worker(spec, storage, tmp_path / "doomed", slow=30)
    wait_for(lambda: any(t.state.name == "RUNNING" and "worker" in t.user_attrs for t in load(storage)), what="the doomed worker's trial")
    [killed] = [t for t in load(storage) if t.state.name == "RUNNING"]
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    survivor = worker(spec, storage, tmp_path / "survivor", slow=1)
    out, err = survivor.communicate(timeout=150)
    assert survivor.returncode == 0, err[-3000:]
    trials = load(storage)
    check_study(trials, 3)
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"


def test_a_worker_refuses_sqlite(tmp_path, classification_spec, capsys):
    """Catches: letting workers share SQLite, which loses and duplicates queued trials under several writers."""
    assert main(["worker", str(classification_spec), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert "SQLite cannot be shared by several workers" in err
    assert not (tmp_path / "x.db").exists()


def test_a_worker_with_a_different_spec_is_refused(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches: a shared study that does not record its spec (``check_spec``): a worker whose training settings
    differ would silently add incomparable trials."""
    storage = f"journal:{tmp_path / 'study.journal'}"
    first = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 1})
    assert main(["worker", str(first), "--storage", storage, "--output", str(tmp_path / "a")]) == 0
    (tmp_path / "b").mkdir()
    other = write_spec(tmp_path / "b", model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 1}, training={"max_steps": 20})
    capsys.readouterr()
    assert main(["worker", str(other), "--storage", storage, "--output", str(tmp_path / "b" / "run")]) == 2
    assert "changed: training.max_steps" in capsys.readouterr().err
    assert len(load(storage)) == 1
