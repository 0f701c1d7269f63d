"""Invalid specs fail with exit code 2 and one message naming the file, the key, the bad value and what is allowed."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import pytest
import yaml

from autopeft.cli import main
from conftest import write_spec


def validate(spec_path, capsys) -> tuple[int, str]:
    code = main(["validate", str(spec_path)])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def edit(spec_path, change) -> None:
    document = yaml.safe_load(spec_path.read_text())
    change(document)
    spec_path.write_text(yaml.safe_dump(document))


def test_a_valid_spec_passes(classification_spec, capsys):
    code, output = validate(classification_spec, capsys)
    assert code == 0, output
    assert "OK" in output and "lora" in output


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["training"].update(max_stepz=10), ["training.max_stepz", "unknown key", "max_steps", "batch_size"]),
        (lambda d: d["search"].update(n_trials="ten"), ["search.n_trials", "'ten'", "integer"]),
        (lambda d: d["search"].update(n_trials=0), ["search.n_trials", "0", "greater than or equal to 1"]),
        (lambda d: d["data"].update(max_length=2), ["data.max_length", "2", "greater than or equal to 8"]),
        (lambda d: d["search"].update(sampler="annealing"), ["search.sampler", "'annealing'", "tpe"]),
        (lambda d: d["search"].update(variants=["lora", "nope"]), ["search.variants[1]", "'nope'", "available: ", "lora"]),
        (lambda d: d["data"].update(source="missing/reviews.csv"), ["data.source", "missing/reviews.csv", "does not exist"]),
        (lambda d: d["data"].update(text_column="body"), ["data.text_column", "'body'", "columns: review, sentiment"]),
        (lambda d: d["data"].update(source="imdb"), ["data.source", "'imdb'", "corpora: ", "rotten-tomatoes"]),
        (lambda d: d["search"]["space"].update({"lora.rank": [4]}), ["search.space.lora.rank", "parameters: ", "lora.r"]),
        (lambda d: d["search"]["space"].update({"lora.r": {"low": 8, "high": 2}}), ["search.space.lora.r", "low 8 is above high 2"]),
        (lambda d: d["search"].update(metric="perplexity"), ["search.metric", "'perplexity'", "accuracy"]),
        (lambda d: d["search"].update(timeout="soon"), ["search.timeout", "'soon'", "30m"]),
        (lambda d: d.update(plugins=["nowhere.py"]), ["plugins[0]", "nowhere.py", "no such plugin"]),
    ],
)
def test_an_invalid_spec_names_file_key_value_and_what_is_allowed(classification_spec, capsys, change, expected):
    edit(classification_spec, change)
    code, output = validate(classification_spec, capsys)
    assert code == 2
    assert str(classification_spec) in output
    for fragment in expected:
        assert fragment in output, f"{fragment!r} not in {output!r}"
    assert "Traceback" not in output


def test_every_problem_is_reported_at_once(classification_spec, capsys):
    edit(classification_spec, lambda d: (d["training"].update(batch_size=0), d["search"].update(seed="x")))
    code, output = validate(classification_spec, capsys)
    assert code == 2
    assert "2 problems" in output and "training.batch_size" in output and "search.seed" in output


def test_yaml_syntax_errors_give_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  id: x\n  task: [unclosed\n")
    code, output = validate(path, capsys)
    assert code == 2 and "line" in output and "not valid YAML" in output


def test_a_missing_spec_file_is_reported(tmp_path, capsys):
    code, output = validate(tmp_path / "nope.yaml", capsys)
    assert code == 2 and "does not exist" in output


def test_the_command_line_prints_no_traceback(classification_spec):
    edit(classification_spec, lambda d: d["model"].update(task="translation"))
    result = subprocess.run([sys.executable, "-m", "autopeft", "validate", str(classification_spec)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "model.task" in result.stderr and "'translation'" in result.stderr and "sequence-classification" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_missing_local_model_folder_is_a_spec_error(tmp_path, sentiment_csv, capsys):
    spec = write_spec(tmp_path, model={"id": "./models/not-there"}, data={"source": str(sentiment_csv)})
    code, output = validate(spec, capsys)
    assert code == 2 and "model.id" in output and "does not exist" in output


@pytest.mark.parametrize("example", sorted((Path(__file__).parent.parent / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_is_valid(example, capsys):
    code, output = validate(example, capsys)
    assert code == 0, output
