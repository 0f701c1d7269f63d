"""The data is read and tokenized in a short-lived child process: the search process never holds ``datasets`` and
pyarrow (about 80 MB for its whole life), gets the same token ids as in-process preparation, and a child that
fails or dies is reported as a data error, not a hang or a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopeft.data import PreparedData, load_raw, prepare, prepare_apart, read_prepared, write_prepared
from autopeft.errors import DataError
from autopeft.plan import make_plan
from autopeft.spec import load_spec

PROBE = """
import sys
from autopeft.cli import main
code = main(sys.argv[1:])
print("EXIT", code, "DATASETS", "datasets" in sys.modules, "PYARROW", "pyarrow" in sys.modules)
"""


def test_a_search_never_imports_datasets_into_its_own_process(classification_spec):
    """Catches: the search reading its data in its own process, which keeps ``datasets`` and pyarrow resident
    through every trial (the peak-memory gap against a hand-written loop)."""
    out = subprocess.run([sys.executable, "-c", PROBE, "search", str(classification_spec)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "EXIT 0 DATASETS False PYARROW False"
    assert (classification_spec.parent / "run" / "best" / "adapter_model.safetensors").is_file()  # the search did run


def _tokenizer_and_spec(spec_path):
    from transformers import AutoTokenizer

    spec = load_spec(spec_path)
    plan = make_plan(spec)
    return AutoTokenizer.from_pretrained(spec.model.id), spec, plan.registry


def test_the_child_hands_back_exactly_what_in_process_preparation_gives(classification_spec):
    tokenizer, spec, registry = _tokenizer_and_spec(classification_spec)
    assert prepare_apart(spec, registry, tokenizer) == prepare(load_raw(spec, registry), tokenizer, spec)


def test_causal_lm_data_comes_back_with_its_per_token_labels(tmp_path, tiny_llama, qa_jsonl):
    from conftest import write_spec

    path = write_spec(
        tmp_path, model={"id": str(tiny_llama), "task": "causal-lm"},
        data={"source": str(qa_jsonl), "prompt_column": "question", "response_column": "answer", "max_length": 16, "splits": {"validation": 8, "test": 8}},
    )
    tokenizer, spec, registry = _tokenizer_and_spec(path)
    apart = prepare_apart(spec, registry, tokenizer)
    assert apart == prepare(load_raw(spec, registry), tokenizer, spec)
    assert -100 in apart.train[0]["labels"]  # the prompt's tokens are masked out of the loss


rows = st.lists(
    st.fixed_dictionaries({"input_ids": st.lists(st.integers(0, 2**31), max_size=5), "labels": st.integers(-100, 50)}), max_size=4
)
per_token_rows = st.lists(
    st.integers(0, 4).flatmap(lambda n: st.fixed_dictionaries({"input_ids": st.lists(st.integers(0, 9), min_size=n, max_size=n), "labels": st.lists(st.integers(-100, 9), min_size=n, max_size=n)})),
    max_size=4,
)


@settings(max_examples=40, deadline=None)
@given(train=rows, validation=rows, test=per_token_rows, names=st.none() | st.lists(st.text(max_size=3), max_size=3))
def test_tokenized_splits_survive_the_hand_over_unchanged(tmp_path_factory, train, validation, test, names):
    """Any mix of per-token and per-row integer columns, empty rows and empty splits round-trips exactly."""
    folder = tmp_path_factory.mktemp("prepared")
    data = PreparedData(train, validation, test, names, [str(i) for i in range(len(test))] if names is not None else None)
    write_prepared(data, folder)
    assert read_prepared(folder) == data


def test_an_error_in_the_child_is_raised_as_a_data_error_with_its_message(classification_spec, monkeypatch):
    tokenizer, spec, registry = _tokenizer_and_spec(classification_spec)

    def broken(raw, tokenizer, spec):
        raise RuntimeError("the tokenizer refused row 17")

    monkeypatch.setattr("autopeft.data.prepare", broken)  # the forked child inherits the patch
    with pytest.raises(DataError, match=r"spec\.yaml: reading and tokenizing data.source failed: RuntimeError: the tokenizer refused row 17"):
        prepare_apart(spec, registry, tokenizer)


def test_a_data_error_in_the_child_keeps_its_own_message(tmp_path, tiny_bert):
    from conftest import write_spec

    data = tmp_path / "gaps.csv"
    data.write_text("review,sentiment\n" + "".join(f"good film {i},{'pos' if i % 3 else ''}\n" for i in range(60)))
    tokenizer, spec, registry = _tokenizer_and_spec(write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(data), "splits": {"validation": 10, "test": 10}}))
    with pytest.raises(DataError, match=r"^label column 'sentiment' has empty values$"):
        prepare_apart(spec, registry, tokenizer)


def test_a_child_killed_while_preparing_is_reported_not_awaited_forever(classification_spec, monkeypatch):
    tokenizer, spec, registry = _tokenizer_and_spec(classification_spec)
    monkeypatch.setattr("autopeft.data.prepare", lambda raw, tokenizer, spec: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(DataError, match=r"spec\.yaml: the process reading and tokenizing data.source was killed by signal 9"):
        prepare_apart(spec, registry, tokenizer)


def _prepare_and_count(spec_path, queue) -> None:
    tokenizer, spec, registry = _tokenizer_and_spec(spec_path)
    queue.put(len(prepare_apart(spec, registry, tokenizer).train))


def test_a_daemonic_process_which_may_not_fork_children_prepares_its_data_itself(classification_spec):
    """Catches: a search started from a pool worker (a daemonic process) failing with "daemonic processes are
    not allowed to have children" instead of reading its data."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    worker = context.Process(target=_prepare_and_count, args=(classification_spec, queue), daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert worker.exitcode == 0
    assert queue.get(timeout=5) == 160
