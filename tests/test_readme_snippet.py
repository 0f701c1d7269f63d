"""The README's offline loading snippet, run as printed, on an adapter from a short search of the packaged MiniLM."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch

from autopeft.cli import main
from autopeft.data import load_raw
from autopeft.errors import ModelNotFoundError, SpecError
from autopeft.models import base_model
from autopeft.plan import make_plan
from autopeft.spec import load_spec
from conftest import write_spec

README = Path(__file__).parent.parent / "README.md"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _offline_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    [snippet] = [b for b in blocks if "from autopeft.models import base_model" in b]
    return snippet


def test_the_readme_snippet_loads_the_adapter_a_search_exported(tmp_path, monkeypatch):
    """Catches: a snippet that needs the hub (HF_HUB_OFFLINE is set here), and a base_model that loads a base
    other than the one the search trained on (its predictions would then differ from test_predictions.csv)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    spec_path = write_spec(
        tmp_path,
        model={"id": MINILM, "task": "sequence-classification"},
        data={"source": "rotten-tomatoes", "text_column": "text", "label_column": "label", "max_length": 32, "splits": {"train": 200, "validation": 32, "test": 48}},
        search={"variants": ["lora"], "n_trials": 1, "space": {"learning_rate": 5e-3}},
        training={"max_steps": 6, "batch_size": 8, "eval_batch_size": 64},
        output={"dir": "runs/quickstart"},
    )
    assert main(["search", str(spec_path)]) == 0
    best = tmp_path / "runs" / "quickstart" / "best"
    assert json.loads((best / "autopeft.json").read_text())["base_model"]["labels"] == ["rotten", "fresh"]

    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_offline_snippet(), "README.md", "exec"), namespace)
    assert printed.getvalue().strip() in ("rotten", "fresh")

    # The snippet's model predicts the test split exactly as the search recorded it (one batch, as evaluated).
    model, tokenizer = namespace["model"], namespace["tokenizer"]
    spec = load_spec(spec_path)
    texts = list(load_raw(spec, make_plan(spec).registry)["test"]["text"])
    with torch.no_grad():
        batch = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
        predicted = [model.config.id2label[i] for i in model(**batch).logits.argmax(-1).tolist()]
    with open(best / "test_predictions.csv", newline="") as handle:
        recorded = [row["prediction"] for row in csv.DictReader(handle)]
    assert predicted == recorded


def test_base_model_says_what_it_tried_and_refuses_bad_arguments(monkeypatch):
    """Catches: base_model reaching for the hub offline, or passing a bad task on to transformers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        base_model("acme/not-packaged", num_labels=2)
    with pytest.raises(SpecError, match="task: got 'regression'"):
        base_model(MINILM, task="regression")
