"""Rank allocation at equal trainable-parameter budgets: uniform LoRA against each allocator and the outer search.

MiniLM on Rotten Tomatoes and BBC News, several seeds. The budget is uniform LoRA with rank 8 on the attention
projections (q, k, v, o) of all 6 layers. Each allocator is configured to spend the same average rank over the
same candidate modules:
- IncreLoRA grows to an average rank of 8;
- LoRA-Squeeze trains at 16 and compresses to 8;
- AdaLoRA prunes from 12 to 8;
- DiffoRA keeps half of the modules at rank 16;
- SoRA and Bayesian-LoRA start at 16 and let their gates decide, so their final sizes vary.

The outer search allocates a rank per module type and half of the layers, with a constraint of the budget's
size. The table reports the LoRA parameters each method actually exported, so "equal budget" can be checked.

    python benchmarks/allocation.py --seeds 0 1 --datasets rotten-tomatoes bbc-news

Prints a markdown table and writes the raw figures to benchmarks/results/allocation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402

import results_file  # noqa: E402  (benchmarks/results_file.py)
from safetensors.torch import load_file  # noqa: E402

from autopeft.orchestrators.local import run_search  # noqa: E402
from autopeft.plan import make_plan  # noqa: E402
from autopeft.spec import parse_spec  # noqa: E402

ATTENTION = "q,k,v,o"
UNIFORM_RANK = 8
# 6 layers x 4 projections x rank 8 x (384 in + 384 out)
BUDGET = 6 * 4 * UNIFORM_RANK * (384 + 384)

DATASETS = {
    "rotten-tomatoes": {"max_length": 64, "steps": 150, "learning_rate": 2e-3, "splits": {"train": 6000, "validation": 500, "test": 1000, "seed": 0}},
    "bbc-news": {"max_length": 128, "steps": 100, "learning_rate": 2e-3, "splits": {"validation": 300, "test": 400, "seed": 0}},
}

# name -> (variant, fixed parameters, extra search settings)
METHODS = {
    "uniform LoRA r=8": ("lora", {"r": UNIFORM_RANK, "alpha_ratio": 2.0, "dropout": 0.05}, {}),
    "AdaLoRA 12→8": ("adalora", {"init_r": 12, "target_ratio": 8 / 12}, {}),
    "IncreLoRA →8": ("increlora", {"init_r": 2, "target_rank": 8}, {}),
    "LoRA-Squeeze 16→8": ("lora-squeeze", {"source_rank": 16, "mode": "rank", "target_rank": 8, "continue_fraction": 0.2}, {}),
    "DiffoRA 16, keep 50%": ("diffora", {"rank": 16, "rho": 0.5}, {}),
    "SoRA 16, gated": ("sora", {"max_rank": 16}, {}),
    "Bayesian-LoRA 16, gated": ("bayesian-lora", {"max_rank": 16}, {}),
    "outer search, rank per role x band": (
        "lora",
        {"alpha_ratio": 2.0, "dropout": 0.05},
        {
            "allocation": {"granularity": "role-band", "bands": 2, "ranks": [0, 4, 8, 16], "roles": ["q", "k", "v", "o"]},
            # trainable_params counts the classifier head too (at most 384 x 5 + 5 weights, for BBC's 5 classes).
            "constraints": [f"trainable_params <= {BUDGET + 384 * 5 + 5}"],
        },
    ),
}


def spec_for(method: str, dataset: str, seed: int, trials: int, out: Path):
    variant, fixed, extra = METHODS[method]
    settings = DATASETS[dataset]
    space = {"learning_rate": settings["learning_rate"], **{f"{variant}.{k}": v for k, v in fixed.items()}}
    if "allocation" not in extra:
        space["target_modules"] = ATTENTION
    raw = {
        "model": {"id": "sentence-transformers/all-MiniLM-L6-v2"},
        "data": {"source": dataset, "max_length": settings["max_length"], "splits": settings["splits"]},
        "search": {"variants": [variant], "space": space, "n_trials": trials if "allocation" in extra else 1, "seed": seed, **extra},
        "training": {"max_steps": settings["steps"], "batch_size": 16, "eval_batch_size": 128},
        "output": {"dir": str(out)},
    }
    return parse_spec(raw, f"benchmark:{method}:{dataset}:{seed}")


def lora_parameters(adapter_dir: Path) -> int:
    return sum(t.numel() for k, t in load_file(adapter_dir / "adapter_model.safetensors").items() if "lora_" in k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--outer-trials", type=int, default=4, help="trials of the outer per-module search")
    parser.add_argument("--out", default="benchmarks/results/allocation.jsonl", help="results are appended, one JSON line per run")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="only print the table of these results files")
    args = parser.parse_args()
    if args.table:
        rows = results_file.read(args.table)
        print_table(rows)
        return
    console = Console(quiet=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in args.datasets:
            for method in args.methods:
                for seed in args.seeds:
                    folder = Path(scratch) / f"{dataset}-{len(results)}"
                    try:
                        run_search(make_plan(spec_for(method, dataset, seed, args.outer_trials, folder)), console)
                        info = json.loads((folder / "best" / "autopeft.json").read_text())
                        row = {
                            "dataset": dataset, "method": method, "seed": seed,
                            "validation_accuracy": info["validation"]["accuracy"], "test_accuracy": info["test"]["accuracy"],
                            "lora_params": lora_parameters(folder / "best"),
                            "modules_with_adapter": sum(1 for m in info["modules"] if m["rank"]),
                        }
                    except Exception as exc:  # a broken method is a result too
                        row = {"dataset": dataset, "method": method, "seed": seed, "error": f"{type(exc).__name__}: {exc}"}
                    results.append(row)
                    results_file.record(row, args.out)
    print_table(results)


def print_table(results: list[dict]) -> None:
    """Mean ± sd over seeds of each method on each data set, as a markdown table."""
    seeds = sorted({r["seed"] for r in results})
    print(f"\nBudget: {BUDGET:,} LoRA parameters (uniform rank {UNIFORM_RANK} on q, k, v, o of 6 layers). Mean ± sd over seeds {seeds}.\n")
    print("| data | method | test accuracy | validation accuracy | LoRA parameters | modules with an adapter |")
    print("|---|---|---|---|---|---|")
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        for method in dict.fromkeys(r["method"] for r in results if r["dataset"] == dataset):
            rows = [r for r in results if r["dataset"] == dataset and r["method"] == method and "error" not in r]
            if not rows:
                errors = {r["error"] for r in results if r["dataset"] == dataset and r["method"] == method}
                print(f"| {dataset} | {method} | failed: {'; '.join(errors)} | | | |")
                continue

            def stat(key: str) -> str:
                values = [r[key] for r in rows]
                return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

            params = statistics.mean(r["lora_params"] for r in rows)
            modules = statistics.mean(r["modules_with_adapter"] for r in rows)
            print(f"| {dataset} | {method} | {stat('test_accuracy')} | {stat('validation_accuracy')} | {params:,.0f} | {modules:g} |")


if __name__ == "__main__":
    main()
