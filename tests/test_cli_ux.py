"""What a user sees on the terminal: progress at 80 columns, log lines, parameter names, the closing table."""

from __future__ import annotations

import io
import re

import optuna
from rich.console import Console

from autopeft.allocation import sample_allocation
from autopeft.cli import main
from autopeft.objectives import select_best
from autopeft.placement import AdapterSite
from autopeft.progress import SearchProgress, best_trials_table, describe_params
from autopeft.spec import AllocationSpec, load_spec
from conftest import write_spec

LOADING = "loading sentence-transformers/all-MiniLM-L6-v2 (plugin packaged_models (built-in)) on cpu"


def _render(renderable, width: int = 80) -> list[str]:
    console = Console(width=width, file=io.StringIO(), force_terminal=False, color_system=None)
    console.print(renderable)
    return console.file.getvalue().splitlines()


def test_progress_fits_80_columns_and_shows_the_loss_once_loading_is_done():
    """Catches: the loading status left on screen after loading (it squeezed the bars to "tr… loss 0.49"), and a
    layout that lets a long status push the numbers out of 80 columns."""
    progress = SearchProgress(Console(file=io.StringIO(), width=80), n_trials=12, finished=0, metric="accuracy")
    progress.message(LOADING)
    progress.start_trial(11, "lora", {"learning_rate": 2e-3, "lora.r": 8})
    progress.on_step(37, 200, 0.4912)
    lines = _render(progress.progress)
    assert all(len(line) <= 80 for line in lines), lines
    assert "loss 0.4912" in lines[1] and "trial 11" in lines[1] and "37/200" in lines[1]
    assert "loading" not in "\n".join(lines)

    progress.on_evaluate(100, {"accuracy": 0.7642})
    lines = _render(progress.progress)
    assert all(len(line) <= 80 for line in lines) and "accuracy 0.7642" in lines[1]

    progress.end_trial(11, "finished", "best: trial 11, accuracy 0.7642")
    lines = _render(progress.progress)
    assert all(len(line) <= 80 for line in lines) and "best: trial 11, accuracy 0.7642" in lines[0]


def test_a_long_status_is_cut_not_the_bars():
    """Catches: a status column without an ellipsis, which wraps or squeezes the bar and counts."""
    progress = SearchProgress(Console(file=io.StringIO(), width=80), n_trials=4, finished=1, metric="accuracy")
    progress.message(LOADING)
    [line] = _render(progress.progress)
    assert len(line) <= 80 and "1/4" in line and line.startswith("trials") and "…" in line


def test_allocation_parameters_name_their_kind_role_and_band():
    """Catches: labels made from the last dotted part only (``b0=8 b0=4``), which hide what each number is."""
    sites = [AdapterSite(f"layer.{layer}.{role}", role, layer, 8, 8) for layer in range(4) for role in ("q", "v")]
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    sample_allocation(trial, AllocationSpec(granularity="role-band", bands=2, ranks=[4, 8], bits=[4, 8]), sites)
    text = describe_params({"learning_rate": 1.5e-3, "lora.r": 8, **trial.params})
    assert text.startswith("lr=1.50e-03 r=8 ")
    for role in ("q", "v"):
        for band in (0, 1):
            rank = trial.params[f"rank.{role}.b{band}"]
            assert f"rank[{role},band{band}]={rank}" in text
            assert f"bits[{role},band{band}]={trial.params[f'bits.{role}.b{band}']}" in text
    assert describe_params({"rank.up.l3": 0, "bits.q": 4}) == "rank[up,layer3]=0 bits[q]=4"


def test_search_log_lines_carry_no_source_location_and_fit_80_columns(tmp_path, tiny_bert, sentiment_csv, capsys, monkeypatch):
    """Catches: the CLI console logging with its default ``log_path`` (every line ending in ``progress.py:54``)."""
    monkeypatch.setenv("COLUMNS", "80")
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 1}, training={"max_steps": 4, "batch_size": 8, "eval_every": 4})
    assert main(["search", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "trial 0 started: lora lr=" in out and "trial 0 finished" in out
    assert not re.search(r"\w+\.py:\d+", out), out
    assert all(len(line) <= 80 for line in out.splitlines()), out


def _spec(tmp_path):
    return load_spec(write_spec(
        tmp_path,
        model={"id": "unused"},
        data={"source": "unused.csv"},
        search={"objectives": ["accuracy"], "constraints": ["trainable_params <= 200000"], "select": {"rule": "smallest-within", "tolerance": 0.01}},
    ))


def test_the_closing_table_starts_with_the_trial_in_best_and_marks_constraint_breakers(tmp_path):
    """Catches: ranking by the metric alone (the first row then is not best/ under ``smallest-within``) and
    listing a trial that breaks a constraint as if it were a candidate."""
    spec = _spec(tmp_path)
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    for accuracy, size in ((0.80, 16000), (0.795, 2000), (0.85, 300000), (0.70, 1000)):
        study.add_trial(optuna.trial.create_trial(
            value=accuracy, params={"learning_rate": 1e-3}, distributions={"learning_rate": distribution},
            user_attrs={"variant": "lora", "metrics": {"accuracy": accuracy}, "costs": {"trainable_params": size}, "trainable_params": size},
        ))
    chosen = select_best(study, spec)
    assert chosen == 1  # within 0.01 of the best feasible accuracy, and the smallest

    lines = [line for line in _render(best_trials_table(study, spec), width=160) if re.match(r"\s*│?\s*\d+\s", line)]
    numbers = [int(re.match(r"\s*│?\s*(\d+)", line).group(1)) for line in lines]
    assert numbers[0] == chosen and "best/" in lines[0]
    assert numbers == [1, 0, 3, 2]  # best/, then feasible by accuracy, then the constraint breaker
    assert "violates trainable_params <= 200000" in lines[-1]
    assert not any("violates" in line for line in lines[:-1])


def test_the_closing_table_agrees_with_best_for_the_default_rule(tmp_path):
    """Catches: a table that sorts failed or pruned trials, or trials without the metric, into the ranking."""
    spec = _spec(tmp_path)
    spec.search.select.rule = "best-metric"
    study = optuna.create_study(direction="maximize")
    distribution = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"learning_rate": 1e-3}, distributions={"learning_rate": distribution},
                                              user_attrs={"variant": "lora", "metrics": {"accuracy": 0.99}}))
    for accuracy in (0.6, 0.9, 0.7):
        study.add_trial(optuna.trial.create_trial(value=accuracy, params={"learning_rate": 1e-3}, distributions={"learning_rate": distribution},
                                                  user_attrs={"variant": "lora", "metrics": {"accuracy": accuracy}, "costs": {"trainable_params": 10}, "trainable_params": 10}))
    lines = [line for line in _render(best_trials_table(study, spec), width=160) if re.match(r"\s*│?\s*\d+\s", line)]
    assert [int(re.match(r"\s*│?\s*(\d+)", line).group(1)) for line in lines] == [2, 3, 1]
    assert select_best(study, spec) == 2
