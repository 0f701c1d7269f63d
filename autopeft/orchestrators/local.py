"""The embedded backend: trials run one after another in this process, on a study in ``RUN_DIR/study.db``.

The study, sampling, recording, early stopping and export belong to :class:`~autopeft.orchestrators.driver.Driver`;
this module is only the executor: it builds the :class:`~autopeft.trial.Workbench` once (base model and tokenized
data, reused by every trial) and runs each asked trial in this process, passing what it sees to the driver.

Running the same spec again resumes: finished trials are kept and not repeated, and the search stops when the
study holds ``n_trials`` finished trials (complete, pruned or failed). A trial that was interrupted (Ctrl-C, a
killed process) is not counted; its configuration is queued to run again first.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable, ContextManager

from rich.console import Console

from autopeft.errors import SpecErrors
from autopeft.orchestrators.driver import Driver, SearchResult, SpaceExhausted, Ticket
from autopeft.plan import Plan
from autopeft.progress import SearchProgress
from autopeft.trial import StepListener

if TYPE_CHECKING:
    from autopeft.trial import Workbench


class TrialMonitor(StepListener):
    """Follows one running trial: progress on screen, and the driver's early-stopping decisions."""

    def __init__(self, driver: Driver, ticket: Ticket, progress: SearchProgress) -> None:
        self.driver, self.ticket, self.progress = driver, ticket, progress

    def on_attach(self, costs: dict[str, float]) -> None:
        import optuna

        # Size costs are known before any training: a configuration that breaks a constraint stops here.
        reason = self.driver.judge_attach(self.ticket, costs)
        if reason:
            raise optuna.TrialPruned(reason)

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.ticket.step = step
        self.progress.on_step(step, total, loss)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        import optuna

        self.progress.on_evaluate(step, metrics)
        reason = self.driver.judge_rung(self.ticket, step, metrics)
        if reason:
            raise optuna.TrialPruned(reason)


def load_workbench(plan: Plan, driver: Driver, message) -> Workbench:
    """Load the model and data once, check they match the study, and check the allocation fits the model."""
    from autopeft.allocation import check_allocation
    from autopeft.fingerprint import data_fingerprint
    from autopeft.trial import Workbench

    workbench = Workbench(plan, message)
    driver.check_data(data_fingerprint(workbench.data))
    allocation = plan.spec.search.allocation
    if allocation is not None:
        errors = check_allocation(allocation, workbench.sites, str(plan.spec.path))
        if errors:
            raise SpecErrors(errors)
    return workbench


def run_search(plan: Plan, console: Console, n_trials: int | None = None, timeout: float | None = None) -> SearchResult:
    """Run (or resume) the search of ``plan`` in its run folder, then export ``best/`` (and ``pareto/``)."""
    with Driver(plan, console, n_trials, timeout) as driver:
        workbench: Workbench | None = None
        stopped_by_user = False
        already = driver.finished()
        if already:
            done = f"{already} of {driver.n_trials} trials" if driver.trials_to_show else f"{already} trials ({driver.steps_used()} steps)"
            console.log(f"resuming {driver.run_dir.path}: {done} already finished")
        with SearchProgress(console, driver.trials_to_show, already, plan.spec.metric) as progress:
            try:
                while driver.finished() < driver.n_trials:
                    if not driver.wants_more():
                        console.log(f"stopping: {driver.stop_reason()}")
                        break
                    if workbench is None:
                        workbench = load_workbench(plan, driver, progress.message)
                    run_one(driver, workbench, progress)
            except KeyboardInterrupt:
                stopped_by_user = True
            except SpaceExhausted as exhausted:
                console.log(f"stopping: {exhausted}; widen search.space or lower n_trials")
        return driver.finish(workbench, stopped_by_user, workbench_factory=lambda: load_workbench(plan, driver, console.log))


def run_one(driver: Driver, workbench: Workbench, progress: SearchProgress, around_trial: Callable[[int], ContextManager] = lambda trial_id: nullcontext()) -> None:
    """Ask the driver for a trial, run it here, and hand the outcome back. ``around_trial(trial_id)`` wraps the
    run (workers beat a heartbeat there)."""
    ticket = driver.ask(workbench.sites)
    if ticket is None:
        return  # a configuration already run: skipped, not counted
    if ticket.config is None:
        progress.end_trial(ticket.number, ticket.failure, driver.best_text())
        return
    import optuna

    progress.start_trial(ticket.number, ticket.config.variant, ticket.trial.params)
    monitor = TrialMonitor(driver, ticket, progress)
    try:
        try:
            with around_trial(ticket.trial._trial_id):
                outcome = workbench.run_trial(ticket.config, ticket.seed, listener=monitor, save_to=driver.run_dir.adapter(ticket.number))
        except KeyboardInterrupt:
            driver.interrupted(ticket, "stopped with Ctrl-C")
            raise
        except Exception as error:
            line = driver.settle(ticket, error)
        except SystemExit as error:
            # A variant that calls sys.exit() fails its trial; it does not end the search.
            line = driver.failed(ticket, f"the variant called sys.exit({error.code!r})")
        else:
            line = driver.complete(ticket, outcome)
    except optuna.exceptions.UpdateFinishedTrialError:
        # A shared study: another worker took this trial as dead (its heartbeat was late) and runs it again.
        line = "[yellow]taken over by another worker[/] (its heartbeat was late); this result is dropped"
    progress.end_trial(ticket.number, line, driver.best_text())
    driver.after_trial()
