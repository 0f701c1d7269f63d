"""Database workers: many ``autopeft worker`` processes, on one or several machines, share one study.

Each worker is a driver of its own (:class:`~autopeft.orchestrators.driver.Driver`) on a shared storage
(:mod:`autopeft.storage`) and runs trials one at a time in its process, exactly like the local backend. What
changes with several writers:

- **Dead workers.** While a trial runs, a thread records a heartbeat in the study every ``heartbeat_interval``
  seconds (Optuna's ``record_heartbeat``). Before asking for a trial, every worker calls Optuna's
  ``fail_stale_trials``: a trial whose heartbeat is older than ``grace_period`` is failed by exactly one worker,
  which queues its configuration again (or, after it killed :data:`~autopeft.orchestrators.driver.MAX_DEATHS`
  processes, records it failed). On the same host a dead worker's trial is found at once from its pid. Journal
  files have no heartbeat, so they rely on the pid check: one host only.
- **Spreading out.** Each worker's sampler has its own seed and uses TPE's constant liar, so running trials push
  the others elsewhere instead of every worker sampling the same point.
- **Stopping.** A worker stops when the study holds ``n_trials`` finished trials; while the remaining trials are
  all running elsewhere it waits, so it can take over any of them whose worker dies. The worker that ran the best
  trial exports ``best/`` into its output folder (it has the adapter); the others say how to export it.
- **Same search.** The spec's settings that decide what trials measure are recorded in the study; a worker whose
  spec differs is refused, naming the keys (:func:`autopeft.fingerprint.check_spec`).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from rich.console import Console

from autopeft.orchestrators.driver import Driver, SearchResult, SpaceExhausted, requeue_dead
from autopeft.orchestrators.local import load_workbench, run_one
from autopeft.plan import Plan
from autopeft.progress import SearchProgress
from autopeft.storage import StorageError, check_shared_url, is_journal, open_storage, redact

if TYPE_CHECKING:
    import optuna

    from autopeft.trial import Workbench

POLL_SECONDS = 2.0


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial_id: int, interval: float) -> Iterator[None]:
    """Record the trial's heartbeat every ``interval`` seconds while the block runs (no-op without heartbeats)."""
    if not hasattr(storage, "record_heartbeat") or not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:
                pass  # a missed beat is harmless; a long outage makes the trial stale, which is the right outcome
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"autopeft-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reap_dead_trials(study: optuna.Study, stale: list[int]) -> list[int]:
    """Fail the running trials whose worker is gone, queueing each configuration again; returns their numbers
    (``stale`` collects those the heartbeat check failed, from the storage's callback).

    Stale heartbeats are Optuna's ``fail_stale_trials`` (its callback re-queues); on this host, a running trial
    whose worker pid no longer exists is failed at once. Whichever worker fails a trial first is the only one that
    re-queues it (the storage refuses to finish a trial twice).
    """
    import warnings

    import optuna

    from autopeft.orchestrators.driver import WORKER

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # its callback appends to ``stale`` what this worker failed
    reaped = list(stale)
    stale.clear()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker") or {}
        if owner.get("host") != WORKER["host"] or not isinstance(owner.get("pid"), int) or _alive(owner["pid"]):
            continue
        try:
            changed = study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        if changed:
            requeue_dead(study, trial)
            reaped.append(trial.number)
    return reaped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_worker(
    plan: Plan,
    console: Console,
    storage_url: str,
    n_trials: int | None = None,
    timeout: float | None = None,
    heartbeat_interval: int = 10,
    grace_period: int = 30,
) -> SearchResult:
    """Join the study at ``storage_url`` and run its trials until it holds ``n_trials`` finished ones; the worker
    that ran the best trial exports ``best/``."""
    import optuna

    check_shared_url(storage_url)
    if grace_period <= heartbeat_interval:
        raise StorageError(f"--grace-period: got {grace_period}; it must be longer than --heartbeat-interval ({heartbeat_interval}), or live trials look dead")
    beats = not is_journal(storage_url)
    stale: list[int] = []

    def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        stale.append(trial.number)
        requeue_dead(study, trial)

    storage = open_storage(
        storage_url,
        heartbeat_interval=heartbeat_interval if beats else None,
        grace_period=grace_period if beats else None,
        on_stale=on_stale,
    )
    with Driver(plan, console, n_trials, timeout, constant_liar=True, storage=storage, storage_url=storage_url) as driver:
        if beats:
            driver.on_ask = storage.record_heartbeat  # a trial beats from the moment it exists
        console.log(f"worker pid {os.getpid()} joined the study at {redact(storage_url)}")
        workbench: Workbench | None = None
        stopped_by_user = False
        with SearchProgress(console, driver.trials_to_show, driver.finished(), plan.spec.metric) as progress:
            try:
                while True:
                    for number in reap_dead_trials(driver.study, stale):
                        console.log(f"trial {number}: its worker died; queued again")
                    if driver.finished() >= driver.n_trials or driver.timed_out() or driver.budget_spent():
                        break
                    running = len(driver.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
                    waiting = len(driver.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
                    if not driver.wants_more(running) and not waiting:
                        time.sleep(POLL_SECONDS)  # the rest runs elsewhere; stay to take over a trial whose worker dies
                        continue
                    if workbench is None:
                        workbench = load_workbench(plan, driver, progress.message)
                    run_one(driver, workbench, progress, around_trial=lambda trial_id: heartbeat(storage, trial_id, heartbeat_interval if beats else 0))
            except KeyboardInterrupt:
                stopped_by_user = True
            except SpaceExhausted as exhausted:
                console.log(f"stopping: {exhausted}; widen search.space or lower n_trials")
        return driver.finish(
            workbench,
            stopped_by_user,
            workbench_factory=lambda: load_workbench(plan, driver, console.log),
            export=ran_the_best(driver),
        )


def ran_the_best(driver: Driver) -> bool:
    """Whether this worker ran the trial ``best/`` holds: that one worker exports it (it has the adapter), so
    workers never retrain it or write the same folder at once."""
    from autopeft.objectives import select_best
    from autopeft.orchestrators.driver import WORKER

    best = select_best(driver.study, driver.spec)
    if best is None:
        return False
    owner = driver.study.get_trials(deepcopy=False)[best].user_attrs.get("worker") or {}
    return owner.get("host") == WORKER["host"] and owner.get("pid") == os.getpid()
