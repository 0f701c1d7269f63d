"""Property: whatever a spec file holds, `autopeft validate` answers quickly with exit 0, or exit 2 and a short message.

Hypothesis starts from a spec that validates for real (a tiny local BERT and a CSV), then mutates it: keys renamed,
deleted or added; values replaced by other types, huge or non-ASCII strings, NaN and infinity, deeper nesting;
and the YAML text itself cut, spliced or fed aliases (bombs, self-references). No outcome may be a traceback, a
message of megabytes, or a call that takes seconds.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from autopeft.cli import main
from autopeft.errors import MAX_LISTED_ERRORS
from conftest import write_spec

AUTOPEFT = Path(sys.executable).parent / "autopeft"
MAX_OUTPUT = 10_000  # bytes: a message names a file, a key, a cut value and what is allowed, for at most 10 problems
MAX_SECONDS = 3.0

# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------

KEYS = ["model", "data", "search", "training", "output", "plugins", "id", "task", "source", "space", "variants",
        "learning_rate", "lora.r", "lora.dropout", "target_modules", "low", "high", "log", "step", "choices",
        "default", "timeout", "n_trials", "max_steps", "dir", "preset", "splits", "validation", "allocation",
        "ranks", "constraints", "objectives", "pruner", "select", "base_bits", "max_length", "text_column"]

huge_strings = st.integers(300, 200_000).flatmap(lambda n: st.sampled_from(["x", "é", "/", "\u2028", "a/"]).map(lambda c: c * n))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**30), 10**30).map(lambda n: n * 10**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 4, 1e-3, -0.2, 0.5, 1.0, 1e300, "1e-3", "30m", "lora", "q,v", "all", "causal-lm",
                     "/etc/passwd", "/proc/x/y", "..", "", "~", "rotten-tomatoes", "tpe", "pareto"]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    huge_strings,
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10), st.integers()), children, max_size=5),
    ),
    max_leaves=12,
)


def paths_of(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested dict/list document."""
    out = [prefix] if prefix else []
    if isinstance(document, dict):
        for key, value in document.items():
            out += paths_of(value, prefix + (key,))
    elif isinstance(document, list):
        for i, value in enumerate(document):
            out += paths_of(value, prefix + (i,))
    return out


def parent_of(document: Any, path: tuple) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


@st.composite
def mutated_documents(draw, base: dict) -> Any:
    """The base spec with one to four mutations: replace, delete, rename, add, or wrap a value."""
    document = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        paths = paths_of(document)
        if not paths or not isinstance(document, dict):
            break
        path = draw(st.sampled_from(paths))
        parent, last = parent_of(document, path), path[-1]
        action = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add", "wrap"]))
        if action == "replace":
            parent[last] = draw(values)
        elif action == "delete":
            del parent[last]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.integers()))] = parent.pop(last)
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)))] = draw(values)
        elif action == "wrap":
            parent[last] = draw(st.sampled_from([lambda v: [v], lambda v: {"low": v}, lambda v: {"choices": v}]))(parent[last])
    if draw(st.integers(0, 9)) == 0:
        document = draw(values)  # not a mapping at all
    return document


def alias_text(levels: int, fanout: int) -> str:
    lines = ["  b0: &b0 [" + ", ".join(["v"] * fanout) + "]"]
    lines += [f"  b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    return "extra:\n" + "\n".join(lines) + f"\nalias_use: *b{levels - 1}\n"


@st.composite
def spec_texts(draw, base: dict) -> str:
    """YAML text of a mutated spec, sometimes edited as text: cut, spliced with junk, or given aliases."""
    text = yaml.safe_dump(draw(mutated_documents(base)), allow_unicode=True, sort_keys=False)
    edit = draw(st.sampled_from(["none", "none", "none", "cut", "splice", "bomb", "self-alias", "merge"]))
    if edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["[", "{", "*x", "&", "!!python/object:os.system", "\t", ": :", "\x00", "'"])) + text[at:]
    elif edit == "bomb":
        text += alias_text(draw(st.integers(1, 9)), draw(st.integers(2, 10)))
    elif edit == "self-alias":
        text += "loop: &loop {again: *loop}\n"
    elif edit == "merge":
        text += "defaults: &d {max_steps: 5}\ntraining2:\n  <<: *d\n"
    return text


# ----------------------------------------------------------------------------------------------------------------
# The property
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def base_spec(tmp_path, tiny_bert, sentiment_csv, monkeypatch) -> dict:
    """A spec that validates for real; relative output folders land in tmp_path, not the repository."""
    monkeypatch.chdir(tmp_path)
    path = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)})
    return yaml.safe_load(path.read_text())


def check_answer(code: int, out: str, err: str, seconds: float) -> None:
    output = out + err
    assert "Traceback" not in output, output[-3000:]
    assert code in (0, 2), (code, output[-3000:])
    assert len(output.encode("utf-8", "backslashreplace")) < MAX_OUTPUT, output[:3000]
    assert seconds < MAX_SECONDS, f"took {seconds:.1f}s"
    if code == 2:
        assert err.startswith("error:") and out == "", output[:3000]
        assert err.count("\n") <= MAX_LISTED_ERRORS + 3, err[:3000]
    else:
        assert out.startswith("OK ") and err == "", output[:3000]


def test_the_base_spec_validates_for_real(base_spec, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec))
    assert main(["validate", str(path)]) == 0, capsys.readouterr()


@settings(max_examples=150, deadline=timedelta(seconds=10), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_validate_answers_any_spec_with_exit_0_or_one_short_message(base_spec, tmp_path, capsys, data):
    """Catches removing any of the guards: the size and alias limits of spec.SpecLoader, the value cuts of
    errors.shorten, the type checks of space.override, spec.PathText, the catch-all of plan._checked."""
    text = data.draw(spec_texts(base_spec), label="spec")
    path = tmp_path / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    capsys.readouterr()
    started = time.monotonic()
    code = main(["validate", str(path)])
    seconds = time.monotonic() - started
    captured = capsys.readouterr()
    event(f"exit {code}")  # --hypothesis-show-statistics: how many mutated specs stayed valid
    check_answer(code, captured.out, captured.err, seconds)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_the_console_script_answers_the_same_way(base_spec, tmp_path, data):
    """The installed `autopeft` script, in a fresh process: exit 0 or 2, never a traceback (what a user sees)."""
    text = data.draw(spec_texts(base_spec), label="spec")
    path = tmp_path / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    result = subprocess.run([str(AUTOPEFT), "validate", str(path)], capture_output=True, text=True, errors="backslashreplace", timeout=120, cwd=tmp_path)
    # A fresh process imports everything first; the bound on time is for validation, so it is looser here.
    check_answer(result.returncode, result.stdout, result.stderr, 0.0)
