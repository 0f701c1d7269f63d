"""What a user sees on the terminal: progress at 80 columns, log lines, parameter names, the closing table."""

from __future__ import annotations

import io
import json
import re

import optuna
import pytest
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


# --------------------------------------------------------------------------------------------------------------
# autopeft plugins, --version, --threads
# --------------------------------------------------------------------------------------------------------------


def test_plugins_prints_a_compact_table_by_default(capsys, monkeypatch):
    """Catches: the default listing printing every variant's whole search space (about 400 lines)."""
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    rows_shown = sum(1 for line in lines if line.count("│") >= 6)
    # One line per variant plus a fixed frame; every variant's space would add about ten lines per variant.
    assert len(lines) < rows_shown + 40, len(lines)
    assert "parameter" not in out and "learning_rate" not in out
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]] for line in lines if line.count("│") >= 6}
    assert rows["lora"] == ["variant", "yes", "native", "built-in"]
    assert rows["increlora"][:3] == ["allocator", "no", "lora"]
    assert rows["lora-xs"][2] == "lora"
    assert "models" in out and "corpora" in out and "presets" in out


def test_plugins_name_and_details_show_search_spaces(capsys):
    """Catches: no way left to see a variant's parameters once the default is compact."""
    assert main(["plugins", "dora"]) == 0
    one = capsys.readouterr().out
    assert "dora" in one and "learning_rate" in one and "lora.r" not in one.replace("dora.r", "")
    assert "models" not in one
    assert main(["plugins", "--details"]) == 0
    details = capsys.readouterr().out
    assert details.count("learning_rate") >= 10 and "increlora" in details


def test_plugins_with_an_unknown_name_says_which_exist(capsys):
    """Catches: an unknown name printing nothing, or a traceback."""
    assert main(["plugins", "lorra"]) == 2
    err = capsys.readouterr().err
    assert "'lorra'" in err and "lora" in err and "Traceback" not in err


def test_plugins_json_keeps_every_search_space(capsys):
    """Catches: --json losing the spaces along with the compact default."""
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    lora = next(v for v in listing["variants"] if v["name"] == "lora")
    assert "learning_rate" in lora["space"] and lora["supports_allocation"] is True and lora["kind"] == "variant"


def test_version_flag(capsys):
    """Catches: a missing --version (argparse would exit 2 asking for a command)."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"autopeft {version('autopeft')}"


def test_threads_from_the_command_line_reach_torch_and_the_saved_spec(tmp_path, tiny_bert, sentiment_csv):
    """Catches: --threads not passed into training.threads, or training.threads not applied with
    torch.set_num_threads when the model is loaded."""
    import torch
    import yaml

    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"n_trials": 1}, training={"max_steps": 2, "batch_size": 8})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main(["search", str(spec), "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())["training"]["threads"] == 2
    # The thread count is not part of what makes trials comparable: a resume may change it.
    assert main(["search", str(spec), "--threads", "1", "--n-trials", "1"]) == 0


def test_bad_threads_are_refused_with_the_key_and_what_is_allowed(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches: a thread count below 1 accepted (torch would raise deep inside a search)."""
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, training={"threads": 0})
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "training.threads" in err and "0" in err and "greater than or equal to 1" in err
    with pytest.raises(SystemExit) as exited:
        main(["search", str(spec), "--threads", "0"])
    assert exited.value.code == 2 and "a whole number of at least 1" in capsys.readouterr().err
