"""The driver: the one writer of a run's study, whatever runs the trials.

A search is a driver plus an executor. The driver owns the study of record: it locks the run folder, samples
configurations, records what trials measured, makes every early-stopping decision, and at the end selects and
exports ``best/`` (and ``pareto/``). Executors only run :meth:`autopeft.trial.Workbench.run_trial` somewhere
(in this process, on a Ray worker) and hand what they see back to the driver, so ``report``, ``status``,
``export``, ``dashboard`` and resume work the same whichever executor ran the trials.

What the driver guarantees:

- **One writer per run folder.** The run folder is locked (:mod:`autopeft.runlock`) for as long as the driver is
  open. (Workers sharing a study in a database are the exception by design: each is a driver of its own, and the
  database settles who runs what; see :mod:`autopeft.orchestrators.worker`.)
- **Nothing repeated.** The sampler is seeded from the spec's seed *and* the study's length, so a resumed or
  extended search continues with new configurations; a sampled configuration that already finished is skipped
  (recorded as a duplicate, not counted, not run).
- **Nothing lost.** A trial left RUNNING by a dead process, or stopped with Ctrl-C, is queued again first. A
  configuration that killed the process twice is recorded failed with that reason instead of blocking the run.
- **Out of space is a stop, not a result.** A trial that fails because the disk is full is kept for a retry and
  the search stops with :class:`autopeft.errors.OutOfSpace`.
- **Comparable trials only.** The resolved search space and the prepared data are fingerprinted in the study; a
  resume with either changed is refused (:mod:`autopeft.fingerprint`).
"""

from __future__ import annotations

import socket
import time
import traceback
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rich.console import Console

from autopeft.errors import OutOfSpace, TrialFailed, is_out_of_space
from autopeft.fingerprint import check_data, check_space, check_spec
from autopeft.objectives import constraint_values, describe_values, feasible, objective_values, pareto_front, select_best, size_front, violations
from autopeft.plan import Plan
from autopeft.progress import describe_params
from autopeft.pruning import optuna_pruner, pareto_should_prune, rung_point
from autopeft.rundir import RunDir, finished_trials, interrupted, write_trials_csv
from autopeft.runlock import RunLock
from autopeft.space import defaults, sample
from autopeft.spec import Spec

if TYPE_CHECKING:
    import optuna

    from autopeft.trial import TrialConfig, TrialOutcome, Workbench

# A configuration whose trial was running when the process died this many times is recorded failed.
MAX_DEATHS = 2
# Consecutive sampled duplicates after which the space is taken as exhausted.
MAX_DUPLICATES_IN_A_ROW = 50


@dataclass
class SearchResult:
    run_dir: RunDir
    finished: int
    best_trial: int | None
    front: list[int] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class Ticket:
    """One asked trial on its way through an executor: its Optuna trial, configuration and what it measured."""

    trial: optuna.Trial
    config: TrialConfig | None
    """None when the configuration could not even be sampled; the trial is then already recorded failed."""
    seed: int
    size_known_at_attach: bool
    failure: str = ""
    """Why sampling failed (when ``config`` is None)."""
    started: float = field(default_factory=time.perf_counter)
    metrics: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    step: int = 0
    rungs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def number(self) -> int:
        return self.trial.number


class SpaceExhausted(Exception):
    """Every configuration the sampler proposes has already been run."""


def make_sampler(spec: Spec, offset: int = 0, constant_liar: bool = False) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``search.sampler``, seeded from ``search.seed`` and ``offset``.

    ``offset`` is the number of trials the study already holds (and, for parallel workers, a worker index mixed
    in), so that a resumed or extended search draws new configurations instead of replaying the first ones.
    ``constant_liar`` makes TPE treat running trials as bad results, so parallel workers spread out. TPE and
    NSGA-II read each trial's constraint values (``Trial.set_constraint``).
    """
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    search = spec.search
    seed = (search.seed * 1_000_003 + offset) % 2**32
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=constant_liar),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "nsgaii": lambda: optuna.samplers.NSGAIISampler(seed=seed),
    }
    return samplers[search.sampler]()


def sample_config(trial: optuna.Trial, plan: Plan, sites: list) -> TrialConfig:
    """Sample a whole trial configuration: variant and its parameters, then allocation and base bits."""
    from autopeft.allocation import sample_allocation
    from autopeft.trial import TrialConfig

    search = plan.spec.search
    # With an outer allocation, each module's rank and placement come from it, not from the variant.
    skip = {"r", "target_modules"} if search.allocation is not None else set()
    variant, params = sample(trial, plan.spaces, skip=skip)
    ranks, bits = sample_allocation(trial, search.allocation, sites) if search.allocation is not None else (None, {})
    base_bits = trial.suggest_categorical("base_bits", search.base_bits) if len(search.base_bits) > 1 else search.base_bits[0]
    return TrialConfig(variant, params, ranks, bits, base_bits)


WORKER = {"host": socket.gethostname()}


def configured(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial's configuration was wholly sampled (and so it may have trained): the driver records
    ``config`` only then. A process killed between two parameters leaves some of them sampled, and no ``config``."""
    return "config" in trial.user_attrs


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue an interrupted trial's configuration to run again, first (its deaths so far travel with it)."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "deaths": trial.user_attrs.get("deaths", 0)})


def requeue_dead(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose process died (now FAIL without a reason): run it again, unless its configuration has now
    killed a process :data:`MAX_DEATHS` times; then record it failed with that reason (a trial that counts).

    A trial whose process died before its configuration was wholly sampled (:func:`configured`) ran nothing: it is
    not queued (a queued partial configuration would be completed by a fresh sample and labelled as its retry); it
    stays an uncounted interrupted trial, and the search samples another in its place."""
    import optuna

    if not configured(trial):
        return
    deaths = trial.user_attrs.get("deaths", 0) + 1
    if deaths < MAX_DEATHS:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "deaths": deaths})
        return
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={
                **{k: v for k, v in trial.user_attrs.items() if k in ("variant", "config", "seed", "worker")},
                "retry_of": trial.number,
                "deaths": deaths,
                "failure_reason": f"the process died {deaths} times while running this configuration "
                "(killed, out of memory, or the variant exited); it is not run again",
            },
        )
    )


WARM_START_TRIALS = 3
"""Configurations a fresh search takes from the run named by ``search.warm_start``."""


def warm_start_configs(run_path: Path, plan: Plan, spec_path: Path | None) -> list[dict[str, Any]]:
    """The best complete trials of the earlier run at ``run_path`` whose variant this search has, as stored
    parameters of this search's space (best first; at most :data:`WARM_START_TRIALS`)."""
    import optuna

    from autopeft.errors import SpecError
    from autopeft.rundir import read_study
    from autopeft.space import carry_over

    run = RunDir(run_path)
    if not run.has_study():
        raise SpecError(str(spec_path), "search.warm_start", str(run_path), "a run folder of an earlier search (its output.dir, holding study.db)")
    study = read_study(run)  # read only: the earlier run is not changed
    directions = study.directions
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("config", {}).get("variant") in plan.spaces]
    maximize = directions[0] == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: t.values[0], reverse=maximize)
    return [carry_over(t.params, t.user_attrs["config"]["variant"], plan.spaces) for t in complete[:WARM_START_TRIALS]]


BUDGET_TRIAL_CAP = 10_000
"""Trials a search with a ``budget`` may start when the spec sets no ``n_trials``."""


class Driver:
    """Owns a run's study. Use as a context manager: entering locks the run folder and opens the study."""

    def __init__(
        self,
        plan: Plan,
        console: Console,
        n_trials: int | None = None,
        timeout: float | None = None,
        constant_liar: bool = False,
        storage: optuna.storages.BaseStorage | None = None,
        storage_url: str | None = None,
    ) -> None:
        """``storage`` (opened from ``storage_url``): a study shared with other workers
        (:mod:`autopeft.orchestrators.worker`). Without it the study is ``RUN_DIR/study.db`` and this driver is its
        only writer, under the run-folder lock."""
        self.plan = plan
        self.spec = plan.spec
        self.console = console
        search = self.spec.search
        self.step_budget = search.budget_steps
        # With a budget, the trial count is only a cap when the spec sets one.
        uncapped = search.budget is not None and "n_trials" not in search.model_fields_set
        self.n_trials = n_trials or (BUDGET_TRIAL_CAP if uncapped else search.n_trials)
        self.timeout = timeout or min((t for t in (search.timeout, search.budget_seconds) if t is not None), default=None)
        self.constant_liar = constant_liar
        self.shared_storage = storage
        self.run_dir = RunDir(self.spec.run_dir, storage=storage_url)
        self.lock = RunLock(self.run_dir.path) if storage is None else None
        self.study: optuna.Study | None = None
        self.opened = time.monotonic()
        self.data_checked = False
        self.duplicates_in_a_row = 0
        self.on_ask: Callable[[int], None] | None = None
        """Called with each new trial's id as soon as it is asked (workers record a first heartbeat there)."""

    # -- opening and closing -----------------------------------------------------------------------------------

    def __enter__(self) -> Driver:
        try:
            if self.lock is not None:
                self.lock.acquire()
            self.run_dir.start(self.spec)
            self.study = self._open_study()
            check_spec(self.study, self.spec)
            check_space(self.study, self.plan)
            # Read by `autopeft status` and the report; written once the study is known to be this spec's.
            self.study.set_user_attr("objectives", [{"name": n, "direction": d} for n, d in self.spec.objectives()])
            self._queue_work()
        except BaseException as error:
            self._release()
            if not isinstance(error, OutOfSpace) and is_out_of_space(error):
                raise OutOfSpace(self.run_dir.path, error) from error
            raise
        self.opened = time.monotonic()
        return self

    def __exit__(self, kind: Any, error: BaseException | None, trace: Any) -> None:
        try:
            if self.study is not None:
                write_trials_csv(self.study, self.run_dir.trials_csv)
        except Exception as failure:
            # With an error already on its way out, that error is the one to report.
            if error is None:
                error = failure
        finally:
            self._release()
        # A full disk can strike anywhere (SQLite, an adapter, trials.csv): it always ends as one clear stop.
        if error is not None and not isinstance(error, OutOfSpace) and is_out_of_space(error):
            raise OutOfSpace(self.run_dir.path, error) from error
        if error is not None and kind is None:
            raise error

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _open_study(self) -> optuna.Study:
        import os
        import zlib

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        objectives = self.spec.objectives()
        study = optuna.create_study(
            study_name="autopeft",
            storage=self.shared_storage or self.run_dir.storage_url,
            pruner=optuna_pruner(self.spec.search.pruner, self.spec.training.eval_every) if len(objectives) == 1 else None,
            directions=[direction for _, direction in objectives],
            load_if_exists=True,
        )
        # Seeded by the study's length (and, for a shared study, by who this worker is): a resumed search
        # continues the sequence instead of replaying it, and two workers do not draw the same sequence.
        offset = len(study.get_trials(deepcopy=False))
        if self.shared_storage is not None:
            offset += zlib.crc32(f"{WORKER['host']}:{os.getpid()}".encode())
        study.sampler = make_sampler(self.spec, offset=offset, constant_liar=self.constant_liar)
        return study

    def _queue_work(self) -> None:
        """Queue interrupted configurations again (first), and each variant's defaults in a fresh search."""
        import optuna

        study = self.study
        trials = study.get_trials(deepcopy=False)
        if self.shared_storage is None:
            retried = {t.user_attrs.get("retry_of") for t in trials}
            for trial in trials:
                if trial.state == optuna.trial.TrialState.RUNNING:
                    # Left behind by a process that died: the lock guarantees no live process is running it.
                    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
                    requeue_dead(study, trial)
                elif interrupted(trial) and trial.number not in retried and configured(trial):
                    requeue(study, trial)
        # (Shared studies: workers detect dead trials by heartbeat, and re-queue interrupted ones as they stop.)
        if not trials and self.spec.search.warm_start:
            for params in warm_start_configs(self.spec.resolve_path(self.spec.search.warm_start), self.plan, self.spec.path):
                study.enqueue_trial(params, user_attrs={"warm_start": True}, skip_if_exists=True)
        baseline = self.spec.search.baseline
        if not trials and baseline:
            for variant, space in self.plan.spaces.items():
                if isinstance(baseline, list) and variant not in baseline:
                    continue
                params = defaults(variant, space)
                if len(self.plan.spaces) > 1:
                    params["variant"] = variant
                study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=True)

    # -- the loop ------------------------------------------------------------------------------------------------

    def finished(self) -> int:
        return finished_trials(self.study)

    def wants_more(self, running: int = 0) -> bool:
        """Whether another trial should start (``running`` trials already under way count as finishing, and as
        using all their steps)."""
        return not self.timed_out() and not self.budget_spent(running) and self.finished() + running < self.n_trials

    @property
    def trials_to_show(self) -> int | None:
        """The trial count progress displays show as the total: None when a budget, not a count, ends the search."""
        return None if self.n_trials == BUDGET_TRIAL_CAP else self.n_trials

    def steps_used(self) -> int:
        """Training steps the finished trials used (a pruned trial counts the steps it ran)."""
        return sum(int(t.user_attrs.get("steps") or 0) for t in self.study.get_trials(deepcopy=False) if t.state.is_finished())

    def budget_spent(self, running: int = 0) -> bool:
        """Whether one more full trial (after ``running`` ones) would go past ``search.budget`` in steps."""
        if self.step_budget is None:
            return False
        return self.steps_used() + (running + 1) * self.spec.training.max_steps > self.step_budget

    def stop_reason(self) -> str:
        """Why no further trial starts, in words for the log."""
        if self.timed_out():
            return f"the time limit of {self.timeout:.0f}s is reached; no new trial is started"
        if self.budget_spent():
            return f"the budget of {self.step_budget} steps is spent ({self.steps_used()} used; a trial takes up to {self.spec.training.max_steps})"
        return f"{self.finished()} of {self.n_trials} trials finished"

    def timed_out(self) -> bool:
        return self.timeout is not None and time.monotonic() - self.opened > self.timeout

    def check_data(self, fingerprint: dict[str, Any]) -> None:
        """Refuse to continue a study whose prepared data differs from this run's (checked once).

        ``fingerprint`` is :func:`autopeft.fingerprint.data_fingerprint` of the data a worker prepared."""
        if not self.data_checked:
            check_data(self.study, self.run_dir, fingerprint)
            self.data_checked = True

    def ask(self, sites: list) -> Ticket | None:
        """The next trial to run; None when the sampler proposed a configuration already run (skipped, not
        counted). A ticket without a config is a trial whose sampling failed: it is already recorded failed.

        Raises :class:`SpaceExhausted` when every proposal for a long while was a configuration already run.
        """
        import os

        import optuna

        trial = self.study.ask()
        if self.on_ask is not None:
            self.on_ask(trial._trial_id)
        try:
            config = sample_config(trial, self.plan, sites)
        except Exception as exc:
            # A sampler or a parameter that cannot produce a value is this configuration's failure, not a crash.
            reason = f"sampling failed: {type(exc).__name__}: {exc}"
            self._fail(trial, reason, traceback.format_exc())
            return Ticket(trial, None, 0, False, failure=f"[red]failed[/]: {reason}")
        duplicate = self._duplicate_of(trial)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.duplicates_in_a_row += 1
            if self.duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                raise SpaceExhausted(f"the last {self.duplicates_in_a_row} configurations proposed had all been run already")
            return None
        self.duplicates_in_a_row = 0
        seed = self.spec.search.seed + trial.number
        trial.set_user_attr("worker", {**WORKER, "pid": os.getpid()})
        trial.set_user_attr("variant", config.variant)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("config", config.to_json())
        size_known = not self.plan.registry.variant(config.variant).size_decided_in_training
        return Ticket(trial, config, seed, size_known)

    def _duplicate_of(self, trial: optuna.Trial) -> int | None:
        """The number of a finished (or running) trial with exactly this configuration, if any.

        A retry of an interrupted trial is not a duplicate: its first run did not finish.
        """
        import optuna

        if "retry_of" in trial.user_attrs:
            return None
        params = trial.params
        for other in self.study.get_trials(deepcopy=False):
            if other.number == trial.number or other.params != params or "duplicate_of" in other.user_attrs:
                continue
            # Of two trials running the same configuration at once (workers), the earlier one is the original.
            running_earlier = other.state == optuna.trial.TrialState.RUNNING and other.number < trial.number
            if running_earlier or (other.state.is_finished() and not interrupted(other)):
                return other.number
        return None

    # -- what executors report ----------------------------------------------------------------------------------

    def judge_attach(self, ticket: Ticket, costs: dict[str, float]) -> str | None:
        """Why the trial should stop now that its adapter is attached (a size constraint broken), or None."""
        ticket.costs = dict(costs)
        broken = violations(self.spec, costs) if ticket.size_known_at_attach else []
        return "violates " + "; ".join(broken) if broken else None

    def judge_rung(self, ticket: Ticket, step: int, metrics: dict[str, float], elapsed: float | None = None) -> str | None:
        """Record an evaluation at ``step``; return why the trial should stop there (early stopping), or None."""
        spec = self.spec
        ticket.metrics, ticket.step = metrics, step
        elapsed = time.perf_counter() - ticket.started if elapsed is None else elapsed
        ticket.costs["train_seconds"] = elapsed * spec.training.max_steps / step  # extrapolated to the full run
        if len(spec.objectives()) == 1:
            ticket.trial.report(metrics[spec.metric], step)
            return f"pruned at step {step}" if ticket.trial.should_prune() else None
        point = rung_point(spec, metrics, ticket.costs)
        ticket.rungs[str(step)] = point
        ticket.trial.set_user_attr("rungs", ticket.rungs)
        if spec.search.pruner.type == "pareto" and step < spec.training.max_steps and pareto_should_prune(self.study, spec, ticket.number, step, point):
            return f"dominated at step {step}"
        return None

    def complete(self, ticket: Ticket, outcome: TrialOutcome) -> str:
        """Record a finished trial; returns the line to show."""
        values = self._record(ticket.trial, outcome.metrics, outcome.costs, outcome.steps)
        self.study.tell(ticket.trial, objective_values(self.spec, outcome.metrics, outcome.costs))
        text = f"finished in {outcome.costs['train_seconds']:.0f}s: validation {describe_values(self.spec, values)}"
        return text + ("" if feasible(self.spec, values) else " [yellow](violates a constraint)[/]")

    def pruned(self, ticket: Ticket, reason: str) -> str:
        import optuna

        self._record(ticket.trial, ticket.metrics, ticket.costs, ticket.step)
        ticket.trial.set_user_attr("pruned_reason", reason)
        self.study.tell(ticket.trial, state=optuna.trial.TrialState.PRUNED)
        return f"[yellow]pruned[/]: {reason}"

    def failed(self, ticket: Ticket, reason: str, details: str = "") -> str:
        self._fail(ticket.trial, reason, f"{ticket.config.variant} {describe_params(ticket.trial.params)}\n\n{details}")
        return f"[red]failed[/]: {reason}"

    def interrupted(self, ticket: Ticket, why: str = "interrupted") -> None:
        """The trial did not finish for a reason outside its configuration: it is run again on resume."""
        import optuna

        ticket.trial.set_user_attr("interrupted", why)
        self.study.tell(ticket.trial, state=optuna.trial.TrialState.FAIL)
        requeue(self.study, self.study._storage.get_trial(ticket.trial._trial_id))

    def settle(self, ticket: Ticket, error: BaseException) -> str:
        """Record a trial that raised ``error``: pruned, out of space (raised again as a stop) or failed."""
        import optuna

        if isinstance(error, optuna.TrialPruned):
            return self.pruned(ticket, str(error))
        if is_out_of_space(error):
            self.interrupted(ticket, "out of disk space")
            raise OutOfSpace(self.run_dir.path, error) from error
        reason = error.reason if isinstance(error, TrialFailed) else f"{type(error).__name__}: {error}"
        return self.failed(ticket, reason, "".join(traceback.format_exception(error)))

    def _fail(self, trial: optuna.Trial, reason: str, details: str) -> None:
        import optuna

        self.run_dir.write_log(trial.number, details)
        trial.set_user_attr("failure_reason", reason)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def _record(self, trial: optuna.Trial, metrics: dict[str, float], costs: dict[str, float], steps: int) -> dict[str, float]:
        """Store what a trial measured (also for pruned trials: their partial result stays in the study)."""
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("costs", costs)
        trial.set_user_attr("trainable_params", costs.get("trainable_params"))
        trial.set_user_attr("steps", steps)
        values = {**costs, **metrics}
        for text, value in constraint_values(self.spec, values).items():
            trial.set_constraint(text, value)  # what the sampler reads; <= 0 is feasible
        return values

    def after_trial(self) -> None:
        """Keep only adapters that may still be exported, and rewrite ``trials.csv``."""
        self.run_dir.keep_adapters(self.keep())
        write_trials_csv(self.study, self.run_dir.trials_csv)

    def keep(self) -> set[int]:
        """Trials whose adapters stay in ``RUN_DIR/adapters`` (``output.keep``): at least those that may still
        become ``best/`` or part of ``pareto/``."""
        import optuna

        spec, study = self.spec, self.study
        # Trials still running (in other workers sharing the output folder) are writing their adapters.
        keep = {select_best(study, spec)} | {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))}
        if len(spec.objectives()) > 1:
            keep |= set(pareto_front(study, spec))
        if spec.output.keep == "front":
            keep |= set(size_front(study, spec))
        elif spec.output.keep == "all":
            keep |= {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
        return {n for n in keep if n is not None}

    def best_text(self) -> str:
        best = select_best(self.study, self.spec)
        if best is None:
            return ""
        metrics = self.study.get_trials(deepcopy=False)[best].user_attrs["metrics"]
        return f"best: trial {best}, {self.spec.metric} {metrics[self.spec.metric]:.4f}"

    # -- the end -----------------------------------------------------------------------------------------------

    def finish(
        self,
        workbench: Workbench | None,
        stopped_by_user: bool = False,
        workbench_factory: Callable[[], Workbench] | None = None,
        export: bool = True,
    ) -> SearchResult:
        """Select ``best/`` (and the front), export them (unless ``export`` is False: a worker that is not the
        last one out), write the report, print the summary."""
        from autopeft.progress import best_trials_table

        study, spec, run_dir, console = self.study, self.spec, self.run_dir, self.console
        write_trials_csv(study, run_dir.trials_csv)
        best = select_best(study, spec)
        front = pareto_front(study, spec) if len(spec.objectives()) > 1 else []
        if stopped_by_user:
            self._write_report()
            console.print(
                f"[yellow]Interrupted.[/] {self.finished()} finished trials are kept in {run_dir.study_db}; "
                "run the same command again to resume."
            )
            return SearchResult(run_dir, self.finished(), best, front, interrupted=True)
        if best is None:
            self._write_report()
            console.print(f"[red]No trial finished successfully{' within the constraints' if spec.search.constraints else ''}.[/] {self._failure_summary()}")
            return SearchResult(run_dir, self.finished(), None, front)
        if not export:
            console.print(
                f"The study's best is trial {best}, which another worker ran: that worker exports best/ into its "
                f"--output folder. Here: autopeft export {run_dir.path} --storage URL --trial {best} --out DIR"
            )
            return SearchResult(run_dir, self.finished(), best, front)
        self.export(workbench, best, front, workbench_factory)
        self._write_report()
        console.print(best_trials_table(study, spec))
        console.print(f"Best adapter (trial {best}): {run_dir.best}" + (f"; Pareto front ({len(front)} trials): {run_dir.path / 'pareto'}" if front else ""))
        return SearchResult(run_dir, self.finished(), best, front)

    def _failure_summary(self) -> str:
        """Why trials did not finish: the most common failure reasons, so the user knows what to fix."""
        from collections import Counter

        reasons = Counter(t.user_attrs.get("failure_reason") or t.user_attrs.get("pruned_reason") for t in self.study.get_trials(deepcopy=False))
        reasons.pop(None, None)
        if not reasons:
            return "Reasons are in trials.csv and logs/."
        top = "; ".join(f"{count} x {reason[:200]}" for reason, count in reasons.most_common(3))
        return f"Reasons: {top}. Details in {self.run_dir.trials_csv} and {self.run_dir.path / 'logs'}."

    def _write_report(self) -> None:
        """Write report.html; a problem drawing it is shown but never fails a finished search."""
        from autopeft.report import write_report

        try:
            self.console.log(f"report: {write_report(self.run_dir)}")
        except Exception as exc:
            if is_out_of_space(exc):
                raise OutOfSpace(self.run_dir.path, exc) from exc
            self.console.print(f"[yellow]The report could not be written[/] ({type(exc).__name__}: {exc}); try: autopeft report {self.run_dir.path}")

    def export(self, workbench: Workbench | None, best: int, front: list[int], workbench_factory: Callable[[], Workbench] | None = None) -> None:
        """Export ``best/`` and, for several objectives, every front trial to ``pareto/trial-N`` (skipping up-to-date ones)."""
        import json

        from autopeft.export import export_trial
        from autopeft.trial import Workbench

        run_dir = self.run_dir

        def exported(folder, number: int) -> bool:
            info = folder / "autopeft.json"
            try:
                return info.is_file() and json.loads(info.read_text()).get("trial") == number
            except (OSError, ValueError):
                return False

        todo = [(run_dir.best, best)] + [(run_dir.path / "pareto" / f"trial-{n}", n) for n in front]
        todo = [(folder, n) for folder, n in todo if not exported(folder, n)]
        if front:
            run_dir.prune_pareto(set(front))
        if not todo:
            return
        if workbench is None:
            workbench = workbench_factory() if workbench_factory else Workbench(self.plan, self.console.log)
        for folder, number in todo:
            try:
                export_trial(self.study, self.plan, workbench, run_dir, number, folder)
            except Exception as exc:
                if is_out_of_space(exc):
                    raise OutOfSpace(run_dir.path, exc) from exc
                raise

