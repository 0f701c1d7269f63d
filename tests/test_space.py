"""The search-space vocabulary: shared parameters, overrides, conditional sampling and decoding."""

from __future__ import annotations

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
