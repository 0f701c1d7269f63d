"""Tiny random models built from a config, small synthetic data sets, and a spec writer.

Nothing here downloads anything: the models are random BERT and Llama networks saved to a temporary folder
with a word-level tokenizer, so specs point at them as local folders exactly as a user would.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

# Tests never reach a hub: everything they use is built here or shipped in installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    import torch

    # Tiny models gain nothing from threads, and on a loaded 2-core machine threads make them many times slower.
    torch.set_num_threads(1)

POSITIVE = ["good", "great", "fine", "superb", "lovely", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "film", "was", "a", "plot", "actor", "very", "story", "and", "it", "scene", "movie"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["question", "answer", "what", "is", "yes", "no"]


def _tokenizer(folder: Path, kind: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    else:
        special = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(special + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special[1] if kind == "bert" else "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def build_tiny_model(folder: Path, kind: str) -> Path:
    """Save a random tiny ``bert`` or ``llama`` model with its tokenizer to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab_size = len(WORDS) + 4
    if kind == "bert":
        config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
        model = BertModel(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    _tokenizer(folder, kind)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short texts whose label is given by the sentiment word in them: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": label})
    return rows


@pytest.fixture
def sentiment_csv(tmp_path) -> Path:
    path = tmp_path / "reviews.csv"
    rows = sentiment_rows(240)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "sentiment"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def qa_jsonl(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(80):
            word = rng.choice(POSITIVE + NEGATIVE)
            answer = "yes" if word in POSITIVE else "no"
            handle.write(json.dumps({"question": f"what is {word}", "answer": f"answer {answer}"}) + "\n")
    return path


def write_spec(folder: Path, **sections: Any) -> Path:
    """Write a spec for a tiny, fast search; ``sections`` replace or extend the defaults key by key."""
    spec: dict[str, Any] = {
        "model": {"id": "REPLACE", "task": "sequence-classification"},
        "data": {"source": "REPLACE", "text_column": "review", "label_column": "sentiment", "max_length": 16, "splits": {"validation": 40, "test": 40}},
        "search": {"variants": ["lora"], "n_trials": 2, "seed": 0, "space": {"learning_rate": {"low": 5e-3, "high": 2e-2}, "lora.r": [2, 4]}},
        "training": {"max_steps": 12, "batch_size": 8, "eval_every": 6, "eval_batch_size": 32},
        "output": {"dir": str(folder / "run")},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(spec.get(section), dict):
            spec[section] = {**spec[section], **values}
        else:
            spec[section] = values
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def classification_spec(tmp_path, tiny_bert, sentiment_csv) -> Path:
    return write_spec(tmp_path, model={"id": str(tiny_bert), "task": "sequence-classification"}, data={"source": str(sentiment_csv)})


def plain_peft_test_predictions(best: Path, model_dir: Path, spec_path: Path) -> tuple[list[int], list[int]]:
    """What a user's fresh process predicts for the test split with plain transformers + PEFT, and what autopeft
    recorded in ``best/test_predictions.csv``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from autopeft.data import collate, load_raw, prepare
    from autopeft.plan import make_plan
    from autopeft.spec import load_spec

    labels = json.loads((best / "autopeft.json").read_text())["base_model"]["labels"]
    base = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    model = PeftModel.from_pretrained(base, best).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = load_spec(spec_path)
    data = prepare(load_raw(spec, make_plan(spec).registry), tokenizer, spec)
    with torch.no_grad():
        inputs = {k: v for k, v in collate(data.test, tokenizer.pad_token_id).items() if k != "labels"}
        predictions = model(**inputs).logits.argmax(-1).tolist()
    with open(best / "test_predictions.csv") as handle:
        recorded = [int(row["prediction_id"]) for row in csv.DictReader(handle)]
    return predictions, recorded


def snapshot(root: Path, ignore: tuple[str, ...] = ()) -> dict[str, object]:
    """Every entry under ``root`` (links not followed): file bytes, link targets, and folders; entries named in
    ``ignore`` (such as the search's own lock file, rewritten by every search) left out."""
    out: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if name in ignore:
                continue
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = ("link", os.readlink(path))
            elif path.is_dir():
                out[key] = "folder"
            else:
                out[key] = path.read_bytes()
    return out
