"""One short search on the real packaged model and corpus (MiniLM on Rotten Tomatoes), offline."""

from __future__ import annotations

import json

from autopeft.cli import main
from conftest import write_spec


def test_a_short_search_on_minilm_and_rotten_tomatoes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = write_spec(
        tmp_path,
        model={"id": "sentence-transformers/all-MiniLM-L6-v2", "task": "sequence-classification"},
        data={"source": "rotten-tomatoes", "text_column": "text", "label_column": "label", "max_length": 32, "splits": {"train": 400, "validation": 64, "test": 64}},
        search={"variants": ["lora"], "n_trials": 1, "space": {}},
        training={"max_steps": 8, "batch_size": 8, "eval_batch_size": 64},
    )
    assert main(["search", str(spec)]) == 0
    info = json.loads((tmp_path / "run" / "best" / "autopeft.json").read_text())
    assert info["base_model"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["base_model"]["labels"] == ["rotten", "fresh"]
    assert info["data"]["sizes"] == {"train": 400, "validation": 64, "test": 64, "labels": ["rotten", "fresh"]}
    assert 0.0 <= info["test"]["accuracy"] <= 1.0
    config = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
