"""What a search optimises, what it must respect, and which trial becomes ``best/``.

Objectives are a task metric (first) and optionally costs (``trainable_params``, ``adapter_bytes``,
``bops_per_token``, ``peak_memory_mb``, ``train_seconds``). Constraints such as ``trainable_params <= 200000``
are recorded on each trial for Optuna's sampler (``Trial.set_constraint``), so it learns to propose feasible configurations instead of
only filtering afterwards. ``best/`` is chosen among feasible complete trials by ``search.select``:

- ``best-metric`` (default): the best task metric.
- ``smallest-within``: among trials whose metric is within ``tolerance`` of the best, the one with the smallest
  first cost objective (or fewest trainable parameters when no cost is an objective).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autopeft.costs import COST_NAMES
from autopeft.spec import METRICS, Spec

if TYPE_CHECKING:
    import optuna


def allowed_names(spec: Spec) -> list[str]:
    return list(METRICS[spec.model.task]) + list(COST_NAMES)


def measured(trial: optuna.trial.FrozenTrial, spec: Spec | None = None) -> dict[str, float]:
    """Validation metrics and costs a trial recorded; with ``spec``, its objective values fill any gap (for
    trials added to the study by other tools, which store only Optuna's values)."""
    values = {**trial.user_attrs.get("costs", {}), **trial.user_attrs.get("metrics", {})}
    if spec is not None and trial.values is not None:
        for (name, _), value in zip(spec.objectives(), trial.values):
            values.setdefault(name, value)
    return values


def objective_values(spec: Spec, metrics: dict[str, float], costs: dict[str, float]) -> list[float]:
    values = {**costs, **metrics}
    return [float(values[name]) for name, _ in spec.objectives()]


def constraint_values(spec: Spec, values: dict[str, float]) -> dict[str, float]:
    """``{constraint text: value}`` in Optuna's convention (<= 0 holds); constraints on unmeasured values are skipped."""
    return {
        text: values[name] - bound if op == "<=" else bound - values[name]
        for text, (name, op, bound) in zip(spec.search.constraints, spec.constraints())
        if name in values
    }


def violations(spec: Spec, values: dict[str, float]) -> list[str]:
    """The constraints ``values`` break, as text; constraints on values not measured yet are skipped."""
    return [
        f"{name} {op} {bound:g} (it is {values[name]:g})"
        for name, op, bound in spec.constraints()
        if name in values and (values[name] > bound if op == "<=" else values[name] < bound)
    ]


def feasible(spec: Spec, values: dict[str, float]) -> bool:
    return all(v <= 0 for v in constraint_values(spec, values).values())


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    better_or_equal = all(sa * x >= sa * y for x, y, sa in zip(a, b, signs))
    return better_or_equal and any(sa * x > sa * y for x, y, sa in zip(a, b, signs))


def front_ranks(points: list[list[float]], directions: list[str]) -> list[int]:
    """Non-dominated sorting: 0 for the Pareto front, 1 for the front once it is removed, and so on."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    ranks = [-1] * len(points)
    remaining = set(range(len(points)))
    level = 0
    while remaining:
        front = {i for i in remaining if not any(_dominates(points[j], points[i], signs) for j in remaining if j != i)}
        for i in front:
            ranks[i] = level
        remaining -= front
        level += 1
    return ranks


def _complete_feasible(study: optuna.Study, spec: Spec) -> list[optuna.trial.FrozenTrial]:
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [t for t in trials if feasible(spec, measured(t, spec))]


def pareto_front(study: optuna.Study, spec: Spec) -> list[int]:
    """Numbers of the feasible complete trials on the Pareto front of the spec's objectives."""
    trials = _complete_feasible(study, spec)
    objectives = spec.objectives()
    points = [[measured(t, spec)[name] for name, _ in objectives] for t in trials]
    ranks = front_ranks(points, [d for _, d in objectives])
    return sorted(t.number for t, rank in zip(trials, ranks) if rank == 0)


def size_front(study: optuna.Study, spec: Spec) -> list[int]:
    """Numbers of the feasible complete trials on the front of the task metric against trainable parameters:
    the trials no other trial beats on both accuracy and size (what ``output.keep: front`` keeps)."""
    trials = [t for t in _complete_feasible(study, spec) if "trainable_params" in measured(t, spec)]
    metric, direction = spec.objectives()[0]
    points = [[measured(t, spec)[metric], measured(t, spec)["trainable_params"]] for t in trials]
    ranks = front_ranks(points, [direction, "minimize"])
    return sorted(t.number for t, rank in zip(trials, ranks) if rank == 0)


def select_best(study: optuna.Study, spec: Spec) -> int | None:
    """The trial ``best/`` holds, by ``search.select``; None when no complete trial meets the constraints."""
    trials = _complete_feasible(study, spec)
    if not trials:
        return None
    metric, direction = spec.objectives()[0]
    sign = 1.0 if direction == "maximize" else -1.0
    values = {t.number: measured(t, spec) for t in trials}
    best = max(trials, key=lambda t: (sign * values[t.number][metric], -t.number))
    if spec.search.select.rule == "best-metric":
        return best.number
    threshold = sign * values[best.number][metric] - spec.search.select.tolerance
    close = [t for t in trials if sign * values[t.number][metric] >= threshold]
    cost = ([name for name, _ in spec.objectives()[1:]] or ["trainable_params"])[0]
    return min(close, key=lambda t: (values[t.number].get(cost, float("inf")), -sign * values[t.number][metric], t.number)).number


def describe_values(spec: Spec, values: dict[str, Any]) -> str:
    return ", ".join(f"{name} {values[name]:.4g}" for name, _ in spec.objectives() if name in values)
