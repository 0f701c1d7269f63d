"""The Ray backend: the same search, its trials run by Ray Tune on a Ray cluster.

The process that runs ``autopeft search`` keeps the :class:`~autopeft.orchestrators.driver.Driver`, and with it the
study, every sampling and early-stopping decision and the export of ``best/``. Ray Tune runs the trials; three
small Tune plug-ins connect it to the driver, all called in this process by Tune's loop:

- :class:`StudySearcher`, Tune's search algorithm: each suggestion is one ``driver.ask()``, returned as a plain
  dict (the configuration, its seed and its trial number); it tells Tune the search is finished once the study
  will hold ``n_trials`` finished trials, and records each trial that ends (complete, pruned or failed).
- :class:`StudyScheduler`, a ``FIFOScheduler`` that hands every report of a trial to the driver's judges (size
  constraints at attach, early stopping at each evaluation) and answers STOP, with the reason kept for the record.
- a ``Stopper`` that ends every trial when the driver itself hit an error (a full disk, data
  that differs from the study's): the search then stops with that error, as the local backend does.

Tune pickles what it is given (into ``RUN_DIR/ray/``); these objects hold only a key into :data:`_SEARCHES`, never
the driver. The trainable, :func:`train_on_worker`, runs in Ray worker processes. Each keeps one
:class:`~autopeft.trial.Workbench` (base model and tokenized data) for every trial it runs (``reuse_actors``), so
loading is paid once per worker, not per trial. A trial that fails for its configuration's sake (NaN loss, a
plugin error) reports its failure as a result and ends normally: Tune does not run it again. A worker process or
node that dies costs its running trial, which Tune runs again up to ``ray.max_failures`` times before it is
recorded failed.

Each search builds a fresh ``Tuner``. Tune's own experiment state is not read back: the study is the record, so
a search whose driver was killed resumes like a local one (finished trials kept, interrupted ones run again).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import secrets
import tempfile
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from autopeft.errors import AutoPeftError, DataError, OutOfSpace, SpecError, SpecErrors, TrialFailed, is_out_of_space
from autopeft.orchestrators.driver import Driver, SearchResult, SpaceExhausted, Ticket
from autopeft.plan import Plan
from autopeft.progress import describe_params
from autopeft.trial import StepListener

if TYPE_CHECKING:
    from autopeft.placement import AdapterSite
    from autopeft.spec import Spec
    from autopeft.trial import Workbench

RAY_FOLDER = "ray"
"""Tune's experiment folder inside the run folder (never the user's ``~/ray_results``)."""
STEP_REPORT_SECONDS = 2.0
"""A running trial reports its step and loss at most this often (each report is a round trip to the driver)."""
PASSED_TO_WORKERS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
"""Environment variables of the search process that workers take over: they decide where a model is found."""
WORKER_DIED = ("The actor died", "The actor experienced an error", "The worker died", "NodeDiedError", "ActorUnavailableError")
"""What Ray's error says when a trial's process or node died (rather than the trial raising)."""
TUNE_ENVIRONMENT = {
    # Tune's CSV/JSON/TensorBoard trial loggers: the study is the record.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Ctrl-C must reach autopeft at once (trials interrupted, not finished), not start Tune's graceful stop.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    # A dead worker is shown as one line of ours, not a traceback per failure.
    "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    # Tune's experiment snapshot is never read back (each search builds a fresh Tuner): write it once an hour.
    "TUNE_GLOBAL_CHECKPOINT_S": "3600",
    # Tune's older output engine, which verbose=0 silences entirely (the newer one still prints a banner).
    "RAY_AIR_NEW_OUTPUT": "0",
}


# ---------------------------------------------------------------------------------------------------------------
# The worker side: one Workbench per worker process, reused by every trial it runs
# ---------------------------------------------------------------------------------------------------------------

_WORKBENCHES: dict[str, tuple[Workbench, dict[str, Any]]] = {}
"""The workbench of this worker process and its data fingerprint, by :func:`_job_key` of the spec."""
_LOADS: dict[str, int] = {}
"""How many times this process loaded a workbench for a spec: 1 when reuse works (reported with every result)."""
_WORKBENCH_LOCK = threading.Lock()
"""One trial at a time uses the process's base model (a stopped trial's thread restores it before the next)."""


class _StoppedByTune(BaseException):
    """Tune stopped the trial (the scheduler said STOP): unwinds ``run_trial``, whose finally restores the base."""


def _load_workbench(job: dict[str, Any]) -> tuple[Workbench, dict[str, Any], int]:
    """This process's workbench for the job's spec, loaded on first use; with its data fingerprint and load count."""
    key = job["key"]
    if key not in _WORKBENCHES:
        from autopeft.fingerprint import data_fingerprint
        from autopeft.registry import load_registry
        from autopeft.spec import parse_spec
        from autopeft.trial import Workbench

        spec = parse_spec(job["spec"], job["spec_file"])
        spec._path = Path(job["spec_file"])
        # The driver checked the spec against the plugins (make_plan); a worker needs only the registry.
        plan = Plan(spec, load_registry(spec.plugin_paths()), {})
        _WORKBENCHES.clear()  # one base model per process: another search's is let go first
        workbench = Workbench(plan)
        _WORKBENCHES[key] = (workbench, data_fingerprint(workbench.data))
        _LOADS[key] = _LOADS.get(key, 0) + 1
    workbench, fingerprint = _WORKBENCHES[key]
    return workbench, fingerprint, _LOADS[key]


class _TuneReporter(StepListener):
    """Reports a running trial to the driver through ``ray.tune.report``: at attach, at every evaluation, and its
    step and loss every :data:`STEP_REPORT_SECONDS`. A report the scheduler answered with STOP raises
    :class:`_StoppedByTune` inside the trial."""

    def __init__(self, where: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        self.where = where
        self.fingerprint = fingerprint
        self.started = time.perf_counter()
        self.last_step_report = time.monotonic()

    def send(self, kind: str, **fields: Any) -> None:
        from ray import tune

        try:
            tune.report({"kind": kind, "where": self.where, **fields})
        except SystemExit:
            # Tune ends a stopped trial's thread with sys.exit() inside report(); the trial unwinds from here.
            raise _StoppedByTune() from None

    def on_attach(self, costs: dict[str, float]) -> None:
        self.send("attach", costs=costs, fingerprint=self.fingerprint)

    def on_step(self, step: int, total: int, loss: float) -> None:
        if time.monotonic() - self.last_step_report >= STEP_REPORT_SECONDS:
            self.last_step_report = time.monotonic()
            self.send("step", step=step, total=total, loss=loss)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        self.send("evaluate", step=step, metrics=metrics, elapsed=time.perf_counter() - self.started)


def _read_adapter(folder: Path) -> list[list[str]]:
    """Every file of a saved adapter folder as ``[relative path, base64 content]``, to travel in a result."""
    return [[path.relative_to(folder).as_posix(), base64.b64encode(path.read_bytes()).decode("ascii")] for path in sorted(folder.rglob("*")) if path.is_file()]


def train_on_worker(config: dict[str, Any], job: dict[str, Any]) -> None:
    """Tune's trainable: run the autopeft trial ``config`` describes in this worker process, reporting to the driver.

    ``config`` is what :meth:`StudySearcher.suggest` returned; ``job`` holds the resolved spec. The trial's outcome
    and adapter files come back in the last result. A failure of the configuration is reported as a result and the
    function returns normally, so Tune does not run it again; only a dead process makes Tune retry.
    """
    import ray
    import torch

    for name, value in job["env"].items():
        os.environ.setdefault(name, value)
    # A stopped trial's thread may take a while to restore a large base model; reusing the worker waits for it.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "120")
    where: dict[str, Any] = {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "started": time.time()}
    with _WORKBENCH_LOCK:
        torch.set_num_threads(job["threads"])
        try:
            _run_reported(config, job, where)
        except _StoppedByTune:
            # Whatever ran is unwound (run_trial's finally restored the base model). Tune ends a stopped trial's
            # thread with exit code 0; returning instead would make Tune's wrapper report once more and wait for
            # an answer forever.
            raise SystemExit(0) from None
        finally:
            _return_freed_memory()


def _return_freed_memory() -> None:
    """Give the memory a finished trial freed back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Tune runs every trial in a new thread, and glibc serves threads from several heaps that keep what was freed in
    them: without this, a worker grew by about 200 MB per MiniLM trial (1.06 GB after the first trial, 2.1 GB after
    six; flat at 1.07 GB with it).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _run_reported(config: dict[str, Any], job: dict[str, Any], where: dict[str, Any]) -> None:
    """The body of :func:`train_on_worker`: every outcome, failures included, ends as a report."""
    from autopeft.trial import TrialConfig

    try:
        workbench, fingerprint, loads = _load_workbench(job)
    except Exception as error:
        # Nothing about this configuration: the worker cannot run any trial, so the search stops.
        _TuneReporter(where, {}).send("broken", error=str(error) if isinstance(error, AutoPeftError) else f"{type(error).__name__}: {error}")
        return
    where["loads"] = loads
    reporter = _TuneReporter(where, fingerprint)
    try:
        with tempfile.TemporaryDirectory(prefix="autopeft-trial-") as folder:
            outcome = workbench.run_trial(TrialConfig.from_json(config["config"]), config["seed"], listener=reporter, save_to=Path(folder) / "adapter")
            adapter = _read_adapter(Path(folder) / "adapter")
    except Exception as error:
        reason = error.reason if isinstance(error, TrialFailed) else f"{type(error).__name__}: {error}"
        reporter.send("failed", reason=reason, details=traceback.format_exc(), out_of_space=is_out_of_space(error))
        return
    except SystemExit as error:
        # A variant that calls sys.exit() fails its trial; it does not end the worker.
        reporter.send("failed", reason=f"the variant called sys.exit({error.code!r})", details="", out_of_space=False)
        return
    outcome_fields = {"metrics": outcome.metrics, "costs": outcome.costs, "steps": outcome.steps, "history": outcome.history}
    reporter.send("outcome", outcome=outcome_fields, adapter=adapter, ended=time.time())


# ---------------------------------------------------------------------------------------------------------------
# The driver side: Tune's searcher and scheduler, both talking to the Driver through one _RaySearch
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Running:
    """A trial Tune holds (pending or running), and what its reports said so far."""

    ticket: Ticket
    where: dict[str, Any] = field(default_factory=dict)
    stop_reason: str | None = None
    outcome: dict[str, Any] | None = None
    adapter: list[list[str]] | None = None
    failure: dict[str, Any] | None = None
    failures: int = 0
    error_text: str = ""

    def restart(self) -> None:
        """Forget the reports of a run that died: Tune runs the trial again from its start."""
        self.where = {}
        self.stop_reason = self.outcome = self.adapter = self.failure = None


_SEARCHES: dict[str, _RaySearch] = {}
"""Live searches of this process, by key: what Tune's pickled plug-ins hold instead of the driver."""


def _unflatten(result: dict[str, Any]) -> dict[str, Any]:
    """Tune flattens nested results into ``a/b`` keys; the reports are read back nested."""
    from ray.tune.utils.util import unflatten_dict

    return unflatten_dict(result)


def short_node(where: dict[str, Any]) -> str:
    """``127.0.0.1 node 3f2a9c pid 4242``: which machine, Ray node and process run a trial."""
    if not where:
        return "waiting for a worker"
    return f"{where.get('ip', '?')} node {str(where.get('node', ''))[:6]} pid {where.get('pid', '?')}"


class TrialBoard:
    """Progress of a Ray search: a live table with one row per trial Tune holds (where it runs, its step, its
    loss and last validation metric), and a log line when a trial starts, evaluates and ends.

    Give it a ``Console(log_path=False)``. On a terminal that is not interactive only the log lines appear.
    """

    def __init__(self, console: Console, n_trials: int, finished: int, metric: str) -> None:
        self.console = console
        self.n_trials = n_trials
        self.finished = finished
        self.metric = metric
        self.rows: dict[int, dict[str, Any]] = {}
        self.live = Live(console=console, get_renderable=self._table, refresh_per_second=2, transient=True)

    def __enter__(self) -> TrialBoard:
        self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.stop()

    def _table(self) -> Table:
        table = Table(title=f"{self.finished} of {self.n_trials} trials finished, {len(self.rows)} on Ray", title_justify="left", expand=True)
        for column in ("trial", "variant", "where", "step", "loss", self.metric):
            # Only "where" gives way on a narrow terminal: the numbers stay whole.
            table.add_column(
                column, justify="left" if column in ("variant", "where") else "right", no_wrap=True, overflow="ellipsis",
                ratio=1 if column == "where" else None, min_width=8 if column == "where" else None,
            )
        for number, row in sorted(list(self.rows.items())):
            loss = row.get("loss")
            table.add_row(
                str(number), row["variant"], escape(row["where"]), f"{row['step']}/{row['total']}",
                f"{loss:.4f}" if isinstance(loss, float) else "", row.get("metric", ""),
            )
        return table

    def start(self, number: int, variant: str, params: dict[str, Any], total: int) -> None:
        self.rows[number] = {"variant": variant, "where": short_node({}), "step": 0, "total": total}
        self.console.log(f"trial {number} started: {variant} {escape(describe_params(params))}")

    def update(self, number: int, **fields: Any) -> None:
        if number in self.rows:
            self.rows[number].update(fields)

    def log(self, text: str) -> None:
        self.console.log(text)

    def end(self, number: int, line: str, best: str, finished: int) -> None:
        """The trial left Tune; ``finished`` is the study's count of finished trials now."""
        self.rows.pop(number, None)
        self.finished = finished
        self.console.log(f"trial {number} {line}" + (f" ({best})" if best else ""))


class _RaySearch:
    """What Tune's plug-ins do to the driver: one object per search, in this process, found by key."""

    def __init__(self, driver: Driver, board: TrialBoard, sites: list[AdapterSite], max_failures: int) -> None:
        self.driver = driver
        self.board = board
        self.sites = sites
        self.max_failures = max_failures
        self.running: dict[str, _Running] = {}
        self.error: BaseException | None = None
        self.done = False
        self.data: dict[str, Any] | None = None
        self.key = secrets.token_hex(8)

    def __enter__(self) -> _RaySearch:
        _SEARCHES[self.key] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _SEARCHES.pop(self.key, None)

    def stop(self, error: BaseException) -> None:
        """The driver hit ``error``: no trial starts, running ones are stopped, the search ends with it."""
        if self.error is None:
            self.error = error

    # -- searcher ---------------------------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        from ray.tune.search import Searcher

        driver = self.driver
        if self.error is not None or self.done:
            return Searcher.FINISHED
        if not driver.wants_more(running=len(self.running)):
            if driver.timed_out() or driver.budget_spent():
                self.board.log(f"stopping: {driver.stop_reason()}")
            elif self.running:
                return None  # a running trial may still end without a result (or early); then another one starts
            self.done = True
            return Searcher.FINISHED
        try:
            ticket = driver.ask(self.sites)
        except SpaceExhausted as exhausted:
            self.board.log(f"stopping: {exhausted}; widen search.space or lower n_trials")
            self.done = True
            return Searcher.FINISHED
        except Exception as error:
            self.stop(error)
            return Searcher.FINISHED
        if ticket is None:
            return None  # a configuration already run: skipped, not counted; Tune asks again
        if ticket.config is None:
            self.board.end(ticket.number, ticket.failure, driver.best_text(), driver.finished())
            return None
        self.running[trial_id] = _Running(ticket)
        self.board.start(ticket.number, ticket.config.variant, ticket.trial.params, driver.spec.training.max_steps)
        return {"config": ticket.config.to_json(), "seed": ticket.seed, "number": ticket.number}

    def complete(self, trial_id: str, error: bool) -> None:
        """Record a trial Tune is done with: complete, pruned, failed, or interrupted (not its fault)."""
        entry = self.running.pop(trial_id, None)
        if entry is None:
            return
        try:
            line = self._record(entry, error)
            self.driver.after_trial()
        except Exception as failure:
            self.stop(failure)
            self._interrupt_if_running(entry, failure)
            line = f"[red]not recorded[/]: {escape(str(failure))[:200]}"
        healthy = self.error is None
        self.board.end(entry.ticket.number, line, self.driver.best_text() if healthy else "", self.driver.finished() if healthy else self.board.finished)

    def _interrupt_if_running(self, entry: _Running, failure: BaseException) -> None:
        """A trial whose result could not be recorded (a full disk, say) is kept for a retry: left RUNNING, the
        next start would count it as a process that died in it."""
        import optuna

        trial_id = entry.ticket.trial._trial_id
        try:
            if self.driver.study._storage.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING:
                self.driver.interrupted(entry.ticket, f"its result could not be recorded ({type(failure).__name__})")
        except Exception:
            pass  # the storage itself is failing: the search stops with ``failure`` either way

    def _record(self, entry: _Running, error: bool) -> str:
        driver, ticket = self.driver, entry.ticket
        self._keep_where(entry)
        if error:
            # A dead process or node; otherwise the trainable itself raised (which autopeft's never should).
            what = "worker died" if any(marker in entry.error_text for marker in WORKER_DIED) else "the trial raised in its Ray worker"
            reason = f"{what} {entry.failures} time(s), more than ray.max_failures={self.max_failures} allows ({entry.error_text or 'no message from Ray'})"
            return driver.failed(ticket, reason, entry.error_text)
        if entry.stop_reason is not None:
            return driver.pruned(ticket, entry.stop_reason)
        if entry.outcome is not None:
            from autopeft.trial import TrialOutcome

            self._write_adapter(ticket.number, entry.adapter or [])
            outcome = entry.outcome
            history = [(int(step), metrics) for step, metrics in outcome.get("history", [])]
            return driver.complete(ticket, TrialOutcome(outcome["metrics"], outcome["costs"], int(outcome["steps"]), history))
        if entry.failure is not None:
            if entry.failure.get("out_of_space"):
                driver.interrupted(ticket, "out of disk space on a Ray worker")
                self.stop(OutOfSpace(f"the temporary folder of the Ray worker at {entry.where.get('ip', '?')}", OSError(entry.failure["reason"])))
                return "[yellow]interrupted[/]: out of disk space on its worker"
            return driver.failed(ticket, entry.failure["reason"], entry.failure.get("details", ""))
        why = "the search stopped" if self.error is not None else "Tune ended it without a result"
        driver.interrupted(ticket, why)
        return f"[yellow]interrupted[/] ({why}); it runs again on resume"

    def _keep_where(self, entry: _Running) -> None:
        """Store where the trial ran (node, process, workbench loads, retries) in its user attributes."""
        if entry.where or entry.failures:
            entry.ticket.trial.set_user_attr("ray", {**entry.where, "restarts": entry.failures})

    def _write_adapter(self, number: int, files: list[list[str]]) -> None:
        """Write the adapter files a worker sent where a local search saves them (``adapters/trial-N``)."""
        folder = self.driver.run_dir.adapter(number)
        for name, data in files:
            relative = Path(name)
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise DataError(f"a Ray worker sent an adapter file named {name!r}, which is not a path inside the adapter folder")
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(data))

    def interrupt_all(self, why: str) -> None:
        """Record every trial Tune still holds as interrupted (run again on resume)."""
        for trial_id in list(self.running):
            entry = self.running.pop(trial_id)
            self.driver.interrupted(entry.ticket, why)
            self.board.end(entry.ticket.number, f"[yellow]interrupted[/] ({why}); it runs again on resume", "", self.board.finished)

    # -- scheduler ----------------------------------------------------------------------------------------------

    def judge(self, trial_id: str, result: dict[str, Any]) -> str | None:
        """Handle one report of a running trial; the reason to stop it, or None to let it go on."""
        entry = self.running.get(trial_id)
        if entry is None:
            return None
        try:
            return self._judge(entry, _unflatten(result))
        except Exception as error:
            self.stop(error)
            return "the search stopped"

    def _judge(self, entry: _Running, result: dict[str, Any]) -> str | None:
        driver, board, ticket = self.driver, self.board, entry.ticket
        number, kind = ticket.number, result.get("kind")
        entry.where.update(result.get("where") or {})
        if kind == "broken":
            raise AutoPeftError(f"the Ray worker at {short_node(entry.where)} could not load the model and data: {result['error']}")
        if kind == "attach":
            self._check_data(result.get("fingerprint") or {}, entry)
            self._keep_where(entry)
            board.update(number, where=short_node(entry.where))
            board.log(f"trial {number} runs on {short_node(entry.where)}")
            reason = driver.judge_attach(ticket, result.get("costs") or {})
        elif kind == "step":
            board.update(number, step=result["step"], loss=float(result["loss"]))
            reason = None
        elif kind == "evaluate":
            step, metrics = int(result["step"]), result["metrics"]
            shown = f"{metrics[driver.spec.metric]:.4f}"
            board.update(number, step=step, metric=shown)
            board.log(f"trial {number} step {step}: validation {driver.spec.metric} {shown}")
            with warnings.catch_warnings():
                # A trial run again after its worker died reports its steps again; Optuna keeps the first values.
                warnings.filterwarnings("ignore", message=".*already reported.*")
                reason = driver.judge_rung(ticket, step, metrics, float(result["elapsed"]))
        elif kind == "outcome":
            entry.outcome, entry.adapter = result["outcome"], result.get("adapter")
            entry.where["ended"] = result.get("ended")
            reason = None
        elif kind == "failed":
            entry.failure = result
            reason = None
        else:
            reason = None
        if reason:
            entry.stop_reason = reason
        return reason

    def _check_data(self, fingerprint: dict[str, Any], entry: _Running) -> None:
        """The first worker's data is checked against the study's; every other worker's against the first's."""
        if self.data is None:
            self.driver.check_data(fingerprint)
            self.data = fingerprint
        elif fingerprint != self.data:
            raise DataError(
                f"the Ray worker at {short_node(entry.where)} prepared other data than the first worker (labels or "
                "examples differ): every node must see the same data files at the same paths"
            )

    def worker_died(self, trial: Any) -> None:
        """Tune lost the trial's worker (or the trainable raised): note it; Tune may run the trial again."""
        entry = self.running.get(trial.trial_id)
        if entry is None:
            return
        entry.failures = trial.run_metadata.num_failures
        entry.error_text = _error_text(trial)
        where = short_node(entry.where) if entry.where else "its worker"
        entry.restart()
        if trial.should_recover():
            what = f"the worker at {where} died" if any(marker in entry.error_text for marker in WORKER_DIED) else f"it raised in the worker at {where}"
            self.board.log(
                f"trial {entry.ticket.number}: {what} ({escape(entry.error_text[:160]) or 'no message'}); "
                f"running it again ({entry.failures} of ray.max_failures={self.max_failures})"
            )
            self.board.update(entry.ticket.number, where=short_node({}), step=0, loss=None, metric="")


def _error_text(trial: Any) -> str:
    """The last error Tune recorded for ``trial`` (from its error file), on one line."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        return ""
    last = text.rsplit("Failure #", 1)[-1]
    lines = [line.strip() for line in last.splitlines()[1:] if line.strip()]
    return " ".join(lines)[:600]


def _search(key: str) -> _RaySearch | None:
    return _SEARCHES.get(key)


def _plugins():
    """Tune's Searcher, Scheduler, Stopper and Callback subclasses (defined when Ray is imported)."""
    from ray.tune import Callback, Stopper
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler
    from ray.tune.search import Searcher

    class StudySearcher(Searcher):
        """Suggests the driver's next configuration; records every trial Tune is done with through the driver."""

        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            search = _search(self.key)
            return search.suggest(trial_id) if search is not None else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            search = _search(self.key)
            if search is not None:
                search.complete(trial_id, error)

        def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
            """Nothing to save: the study is the search's state."""

    class StudyScheduler(FIFOScheduler):
        """Runs trials in the order suggested; STOP when the driver judges a report (size, early stopping)."""

        _supports_buffered_results = False  # every report is judged when it is made

        def __init__(self, key: str) -> None:
            super().__init__()
            self.key = key

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            search = _search(self.key)
            reason = search.judge(trial.trial_id, result) if search is not None else None
            return TrialScheduler.STOP if reason else TrialScheduler.CONTINUE

        def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
            search = _search(self.key)
            if search is not None:
                search.worker_died(trial)

    class StopOnDriverError(Stopper):
        """Stops every trial once the driver hit an error."""

        def __init__(self, key: str) -> None:
            self.key = key

        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            search = _search(self.key)
            return search is None or search.error is not None

    class DropAdapterFiles(Callback):
        """Adapter files travel in a trial's last result to the searcher; Tune need not keep them."""

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            result.pop("adapter", None)

    return StudySearcher, StudyScheduler, StopOnDriverError, DropAdapterFiles


# ---------------------------------------------------------------------------------------------------------------
# Running a search
# ---------------------------------------------------------------------------------------------------------------


def driver_sites(plan: Plan) -> list[AdapterSite]:
    """The model's adapter sites, for sampling ``search.allocation`` in the driver: built on the meta device from
    the model's config (no weights loaded). ``[]`` when the spec has no allocation (nothing samples them)."""
    spec = plan.spec
    if spec.search.allocation is None:
        return []
    import torch
    import transformers

    from autopeft.allocation import check_allocation
    from autopeft.models import resolve_model
    from autopeft.placement import adapter_sites

    resolved = resolve_model(spec.model, plan.registry, spec.base_dir)
    config = transformers.AutoConfig.from_pretrained(resolved.path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code)
    head = transformers.AutoModelForSequenceClassification if spec.model.task == "sequence-classification" else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = head.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    sites = adapter_sites(model)
    errors = check_allocation(spec.search.allocation, sites, str(spec.path))
    if errors:
        raise SpecErrors(errors)
    return sites


@contextmanager
def ray_connection(plan: Plan, console: Console) -> Iterator[None]:
    """Ray for the search: joined at ``ray.address``, or started on this machine when it is null.

    A Ray this process was already connected to is used as it is and left running; otherwise the connection made
    here is closed at the end (which stops a Ray instance started here, and only that).
    """
    spec = plan.spec
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise SpecError(str(spec.path), "search.backend", "ray", "the Ray backend needs Ray: pip install 'autopeft[ray]'") from None
    if ray.is_initialized():
        yield
        return
    address = spec.ray.address
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        options["include_dashboard"] = False
        console.log("starting Ray on this machine")
    else:
        if address != "auto":
            _check_reachable(spec, address)
        console.log(f"joining the Ray cluster at {address}")
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if address is None:
            raise
        raise SpecError(str(spec.path), "ray.address", address, f"no Ray cluster could be joined there ({type(exc).__name__}: {str(exc)[:300]})") from None
    try:
        _check_resources(spec, console)
        yield
    finally:
        ray.shutdown()


def _check_reachable(spec: Spec, address: str) -> None:
    """Refuse a ``HOST:PORT`` where nothing listens at once (Ray itself would retry for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise SpecError(
            str(spec.path), "ray.address", address, f"no Ray head node answers there ({exc.strerror or type(exc).__name__}); give the address `ray start --head` printed, or 'auto' on a cluster machine"
        ) from None


def _check_resources(spec: Spec, console: Console) -> None:
    """Warn when no node of the cluster can ever hold one trial (``ray.resources_per_trial``): Tune then waits,
    for a node that an autoscaler may add or may never come."""
    import ray

    wanted = {"CPU": spec.ray.resources_per_trial.cpu, "GPU": spec.ray.resources_per_trial.gpu}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if not any(all(have.get(name, 0) >= amount for name, amount in wanted.items() if amount) for have in nodes):
        largest = ", ".join(f"{have.get('CPU', 0):g} CPU {have.get('GPU', 0):g} GPU" for have in nodes) or "no node"
        console.print(
            f"[yellow]warning:[/] no node of the Ray cluster has {wanted['CPU']:g} CPU and {wanted['GPU']:g} GPU for one trial "
            f"(ray.resources_per_trial); nodes: {largest}. Trials wait until such a node joins."
        )


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's settings for an autopeft search (:data:`TUNE_ENVIRONMENT`) and its loggers quiet, restored after."""
    saved = {name: os.environ.get(name) for name in TUNE_ENVIRONMENT}
    os.environ.update(TUNE_ENVIRONMENT)
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _job_key(spec_dict: dict[str, Any]) -> str:
    """What decides a worker's workbench (model, data, training, seed, plugins): equal keys share a loaded one."""
    import hashlib
    import json

    parts = {name: spec_dict.get(name) for name in ("model", "data", "training", "plugins")}
    parts["seed"] = spec_dict.get("search", {}).get("seed")
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _trial_name(trial: Any) -> str:
    return f"trial-{trial.config.get('number', trial.trial_id)}"


def _fit(search: _RaySearch, plan: Plan) -> None:
    """Run Tune until the searcher says the search is finished and every trial it started has ended."""
    from ray import tune

    from autopeft.rundir import saved_spec

    spec = plan.spec
    resources = spec.ray.resources_per_trial
    spec_dict = saved_spec(spec)
    job = {
        "spec": spec_dict,
        "spec_file": str(spec.path),
        "key": _job_key(spec_dict),
        "threads": spec.training.threads or max(1, math.ceil(resources.cpu)),
        "env": {name: os.environ[name] for name in PASSED_TO_WORKERS if name in os.environ},
    }
    searcher, scheduler, stopper, drop_adapter = _plugins()
    trainable = tune.with_resources(tune.with_parameters(train_on_worker, job=job), {"cpu": resources.cpu, "gpu": resources.gpu})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher(search.key),
            scheduler=scheduler(search.key),
            num_samples=-1,  # the searcher decides when the search is finished
            max_concurrent_trials=spec.ray.max_concurrent,
            reuse_actors=True,  # a worker keeps its loaded workbench for the next trial
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str((spec.run_dir / RAY_FOLDER).resolve()),
            failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=0, checkpoint_at_end=False),
            stop=stopper(search.key),
            callbacks=[drop_adapter()],
            verbose=0,
            log_to_file=False,
        ),
    )
    tuner.fit()


def run_search(plan: Plan, console: Console, n_trials: int | None = None, timeout: float | None = None) -> SearchResult:
    """Run (or resume) the search of ``plan`` with its trials on Ray, then export ``best/`` (and ``pareto/``)."""
    from autopeft.orchestrators.local import load_workbench

    spec = plan.spec
    sites = driver_sites(plan)
    with Driver(plan, console, n_trials, timeout, constant_liar=spec.ray.max_concurrent > 1) as driver:
        stopped_by_user = False
        already = driver.finished()
        if already:
            console.log(f"resuming {driver.run_dir.path}: {already} of {driver.n_trials} trials already finished")
        if driver.wants_more():
            with ray_connection(plan, console), TrialBoard(console, driver.n_trials, already, spec.metric) as board, _RaySearch(driver, board, sites, spec.ray.max_failures) as search:
                try:
                    with _quiet_tune():
                        _fit(search, plan)
                except KeyboardInterrupt:
                    stopped_by_user = True
                    search.interrupt_all("stopped with Ctrl-C")
                except BaseException:
                    search.interrupt_all("the search stopped on an error")
                    raise
                search.interrupt_all("the search stopped")
                if search.error is not None:
                    raise search.error
        return driver.finish(None, stopped_by_user, workbench_factory=lambda: load_workbench(plan, driver, console.log))
