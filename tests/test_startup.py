"""The quick commands stay quick: ``--help``, ``validate`` and ``status`` never import torch, transformers or PEFT
(importing them takes seconds; the commands take a fraction of one)."""

from __future__ import annotations

import subprocess
import sys

from autopeft.cli import main

HEAVY = ("torch", "transformers", "peft", "datasets")

PROBE = """
import sys
from autopeft.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED", sorted(name for name in {heavy!r} if name in sys.modules))
"""


def imported_by(*args: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``autopeft ARGS``."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("IMPORTED"))
    return eval(line.removeprefix("IMPORTED "))  # a list literal this probe printed


def test_help_validate_and_status_import_no_heavy_library(classification_spec, tmp_path):
    """Catches: a module on these paths importing torch (or transformers, PEFT, datasets) at import time, which
    makes each of these commands take seconds instead of a fraction of one."""
    assert main(["search", str(classification_spec)]) == 0
    run = tmp_path / "run"
    assert imported_by("--help") == []
    assert imported_by("validate", str(classification_spec)) == []
    assert imported_by("status", str(run)) == []
