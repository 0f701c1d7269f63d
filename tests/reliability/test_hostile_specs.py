"""Hostile and careless specs end in exit code 2 and one short message naming file, key, value and what is allowed.

Each test covers one way a spec used to crash `autopeft validate` with a traceback, pass validation and fail
later, or make validation slow or its message huge.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from autopeft.cli import main
from autopeft.errors import SpecError
from autopeft.spec import load_spec, load_yaml
from conftest import write_spec

AUTOPEFT = Path(sys.executable).parent / "autopeft"


def validate(spec_path: Path, capsys) -> tuple[int, str]:
    code = main(["validate", str(spec_path)])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def assert_refused(spec_path: Path, capsys, *fragments: str, file: Path | None = None) -> str:
    """Validate ``spec_path``: exit code 2, one message naming ``file`` (default: the spec) and each fragment."""
    code, output = validate(spec_path, capsys)
    assert code == 2, output
    assert output.startswith("error:") and f"{file or spec_path}: " in output and "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in {output!r}"
    return output


@pytest.fixture
def spec_with(tmp_path, tiny_bert, sentiment_csv):
    """``spec_with(**sections)``: a valid tiny spec with some sections replaced or extended."""

    def make(**sections):
        model = {"id": str(tiny_bert), **sections.pop("model", {})}
        data = {"source": str(sentiment_csv), **sections.pop("data", {})}
        return write_spec(tmp_path, model=model, data=data, **sections)

    return make


def space(**overrides):
    return {"search": {"space": overrides}}


# --------------------------------------------------------------------------------------------------------------
# 1. Values that made validation raise (TypeError, OSError) now give a message
# --------------------------------------------------------------------------------------------------------------

CRASHES = {
    "string bound": (space(learning_rate={"low": "abc"}), ["search.space.learning_rate", "'abc'", "not a finite number"]),
    "choices not a list": (space(**{"lora.r": {"choices": 5}}), ["search.space.lora.r", "choices is a list", "integers >= 1"]),
    "mapping as default": (space(**{"lora.r": {"default": {"a": 1}}}), ["search.space.lora.r", "default {'a': 1} is not an integer"]),
    "dict default of a float": (space(**{"lora.dropout": {"default": {"a": 1}}}), ["search.space.lora.dropout", "not a finite number"]),
    "long data.source": ({"data": {"source": "x" * 300 + ".csv"}}, ["data.source", "(306 characters)", "at most 255 bytes"]),
    "non-ASCII data.source": ({"data": {"source": "é" * 200}}, ["data.source", "at most 255 bytes", "one has 400"]),
    "long model.id": ({"model": {"id": "m" * 300}}, ["model.id", "at most 255 bytes"]),
    "long path in model.id": ({"model": {"id": "/".join(["d" * 200] * 30)}}, ["model.id", "at most 4096 bytes"]),
    "long search.preset": ({"search": {"preset": "p" * 300}}, ["search.preset", "at most 255 bytes"]),
    "NUL in a plugin path": ({"plugins": ["a\0b.py"]}, ["plugins.0", "NUL"]),
    "unknown field of a non-string name": (space(learning_rate={1: 2}), ["search.space.learning_rate", "unknown field(s) ['1']"]),
}


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_values_that_crashed_validation_give_one_message(spec_with, capsys, case):
    """Catches removing the type checks in space.override / Param.problems (TypeError) or the path checks in
    spec.PathText (OSError: File name too long)."""
    sections, fragments = CRASHES[case]
    assert_refused(spec_with(**sections), capsys, *fragments)


@pytest.mark.parametrize("content, fragments", [
    ("- just\n- a list\n", ["(top level)", "a preset is a mapping"]),
    ("variants: lora\n", ["variants", "a non-empty list of variant names"]),
    ("space: [1, 2]\n", ["space", "a mapping {parameter: override}"]),
    ("space: {lora.dropout: {low: 1e-4, high: .inf}}\n", ["space.lora.dropout.high", "must be finite"]),
    ("space: {lora.alpha_ratio: [1, .nan]}\n", ["space.lora.alpha_ratio[1]", "must be finite"]),
    ("space: {lora.dropout: {high: 2}}\n", ["search.space.lora.dropout", "high 2.0 is not in [0, 1)"]),
    ("space: {learning_rate: [1, 2\n", ["line 2", "not valid YAML"]),
])
def test_a_malformed_preset_file_is_reported_with_its_file_and_key(spec_with, tmp_path, capsys, content, fragments):
    """Catches removing the shape checks in plan.load_preset (TypeError / AttributeError on a list preset)."""
    preset = tmp_path / "my-preset.yaml"
    preset.write_text(content)
    spec = spec_with(search={"preset": str(preset)})
    problem_in_spec = fragments[0].startswith("search.")
    assert_refused(spec, capsys, *fragments, file=spec if problem_in_spec else preset)


def test_any_exception_while_checking_becomes_a_spec_error(spec_with, capsys, monkeypatch):
    """Catches removing the catch-all in plan._checked: an unforeseen exception in a check (here the data check
    hitting a permission error) must name the key instead of printing a traceback."""
    import autopeft.plan

    def unreadable(spec, registry):
        raise PermissionError(13, "Permission denied", str(spec.data.source))

    monkeypatch.setattr(autopeft.plan, "check_source", unreadable)
    assert_refused(spec_with(), capsys, "data.source", "cannot be checked (PermissionError", "Permission denied")


# --------------------------------------------------------------------------------------------------------------
# 2. Values that passed validation and failed later are refused at validate
# --------------------------------------------------------------------------------------------------------------

LATE_FAILURES = {
    "inf in a space override": (space(learning_rate={"low": 1e-3, "high": float("inf"), "log": True}), ["search.space.learning_rate.high", "inf", "finite"]),
    "nan timeout": ({"search": {"timeout": float("nan")}}, ["search.timeout", "nan", "finite"]),
    "inf weight decay": ({"training": {"weight_decay": float("inf")}}, ["training.weight_decay", "inf", "finite"]),
    "inf as text for a float": ({"training": {"weight_decay": "inf"}}, ["training.weight_decay", "'inf'", "finite number"]),
    "nan in a choice list": (space(**{"lora.alpha_ratio": [1.0, float("nan")]}), ["search.space.lora.alpha_ratio[1]", "finite"]),
    "nan split": ({"data": {"splits": {"validation": float("nan")}}}, ["data.splits.validation", "finite"]),
    "inf in a constraint": ({"search": {"constraints": ["trainable_params <= 1e999"]}}, ["search.constraints", "not a finite number"]),
    "timeout that overflows": ({"search": {"timeout": "9" * 400 + "s"}}, ["search.timeout", "finite"]),
    "string fixed for an int": (space(**{"lora.r": "hello"}), ["search.space.lora.r", "'hello'", "integers >= 1"]),
    "float fixed for an int": (space(**{"lora.r": 8.5}), ["search.space.lora.r", "integers"]),
    "bool fixed for a float": (space(**{"lora.dropout": True}), ["search.space.lora.dropout", "finite numbers in [0, 1)"]),
    "number for a string choice": (space(target_modules=[1, 2]), ["search.space.target_modules", "choice 1", "strings"]),
    "log maybe": (space(learning_rate={"low": 1e-3, "high": 1e-2, "log": "maybe"}), ["search.space.learning_rate", "log 'maybe' is not true or false"]),
    "negative dropout": (space(**{"lora.dropout": -0.2}), ["search.space.lora.dropout", "-0.2", "in [0, 1)"]),
    "dropout range past 1": (space(**{"lora.dropout": {"high": 1.0}}), ["search.space.lora.dropout", "high 1.0 is not in [0, 1)"]),
    "zero learning rate": (space(learning_rate=[0.0, 1e-3]), ["search.space.learning_rate", "choice 0.0", "> 0"]),
    "zero rank in choices": (space(**{"lora.r": [0, 4]}), ["search.space.lora.r", "choice 0", "integers >= 1"]),
    "negative low rank": (space(**{"lora.r": {"low": -2}}), ["search.space.lora.r", "low -2 is not >= 1"]),
    "negative rank of a rank without log": ({"search": {"variants": ["vblora"], "space": {"vblora.r": -1}}}, ["search.space.vblora.r", "integers >= 1"]),
    "step on a float": (space(learning_rate={"step": 0.1}), ["search.space.learning_rate", "no step"]),
    "choices and a range": (space(**{"lora.r": {"choices": [4], "low": 2}}), ["search.space.lora.r", "either choices or low"]),
    "not a plugin file": ({"plugins": ["/etc/passwd"]}, ["plugins[0]", "'/etc/passwd'", "a .py file or a package folder"]),
}


@pytest.mark.parametrize("case", sorted(LATE_FAILURES))
def test_values_that_failed_later_are_refused_at_validate(spec_with, capsys, case):
    """Catches removing the non-finite walk in spec.parse_spec, allow_inf_nan=False, the type and Bounds checks
    in space.override, Param.legal on lora's dropout and ranks, or the plugin-path check in plan.make_plan."""
    sections, fragments = LATE_FAILURES[case]
    assert_refused(spec_with(**sections), capsys, *fragments)


def test_a_package_folder_without_init_is_not_a_plugin(spec_with, tmp_path, capsys):
    """Catches dropping the spec-listed broken-plugin check in plan.make_plan (the registry's import refuses the
    folder; validate then said OK)."""
    (tmp_path / "not_a_package").mkdir()
    assert_refused(spec_with(plugins=[str(tmp_path / "not_a_package")]), capsys, "plugins[0]", "without __init__.py")


def test_an_output_folder_under_a_file_is_refused(spec_with, tmp_path, capsys):
    """Catches removing plan._check_output: the search would fail after loading the model."""
    (tmp_path / "a-file").write_text("not a folder")
    assert_refused(spec_with(output={"dir": str(tmp_path / "a-file" / "run")}), capsys, "output.dir", f"{tmp_path / 'a-file'} is a file")
    assert_refused(spec_with(output={"dir": str(tmp_path / "a-file")}), capsys, "output.dir", "it is a file, not a folder")


def test_an_output_folder_that_cannot_be_written_is_refused(spec_with, capsys):
    """Catches removing the write probe in plan._check_output. /proc takes no new folder, even for root (for whom
    permission bits and os.access say yes)."""
    assert_refused(spec_with(output={"dir": "/proc/autopeft-run/out"}), capsys, "output.dir", "cannot write in /proc")


def test_the_write_probe_leaves_nothing_behind(spec_with, tmp_path, capsys):
    """The write check creates nothing a user would find: neither the run folder nor a probe."""
    spec = spec_with(output={"dir": str(tmp_path / "runs" / "new")})
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = validate(spec, capsys)
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------------------------------------------
# 3. 1e-3 is a number (YAML 1.1 reads it as a string)
# --------------------------------------------------------------------------------------------------------------


def test_exponent_floats_without_a_dot_are_numbers_everywhere(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches removing the extra float resolver of spec.SpecLoader, or plan.load_preset not using load_yaml."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("space:\n  learning_rate: {low: 1e-4, high: 5E-3, log: true}\n")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        f"model: {{id: {tiny_bert}}}\n"
        f"data: {{source: {sentiment_csv}, text_column: review, label_column: sentiment, splits: {{validation: 40, test: 40}}}}\n"
        f"search: {{preset: {preset}, space: {{lora.dropout: {{low: 1e-2, high: 1E-1}}}}, constraints: ['trainable_params <= 1e6']}}\n"
        f"training: {{weight_decay: 1e-2, max_steps: 1e3}}\n"
        f"output: {{dir: {tmp_path / 'run'}}}\n"
    )
    code, output = validate(spec_path, capsys)
    assert code == 0, output
    spec = load_spec(spec_path)
    assert spec.training.weight_decay == 0.01 and spec.training.max_steps == 1000
    assert spec.search.space["lora.dropout"] == {"low": 0.01, "high": 0.1}

    from autopeft.plan import make_plan

    spaces = make_plan(spec).spaces["lora"]
    assert (spaces["learning_rate"].low, spaces["learning_rate"].high) == (1e-4, 5e-3)
    assert load_yaml("a: 1e3\nb: -2.5e-3\nc: 1_000e-3\nd: '1e3'\ne: 1e\nf: e3\n") == {"a": 1000.0, "b": -0.0025, "c": 1.0, "d": "1e3", "e": "1e", "f": "e3"}


def test_a_saved_run_spec_reads_exponent_floats(tmp_path, tiny_bert, sentiment_csv):
    """A run folder's spec.yaml is read by load_spec too, so a hand-edited 1e-3 there is a number, also where the
    schema takes any value (search.space) and pydantic would not turn the string into a float."""
    spec_path = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)})
    text = yaml.safe_dump(load_spec(spec_path).model_dump(mode="json"), sort_keys=False)
    saved = tmp_path / "run-spec.yaml"
    saved.write_text(text.replace("low: 0.005", "low: 5e-3"))
    assert load_spec(saved).search.space["learning_rate"]["low"] == 5e-3


# --------------------------------------------------------------------------------------------------------------
# 4. Hostile sizes: huge values, alias bombs, deep nesting, huge files
# --------------------------------------------------------------------------------------------------------------


def test_a_huge_value_gives_a_short_message(spec_with, capsys):
    """Catches removing the cut in errors.shorten: the message repeated the 200 KB value in full."""
    output = assert_refused(spec_with(**space(**{"lora.r": "y" * 200_000})), capsys, "search.space.lora.r", "… (200002 characters)")
    assert len(output) < 1000


def test_a_huge_key_and_many_problems_give_a_short_message(spec_with, capsys):
    """Catches removing the cut of keys in SpecError or the cap on listed problems in SpecErrors."""
    many = {f"k{i:03}" + "z" * 3000: i for i in range(100)}
    output = assert_refused(spec_with(training=many), capsys, "100 problems", "… and 90 more", "(3013 characters)")
    assert len(output) < 6000


def alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [7, 9])
def test_an_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path, capsys, levels):
    """Catches removing the expanded-size count in spec.SpecLoader.compose_node: a 7-level bomb printed 39 MB and
    a 9-level one ran for minutes."""
    spec = tmp_path / "bomb.yaml"
    spec.write_text(alias_bomb(levels) + "model: {id: x}\ndata: {source: y}\n")
    assert spec.stat().st_size < 1000
    started = time.monotonic()
    output = assert_refused(spec, capsys, "at most 100000 values", "line 5", "got '111111 values'")
    assert time.monotonic() - started < 5 and len(output) < 1000


def test_an_alias_that_contains_itself_is_refused(tmp_path, capsys):
    spec = tmp_path / "loop.yaml"
    spec.write_text("model: &m {id: x, again: *m}\ndata: {source: y}\n")
    assert_refused(spec, capsys, "'*m'", "contains it")


def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path, capsys):
    """Catches removing the depth bound in spec.SpecLoader (the composer overflowed Python's stack)."""
    spec = tmp_path / "deep.yaml"
    spec.write_text("model: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert_refused(spec, capsys, "nest at most 64 levels")


def test_a_spec_file_over_the_size_limit_is_refused(tmp_path, capsys):
    """Catches removing the size limit in spec.load_yaml."""
    spec = tmp_path / "big.yaml"
    spec.write_text("name: " + "x" * 1_200_000 + "\n")
    assert_refused(spec, capsys, "(file)", "1200007 bytes", "at most 1000000 bytes")


def test_a_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    """Catches removing the decode check in spec.load_yaml (UnicodeDecodeError traceback)."""
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("name: café\n".encode("latin-1"))
    assert_refused(spec, capsys, "not UTF-8 text")


def test_load_yaml_raises_spec_errors_only():
    with pytest.raises(SpecError, match="at most 100000 values"):
        load_yaml(alias_bomb(8))
    with pytest.raises(SpecError, match="not valid YAML"):
        load_yaml("a: [1, 2\n", file="x.yaml")


def test_the_console_script_prints_one_line_for_an_alias_bomb(tmp_path):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(alias_bomb(9) + "model: {id: x}\ndata: {source: y}\n")
    result = subprocess.run([str(AUTOPEFT), "validate", str(spec)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1 and len(result.stderr) < 1000


def test_a_terminal_that_cannot_show_a_path_gets_it_escaped(tmp_path, tiny_bert, sentiment_csv):
    """Catches removing the errors="backslashreplace" set up in cli.main: printing a non-ASCII path to an ASCII
    terminal raised UnicodeEncodeError after the spec had validated."""
    data = tmp_path / "données.csv"
    data.write_bytes(sentiment_csv.read_bytes())
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(data)})
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run([str(AUTOPEFT), "validate", str(spec)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "donn\\xe9es.csv" in result.stdout.replace("\n", "") and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------------------------
# 6. A causal-LM task needs a model with a causal-LM head
# --------------------------------------------------------------------------------------------------------------


def test_causal_lm_on_an_encoder_is_refused_at_validate(tmp_path, tiny_bert, qa_jsonl, capsys):
    """Catches removing plan._check_task_head: the search trained a BERT encoder as a "causal LM"."""
    spec = write_spec(
        tmp_path, model={"id": str(tiny_bert), "task": "causal-lm"},
        data={"source": str(qa_jsonl), "prompt_column": "question", "response_column": "answer", "text_column": None, "label_column": None},
        search={"space": {}},
    )
    assert_refused(spec, capsys, "model.task", "'causal-lm'", str(tiny_bert), "bert encoder (BertModel)", "not a causal language model")


def test_causal_lm_on_a_decoder_still_validates(tmp_path, tiny_llama, qa_jsonl, capsys):
    """The head check refuses encoders only (a check keyed on the wrong config field would refuse Llama too)."""
    spec = write_spec(
        tmp_path, model={"id": str(tiny_llama), "task": "causal-lm"},
        data={"source": str(qa_jsonl), "prompt_column": "question", "response_column": "answer", "text_column": None, "label_column": None},
        search={"space": {}},
    )
    code, output = validate(spec, capsys)
    assert code == 0, output


def test_causal_lm_on_a_packaged_encoder_is_refused(tmp_path, qa_jsonl, capsys):
    """The packaged MiniLM (a plugin's model source) is checked from its config.json alone."""
    spec = write_spec(
        tmp_path, model={"id": "sentence-transformers/all-MiniLM-L6-v2", "task": "causal-lm"},
        data={"source": str(qa_jsonl), "prompt_column": "question", "response_column": "answer", "text_column": None, "label_column": None},
        search={"space": {}},
    )
    assert_refused(spec, capsys, "model.task", "sentence-transformers/all-MiniLM-L6-v2", "not a causal language model")
