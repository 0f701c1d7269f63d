"""How much compute early stopping saves: MiniLM on Rotten Tomatoes, single- and multi-objective, several seeds.

For each seed the same search runs twice, without and with early stopping (Optuna's median pruner for one
objective, autopeft's Pareto-rank rule for accuracy + trainable parameters). We report the best validation
accuracy the search without early stopping reaches, and the training steps and seconds each search spent before
its first trial reached that accuracy (or its whole budget, marked "not reached", if it never did).

    python benchmarks/pruning.py --seeds 0 1 --trials 8 --steps 100

Prints a markdown table and writes the raw figures to benchmarks/results/pruning.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402

import results_file  # noqa: E402  (benchmarks/results_file.py)

from autopeft.orchestrators.local import run_search  # noqa: E402
from autopeft.plan import make_plan  # noqa: E402
from autopeft.rundir import RunDir, open_study  # noqa: E402
from autopeft.spec import parse_spec  # noqa: E402

MODES = {
    "single": {"objectives": ["accuracy"], "pruner": {"type": "median", "startup_trials": 3}},
    "multi": {"objectives": ["accuracy", "trainable_params"], "pruner": {"type": "pareto", "startup_trials": 3}, "sampler": "tpe"},
}


def spec_for(mode: str, seed: int, trials: int, steps: int, pruned: bool, out: Path):
    search = dict(MODES[mode])
    if not pruned:
        search["pruner"] = {"type": "none"}
    raw = {
        "model": {"id": "sentence-transformers/all-MiniLM-L6-v2"},
        "data": {"source": "rotten-tomatoes", "max_length": 48, "splits": {"train": 3000, "validation": 400, "test": 400, "seed": 0}},
        "search": {
            "variants": ["lora"],
            "space": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}, "lora.r": [2, 4, 8, 16, 32], "target_modules": ["q,v", "q,k,v,o", "all"]},
            "n_trials": trials,
            "seed": seed,
            **search,
        },
        "training": {"max_steps": steps, "batch_size": 16, "eval_every": max(1, steps // 4), "eval_batch_size": 128},
        "output": {"dir": str(out)},
    }
    return parse_spec(raw, f"benchmark:{mode}:{seed}:{'pruned' if pruned else 'full'}")


def compute_to_reach(run_dir: Path, target: float) -> dict:
    """Steps and seconds spent, in trial order, until a complete trial reached ``target`` accuracy."""
    import optuna

    study = open_study(RunDir(run_dir), "maximize")
    steps = seconds = 0.0
    for trial in sorted(study.trials, key=lambda t: t.number):
        steps += trial.user_attrs.get("steps", 0)
        seconds += trial.duration.total_seconds() if trial.duration else 0.0
        accuracy = trial.user_attrs.get("metrics", {}).get("accuracy")
        if trial.state == optuna.trial.TrialState.COMPLETE and accuracy is not None and accuracy >= target - 1e-9:
            return {"steps": steps, "seconds": seconds, "reached": True}
    return {"steps": steps, "seconds": seconds, "reached": False}


def summary(run_dir: Path) -> dict:
    import optuna

    study = open_study(RunDir(run_dir), "maximize")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {
        "best_accuracy": max(t.user_attrs["metrics"]["accuracy"] for t in complete),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "total_steps": sum(t.user_attrs.get("steps", 0) for t in study.trials),
        "total_seconds": sum(t.duration.total_seconds() for t in study.trials if t.duration),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", default="benchmarks/results/pruning.jsonl", help="results are appended, one JSON line per seed")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="only print the table of these results files")
    args = parser.parse_args()
    if args.table:
        print_table(results_file.read(args.table))
        return
    console = Console(quiet=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for mode in args.modes:
            for seed in args.seeds:
                runs = {}
                for pruned in (False, True):
                    folder = Path(scratch) / f"{mode}-{seed}-{pruned}"
                    run_search(make_plan(spec_for(mode, seed, args.trials, args.steps, pruned, folder)), console)
                    runs[pruned] = folder
                full, early = summary(runs[False]), summary(runs[True])
                target = full["best_accuracy"]
                row = {
                    "mode": mode,
                    "seed": seed,
                    "target_accuracy": target,
                    "full": {**full, **compute_to_reach(runs[False], target)},
                    "pruned": {**early, **compute_to_reach(runs[True], target)},
                }
                row["trials"] = args.trials
                results.append(row)
                results_file.record(row, args.out)
    print_table(results)


def print_table(results: list[dict]) -> None:
    """The compute each search needed to reach the target accuracy, as a markdown table with savings per mode."""
    print("\n| objectives | seed | best accuracy without early stopping | steps to reach it: without / with | seconds: without / with | pruned trials | best accuracy with early stopping |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        full, early = row["full"], row["pruned"]
        reached = "" if early["reached"] else " (not reached)"
        print(
            f"| {row['mode']} | {row['seed']} | {row['target_accuracy']:.3f} | {full['steps']:.0f} / {early['steps']:.0f}{reached} | "
            f"{full['seconds']:.0f} / {early['seconds']:.0f} | {early['pruned']} of {row.get('trials', '?')} | {early['best_accuracy']:.3f} |"
        )
    for mode in dict.fromkeys(r["mode"] for r in results):
        rows = [r for r in results if r["mode"] == mode]
        saved = [1 - r["pruned"]["steps"] / r["full"]["steps"] for r in rows if r["pruned"]["reached"]]
        total = [1 - r["pruned"]["total_steps"] / r["full"]["total_steps"] for r in rows]
        print(f"\n{mode}: target reached with early stopping in {len(saved)} of {len(rows)} seeds; "
              f"mean saving in steps to target {statistics.mean(saved) * 100 if saved else float('nan'):.0f}%; "
              f"mean saving in total search steps {statistics.mean(total) * 100:.0f}%")


if __name__ == "__main__":
    main()
