"""Stopping weak trials early, for single- and multi-objective searches.

Single objective: Optuna's own pruners (median, successive halving, Hyperband) judge the validation metric that
each trial reports at every evaluation.

Several objectives: Optuna cannot prune those studies, so autopeft judges a trial at each rung (evaluation step)
by **non-dominated rank**. The trial's point at that rung is its intermediate metric together with its costs: the
static costs (trainable parameters, adapter bytes, bit operations) are known as soon as the adapter is attached,
and the time cost is extrapolated from the steps so far. The point is compared with the points every earlier
trial had at the same rung. The trial is pruned when that comparison puts it behind the Pareto front, that is
when some earlier trial was at least as good in every objective and better in one at the same point of training.
Trials on the front are never pruned, so the front survives. As with Optuna's pruners, no trial is pruned until
``startup_trials`` trials have finished, or before ``warmup_steps``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopeft.objectives import front_ranks
from autopeft.spec import PrunerSpec, Spec, TrainingSpec

if TYPE_CHECKING:
    import optuna

REDUCTION_FACTOR = 4
"""Successive halving keeps the best quarter at each rung, and each rung is four times the steps of the one before."""


def evaluation_steps(training: TrainingSpec, pruner: PrunerSpec) -> list[int]:
    """The steps at which a trial evaluates on the validation split: every ``training.eval_every`` steps and at
    the end. With successive halving, only at its rungs (``eval_every`` × 4^k) and at the end: it decides nothing
    between rungs, and each evaluation costs as much as several training steps."""
    last = training.max_steps
    every = training.eval_every or last
    if pruner.type == "successive-halving":
        rungs, rung = [], every
        while rung < last:
            rungs.append(rung)
            rung *= REDUCTION_FACTOR
        return rungs + [last]
    return sorted({*range(every, last + 1, every), last})


def optuna_pruner(pruner: PrunerSpec, first_rung: int | None = None) -> optuna.pruners.BasePruner:
    """Optuna's pruner for a single-objective study (a no-op pruner for ``none`` and ``pareto``).

    ``first_rung`` (``training.eval_every``): the step of the first evaluation, where successive halving holds its
    first rung (Optuna's own guess is a hundredth of the first trial's steps, before any evaluation happens)."""
    import optuna

    if pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.startup_trials, n_warmup_steps=pruner.warmup_steps)
    if pruner.type == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung or "auto", reduction_factor=REDUCTION_FACTOR, min_early_stopping_rate=0)
    if pruner.type == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def rung_point(spec: Spec, metrics: dict[str, float], costs: dict[str, float]) -> list[float]:
    values = {**costs, **metrics}
    return [float(values[name]) for name, _ in spec.objectives()]


def pareto_should_prune(study: optuna.Study, spec: Spec, trial_number: int, step: int, point: list[float]) -> bool:
    """Whether a trial whose objectives at rung ``step`` are ``point`` falls behind the front of earlier trials."""
    import optuna

    pruner = spec.search.pruner
    if step < pruner.warmup_steps:
        return False
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = study.get_trials(deepcopy=False, states=done)
    if sum(t.state == optuna.trial.TrialState.COMPLETE for t in finished) < pruner.startup_trials:
        return False
    others = [t.user_attrs["rungs"][str(step)] for t in finished if t.number != trial_number and str(step) in t.user_attrs.get("rungs", {})]
    if not others:
        return False
    ranks = front_ranks(others + [point], [d for _, d in spec.objectives()])
    return ranks[-1] > 0
