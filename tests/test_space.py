"""The search-space vocabulary: shared parameters, overrides, conditional sampling and decoding."""

from __future__ import annotations

import re

import optuna
import pytest

from autopeft.space import CategoricalParam, FloatParam, IntParam, check_space, decode, defaults, override, sample, shared

SPACES = {
    "alpha": {"learning_rate": shared("learning_rate"), "r": IntParam(2, 16, default=4), "init": CategoricalParam(("gauss", "svd"), default="gauss"), "iters": IntParam(1, 4, default=2, condition={"init": ["svd"]})},
    "beta": {"learning_rate": shared("learning_rate"), "d": FloatParam(0.0, 1.0, default=0.5)},
}


def test_each_variant_samples_only_its_own_parameters_and_the_shared_ones():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        variant, params = sample(trial, SPACES)
        seen.add(variant)
        assert set(params) <= set(SPACES[variant])
        assert ("iters" in params) == (params.get("init") == "svd")
        assert all(k in ("variant", "learning_rate") or k.startswith(f"{variant}.") for k in trial.params)
        assert decode(trial.params, SPACES) == (variant, params)
        study.tell(trial, 0.0)
    assert seen == {"alpha", "beta"}


def test_overrides_fix_narrow_or_replace_a_parameter():
    r = SPACES["alpha"]["r"]
    assert override(r, 8) == CategoricalParam((8,), default=8)
    assert override(r, [2, 8]).choices == (2, 8)
    narrowed = override(r, {"low": 8, "high": 12})
    assert (narrowed.low, narrowed.high, narrowed.default) == (8, 12, 8)
    with pytest.raises(ValueError, match="low 9 is above high 3"):
        override(r, {"low": 9, "high": 3})
    with pytest.raises(ValueError, match="unknown field"):
        override(r, {"min": 1})
    with pytest.raises(ValueError, match="takes 'choices'"):
        override(SPACES["alpha"]["init"], {"low": 1})


def test_defaults_respect_conditions():
    assert defaults("alpha", SPACES["alpha"]) == {"learning_rate": 1e-3, "alpha.r": 4, "alpha.init": "gauss"}


def test_invalid_declarations_are_reported():
    problems = check_space({"r": IntParam(8, 2, default=4), "x.y": FloatParam(0, 1, default=0.5), "learning_rate": IntParam(1, 2, default=1), "c": CategoricalParam((), default=None, condition={"zz": [1]})})
    text = " ".join(problems)
    assert "low 8 is above high 2" in text and "may not contain '.'" in text and "shared parameter" in text
    assert "choices is empty" in text and "'zz'" in text


def test_shared_parameters_keep_their_range():
    assert shared("learning_rate", default=5e-3).low == shared("learning_rate").low
    with pytest.raises(ValueError):
        shared("learning_rate", low=1.0)


def test_bounds_say_what_a_parameter_can_take_at_all():
    from autopeft.space import POSITIVE, PROBABILITY, RANK, Bounds

    assert 0.0 in PROBABILITY and 1.0 not in PROBABILITY and -0.1 not in PROBABILITY
    assert 1 in RANK and 0 not in RANK and 0.0 not in POSITIVE
    assert (str(PROBABILITY), str(RANK), str(POSITIVE), str(Bounds(high=2))) == ("in [0, 1)", ">= 1", "> 0", "<= 2")
    # Log scales imply positivity even without declared bounds.
    assert IntParam(2, 8, default=4, log=True).bounds == RANK and FloatParam(0.1, 1, default=0.5, log=True).bounds == POSITIVE


def test_overrides_keep_the_parameter_type_and_its_legal_bounds():
    """Catches removing space._accepts / _choices_override checks or the type checks of Param.problems."""
    from autopeft.space import PROBABILITY, RANK

    r = IntParam(2, 16, default=4, log=True, legal=RANK)
    dropout = FloatParam(0.0, 0.2, default=0.05, legal=PROBABILITY)
    init = SPACES["alpha"]["init"]
    assert override(dropout, [0, 0.1]).choices == (0.0, 0.1)  # numbers for a float parameter become floats
    assert override(dropout, {"low": 0, "high": 0.5}) == FloatParam(0.0, 0.5, default=0.05, legal=PROBABILITY)
    for param, raw, message in [
        (r, "hello", "takes integers >= 1"),
        (r, True, "takes integers >= 1"),
        (r, 8.0, "takes integers >= 1"),
        (r, [0, 4], "choice 0 is not allowed"),
        (r, {"low": -2}, "low -2 is not >= 1"),
        (r, {"choices": 5}, "choices is a list"),
        (r, {"choices": [4], "high": 8}, "either choices or high"),
        (r, {"default": {"a": 1}}, "default {'a': 1} is not an integer"),
        (r, {"log": "maybe"}, "log 'maybe' is not true or false"),
        (r, {"step": 0}, "step 0 is not an integer >= 1"),
        (dropout, -0.2, "finite numbers in [0, 1)"),
        (dropout, float("nan"), "finite numbers in [0, 1)"),
        (dropout, {"high": float("inf")}, "high inf is not a finite number"),
        (dropout, {"step": 0.1}, "no step"),
        (init, 3, "takes strings"),
        (init, {1: 2}, "unknown field(s) ['1']"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            override(param, raw)


@pytest.mark.parametrize("param", [
    IntParam("2", "8", default=4),
    IntParam(2, 8, default=None),
    IntParam(2, 8, default=4, step=0.5),
    FloatParam(0.0, float("nan"), default=0.0),
    FloatParam(0.0, 1.0, default=[0.5]),
    CategoricalParam(None, default=None),
    CategoricalParam("abc", default="a"),
    CategoricalParam(({"a": 1},), default={"a": 1}),
    IntParam(2, 8, default=4, condition=["x"]),
    IntParam(2, 8, default=4, condition={"x": 1}),
    IntParam(2, 8, default=4, help=None),
    IntParam(2, 8, default=4, legal="positive"),
], ids=repr)
def test_a_malformed_declaration_is_reported_never_raised(param):
    """Catches removing any type check in Param.problems or check_space (they raised TypeError/AttributeError)."""
    problems = check_space({"x": IntParam(1, 2, default=1), "p": param, 3: param})
    assert any(p.startswith("parameter 'p': ") for p in problems), problems
    assert "parameter name 3 is not a non-empty string" in problems


def test_a_condition_on_a_later_parameter_is_reported():
    """Sampling goes in declaration order: a condition on a later parameter would silently never hold."""
    problems = check_space({"a": IntParam(1, 2, default=1, condition={"b": ["x"]}), "b": CategoricalParam(("x",), default="x")})
    assert problems == ["parameter 'a' has a condition on 'b', which is declared after it"]


def test_carry_over_keeps_only_values_the_new_space_can_take():
    """Catches: warm start forcing a value outside the new range (numbers) or choices (categories) on the sampler,
    a parameter the new space lacks passed through, and the variant left out when the new search chooses one."""
    from autopeft.space import carry_over

    space = {"learning_rate": FloatParam(1e-3, 1e-2, default=2e-3, log=True), "r": IntParam(2, 16, default=8), "alpha_ratio": CategoricalParam((1.0, 2.0), default=2.0)}
    earlier = {"learning_rate": 5e-3, "lora.r": 64, "lora.alpha_ratio": 4.0, "lora.dropout": 0.1}
    assert carry_over(earlier, "lora", {"lora": space}) == {"learning_rate": 5e-3}
    inside = {"learning_rate": 5e-2, "lora.r": 4, "lora.alpha_ratio": 1.0}
    assert carry_over(inside, "lora", {"lora": space, "dora": space}) == {"lora.r": 4, "lora.alpha_ratio": 1.0, "variant": "lora"}
