"""Multi-objective search, constraints, the choice of best/, and early stopping of weak trials."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from autopeft.cli import main
from autopeft.objectives import front_ranks
from autopeft.pruning import pareto_should_prune
from autopeft.rundir import RunDir, open_study
from autopeft.spec import load_spec
from conftest import write_spec


def rows_of(run) -> list[dict[str, str]]:
    with open(run / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def spec_with(tmp_path, tiny_bert, sentiment_csv, training=None, learning_rate=1e-2, **search):
    space = {"learning_rate": learning_rate, "lora.r": [2, 8, 16], "target_modules": ["q", "q,v", "all"]}
    base_search = {"variants": ["lora"], "n_trials": 4, "space": space}
    return write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        search={**base_search, **search},
        training={"max_steps": 12, "batch_size": 8, "eval_every": 4, **(training or {})},
    )


def pre_create(spec_path, directions, configs):
    """Create the run's study and queue exact configurations (tests need known trials, not sampled ones)."""
    spec = load_spec(spec_path)
    run_dir = RunDir(spec.run_dir)
    run_dir.path.mkdir(parents=True)
    study = optuna.create_study(study_name="autopeft", storage=run_dir.storage_url, directions=directions)
    for params in configs:
        study.enqueue_trial(params)
    return run_dir


def test_front_ranks_sort_points_by_domination():
    points = [[0.9, 100], [0.8, 50], [0.7, 80], [0.9, 120], [0.6, 40]]
    assert front_ranks(points, ["maximize", "minimize"]) == [0, 0, 1, 1, 0]


def test_several_objectives_give_a_pareto_front_of_exported_adapters(tmp_path, tiny_bert, sentiment_csv):
    spec = spec_with(tmp_path, tiny_bert, sentiment_csv, objectives=["accuracy", "trainable_params"], sampler="nsgaii")
    assert main(["search", str(spec)]) == 0
    run = tmp_path / "run"
    study = open_study(RunDir(run), "maximize")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.user_attrs["objectives"] == [{"name": "accuracy", "direction": "maximize"}, {"name": "trainable_params", "direction": "minimize"}]

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    points = {t.number: (t.user_attrs["metrics"]["accuracy"], t.user_attrs["trainable_params"]) for t in complete}
    front = {n for n, (acc, size) in points.items() if not any(a >= acc and s <= size and (a > acc or s < size) for a, s in points.values())}
    exported = {int(p.name.split("-")[1]) for p in (run / "pareto").iterdir()}
    assert exported == front
    for number in front:
        folder = run / "pareto" / f"trial-{number}"
        assert json.loads((folder / "autopeft.json").read_text())["trial"] == number
        PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), folder)
    best = json.loads((run / "best" / "autopeft.json").read_text())["trial"]
    assert points[best][0] == max(acc for acc, _ in points.values())


def test_constraints_stop_oversized_trials_before_training_and_keep_them_out_of_best(tmp_path, tiny_bert, sentiment_csv):
    spec = spec_with(tmp_path, tiny_bert, sentiment_csv, constraints=["trainable_params <= 1000"], baseline=False)
    run_dir = pre_create(spec, ["maximize"], [
        {"lora.r": 16, "target_modules": "all", "learning_rate": 1e-2},  # far over the budget
        {"lora.r": 2, "target_modules": "q,v", "learning_rate": 1e-2},   # within it
    ])
    assert main(["search", str(spec), "--n-trials", "2"]) == 0
    rows = rows_of(run_dir.path)
    assert rows[0]["state"] == "PRUNED" and "violates trainable_params <= 1000" in rows[0]["failure_reason"]
    assert rows[0]["steps"] == "0"
    assert rows[1]["state"] == "COMPLETE"
    assert json.loads((run_dir.best / "autopeft.json").read_text())["trial"] == 1
    study = open_study(run_dir, "maximize")
    # What the sampler reads: the oversized trial is infeasible, the small one feasible.
    assert study.trials[0].constraints["trainable_params <= 1000"] > 0 >= study.trials[1].constraints["trainable_params <= 1000"]


def test_smallest_within_tolerance_prefers_a_smaller_adapter(tmp_path, tiny_bert, sentiment_csv):
    spec = spec_with(tmp_path, tiny_bert, sentiment_csv, select={"rule": "smallest-within", "tolerance": 1.0}, baseline=False)
    run_dir = pre_create(spec, ["maximize"], [
        {"lora.r": 16, "target_modules": "all", "learning_rate": 1e-2},
        {"lora.r": 2, "target_modules": "q,v", "learning_rate": 1e-2},
    ])
    assert main(["search", str(spec), "--n-trials", "2"]) == 0
    # With a tolerance of 1.0 every trial is close enough, so the smallest one is chosen.
    assert json.loads((run_dir.best / "autopeft.json").read_text())["trial"] == 1


def test_the_median_pruner_stops_a_weak_single_objective_trial(tmp_path, tiny_bert, sentiment_csv):
    spec = spec_with(tmp_path, tiny_bert, sentiment_csv, training={"max_steps": 80, "batch_size": 16, "eval_every": 20}, pruner={"type": "median", "startup_trials": 2}, baseline=False, learning_rate={"low": 1e-5, "high": 1e-2})
    good = {"lora.r": 8, "target_modules": "all", "learning_rate": 1e-2}
    run_dir = pre_create(spec, ["maximize"], [good, good, {**good, "learning_rate": 1e-5}])
    assert main(["search", str(spec), "--n-trials", "3"]) == 0
    rows = rows_of(run_dir.path)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED"]
    # The pruned trial's partial result stays: its metrics at the step where it stopped.
    assert int(rows[2]["steps"]) < 80 and rows[2]["val_accuracy"] != ""
    study = open_study(run_dir, "maximize")
    assert study.trials[2].intermediate_values  # reported rungs, for the intermediate-values plot


def test_pareto_rule_prunes_a_dominated_trial_and_keeps_the_front(tmp_path, tiny_bert, sentiment_csv):
    spec = spec_with(
        tmp_path, tiny_bert, sentiment_csv,
        training={"max_steps": 80, "batch_size": 16, "eval_every": 20},
        objectives=["accuracy", "trainable_params"], pruner={"type": "pareto", "startup_trials": 2}, baseline=False,
        learning_rate={"low": 1e-5, "high": 1e-2},
    )
    good = {"lora.r": 8, "target_modules": "all", "learning_rate": 1e-2}
    small = {"lora.r": 2, "target_modules": "q,v", "learning_rate": 1e-2}
    run_dir = pre_create(spec, ["maximize", "minimize"], [good, small, {**good, "learning_rate": 1e-5}, {**small, "lora.r": 2, "target_modules": "q"}])
    assert main(["search", str(spec), "--n-trials", "4"]) == 0
    rows = rows_of(run_dir.path)
    # Same size as trial 0 but barely learning: dominated at its first rung.
    assert rows[2]["state"] == "PRUNED" and "dominated at step" in rows[2]["failure_reason"]
    # The smallest adapter is on the front whatever its accuracy, so it is never pruned.
    assert rows[3]["state"] == "COMPLETE"
    front = {int(p.name.split("-")[1]) for p in (run_dir.path / "pareto").iterdir()}
    assert 3 in front and 2 not in front


def test_pareto_rule_on_recorded_rungs():
    spec = load_spec_from({"objectives": ["accuracy", "trainable_params"], "pruner": {"type": "pareto", "startup_trials": 1}})
    study = optuna.create_study(directions=["maximize", "minimize"])
    for accuracy, size in [(0.8, 100.0), (0.6, 10.0)]:
        study.add_trial(optuna.trial.create_trial(values=[accuracy, size], user_attrs={"rungs": {"20": [accuracy, size]}}))
    assert pareto_should_prune(study, spec, 99, 20, [0.7, 100.0])       # worse than (0.8, 100)
    assert not pareto_should_prune(study, spec, 99, 20, [0.7, 50.0])    # between the two: on the front
    assert not pareto_should_prune(study, spec, 99, 20, [0.5, 5.0])     # smallest: on the front
    assert not pareto_should_prune(study, spec, 99, 40, [0.1, 100.0])   # no trial reached step 40 yet


def load_spec_from(search):
    from autopeft.spec import parse_spec

    return parse_spec({"model": {"id": "x"}, "data": {"source": "rotten-tomatoes"}, "search": search})


@pytest.mark.parametrize(
    "search, key, fragment",
    [
        ({"objectives": ["accuracy"], "pruner": "pareto"}, "search.pruner.type", "needs several objectives"),
        ({"objectives": ["accuracy", "adapter_bytes"], "pruner": "median"}, "search.pruner.type", "use 'pareto'"),
        ({"objectives": ["trainable_params", "accuracy"]}, "search.objectives[0]", "the first objective is the task metric"),
        ({"objectives": ["accuracy", "speed"]}, "search.objectives[1]", "allowed: accuracy"),
        ({"constraints": ["trainable_params < 5"]}, "search.constraints", "name <= number"),
        ({"constraints": ["size <= 5"]}, "search.constraints[0]", "'size' is not a metric or cost"),
        ({"constraints": ["trainable_params <= 5"], "sampler": "random"}, "search.sampler", "only tpe and nsgaii"),
    ],
)
def test_objective_mistakes_are_spec_errors(tmp_path, tiny_bert, sentiment_csv, capsys, search, key, fragment):
    spec = spec_with(tmp_path, tiny_bert, sentiment_csv, **search)
    assert main(["validate", str(spec)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert key in err and fragment in err


def test_allocators_are_judged_on_their_trained_size_not_their_starting_size(tmp_path, tiny_bert, sentiment_csv):
    spec = write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        search={"variants": ["sora"], "n_trials": 1, "space": {}, "constraints": ["trainable_params <= 1"]},
    )
    # No adapter is that small, but SoRA attaches at its maximum rank and shrinks: it must train before it is judged.
    assert main(["search", str(spec)]) == 1
    [row] = rows_of(tmp_path / "run")
    assert row["state"] == "COMPLETE" and row["steps"] == "12"
    assert not (tmp_path / "run" / "best").exists()
