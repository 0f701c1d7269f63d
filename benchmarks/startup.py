"""How long the quick commands take from a cold interpreter: ``autopeft --help``, ``validate`` and ``status``.

They must answer in under a second, so none of them imports torch, transformers, PEFT or ``datasets``
(``tests/test_startup.py`` checks the imports). This script makes a one-trial run of a random 2-layer BERT to have
something to show ``status`` for, then times each command ``--repeats`` times as a fresh process and prints the
median and the slowest.

    cd benchmarks && taskset -c 1 python startup.py --repeats 5

Appends one JSON line per command to ``benchmarks/results/startup.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import results_file  # noqa: E402  (benchmarks/results_file.py)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "startup.jsonl"
GOAL_SECONDS = 1.0


def autopeft_command() -> list[str]:
    """The console script next to this interpreter (as a user runs it), else ``python -m autopeft``."""
    script = Path(sys.executable).with_name("autopeft")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "autopeft"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import yaml

    from overhead import write_data
    from scaling import tiny_model

    with tempfile.TemporaryDirectory(prefix="autopeft-startup-") as scratch:
        scratch = Path(scratch)
        data = write_data(scratch / "data", 200, 50, 50)
        spec = {
            "model": {"id": str(tiny_model(scratch / "tiny-bert"))},
            "data": {"source": {s: str(data / f"{s}.csv") for s in ("train", "validation", "test")}, "max_length": 32},
            "search": {"n_trials": 1},
            "training": {"max_steps": 4, "batch_size": 8},
            "output": {"dir": str(scratch / "run")},
        }
        spec_path = scratch / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        subprocess.run([*autopeft_command(), "search", str(spec_path)], check=True, stdout=subprocess.DEVNULL)
        commands = {"--help": ["--help"], "validate": ["validate", str(spec_path)], "status": ["status", str(scratch / "run")]}
        load = os.getloadavg()[0]
        for name, arguments in commands.items():
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                subprocess.run([*autopeft_command(), *arguments], check=True, stdout=subprocess.DEVNULL)
                seconds.append(time.perf_counter() - started)
            median = statistics.median(seconds)
            results_file.record(
                {
                    "command": f"autopeft {name}", "seconds": [round(s, 3) for s in seconds], "median": round(median, 3),
                    "slowest": round(max(seconds), 3), "goal": GOAL_SECONDS, "met": max(seconds) < GOAL_SECONDS,
                    "load_before": round(load, 2), "cpus": sorted(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M"),
                },
                RESULTS,
            )
        shutil.rmtree(scratch / "run", ignore_errors=True)


if __name__ == "__main__":
    main()
