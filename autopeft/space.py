"""The search-space vocabulary: typed parameters that variants declare and specs override.

A variant declares its space as ``{name: Param}``. Parameters named in :data:`SHARED_PARAMS` (learning rate,
target modules) mean the same thing in every variant and are sampled under their bare name; a variant's own
parameters are sampled as ``"<variant>.<name>"`` so that a conditional space over several variants stays
unambiguous. A parameter may also declare :class:`Bounds` on what any spec may set it to (ranks >= 1, dropout in
[0, 1)); :func:`override` holds a spec's values to the parameter's type and bounds. Sampling is define-by-run
(``trial.suggest_*``), so it works with any Optuna sampler and with Ray Tune's Optuna searcher alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional, Union

from autopeft.errors import show

if TYPE_CHECKING:
    import optuna

Scalar = Union[bool, int, float, str, None]


@dataclass(frozen=True)
class Bounds:
    """The values a parameter can take at all (a rank >= 1, a dropout in [0, 1)), whatever range a variant
    declares or a spec narrows it to. ``None`` leaves a side unbounded; ``*_open`` excludes the end itself."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "of any size"


RANK = Bounds(1)
"""Ranks, and counts of things such as vectors or frequencies: at least 1."""
POSITIVE = Bounds(0, low_open=True)
"""Learning rates, scales and other strictly positive reals."""
PROBABILITY = Bounds(0, 1, high_open=True)
"""Dropout rates: 0 included, 1 (everything dropped) not."""
FRACTION = Bounds(0, 1)
"""Fractions of steps or modules."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """An int or a finite float (bools are not numbers here, and NaN or infinity breaks every sampler)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, str)) or _is_number(value)


def _common_problems(param: Any) -> list[str]:
    """Problems of the fields every parameter has: ``help``, ``condition`` and ``legal``."""
    out = []
    if not isinstance(param.help, str):
        out.append(f"help {show(param.help)} is not a string")
    condition = param.condition
    if not isinstance(condition, Mapping):
        out.append(f"condition {show(condition)} is not a mapping {{parameter: [values]}}")
    else:
        for other, allowed in condition.items():
            if not isinstance(other, str):
                out.append(f"condition names {show(other)}, not a parameter name")
            elif not isinstance(allowed, (list, tuple)) or not all(_is_scalar(v) for v in allowed):
                out.append(f"condition on {other!r} is {show(allowed)}, not a list of values")
    legal = getattr(param, "legal", None)
    if legal is not None and not (
        isinstance(legal, Bounds) and all(end is None or _is_number(end) for end in (legal.low, legal.high))
    ):
        out.append(f"legal {show(legal)} is not an autopeft.space.Bounds of numbers")
    return out


def _range_problems(param: IntParam | FloatParam, legal: Bounds) -> list[str]:
    """Problems of ``low``, ``high`` and ``default`` once they are known to be numbers."""
    out = []
    if param.low > param.high:
        out.append(f"low {param.low} is above high {param.high}")
    if not param.low <= param.default <= param.high:
        out.append(f"default {param.default} is outside [{param.low}, {param.high}]")
    for name in ("low", "high", "default"):
        value = getattr(param, name)
        if value not in legal:
            out.append(f"{name} {value} is not {legal} (what this parameter can take at all)")
    return out


@dataclass(frozen=True)
class IntParam:
    """An integer in ``[low, high]``, optionally on a log scale or with a step.

    ``legal`` bounds what any spec may set it to (e.g. :data:`RANK`); a log-scale integer is always >= 1.
    """

    low: int
    high: int
    default: int
    log: bool = False
    step: int = 1
    help: str = ""
    condition: dict[str, list[Scalar]] = field(default_factory=dict)
    legal: Optional[Bounds] = None

    @property
    def bounds(self) -> Bounds:
        """What this parameter can take at all: ``legal``, else >= 1 on a log scale, else any integer."""
        return self.legal or (RANK if self.log is True else Bounds())

    def problems(self) -> list[str]:
        out = [f"{name} {show(getattr(self, name))} is not an integer" for name in ("low", "high", "default") if not _is_int(getattr(self, name))]
        if not isinstance(self.log, bool):
            out.append(f"log {show(self.log)} is not true or false")
        if not _is_int(self.step) or self.step < 1:
            out.append(f"step {show(self.step)} is not an integer >= 1")
        out += _common_problems(self)
        if out:  # the checks below compare the fields, so they need the right types
            return out
        if self.log and self.low < 1:
            out.append("a log-scale integer needs low >= 1")
        if self.log and self.step != 1:
            out.append("a log-scale integer cannot have a step")
        return out + _range_problems(self, self.bounds)

    def describe(self) -> str:
        return f"int [{self.low}, {self.high}]" + (" log" if self.log else "") + (f" step {self.step}" if self.step != 1 else "")

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class FloatParam:
    """A real number in ``[low, high]``, optionally on a log scale.

    ``legal`` bounds what any spec may set it to (e.g. :data:`PROBABILITY`); a log-scale float is always > 0.
    """

    low: float
    high: float
    default: float
    log: bool = False
    help: str = ""
    condition: dict[str, list[Scalar]] = field(default_factory=dict)
    legal: Optional[Bounds] = None

    @property
    def bounds(self) -> Bounds:
        """What this parameter can take at all: ``legal``, else > 0 on a log scale, else any finite number."""
        return self.legal or (POSITIVE if self.log is True else Bounds())

    def problems(self) -> list[str]:
        out = [f"{name} {show(getattr(self, name))} is not a finite number" for name in ("low", "high", "default") if not _is_number(getattr(self, name))]
        if not isinstance(self.log, bool):
            out.append(f"log {show(self.log)} is not true or false")
        out += _common_problems(self)
        if out:  # the checks below compare the fields, so they need the right types
            return out
        if self.log and self.low <= 0:
            out.append("a log-scale float needs low > 0")
        return out + _range_problems(self, self.bounds)

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
        if not isinstance(self.choices, (tuple, list)):
            return [f"choices {show(self.choices)} is not a tuple of values"] + _common_problems(self)
        out = []
        if not self.choices:
            out.append("choices is empty")
        bad = [c for c in self.choices if not _is_scalar(c)]
        if bad:
            out.append(f"choices must be null, bool, int, finite float or str, not {show(bad)}")
        if not _is_scalar(self.default) or self.default not in self.choices:
            out.append(f"default {show(self.default)} is not one of the choices {show(list(self.choices))}")
        return out + _common_problems(self)

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def suggest(self, trial: optuna.Trial, name: str) -> Scalar:
        return trial.suggest_categorical(name, list(self.choices))


Param = Union[IntParam, FloatParam, CategoricalParam]

TARGET_MODULE_CHOICES = ("q,v", "q,k,v", "q,k,v,o", "q,k,v,o,up,down", "all")

SHARED_PARAMS: dict[str, Param] = {
    "learning_rate": FloatParam(
        1e-5, 1e-2, default=1e-3, log=True, legal=POSITIVE, help="peak learning rate of AdamW (linear warm-up, then linear decay)"
    ),
    "target_modules": CategoricalParam(
        TARGET_MODULE_CHOICES,
        default="q,v",
        help="comma-separated module roles that get an adapter: q, k, v, o (attention), up, down, gate (MLP), "
        "or 'all' for every linear layer of the transformer blocks",
    ),
}


LEARNING_RATE_REFERENCE_STEPS = 1000
"""Trials this long or longer start at a variant's declared learning rate; shorter ones start higher."""
LEARNING_RATE_MAX_BOOST = 10.0
"""The most the first learning rate of a short trial is raised above the declared one."""


def learning_rate_for_steps(param: Param, steps: int) -> Param:
    """The learning rate ``param`` with its default (the baseline trial's rate) fitted to trials of ``steps`` steps.

    A declared default suits trials of :data:`LEARNING_RATE_REFERENCE_STEPS` steps or more. A shorter trial gets
    the default times ``√(reference / steps)``, at most :data:`LEARNING_RATE_MAX_BOOST` times it and never above
    the range: in 40 to 60 steps a LoRA at 1e-3 barely leaves its start (on Rotten Tomatoes it predicted one
    class), while the rates searches kept there were 2.5e-3 to 9e-3 (BENCHMARKS.md, "Search quality"). The range
    searched does not change, only where the search starts. Anything but a float parameter is returned as it is.
    """
    if not isinstance(param, FloatParam) or steps >= LEARNING_RATE_REFERENCE_STEPS:
        return param
    boost = min(math.sqrt(LEARNING_RATE_REFERENCE_STEPS / max(steps, 1)), LEARNING_RATE_MAX_BOOST)
    return replace(param, default=min(param.default * boost, param.high))


def shared(name: str, **changes: Any) -> Param:
    """A shared parameter from :data:`SHARED_PARAMS`, with a variant's own default if it needs one.

    Only ``default`` may change: a shared parameter means the same thing (and has the same range) everywhere.
    """
    if set(changes) - {"default"}:
        raise ValueError(f"only the default of a shared parameter may change, not {sorted(set(changes) - {'default'})}")
    return replace(SHARED_PARAMS[name], **changes)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, str):
        return "strings"
    return "numbers" if _is_number(value) else "other"


def _takes(param: Param) -> str:
    """What values a parameter takes, in words (for messages)."""
    if isinstance(param, CategoricalParam):
        return " or ".join(sorted({_kind(c) for c in param.choices} - {"other"}))
    bounds = param.bounds
    kind = "integers" if isinstance(param, IntParam) else "finite numbers"
    return kind if bounds == Bounds() else f"{kind} {bounds}"


def _accepts(param: Param, value: Any) -> bool:
    """Whether ``value`` can be a fixed value or a choice of ``param``: the right type, within its bounds."""
    if isinstance(param, IntParam):
        return _is_int(value) and value in param.bounds
    if isinstance(param, FloatParam):
        return _is_number(value) and value in param.bounds
    return _kind(value) != "other" and _kind(value) in {_kind(c) for c in param.choices}


def _as_type(param: Param, value: Any) -> Any:
    """Numbers given for a float parameter, as floats (``low: 1`` means 1.0)."""
    return float(value) if isinstance(param, FloatParam) and _is_number(value) else value


OVERRIDE_FIELDS = ("low", "high", "log", "step", "choices", "default")


def override(param: Param, raw: Any) -> Param:
    """Apply a spec's override to a declared parameter.

    ``raw`` is a scalar (fix the value), a list (choose among these values) or a mapping of fields to change
    (``low``, ``high``, ``log``, ``step``, ``choices``, ``default``). Every value must have the parameter's type
    (integers for an integer parameter, numbers for a float one) and lie within its :class:`Bounds`. Raises
    ``ValueError`` saying what is allowed.
    """
    if isinstance(raw, list):
        raw = {"choices": raw}
    if not isinstance(raw, dict):
        if not _accepts(param, raw):
            raise ValueError(f"this parameter takes {_takes(param)}")
        value = _as_type(param, raw)
        return CategoricalParam((value,), default=value, help=param.help, condition=param.condition)
    unknown = [str(k) for k in raw if k not in OVERRIDE_FIELDS]
    if unknown:
        raise ValueError(f"unknown field(s) {show(sorted(unknown))}; allowed: {', '.join(OVERRIDE_FIELDS)}")
    if "choices" in raw:
        new = _choices_override(param, raw)
    elif isinstance(param, CategoricalParam):
        raise ValueError(f"a categorical parameter takes 'choices' (currently {show(list(param.choices))}), not {show(sorted(map(str, raw)))}")
    else:
        if isinstance(param, FloatParam) and "step" in raw:
            raise ValueError("a float parameter has no step; allowed: low, high, log, default")
        new = replace(param, **{k: _as_type(param, v) for k, v in raw.items()})
        if "default" not in raw and all(_is_number(v) for v in (new.low, new.high, new.default)) and new.low <= new.high:
            # Keep the declared default meaningful: clamp it into the narrowed range.
            clamped = min(max(new.default, new.low), new.high)
            new = replace(new, default=type(param.default)(clamped))
    problems = new.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return new


def _choices_override(param: Param, raw: dict[str, Any]) -> CategoricalParam:
    """``{choices: [...], default: ...}``: a categorical parameter over values the declared one accepts."""
    if not isinstance(raw["choices"], list):
        raise ValueError(f"choices is a list of values, e.g. [4, 8, 16]; this parameter takes {_takes(param)}")
    mixed = sorted(set(raw) & {"low", "high", "log", "step"})
    if mixed:
        raise ValueError(f"give either choices or {', '.join(mixed)}, not both")
    rejected = [value for value in raw["choices"] if not _accepts(param, value)]
    if rejected:
        raise ValueError(f"choice {show(rejected[0])} is not allowed; this parameter takes {_takes(param)}")
    choices = tuple(_as_type(param, value) for value in raw["choices"])
    if "default" in raw:
        default = _as_type(param, raw["default"])
    else:
        default = param.default if param.default in choices else (choices[0] if choices else None)
    return CategoricalParam(choices, default=default, help=param.help, condition=param.condition)


def check_space(space: Any) -> list[str]:
    """Every problem of a declared space, as readable sentences (empty when the space is valid).

    Any malformed declaration (a name that is not a string, bounds of the wrong type, a condition that is not a
    mapping) is reported here as a sentence, never raised, so one broken plugin cannot stop the others.
    """
    if not isinstance(space, Mapping):
        return [f"the space is a {type(space).__name__}, not a dict {{name: parameter}}"]
    problems = []
    names = list(space)
    for position, (name, param) in enumerate(space.items()):
        if not isinstance(name, str) or not name:
            problems.append(f"parameter name {show(name)} is not a non-empty string")
            continue
        if not isinstance(param, (IntParam, FloatParam, CategoricalParam)):
            problems.append(f"parameter {name!r} is a {type(param).__name__}, not an IntParam, FloatParam or CategoricalParam")
            continue
        if "." in name:
            problems.append(f"parameter name {name!r} may not contain '.'")
        if name in SHARED_PARAMS and type(param) is not type(SHARED_PARAMS[name]):
            problems.append(f"{name!r} is a shared parameter; declare it with autopeft.space.shared({name!r})")
        problems += [f"parameter {name!r}: {p}" for p in param.problems()]
        if isinstance(param.condition, Mapping):
            for other in param.condition:
                if isinstance(other, str) and other not in space:
                    problems.append(f"parameter {name!r} has a condition on {other!r}, which the space does not declare")
                elif isinstance(other, str) and names.index(other) > position:
                    # Sampling goes in declaration order: a condition on a later parameter would never hold.
                    problems.append(f"parameter {name!r} has a condition on {other!r}, which is declared after it")
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


def carry_over(trial_params: dict[str, Any], variant: str, spaces: dict[str, dict[str, Param]]) -> dict[str, Any]:
    """An earlier trial's stored parameters (of ``variant``) as stored parameters of the current ``spaces``.

    Values the current space cannot take (a parameter it lacks, a value outside its range or choices) are left
    out, so the sampler draws them; the variant is named only when the current search chooses among several.
    """
    _, bare = decode({**trial_params, "variant": variant}, {variant: {}})
    space = spaces[variant]
    kept = {name: value for name, value in bare.items() if name in space and _within(space[name], value)}
    params = {qualified_name(variant, name): value for name, value in kept.items()}
    if len(spaces) > 1:
        params["variant"] = variant
    return params


def _within(param: Param, value: Any) -> bool:
    """Whether ``param`` as searched can take ``value``: one of its choices, or a number of its type in
    ``[low, high]``."""
    if isinstance(param, CategoricalParam):
        return value in param.choices
    return _accepts(param, value) and param.low <= value <= param.high


def defaults(variant: str, space: dict[str, Param]) -> dict[str, Any]:
    """The variant's default configuration as stored trial parameters (for enqueueing a baseline trial)."""
    values: dict[str, Any] = {}
    for name, param in space.items():
        if _condition_holds(param, values):
            values[name] = param.default
    return {qualified_name(variant, k): v for k, v in values.items()}
