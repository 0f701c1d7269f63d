"""The search-space vocabulary: typed parameters that variants declare and specs override.

A variant declares its space as ``{name: Param}``. Parameters named in :data:`SHARED_PARAMS` (learning rate,
target modules) mean the same thing in every variant and are sampled under their bare name; a variant's own
parameters are sampled as ``"<variant>.<name>"`` so that a conditional space over several variants stays
unambiguous. Sampling is define-by-run (``trial.suggest_*``), so it works with any Optuna sampler and with
Ray Tune's Optuna searcher alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import optuna

Scalar = Union[bool, int, float, str, None]


@dataclass(frozen=True)
class IntParam:
    """An integer in ``[low, high]``, optionally on a log scale or with a step."""

    low: int
    high: int
    default: int
    log: bool = False
    step: int = 1
    help: str = ""
    condition: dict[str, list[Scalar]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.low > self.high:
            out.append(f"low {self.low} is above high {self.high}")
        if self.log and self.low < 1:
            out.append("a log-scale integer needs low >= 1")
        if self.log and self.step != 1:
            out.append("a log-scale integer cannot have a step")
        if not self.low <= self.default <= self.high:
            out.append(f"default {self.default} is outside [{self.low}, {self.high}]")
        return out

    def describe(self) -> str:
        return f"int [{self.low}, {self.high}]" + (" log" if self.log else "") + (f" step {self.step}" if self.step != 1 else "")

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class FloatParam:
    """A real number in ``[low, high]``, optionally on a log scale."""

    low: float
    high: float
    default: float
    log: bool = False
    help: str = ""
    condition: dict[str, list[Scalar]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.low > self.high:
            out.append(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            out.append("a log-scale float needs low > 0")
        if not self.low <= self.default <= self.high:
            out.append(f"default {self.default} is outside [{self.low}, {self.high}]")
        return out

    def describe(self) -> str:
        return f"float [{self.low:g}, {self.high:g}]" + (" log" if self.log else "")

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class CategoricalParam:
    """One of a list of choices (``None``, bool, int, float or str, as Optuna stores them)."""

    choices: tuple[Scalar, ...]
    default: Scalar
    help: str = ""
    condition: dict[str, list[Scalar]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if not self.choices:
            out.append("choices is empty")
        bad = [c for c in self.choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            out.append(f"choices must be null, bool, int, float or str, not {bad!r}")
        if self.default not in self.choices:
            out.append(f"default {self.default!r} is not one of the choices {list(self.choices)!r}")
        return out

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def suggest(self, trial: optuna.Trial, name: str) -> Scalar:
        return trial.suggest_categorical(name, list(self.choices))


Param = Union[IntParam, FloatParam, CategoricalParam]

TARGET_MODULE_CHOICES = ("q,v", "q,k,v", "q,k,v,o", "q,k,v,o,up,down", "all")

SHARED_PARAMS: dict[str, Param] = {
    "learning_rate": FloatParam(
        1e-5, 1e-2, default=1e-3, log=True, help="peak learning rate of AdamW (linear warm-up, then linear decay)"
    ),
    "target_modules": CategoricalParam(
        TARGET_MODULE_CHOICES,
        default="q,v",
        help="comma-separated module roles that get an adapter: q, k, v, o (attention), up, down, gate (MLP), "
        "or 'all' for every linear layer of the transformer blocks",
    ),
}


def shared(name: str, **changes: Any) -> Param:
    """A shared parameter from :data:`SHARED_PARAMS`, with a variant's own default if it needs one.

    Only ``default`` may change: a shared parameter means the same thing (and has the same range) everywhere.
    """
    if set(changes) - {"default"}:
        raise ValueError(f"only the default of a shared parameter may change, not {sorted(set(changes) - {'default'})}")
    return replace(SHARED_PARAMS[name], **changes)


def override(param: Param, raw: Any) -> Param:
    """Apply a spec's override to a declared parameter.

    ``raw`` is a scalar (fix the value), a list (choose among these values) or a mapping of fields to change
    (``low``, ``high``, ``log``, ``step``, ``choices``, ``default``). Raises ``ValueError`` with what is allowed.
    """
    if isinstance(raw, list):
        raw = {"choices": raw}
    if not isinstance(raw, dict):
        return CategoricalParam((raw,), default=raw, help=param.help, condition=param.condition)
    unknown = set(raw) - {"low", "high", "log", "step", "choices", "default"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: low, high, log, step, choices, default")
    if "choices" in raw:
        choices = tuple(raw["choices"])
        default = raw.get("default", param.default if param.default in choices else (choices[0] if choices else None))
        new: Param = CategoricalParam(choices, default=default, help=param.help, condition=param.condition)
    elif isinstance(param, CategoricalParam):
        raise ValueError(f"a categorical parameter takes 'choices' (currently {list(param.choices)!r}), not {sorted(raw)}")
    else:
        fields = {k: v for k, v in raw.items() if k in ("low", "high", "log", "step", "default")}
        if isinstance(param, FloatParam):
            fields.pop("step", None)
        new = replace(param, **fields)
        if "default" not in raw and not new.low <= new.default <= new.high:
            # Keep the declared default meaningful: clamp it into the narrowed range.
            clamped = min(max(new.default, new.low), new.high)
            new = replace(new, default=type(new.default)(clamped))
    problems = new.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return new


def check_space(space: dict[str, Param]) -> list[str]:
    """Every problem of a declared space, as readable sentences (empty when the space is valid)."""
    problems = []
    for name, param in space.items():
        if not isinstance(param, (IntParam, FloatParam, CategoricalParam)):
            problems.append(f"parameter {name!r} is a {type(param).__name__}, not an IntParam, FloatParam or CategoricalParam")
            continue
        if "." in name:
            problems.append(f"parameter name {name!r} may not contain '.'")
        if name in SHARED_PARAMS and type(param) is not type(SHARED_PARAMS[name]):
            problems.append(f"{name!r} is a shared parameter; declare it with autopeft.space.shared({name!r})")
        problems += [f"parameter {name!r}: {p}" for p in param.problems()]
        for other in param.condition:
            if other not in space:
                problems.append(f"parameter {name!r} has a condition on {other!r}, which the space does not declare")
    return problems


def qualified_name(variant: str, name: str) -> str:
    """The name a parameter is sampled under: bare for shared parameters, ``variant.name`` otherwise."""
    return name if name in SHARED_PARAMS else f"{variant}.{name}"


def _condition_holds(param: Param, values: dict[str, Any]) -> bool:
    return all(name in values and values[name] in allowed for name, allowed in param.condition.items())


def sample(trial: optuna.Trial, spaces: dict[str, dict[str, Param]], skip: set[str] = frozenset()) -> tuple[str, dict[str, Any]]:
    """Sample one configuration: the variant (when there is a choice) and then only that variant's parameters.

    Returns ``(variant, params)`` with bare parameter names, as the variant's ``attach`` receives them.
    Parameters named in ``skip`` are not sampled (something else decides them).
    """
    names = list(spaces)
    variant = trial.suggest_categorical("variant", names) if len(names) > 1 else names[0]
    values: dict[str, Any] = {}
    for name, param in spaces[variant].items():
        if name not in skip and _condition_holds(param, values):
            values[name] = param.suggest(trial, qualified_name(variant, name))
    return variant, values


def decode(trial_params: dict[str, Any], spaces: dict[str, dict[str, Param]]) -> tuple[str, dict[str, Any]]:
    """The inverse of :func:`sample`: ``(variant, bare params)`` from a finished trial's stored parameters."""
    variant = trial_params.get("variant", next(iter(spaces)))
    prefix = f"{variant}."
    params = {}
    for key, value in trial_params.items():
        if key in SHARED_PARAMS:
            params[key] = value
        elif key.startswith(prefix):
            params[key[len(prefix):]] = value
    return variant, params


def defaults(variant: str, space: dict[str, Param]) -> dict[str, Any]:
    """The variant's default configuration as stored trial parameters (for enqueueing a baseline trial)."""
    values: dict[str, Any] = {}
    for name, param in space.items():
        if _condition_holds(param, values):
            values[name] = param.default
    return {qualified_name(variant, k): v for k, v in values.items()}
