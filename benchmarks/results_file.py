"""Benchmark results as JSON lines: one line per run, appended as it finishes, so an interrupted benchmark keeps them."""

from __future__ import annotations

import json
from pathlib import Path


def record(row: dict, path: str | Path) -> None:
    """Print a result and append it to the results file."""
    print(json.dumps(row), flush=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def read(paths: list[str]) -> list[dict]:
    """Every result in these results files, in order."""
    return [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
