"""Causal language modelling on a tiny Llama: instruction pairs and plain text, eval loss and perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from autopeft.cli import main
from autopeft.data import collate, load_raw, prepare
from autopeft.plan import make_plan
from autopeft.spec import load_spec
from conftest import write_spec


def lm_spec(tmp_path, tiny_llama, source, **data):
    return write_spec(
        tmp_path,
        model={"id": str(tiny_llama), "task": "causal-lm"},
        data={"source": str(source), "text_column": None, "label_column": None, "max_length": 16, "splits": {"validation": 16, "test": 16}, **data},
        search={"variants": ["lora"], "n_trials": 1, "space": {"learning_rate": {"low": 1e-2, "high": 2e-2}}},
    )


def test_instruction_pairs_train_on_the_response_and_export_a_loadable_adapter(tmp_path, tiny_llama, qa_jsonl):
    spec_path = lm_spec(tmp_path, tiny_llama, qa_jsonl, prompt_column="question", response_column="answer")
    assert main(["search", str(spec_path)]) == 0
    best = tmp_path / "run" / "best"
    info = json.loads((best / "autopeft.json").read_text())
    assert set(info["validation"]) == {"eval_loss", "perplexity"}
    assert info["validation"]["perplexity"] == pytest.approx(math.exp(info["validation"]["eval_loss"]))
    assert info["metric"] == {"name": "eval_loss", "direction": "minimize"}

    spec = load_spec(spec_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token  # as autopeft does for a tokenizer without a padding token
    data = prepare(load_raw(spec, make_plan(spec).registry), tokenizer, spec)
    # Prompt tokens are masked out of the loss; response tokens are kept.
    first = data.train[0]
    assert first["labels"][0] == -100 and first["labels"][-1] == first["input_ids"][-1]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), best).eval()
    batch = collate(data.test, tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    # One batch holds the whole test split, so the model's mean is autopeft's token-weighted mean.
    assert loss == pytest.approx(info["test"]["eval_loss"], rel=1e-4)


def test_plain_text_language_modelling(tmp_path, tiny_llama, sentiment_csv):
    spec_path = lm_spec(tmp_path, tiny_llama, sentiment_csv, text_column="review")
    assert main(["search", str(spec_path)]) == 0
    info = json.loads((tmp_path / "run" / "best" / "autopeft.json").read_text())
    assert info["validation"]["eval_loss"] > 0 and info["base_model"]["task"] == "causal-lm"


def test_causal_lm_needs_its_columns(tmp_path, tiny_llama, qa_jsonl, capsys):
    spec_path = lm_spec(tmp_path, tiny_llama, qa_jsonl, prompt_column="question", response_column="reply")
    assert main(["validate", str(spec_path)]) == 2
    assert "data.response_column" in capsys.readouterr().err
