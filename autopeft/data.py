"""Reading the spec's data, splitting it deterministically, and tokenizing it once per run.

The test split is only ever used to report the exported adapter's score, never to choose it.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from autopeft.errors import DataError, SpecError
from autopeft.registry import Registry
from autopeft.spec import Spec

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")


# --------------------------------------------------------------------------------------------------------------
# Where the data is, and which columns it has (cheap: used by `autopeft validate`)
# --------------------------------------------------------------------------------------------------------------


def _file_format(spec: Spec, path: Path) -> str:
    if spec.data.format != "auto":
        return spec.data.format
    if path.is_dir():
        return "datasets"
    return SUFFIX_FORMATS.get(path.suffix.lower(), "")


def data_files(spec: Spec) -> dict[str, Path] | None:
    """``{split: path}`` when the source is files or a folder; None when it names a corpus."""
    source = spec.data.source
    if isinstance(source, dict):
        return {split: spec.resolve_path(p) for split, p in source.items()}
    looks_like_path = any(ch in source for ch in "/\\") or Path(source).suffix.lower() in SUFFIX_FORMATS
    path = spec.resolve_path(source)
    if looks_like_path or path.exists():
        return {"data": path}
    return None


def check_source(spec: Spec, registry: Registry) -> list[SpecError]:
    """Problems with ``data.source``: a missing file, an unknown format, or an unknown corpus name."""
    file = str(spec.path)
    files = data_files(spec)
    if files is None:
        if spec.data.source not in registry.corpora:
            names = ", ".join(sorted(registry.corpora)) or "(no corpus plugin is installed)"
            return [SpecError(file, "data.source", spec.data.source, f"not a file, folder or known corpus; corpora: {names}")]
        return []
    errors = []
    for split, path in files.items():
        key = "data.source" if split == "data" else f"data.source.{split}"
        if not path.exists():
            errors.append(SpecError(file, key, str(path), "the file or folder does not exist"))
        elif not _file_format(spec, path):
            errors.append(SpecError(file, key, str(path), "cannot tell the format; use .csv, .jsonl, .json, .parquet, a datasets folder, or set data.format"))
    return errors


def peek_columns(spec: Spec, registry: Registry) -> list[str]:
    """The column names of the data, reading only headers or metadata."""
    files = data_files(spec)
    if files is None:
        return list(registry.corpora[spec.data.source].item.columns)
    path = next(iter(files.values()))
    fmt = _file_format(spec, path)
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), [])
    if fmt in ("jsonl", "json"):
        with open(path, encoding="utf-8") as handle:
            if fmt == "jsonl":
                first = handle.readline()
                return list(json.loads(first)) if first.strip() else []
            document = json.load(handle)
            rows = document if isinstance(document, list) else document.get("data", [])
            return list(rows[0]) if rows else []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    import datasets

    loaded = datasets.load_from_disk(str(path))
    return loaded.column_names if isinstance(loaded, datasets.Dataset) else next(iter(loaded.values())).column_names


def required_columns(spec: Spec) -> dict[str, str]:
    """``{spec key: column}`` of the columns the task reads."""
    data = spec.data
    if spec.model.task == "sequence-classification":
        return {"data.text_column": data.text_column, "data.label_column": data.label_column}
    if data.prompt_column or data.response_column:
        return {"data.prompt_column": data.prompt_column, "data.response_column": data.response_column}
    return {"data.text_column": data.text_column}


def check_columns(spec: Spec, registry: Registry) -> list[SpecError]:
    """Problems with the column keys: a column the task needs that is unset or not in the data."""
    file = str(spec.path)
    try:
        columns = peek_columns(spec, registry)
    except Exception as exc:
        return [SpecError(file, "data.source", str(spec.data.source), f"cannot read its columns ({type(exc).__name__}: {exc})")]
    errors = []
    for key, column in required_columns(spec).items():
        if column is None:
            errors.append(SpecError(file, key, None, f"{spec.model.task} needs this column; columns in the data: {', '.join(columns)}"))
        elif column not in columns:
            errors.append(SpecError(file, key, column, f"not a column of the data; columns: {', '.join(columns)}"))
    return errors


# --------------------------------------------------------------------------------------------------------------
# Loading and splitting
# --------------------------------------------------------------------------------------------------------------


def _load_file(spec: Spec, path: Path) -> datasets.Dataset | datasets.DatasetDict:
    import datasets

    fmt = _file_format(spec, path)
    if fmt == "datasets":
        return datasets.load_from_disk(str(path))
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[fmt]
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def load_raw(spec: Spec, registry: Registry) -> datasets.DatasetDict:
    """The data as a ``DatasetDict`` with ``train``, ``validation`` and ``test``, split by ``data.splits``."""
    import datasets

    datasets.disable_progress_bars()  # autopeft's own display says what is being loaded
    files = data_files(spec)
    try:
        if files is None:
            loaded = registry.corpora[spec.data.source].item.load()
        elif list(files) == ["data"]:
            loaded = _load_file(spec, files["data"])
        else:
            loaded = datasets.DatasetDict({split: _load_file(spec, path) for split, path in files.items()})
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"{spec.path}: data.source {spec.data.source!r} cannot be read: {exc}") from exc
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return split_data(loaded, spec)


def _count(size: int | float, total: int) -> int:
    return int(size) if isinstance(size, int) else max(1, int(round(size * total)))


def split_data(loaded: datasets.DatasetDict, spec: Spec) -> datasets.DatasetDict:
    """Use the data's own splits where it has them and carve the missing ones out of ``train`` with the seed."""
    import datasets

    sizes = spec.data.splits
    splits = dict(loaded)
    if "train" not in splits:
        raise DataError(f"{spec.path}: data.source has splits {sorted(splits)}; one must be called 'train'")
    validation = next((splits[n] for n in VALIDATION_SPLIT_NAMES if n in splits), None)
    test = splits.get("test")
    pool = splits["train"].shuffle(seed=sizes.seed)
    total = len(pool)
    n_test = 0 if test is not None else _count(sizes.test, total)
    n_validation = 0 if validation is not None else _count(sizes.validation, total)
    if n_test + n_validation >= total:
        raise DataError(
            f"{spec.path}: data.splits asks for {n_validation} validation and {n_test} test examples "
            f"out of {total}; nothing would be left to train on"
        )
    if test is None:
        test = pool.select(range(n_test))
    if validation is None:
        validation = pool.select(range(n_test, n_test + n_validation))
    train = pool.select(range(n_test + n_validation, total))
    if sizes.train is not None:
        train = train.select(range(min(len(train), _count(sizes.train, len(train)))))
    return datasets.DatasetDict({"train": train, "validation": validation, "test": test})


# --------------------------------------------------------------------------------------------------------------
# Tokenizing once
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """Tokenized splits, ready for every trial of the run."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    label_names: list[str] | None
    """Class names in label-id order (classification only)."""
    test_texts: list[str] | None = None
    """The raw text of each test example, in order (classification only: ``test_predictions.csv`` shows it)."""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}
        if self.label_names is not None:
            out["labels"] = self.label_names
        return out


def _label_names(raw: datasets.DatasetDict, column: str) -> list[str]:
    feature = raw["train"].features.get(column)
    if getattr(feature, "names", None):
        return list(feature.names)
    values = set()
    for split in raw.values():
        values.update(split[column])
    if None in values:
        raise DataError(f"label column {column!r} has empty values")
    return [str(v) for v in sorted(values, key=lambda v: (str(type(v)), v))]


def prepare(raw: datasets.DatasetDict, tokenizer: PreTrainedTokenizerBase, spec: Spec) -> PreparedData:
    """Tokenize every split once: ``input_ids``, ``attention_mask`` and ``labels`` (class ids or LM targets)."""
    data = spec.data
    max_length = data.max_length
    if spec.model.task == "sequence-classification":
        names = _label_names(raw, data.label_column)
        feature = raw["train"].features.get(data.label_column)
        has_class_label = bool(getattr(feature, "names", None))
        index = {name: i for i, name in enumerate(names)}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            encoded = tokenizer([str(t) for t in batch[data.text_column]], truncation=True, max_length=max_length)
            labels = batch[data.label_column]
            encoded["labels"] = list(labels) if has_class_label else [index[str(v)] for v in labels]
            return encoded

    else:
        names = None

        def encode(batch: dict[str, list]) -> dict[str, list]:
            return _encode_causal(batch, tokenizer, spec)

    tokenized = {split: _encode_rows(dataset, encode) for split, dataset in raw.items()}
    texts = [str(t) for t in raw["test"][data.text_column]] if names is not None else None
    return PreparedData(tokenized["train"], tokenized["validation"], tokenized["test"], names, texts)


def prepare_apart(spec: Spec, registry: Registry, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """``prepare(load_raw(spec, registry), tokenizer, spec)``, run in a forked child process where the system can fork.

    Reading the data needs ``datasets`` and pyarrow: about 80 MB of resident memory that a process keeps until it
    exits, since libraries are never unloaded. A trial needs only the token ids, so the child reads and tokenizes,
    hands the splits back as a safetensors file in a private temporary folder, and exits; the search process
    never imports ``datasets``. Forking (not spawning) means the child starts with the tokenizer and the plugins
    already loaded, so preparing costs no more time than in-process. A failure in the child is raised here as
    :class:`DataError` with its message. Where ``fork`` is unsafe or missing (macOS, Windows), and in a daemonic
    process (which may not have children), the data is prepared in this process.
    """
    import multiprocessing

    if not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return prepare(load_raw(spec, registry), tokenizer, spec)

    with tempfile.TemporaryDirectory(prefix="autopeft-data-") as scratch:
        folder = Path(scratch)
        child = multiprocessing.get_context("fork").Process(
            target=_prepare_into, args=(spec, registry, tokenizer, folder), name="autopeft-data", daemon=True
        )
        child.start()
        try:
            child.join()
        finally:  # interrupted while waiting: the child must not outlive the search
            if child.is_alive():
                child.terminate()
                child.join()
        failure = folder / PREPARE_FAILURE
        if failure.is_file():
            reason = json.loads(failure.read_text(encoding="utf-8"))
            if reason["type"] == "KeyboardInterrupt":
                raise KeyboardInterrupt
            if reason["type"] == "DataError":
                raise DataError(reason["message"])
            raise DataError(f"{spec.path}: reading and tokenizing data.source failed: {reason['type']}: {reason['message']}")
        if child.exitcode != 0 or not (folder / PREPARED_TOKENS).is_file():
            how = f"was killed by signal {-child.exitcode}" if (child.exitcode or 0) < 0 else f"exited with code {child.exitcode}"
            raise DataError(f"{spec.path}: the process reading and tokenizing data.source {how} before it finished (out of memory?)")
        return read_prepared(folder)


PREPARED_TOKENS = "tokens.safetensors"
PREPARED_INFO = "prepared.json"
PREPARE_FAILURE = "failure.json"


def _prepare_into(spec: Spec, registry: Registry, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """The forked child's work: prepare the data and write it to ``folder``, or write why it could not."""
    # The parent's progress display may have replaced the streams with proxies whose locks another thread held at
    # the fork; write straight to the terminal instead.
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    try:
        write_prepared(prepare(load_raw(spec, registry), tokenizer, spec), folder)
    except BaseException as exc:  # everything, so the parent can say what went wrong
        (folder / PREPARE_FAILURE).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}), encoding="utf-8")


def write_prepared(data: PreparedData, folder: Path) -> None:
    """Write tokenized splits to ``folder``: every integer column as one flat array (plus row offsets for
    per-token columns) in safetensors, the label names and test texts in JSON."""
    import numpy as np
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    splits: dict[str, dict[str, Any]] = {}
    for split in ("train", "validation", "test"):
        rows: list[dict[str, Any]] = getattr(data, split)
        columns = {}
        for column in rows[0] if rows else []:
            values = [row[column] for row in rows]
            per_token = isinstance(values[0], list)
            flat = np.array([v for value in values for v in value] if per_token else values, dtype=np.int64)
            arrays[f"{split}.{column}"] = flat
            if per_token:
                arrays[f"{split}.{column}.offsets"] = np.cumsum([0] + [len(value) for value in values], dtype=np.int64)
            columns[column] = "per_token" if per_token else "per_row"
        splits[split] = {"rows": len(rows), "columns": columns}
    save_file(arrays, str(folder / PREPARED_TOKENS))
    info = {"splits": splits, "label_names": data.label_names, "test_texts": data.test_texts}
    (folder / PREPARED_INFO).write_text(json.dumps(info), encoding="utf-8")


def read_prepared(folder: Path) -> PreparedData:
    """The :class:`PreparedData` that :func:`write_prepared` wrote to ``folder``."""
    from safetensors.numpy import load_file

    arrays = load_file(str(folder / PREPARED_TOKENS))
    info = json.loads((folder / PREPARED_INFO).read_text(encoding="utf-8"))
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, layout in info["splits"].items():
        columns = {}
        for column, kind in layout["columns"].items():
            flat = arrays[f"{split}.{column}"].tolist()
            if kind == "per_token":
                offsets = arrays[f"{split}.{column}.offsets"].tolist()
                columns[column] = [flat[start:end] for start, end in zip(offsets, offsets[1:])]
            else:
                columns[column] = flat
        names = list(columns)
        splits[split] = [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
    return PreparedData(splits["train"], splits["validation"], splits["test"], info["label_names"], info["test_texts"])


def _encode_rows(dataset: datasets.Dataset, encode: Callable[[dict[str, list]], dict[str, list]], chunk: int = 1024) -> list[dict]:
    """``encode`` applied to ``dataset`` in chunks, as plain rows: trials index rows at random many times, which is
    much faster on lists than on Arrow, and calling the tokenizer directly skips ``Dataset.map``'s fingerprint
    hashing of the tokenizer (a second per split on a small model)."""
    rows: list[dict] = []
    for start in range(0, len(dataset), chunk):
        columns = dict(encode(dataset[start : start + chunk]))
        names = list(columns)
        rows += [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
    return rows


def _encode_causal(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, spec: Spec) -> dict[str, list]:
    """Plain text is trained on every token; prompt/response pairs only on the response tokens."""
    data = spec.data
    eos = tokenizer.eos_token or ""
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    if data.prompt_column:
        prompts = [_format_prompt(tokenizer, str(p)) for p in batch[data.prompt_column]]
        responses = [str(r) + eos for r in batch[data.response_column]]
    else:
        prompts = [""] * len(batch[data.text_column])
        responses = [str(t) + eos for t in batch[data.text_column]]
    for prompt, response in zip(prompts, responses):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        response_ids = tokenizer(response, add_special_tokens=not prompt)["input_ids"]
        ids = (prompt_ids + response_ids)[: data.max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[: data.max_length]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def _format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized examples to the longest one (labels padded with -100 for language modelling)."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    sequence_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long) if sequence_labels else torch.tensor([e["labels"] for e in examples])
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        attention_mask[row, :n] = 1
        if sequence_labels:
            labels[row, :n] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: list[dict], batch_size: int, pad_token_id: int, seed: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over ``examples``: reshuffled epoch after epoch without end when ``seed`` is set, else one ordered pass."""
    import torch

    if seed is None:
        for start in range(0, len(examples), batch_size):
            yield collate(examples[start : start + batch_size], pad_token_id)
        return
    batch_size = min(batch_size, len(examples))
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id)
