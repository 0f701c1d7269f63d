"""Throughput of the local and Ray backends on this machine: finished trials per hour with 1 and 2 trials at once.

MiniLM (the packaged ``sentence-transformers/all-MiniLM-L6-v2``) on Rotten Tomatoes, short LoRA trials of the same
size (q,v, r 8; only the learning rate is searched), every trial on one core (``training.threads: 1``, and
``ray.resources_per_trial.cpu: 1``). Four configurations, each in its own process so its memory is its own:

- ``local``: the local backend, which runs one trial at a time in the search process;
- ``local x2``: two local searches side by side, half the trials each (what two processes get from this machine
  without Ray, the reference for two trials at once);
- ``ray 1`` and ``ray 2``: the Ray backend on a Ray instance it starts on this machine, ``max_concurrent`` 1 or 2.

Measured for each, from the study (the search process's clock):

- ``span_seconds``: from the first trial's training start to the last trial's end (a trial's start is its
  completion time less its ``train_seconds``); ``trials_per_hour`` = finished trials x 3600 / span. Start-up
  (loading, starting Ray) is left out of the span and counted apart as ``startup_seconds``.
- ``search_seconds``: the whole ``run_search`` call, export of ``best/`` and the report included.
- peak resident memory of the search process and of each Ray trial worker.

Ray's cost per trial is ``(span of ray 1 - span of local) / trials``; its cost per search is the difference in
start-up. Goals: two trials at once give at least 1.8x the trials per hour of one; Ray adds under 2 s per trial.

    cd benchmarks && python scaling.py --trials 8 --steps 30
    cd benchmarks && python scaling.py --model tiny --trials 8 --steps 30   # a random 2-layer BERT
    cd benchmarks && python scaling.py --table results/scaling.jsonl    # the table of recorded results

Appends one JSON line per configuration to ``benchmarks/results/scaling.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import results_file  # noqa: E402  (benchmarks/results_file.py)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling.jsonl"
CONFIGURATIONS = {"local": ("local", 1), "local x2": ("local", 2), "ray 1": ("ray", 1), "ray 2": ("ray", 2)}
GOAL_SPEEDUP = 1.8
GOAL_RAY_SECONDS_PER_TRIAL = 2.0


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def tiny_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved to ``folder``: trials that cost almost
    nothing, so what the backends themselves add per trial shows."""
    import torch
    from transformers import BertConfig, BertModel

    from autopeft.models import base_tokenizer

    if not (folder / "config.json").is_file():
        tokenizer = base_tokenizer(MINILM)
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        BertModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def spec_dict(backend: str, concurrent: int, trials: int, steps: int, seed: int, out: Path, model: str = MINILM) -> dict:
    return {
        "model": {"id": model},
        "data": {"source": "rotten-tomatoes", "max_length": 48, "splits": {"train": 2000, "validation": 200, "test": 200, "seed": 0}},
        "search": {
            "variants": ["lora"],
            "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "target_modules": "q,v", "lora.r": 8},
            "n_trials": trials,
            "seed": seed,
            "backend": backend,
        },
        "training": {"max_steps": steps, "batch_size": 16, "eval_batch_size": 100, "threads": 1},
        "ray": {"max_concurrent": concurrent, "resources_per_trial": {"cpu": 1}},
        "output": {"dir": str(out)},
    }


class WorkerMemory:
    """Samples the peak resident memory (VmHWM) of this process's descendants that run Ray trials."""

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(stat.parent.name))
        out, todo = [], [os.getpid()]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            for pid in self._descendants():
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                if "ImplicitFunc" in title or "train_on_worker" in title:
                    peak = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak)

    def __enter__(self) -> WorkerMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def run_one(backend: str, concurrent: int, trials: int, steps: int, seed: int, out: Path, model: str = MINILM) -> dict:
    """Run one search in this process and measure it (the child side of :func:`measure`)."""
    from rich.console import Console

    from autopeft.plan import make_plan
    from autopeft.spec import parse_spec

    if backend == "ray":
        from autopeft.orchestrators.ray_tune import run_search
    else:
        from autopeft.orchestrators.local import run_search
    spec = parse_spec(spec_dict(backend, concurrent, trials, steps, seed, out, model), f"benchmark:{backend}:{concurrent}")
    plan = make_plan(spec)
    console = Console(file=open(os.devnull, "w"), log_path=False)
    started = datetime.now(timezone.utc)
    with WorkerMemory() as workers:
        clock = time.perf_counter()
        run_search(plan, console)
        seconds = time.perf_counter() - clock
    return {
        "call_started": started.timestamp(),
        "search_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": sorted(round(v, 1) for v in workers.peaks.values()),
    }


def trial_times(run_dir: Path) -> list[tuple[float, float, float]]:
    """``(training start, end, train_seconds)`` of each complete trial, in seconds since the epoch."""
    import optuna

    from autopeft.rundir import RunDir, open_study

    study = open_study(RunDir(run_dir), "maximize")
    out = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        end = trial.datetime_complete.astimezone(timezone.utc).timestamp() if trial.datetime_complete.tzinfo else trial.datetime_complete.timestamp()
        seconds = trial.user_attrs["costs"]["train_seconds"]
        out.append((end - seconds, end, seconds))
    return out


def measure(name: str, trials: int, steps: int, seed: int, folder: Path, model: str = MINILM) -> dict:
    """Run configuration ``name`` in child processes and summarise it as one result row."""
    backend, concurrent = CONFIGURATIONS[name]
    processes = 2 if name == "local x2" else 1
    per_process = trials // processes
    load_before = os.getloadavg()
    children = []
    for index in range(processes):
        out = folder / f"{name.replace(' ', '-')}-{index}"
        command = [sys.executable, __file__, "--child", backend, str(1 if backend == "local" else concurrent), str(per_process), str(steps), str(seed + index), str(out), model]
        children.append((out, subprocess.Popen(command, stdout=subprocess.PIPE, text=True)))
    reports = []
    for out, child in children:
        stdout, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"{name}: the search process failed (exit {child.returncode})")
        reports.append((out, json.loads(stdout.strip().splitlines()[-1])))
    load_after = os.getloadavg()
    times = [t for out, _ in reports for t in trial_times(out)]
    first_start = min(start for start, _, _ in times)
    span = max(end for _, end, _ in times) - first_start
    return {
        "model": "tiny" if model != MINILM else "minilm",
        "configuration": name,
        "backend": backend,
        "concurrent": concurrent,
        "processes": processes,
        "trials": len(times),
        "steps": steps,
        "span_seconds": round(span, 2),
        "trials_per_hour": round(len(times) * 3600 / span, 1),
        "mean_train_seconds": round(sum(s for _, _, s in times) / len(times), 2),
        "startup_seconds": round(first_start - min(report["call_started"] for _, report in reports), 2),
        "search_seconds": round(max(report["search_seconds"] for _, report in reports), 2),
        "peak_rss_mb": round(max(report["peak_rss_mb"] for _, report in reports), 1),
        "worker_peak_rss_mb": [v for _, report in reports for v in report["worker_peak_rss_mb"]],
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in load_after],
        "cpus": os.cpu_count(),
        "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def table(rows: list[dict]) -> str:
    """The markdown tables (one per model) of the latest row of each configuration, and the goals against them."""
    models = dict.fromkeys(row.get("model", "minilm") for row in rows)
    return "\n\n".join(f"model: {model}\n\n" + _table([r for r in rows if r.get("model", "minilm") == model]) for model in models)


def _table(rows: list[dict]) -> str:
    latest = {row["configuration"]: row for row in rows}
    lines = [
        "| configuration | trials | at once | span s | trials/hour | mean train s | start-up s | search s | search process peak MB | per worker peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in CONFIGURATIONS:
        if name in latest:
            r = latest[name]
            workers = f"{max(r['worker_peak_rss_mb']):.0f}" if r["worker_peak_rss_mb"] else "-"
            lines.append(
                f"| {name} | {r['trials']} | {r['concurrent']} | {r['span_seconds']:.1f} | "
                f"{r['trials_per_hour']:.0f} | {r['mean_train_seconds']:.2f} | {r['startup_seconds']:.1f} | {r['search_seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {workers} |"
            )
    notes = []
    if "ray 1" in latest and "ray 2" in latest:
        speedup = latest["ray 2"]["trials_per_hour"] / latest["ray 1"]["trials_per_hour"]
        notes.append(f"ray 2 / ray 1: {speedup:.2f}x trials per hour (goal >= {GOAL_SPEEDUP}x: {'met' if speedup >= GOAL_SPEEDUP else 'NOT met'})")
    if "local" in latest and "local x2" in latest:
        notes.append(f"local x2 / local: {latest['local x2']['trials_per_hour'] / latest['local']['trials_per_hour']:.2f}x trials per hour")
    if "local" in latest and "ray 1" in latest:
        local, ray = latest["local"], latest["ray 1"]
        per_trial = (ray["span_seconds"] / ray["trials"]) - (local["span_seconds"] / local["trials"])
        notes.append(f"Ray adds {per_trial:.2f} s per trial (goal < {GOAL_RAY_SECONDS_PER_TRIAL} s: {'met' if per_trial < GOAL_RAY_SECONDS_PER_TRIAL else 'NOT met'})")
        notes.append(f"Ray adds {ray['startup_seconds'] - local['startup_seconds']:.1f} s of start-up per search, {ray['search_seconds'] - local['search_seconds']:.1f} s per search in all")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="finished trials per configuration (even)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGURATIONS), help="run only these configurations")
    parser.add_argument("--out", default=str(RESULTS), help="results file to append to")
    parser.add_argument("--table", nargs="*", help="print the table of these results files and exit")
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm", help="MiniLM (packaged) or a random 2-layer BERT")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, concurrent, trials, steps, seed, out, model = args.child
        print(json.dumps(run_one(backend, int(concurrent), int(trials), int(steps), int(seed), Path(out), model)))
        return
    if args.table is not None:
        print(table(results_file.read(args.table or [str(RESULTS)])))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="autopeft-scaling-") as folder:
        model = str(tiny_model(Path(folder) / "tiny-bert")) if args.model == "tiny" else MINILM
        for name in args.only or CONFIGURATIONS:
            row = measure(name, args.trials, args.steps, args.seed, Path(folder), model)
            results_file.record(row, args.out)
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
