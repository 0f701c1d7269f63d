"""The embedded backend: an Optuna study in ``RUN_DIR/study.db`` (SQLite), trials run in this process.

Running the same spec again resumes: finished trials are kept and not repeated, and the search stops when the
study holds ``n_trials`` finished trials (complete, pruned or failed). A trial that was interrupted (Ctrl-C, a
killed process) is not counted; its configuration is queued to run again first.
"""

from __future__ import annotations

import time
import warnings
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console

from autopeft.errors import TrialFailed
from autopeft.plan import Plan
from autopeft.progress import SearchProgress, best_trials_table, describe_params
from autopeft.rundir import RunDir, best_number, finished_trials, interrupted, open_study, trial_rows, write_trials_csv
from autopeft.allocation import check_allocation, sample_allocation
from autopeft.errors import SpecErrors
from autopeft.space import defaults, sample
from autopeft.spec import SearchSpec

if TYPE_CHECKING:
    import optuna

    from autopeft.trial import TrialConfig, Workbench


@dataclass
class SearchResult:
    run_dir: RunDir
    finished: int
    best_trial: int | None
    interrupted: bool = False


def make_sampler(search: SearchSpec) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``search.sampler``, seeded."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=search.seed, multivariate=True, group=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=search.seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=search.seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=search.seed, warn_independent_sampling=False),
        "nsgaii": lambda: optuna.samplers.NSGAIISampler(seed=search.seed),
    }
    return samplers[search.sampler]()


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


def _outcome_text(metric: str, metrics: dict[str, float], seconds: float) -> str:
    return f"finished in {seconds:.0f}s: validation {metric} {metrics[metric]:.4f}"


def run_search(plan: Plan, console: Console, n_trials: int | None = None, timeout: float | None = None) -> SearchResult:
    """Run (or resume) the search of ``plan`` in its run folder, then export the best adapter to ``best/``."""
    from autopeft.export import export_trial
    from autopeft.trial import Workbench

    spec = plan.spec
    n_trials = n_trials or spec.search.n_trials
    timeout = timeout or spec.search.timeout
    run_dir = RunDir(spec.run_dir)
    run_dir.start(spec)
    study = open_study(run_dir, spec.direction, make_sampler(spec.search))
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

    best = best_number(study)
    if stopped_by_user:
        console.print(
            f"[yellow]Interrupted.[/] {finished_trials(study)} finished trials are kept in {run_dir.study_db}; "
            "run the same command again to resume."
        )
        return SearchResult(run_dir, finished_trials(study), best, interrupted=True)

    rows = trial_rows(study)
    if best is None:
        console.print("[red]No trial finished successfully.[/] Reasons are in trials.csv and logs/.")
        return SearchResult(run_dir, finished_trials(study), None)
    if not _best_is_exported(run_dir, best):
        workbench = workbench or Workbench(plan, console.log)
        export_trial(study, plan, workbench, run_dir, best, run_dir.best)
    console.print(best_trials_table(rows, spec.metric, spec.direction))
    console.print(f"Best adapter (trial {best}): {run_dir.best}")
    return SearchResult(run_dir, finished_trials(study), best)


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
    save_to = run_dir.adapter(trial.number)
    try:
        outcome = workbench.run_trial(config, seed, listener=progress, save_to=save_to)
    except KeyboardInterrupt:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    except Exception as exc:
        reason = exc.reason if isinstance(exc, TrialFailed) else f"{type(exc).__name__}: {exc}"
        run_dir.log(trial.number).parent.mkdir(parents=True, exist_ok=True)
        run_dir.log(trial.number).write_text(f"{config.variant} {describe_params(trial.params)}\n\n{traceback.format_exc()}")
        trial.set_user_attr("failure_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        progress.end_trial(trial.number, f"[red]failed[/]: {reason}", _best_text(study, spec.metric))
    else:
        trial.set_user_attr("metrics", outcome.metrics)
        trial.set_user_attr("costs", outcome.costs)
        trial.set_user_attr("trainable_params", outcome.costs["trainable_params"])
        trial.set_user_attr("steps", outcome.steps)
        study.tell(trial, outcome.metrics[spec.metric])
        progress.end_trial(trial.number, _outcome_text(spec.metric, outcome.metrics, outcome.costs["train_seconds"]), _best_text(study, spec.metric))
    run_dir.keep_adapters({n for n in [best_number(study)] if n is not None})
    write_trials_csv(study, run_dir.trials_csv)


def _best_text(study: optuna.Study, metric: str) -> str:
    best = best_number(study)
    return f"best: trial {best}, {metric} {study.best_value:.4f}" if best is not None else ""


def _best_is_exported(run_dir: RunDir, number: int) -> bool:
    import json

    info = run_dir.best / "autopeft.json"
    return info.is_file() and json.loads(info.read_text()).get("trial") == number
