"""Spec options that change what a search keeps and how it starts: ``output.keep`` and ``search.baseline``."""

from __future__ import annotations

import json

import optuna
import pytest

from autopeft.cli import main
from autopeft.rundir import RunDir
from autopeft.trial import Workbench
from conftest import write_spec


def study_of(run) -> optuna.Study:
    return optuna.load_study(study_name="autopeft", storage=RunDir(run).storage_url)


def kept(run) -> set[int]:
    return {int(p.name.split("-")[1]) for p in (run / "adapters").iterdir()}


def test_keep_all_keeps_every_adapter_and_export_needs_no_retraining(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    """Catches: ``output.keep: all`` ignored in ``Driver.keep`` (adapters of non-best trials deleted, so exporting
    one retrains it)."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 3}, output={"dir": str(tmp_path / "run"), "keep": "all"})
    assert main(["search", str(spec)]) == 0
    run = tmp_path / "run"
    assert kept(run) == {0, 1, 2}
    best = json.loads((run / "best" / "autopeft.json").read_text())["trial"]
    other = next(n for n in (0, 1, 2) if n != best)

    def no_retraining(*args, **kwargs):
        raise AssertionError("export retrained a trial whose adapter was kept")

    monkeypatch.setattr(Workbench, "run_trial", no_retraining)
    assert main(["export", str(run), "--trial", str(other), "--out", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()


def test_keep_front_keeps_the_smallest_adapter(tmp_path, tiny_bert, sentiment_csv):
    """Catches: ``output.keep: front`` keeping only the best trial. The trial with the fewest trainable parameters
    is on the front of accuracy against size whatever its accuracy, so it must be kept."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 4, "space": {"learning_rate": {"low": 5e-3, "high": 2e-2}, "lora.r": [2, 8], "target_modules": ["q,v", "q,k,v,o"]}}, output={"dir": str(tmp_path / "run"), "keep": "front"})
    assert main(["search", str(spec)]) == 0
    trials = [t for t in study_of(tmp_path / "run").trials if t.state.name == "COMPLETE"]
    smallest = min(trials, key=lambda t: (t.user_attrs["trainable_params"], -t.user_attrs["metrics"]["accuracy"]))
    assert smallest.number in kept(tmp_path / "run")


@pytest.mark.parametrize("baseline, expected", [(["dora"], ["dora"]), (False, [])])
def test_baseline_can_be_limited_to_some_variants(tmp_path, tiny_bert, sentiment_csv, baseline, expected):
    """Catches: ``search.baseline`` as a list ignored (every variant's defaults would take a slot, starving the
    search of sampled configurations)."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"variants": ["lora", "dora"], "n_trials": 2, "baseline": baseline, "space": {"learning_rate": {"low": 5e-3, "high": 2e-2}}})
    assert main(["search", str(spec)]) == 0
    trials = study_of(tmp_path / "run").trials
    assert [t.params["variant"] for t in trials if t.user_attrs.get("baseline")] == expected


def test_a_baseline_for_a_variant_not_searched_is_refused(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches: a typo in ``search.baseline`` silently running no baseline."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"variants": ["lora"], "baseline": ["dorra"]})
    assert main(["validate", str(spec)]) == 2
    assert "search.baseline[0]: got 'dorra'; not a searched variant; searched: lora" in capsys.readouterr().err


def test_a_size_constraint_judges_the_stored_adapter_before_training(tmp_path, tiny_bert, sentiment_csv):
    """Catches: judging ``adapter_bytes`` at attach on what trains rather than on what the export stores. NOLA
    trains mixture coefficients but stores plain LoRA factors (on the tiny BERT: 4,360 bytes when attached,
    8,456 exported); a bound between the two let such trials train every step and then break the constraint."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"variants": ["nola"], "n_trials": 1, "constraints": ["adapter_bytes <= 6000"], "space": {"learning_rate": {"low": 5e-3, "high": 2e-2}}})
    assert main(["search", str(spec)]) == 1
    [trial] = study_of(tmp_path / "run").trials
    assert trial.state.name == "PRUNED" and trial.user_attrs["steps"] == 0
    assert trial.user_attrs["pruned_reason"] == "violates adapter_bytes <= 6000 (it is 8456)"


def test_a_step_budget_is_spent_and_never_exceeded(tmp_path, tiny_bert, sentiment_csv):
    """Catches: ``search.budget`` ignored by the driver (the search would run all 20 trials, 240 steps), a trial
    started that could go past the budget, and pruned trials counted as if they had run every step (the search
    would stop with steps left for another trial)."""
    spec = write_spec(
        tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"n_trials": 20, "budget": "60 steps", "space": {"learning_rate": {"low": 1e-4, "high": 3e-2, "log": True}, "lora.r": [2, 4, 8]}},
        training={"max_steps": 12, "eval_every": 3},
    )
    assert main(["search", str(spec)]) == 0
    trials = [t for t in study_of(tmp_path / "run").trials if t.state.is_finished()]
    used = sum(t.user_attrs.get("steps", 0) for t in trials)
    assert used <= 60
    assert used + 12 > 60, f"the search stopped with {60 - used} steps left, enough for another trial"
    # Successive halving is the default under a budget: weak configurations stop at a rung, so more configurations
    # fit than 60 // 12 = 5 full trials.
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    assert len(trials) > 5


def test_a_budget_turns_on_successive_halving_with_rungs_at_each_evaluation():
    """Catches: a budget leaving the pruner off (every configuration would run to the end), choosing successive
    halving for several objectives (where it never prunes), or leaving ``eval_every`` unset (no rung)."""
    from autopeft.spec import parse_spec

    spec = parse_spec({"model": {"id": "m"}, "data": {"source": "rotten-tomatoes"}, "search": {"budget": "4000 steps"}, "training": {"max_steps": 200}}, "spec.yaml")
    assert (spec.search.pruner.type, spec.training.eval_every, spec.search.budget_steps) == ("successive-halving", 50, 4000)
    chosen = parse_spec({"model": {"id": "m"}, "data": {"source": "rotten-tomatoes"}, "search": {"budget": "30m", "pruner": "none"}}, "spec.yaml")
    assert (chosen.search.pruner.type, chosen.search.budget_seconds) == ("none", 1800.0)
    several = parse_spec({"model": {"id": "m"}, "data": {"source": "rotten-tomatoes"}, "search": {"budget": 800, "objectives": ["accuracy", "trainable_params"]}}, "spec.yaml")
    assert several.search.pruner.type == "pareto"  # successive halving cannot judge two objectives


@pytest.mark.parametrize(
    "search,training,evaluated",
    [
        ({"budget": "48 steps"}, {"max_steps": 16, "eval_every": 4}, [4, 16]),  # successive halving: its rungs and the end
        ({"budget": "48 steps"}, {"max_steps": 40, "eval_every": 2}, [2, 8, 32, 40]),
        ({"n_trials": 2, "pruner": {"type": "median"}}, {"max_steps": 16, "eval_every": 4}, [4, 8, 12, 16]),  # every evaluation is a rung
    ],
)
def test_with_successive_halving_a_trial_evaluates_only_at_its_rungs(tmp_path, tiny_bert, sentiment_csv, search, training, evaluated):
    """Catches: evaluating between successive halving's rungs, where it decides nothing (each evaluation costs several
    training steps: the budgeted search was slower than the alternatives by about its evaluations), or dropping the
    rungs or evaluations other pruners judge."""
    spec = write_spec(
        tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"seed": 0, "space": {"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}}, **search}, training=training,
    )
    assert main(["search", str(spec)]) == 0
    complete = [t for t in study_of(tmp_path / "run").trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    assert [sorted(t.intermediate_values) for t in complete] == [evaluated] * len(complete)


@pytest.mark.parametrize("budget", ["lots", "0 steps", -5, "1.5 steps", True])
def test_a_bad_budget_is_refused_with_what_is_allowed(tmp_path, budget, capsys):
    """Catches: a budget that is neither steps nor a duration accepted (and then ignored or crashing later)."""
    spec = tmp_path / "spec.yaml"
    import yaml

    spec.write_text(yaml.safe_dump({"model": {"id": "m"}, "data": {"source": "rotten-tomatoes"}, "search": {"budget": budget}}))
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "search.budget" in err and "steps" in err and "Traceback" not in err


def test_warm_start_tries_the_earlier_runs_best_configurations_first(tmp_path, tiny_bert, sentiment_csv):
    """Catches: ``search.warm_start`` ignored (the new search would start from its baseline and the sampler), the
    earlier run's trials taken in the wrong order (not best first), and a value outside the new space forced on
    the sampler instead of being drawn again."""
    space = {"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}, "lora.r": [2, 4, 8]}
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = write_spec(tmp_path / "first", model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 4, "space": space})
    assert main(["search", str(first)]) == 0
    earlier = study_of(tmp_path / "first" / "run")
    ranked = sorted((t for t in earlier.trials if t.state.name == "COMPLETE"), key=lambda t: -t.value)
    # The new space fixes dropout at a value no earlier trial had: that value cannot be carried over.
    changed = {**space, "lora.dropout": 0.123}
    second = write_spec(
        tmp_path / "second", model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"n_trials": 3, "space": changed, "warm_start": str(tmp_path / "first" / "run"), "baseline": False},
    )
    assert main(["search", str(second)]) == 0
    trials = study_of(tmp_path / "second" / "run").trials
    for new, old in zip(trials, ranked[:3]):
        assert {k: new.params[k] for k in ("learning_rate", "lora.r", "target_modules")} == {k: old.params[k] for k in ("learning_rate", "lora.r", "target_modules")}
        assert new.params["lora.dropout"] == 0.123 and new.user_attrs.get("warm_start")
    assert len(ranked) >= 3


def test_warm_start_from_a_folder_that_is_no_run_is_refused(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches: a missing or mistyped earlier run silently ignored (the user believes the search is warm)."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"warm_start": str(tmp_path / "nothing")})
    assert main(["search", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "search.warm_start" in err and "nothing" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "max_steps, space, variant, expected",
    [
        (40, {}, "lora", 5e-3),  # 1e-3 · √(1000/40)
        (250, {}, "lora", 2e-3),  # 1e-3 · √(1000/250)
        (1000, {}, "lora", 1e-3),  # long trials start at the declared default
        (4, {}, "lora", 1e-2),  # at most ten times it, and never above the range
        (40, {}, "svfit", 1e-2),  # a variant's own default (5e-3) is raised the same way, within the range
        (40, {"learning_rate": {"default": 2e-4}}, "lora", 2e-4),  # a spec's default wins
        (40, {"learning_rate": {"low": 1e-4, "high": 3e-3}}, "lora", 3e-3),  # a narrowed range holds it
    ],
)
def test_the_baseline_learning_rate_is_fitted_to_the_trial_length(tmp_path, tiny_bert, sentiment_csv, max_steps, space, variant, expected):
    """Catches: dropping learning_rate_for_steps from the plan (a 40-step baseline at 1e-3 barely trains: on
    Rotten Tomatoes it predicted one class), the √ scaling, the ceiling of the range, or the scaled default
    overriding a spec's. The tenfold cap is the next test's."""
    from autopeft.plan import make_plan
    from autopeft.space import defaults
    from autopeft.spec import load_spec

    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"variants": [variant], "space": space}, training={"max_steps": max_steps, "batch_size": 8, "eval_every": max_steps})
    plan = make_plan(load_spec(str(spec)))
    assert defaults(variant, plan.spaces[variant])["learning_rate"] == pytest.approx(expected)
    assert (plan.spaces[variant]["learning_rate"].low, plan.spaces[variant]["learning_rate"].high) == ((1e-5, 1e-2) if not space else (space["learning_rate"].get("low", 1e-5), space["learning_rate"].get("high", 1e-2)))


def test_the_baseline_trial_runs_at_the_fitted_learning_rate(tmp_path, tiny_bert, sentiment_csv):
    """Catches: the search enqueueing its baseline from the variant's declared space rather than the plan's."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 1, "space": {"lora.r": [2]}}, training={"max_steps": 40, "batch_size": 8, "eval_every": 40})
    assert main(["search", str(spec)]) == 0
    [trial] = study_of(tmp_path / "run").trials
    assert trial.user_attrs["baseline"] and trial.params["learning_rate"] == pytest.approx(5e-3)


def test_a_short_trial_raises_the_first_learning_rate_at_most_tenfold():
    """Catches: dropping the cap of learning_rate_for_steps (a 4-step trial would start 16 times higher)."""
    from autopeft.space import FloatParam, learning_rate_for_steps

    low_default = FloatParam(1e-6, 1.0, default=1e-4, log=True)
    assert learning_rate_for_steps(low_default, 4).default == pytest.approx(1e-3)
    assert learning_rate_for_steps(low_default, 10_000) == low_default
