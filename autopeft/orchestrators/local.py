"""The embedded backend: an Optuna study in ``RUN_DIR/study.db`` (SQLite), trials run in this process.

Running the same spec again resumes: finished trials are kept and not repeated, and the search stops when the
study holds ``n_trials`` finished trials (complete, pruned or failed). A trial that was interrupted (Ctrl-C, a
killed process) is not counted; its configuration is queued to run again first.
"""

from __future__ import annotations

import shutil
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console

from autopeft.allocation import check_allocation, sample_allocation
from autopeft.errors import SpecErrors, TrialFailed
from autopeft.objectives import constraint_values, describe_values, feasible, objective_values, pareto_front, select_best, violations
from autopeft.plan import Plan
from autopeft.progress import SearchProgress, best_trials_table, describe_params
from autopeft.pruning import optuna_pruner, pareto_should_prune, rung_point
from autopeft.rundir import RunDir, finished_trials, interrupted, trial_rows, write_trials_csv
from autopeft.space import defaults, sample
from autopeft.spec import Spec
from autopeft.trial import StepListener

if TYPE_CHECKING:
    import optuna

    from autopeft.trial import TrialConfig, Workbench


@dataclass
class SearchResult:
    run_dir: RunDir
    finished: int
    best_trial: int | None
    front: list[int] = field(default_factory=list)
    interrupted: bool = False


def make_sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``search.sampler``, seeded. TPE and NSGA-II read each trial's constraint values
    (``Trial.set_constraint``) and steer away from infeasible regions."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    search = spec.search
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=search.seed, multivariate=True, group=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=search.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=search.seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=search.seed, warn_independent_sampling=False),
        "nsgaii": lambda: optuna.samplers.NSGAIISampler(seed=search.seed),
    }
    return samplers[search.sampler]()


def create_study(run_dir: RunDir, spec: Spec) -> optuna.Study:
    """Create or load the run's study with the spec's objectives, sampler and pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objectives = spec.objectives()
    study = optuna.create_study(
        study_name="autopeft",
        storage=run_dir.storage_url,
        sampler=make_sampler(spec),
        pruner=optuna_pruner(spec.search.pruner) if len(objectives) == 1 else None,
        directions=[direction for _, direction in objectives],
        load_if_exists=True,
    )
    study.set_user_attr("objectives", [{"name": name, "direction": direction} for name, direction in objectives])
    return study


def _queue_work(study: optuna.Study, plan: Plan) -> None:
    """Queue interrupted configurations again, and each variant's defaults at the start of a fresh search."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if trial.state == optuna.trial.TrialState.RUNNING:
            # Left behind by a killed process (a single local worker owns this study).
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if interrupted(trial) and trial.number not in retried and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    if not trials and plan.spec.search.baseline:
        for variant, space in plan.spaces.items():
            params = defaults(variant, space)
            if len(plan.spaces) > 1:
                params["variant"] = variant
            study.enqueue_trial(params, user_attrs={"baseline": True})


def sample_config(trial: optuna.Trial, plan: Plan, sites: list) -> TrialConfig:
    """Sample a whole trial configuration: variant and its parameters, then allocation and base bits."""
    from autopeft.trial import TrialConfig

    search = plan.spec.search
    # With an outer allocation, each module's rank and placement come from it, not from the variant.
    skip = {"r", "target_modules"} if search.allocation is not None else set()
    variant, params = sample(trial, plan.spaces, skip=skip)
    ranks, bits = sample_allocation(trial, search.allocation, sites) if search.allocation is not None else (None, {})
    base_bits = trial.suggest_categorical("base_bits", search.base_bits) if len(search.base_bits) > 1 else search.base_bits[0]
    return TrialConfig(variant, params, ranks, bits, base_bits)


class TrialMonitor(StepListener):
    """Follows one running trial: progress on screen, intermediate results in the study, early stopping."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, spec: Spec, progress: SearchProgress, size_known_at_attach: bool = True) -> None:
        self.study, self.trial, self.spec, self.progress = study, trial, spec, progress
        self.size_known_at_attach = size_known_at_attach
        self.metrics: dict[str, float] = {}
        self.costs: dict[str, float] = {}
        self.step = 0
        self.started = time.perf_counter()
        self.rungs: dict[str, list[float]] = {}

    def on_attach(self, costs: dict[str, float]) -> None:
        import optuna

        # Size costs are known before any training: a configuration that breaks a constraint stops here.
        self.costs = dict(costs)
        broken = violations(self.spec, costs) if self.size_known_at_attach else []
        if broken:
            raise optuna.TrialPruned("violates " + "; ".join(broken))

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.step = step
        self.progress.on_step(step, total, loss)

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        import optuna

        self.metrics = metrics
        self.progress.on_evaluate(step, metrics)
        elapsed = time.perf_counter() - self.started
        self.costs["train_seconds"] = elapsed * self.spec.training.max_steps / step  # extrapolated to the full run
        if len(self.spec.objectives()) == 1:
            self.trial.report(metrics[self.spec.metric], step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")
            return
        point = rung_point(self.spec, metrics, self.costs)
        self.rungs[str(step)] = point
        self.trial.set_user_attr("rungs", self.rungs)
        if self.spec.search.pruner.type == "pareto" and step < self.spec.training.max_steps and pareto_should_prune(self.study, self.spec, self.trial.number, step, point):
            raise optuna.TrialPruned(f"dominated at step {step}")


def run_search(plan: Plan, console: Console, n_trials: int | None = None, timeout: float | None = None) -> SearchResult:
    """Run (or resume) the search of ``plan`` in its run folder, then export ``best/`` (and ``pareto/``)."""
    from autopeft.trial import Workbench

    spec = plan.spec
    n_trials = n_trials or spec.search.n_trials
    timeout = timeout or spec.search.timeout
    run_dir = RunDir(spec.run_dir)
    run_dir.start(spec)
    study = create_study(run_dir, spec)
    _queue_work(study, plan)
    started = time.monotonic()
    workbench: Workbench | None = None
    stopped_by_user = False
    already = finished_trials(study)
    if already:
        console.log(f"resuming {run_dir.path}: {already} of {n_trials} trials already finished")

    with SearchProgress(console, n_trials, already, spec.metric) as progress:
        try:
            while finished_trials(study) < n_trials:
                if timeout is not None and time.monotonic() - started > timeout:
                    console.log(f"timeout of {timeout:.0f}s reached; no new trial is started")
                    break
                if workbench is None:
                    workbench = Workbench(plan, progress.message)
                    if spec.search.allocation is not None:
                        errors = check_allocation(spec.search.allocation, workbench.sites, str(spec.path))
                        if errors:
                            raise SpecErrors(errors)
                _run_one(study, plan, workbench, run_dir, progress)
        except KeyboardInterrupt:
            stopped_by_user = True
        finally:
            write_trials_csv(study, run_dir.trials_csv)

    best = select_best(study, spec)
    front = pareto_front(study, spec) if len(spec.objectives()) > 1 else []
    if stopped_by_user:
        _write_report(run_dir, console)
        console.print(
            f"[yellow]Interrupted.[/] {finished_trials(study)} finished trials are kept in {run_dir.study_db}; "
            "run the same command again to resume."
        )
        return SearchResult(run_dir, finished_trials(study), best, front, interrupted=True)
    if best is None:
        _write_report(run_dir, console)
        console.print("[red]No trial finished within the constraints.[/] Reasons are in trials.csv and logs/.")
        return SearchResult(run_dir, finished_trials(study), None, front)
    export_results(study, plan, workbench, run_dir, best, front, console)
    _write_report(run_dir, console)
    console.print(best_trials_table(study, spec))
    console.print(f"Best adapter (trial {best}): {run_dir.best}" + (f"; Pareto front ({len(front)} trials): {run_dir.path / 'pareto'}" if front else ""))
    return SearchResult(run_dir, finished_trials(study), best, front)


def _write_report(run_dir: RunDir, console: Console) -> None:
    """Write report.html; a problem drawing it is shown but never fails a finished search."""
    from autopeft.report import write_report

    try:
        console.log(f"report: {write_report(run_dir)}")
    except Exception as exc:
        console.print(f"[yellow]The report could not be written[/] ({type(exc).__name__}: {exc}); try: autopeft report {run_dir.path}")


def _run_one(study: optuna.Study, plan: Plan, workbench: Workbench, run_dir: RunDir, progress: SearchProgress) -> None:
    import optuna

    spec = plan.spec
    trial = study.ask()
    config = sample_config(trial, plan, workbench.sites)
    seed = spec.search.seed + trial.number
    trial.set_user_attr("variant", config.variant)
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("config", config.to_json())
    progress.start_trial(trial.number, config.variant, trial.params)
    size_known = not plan.registry.variant(config.variant).size_decided_in_training
    monitor = TrialMonitor(study, trial, spec, progress, size_known_at_attach=size_known)
    try:
        outcome = workbench.run_trial(config, seed, listener=monitor, save_to=run_dir.adapter(trial.number))
    except KeyboardInterrupt:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except optuna.TrialPruned as pruned:
        _record(trial, spec, monitor.metrics, monitor.costs, monitor.step)
        trial.set_user_attr("pruned_reason", str(pruned))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        progress.end_trial(trial.number, f"[yellow]pruned[/]: {pruned}", _best_text(study, spec))
    except Exception as exc:
        reason = exc.reason if isinstance(exc, TrialFailed) else f"{type(exc).__name__}: {exc}"
        run_dir.log(trial.number).parent.mkdir(parents=True, exist_ok=True)
        run_dir.log(trial.number).write_text(f"{config.variant} {describe_params(trial.params)}\n\n{traceback.format_exc()}")
        trial.set_user_attr("failure_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        progress.end_trial(trial.number, f"[red]failed[/]: {reason}", _best_text(study, spec))
    else:
        values = _record(trial, spec, outcome.metrics, outcome.costs, outcome.steps)
        study.tell(trial, objective_values(spec, outcome.metrics, outcome.costs))
        text = f"finished in {outcome.costs['train_seconds']:.0f}s: validation {describe_values(spec, values)}"
        progress.end_trial(trial.number, text + ("" if feasible(spec, values) else " [yellow](violates a constraint)[/]"), _best_text(study, spec))
    keep = set(pareto_front(study, spec)) | {select_best(study, spec)} if len(spec.objectives()) > 1 else {select_best(study, spec)}
    run_dir.keep_adapters({n for n in keep if n is not None})
    write_trials_csv(study, run_dir.trials_csv)


def _record(trial: optuna.Trial, spec: Spec, metrics: dict[str, float], costs: dict[str, float], steps: int) -> dict[str, float]:
    """Store what a trial measured (also for pruned trials: their partial result stays in the study)."""
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("costs", costs)
    trial.set_user_attr("trainable_params", costs.get("trainable_params"))
    trial.set_user_attr("steps", steps)
    values = {**costs, **metrics}
    for text, value in constraint_values(spec, values).items():
        trial.set_constraint(text, value)  # what the sampler reads; <= 0 is feasible
    return values


def _best_text(study: optuna.Study, spec: Spec) -> str:
    best = select_best(study, spec)
    if best is None:
        return ""
    metrics = study.trials[best].user_attrs["metrics"]
    return f"best: trial {best}, {spec.metric} {metrics[spec.metric]:.4f}"


def export_results(study: optuna.Study, plan: Plan, workbench: Workbench | None, run_dir: RunDir, best: int, front: list[int], console: Console) -> None:
    """Export ``best/`` and, for several objectives, every front trial to ``pareto/trial-N`` (skipping up-to-date ones)."""
    import json

    from autopeft.export import export_trial
    from autopeft.trial import Workbench

    def exported(folder, number: int) -> bool:
        info = folder / "autopeft.json"
        return info.is_file() and json.loads(info.read_text()).get("trial") == number

    todo = [(run_dir.best, best)] + [(run_dir.path / "pareto" / f"trial-{n}", n) for n in front]
    todo = [(folder, n) for folder, n in todo if not exported(folder, n)]
    if front:
        pareto = run_dir.path / "pareto"
        if pareto.is_dir():
            for stale in pareto.iterdir():
                if stale.name not in {f"trial-{n}" for n in front}:
                    shutil.rmtree(stale, ignore_errors=True)
    if not todo:
        return
    workbench = workbench or Workbench(plan, console.log)
    for folder, number in todo:
        export_trial(study, plan, workbench, run_dir, number, folder)
