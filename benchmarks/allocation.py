"""The rank allocators' paper claims, measured: each method against plain LoRA, its learning rate tuned per run.

MiniLM (the packaged ``sentence-transformers/all-MiniLM-L6-v2``, 64 tokens) on Rotten Tomatoes and BBC News; adapters
on q, k, v and o of all 6 layers. Each seed draws its own train/validation/test split (written once to CSV files
every configuration of that seed reads) and seeds the sampler and the training. For every (data set, seed,
configuration) one autopeft search runs with ``search.budget: --budget-steps steps`` over the learning rate alone
(1e-4 to 1e-2, log; the first trial at the default 1e-3) while every other knob of the variant is fixed (the
configuration's values, the variant's defaults for the rest); each trial trains ``--steps`` steps (batch 16), and
successive halving screens the rates. The score of a run is the test accuracy of the exported ``best/`` folder as
``peft.PeftModel.from_pretrained`` loads it on a fresh base model (autopeft's own test score is kept next to it).

The claims (``--claims``; the configurations each needs are run once and shared):

- ``squeeze``: LoRA-Squeeze compressing rank 16 to 8, post-hoc (SVD at 80% of the steps, then training on) and
  In-Squeeze (the rank annealed 16→8 in 4 SVD stages), beats LoRA trained at rank 8 directly;
- ``increlora``: IncreLoRA (growing from rank 1) gains most at low budgets: its gain over plain LoRA of the same
  average rank is positive at average rank 2 and 4, and larger there than at 8;
- ``bayesian``: Bayesian-LoRA (rank and bit gates over at most rank 8) uses fewer bit operations than uniform LoRA
  rank 8 with 16-bit adapters and is no less accurate; the table shows ``bops_per_token`` (autopeft's cost: base
  and adapters, at float32 activations), the adapters' own bit operations at 16-bit activations, and the learned
  bits (``adapter_bits.json`` in the export; modules not in it are at 16 bits);
- ``adalora``: AdaLoRA pruning from rank 16 to an average of 8 beats LoRA rank 8 (equal budget);
- ``sora``: SoRA (16 slots) at average rank 2, 4 and 8 beats LoRA of the same rank; its size–accuracy curve (rank
  1 too) is drawn by ``--plot-sora``. SoRA's knob here is ``target_rank``: the proximal threshold the paper sets through λ
  is derived from it, so sweeping it is the λ sweep;
- ``diffora``: DiffoRA keeping half of the modules at rank 16 beats LoRA rank 8 on all of them (equal size).

``--table`` prints, for each claim, every configuration's numbers (mean ± standard deviation over seeds) and each
comparison as the mean ± standard deviation over seeds of the per-seed difference (same split, same seed), with
a verdict: *holds* (the gap exceeds its spread, in the claimed direction), *does not hold here* (a gap at least
as large as its spread the other way, or none), *inconclusive* (the spread is larger than the gap, or one
seed). A "no less accurate" comparison holds unless it is worse by more than its spread. A claim holds when all
its comparisons hold, does not hold here when any does not, and is inconclusive otherwise.

It must run alone, pinned to one core (``taskset -c 0``): nothing else on that core, so its timings (recorded
with every row) mean what the estimate below assumes. It can run in pieces (``--claims``, ``--datasets``,
``--seeds``); rows are appended as they finish, and a run already recorded with the same steps and budget is not
run again::

    cd benchmarks && taskset -c 0 python allocation.py --seeds 0 1 2
    cd benchmarks && taskset -c 0 python allocation.py --claims squeeze adalora --datasets bbc-news --seeds 0 1 2
    cd benchmarks && python allocation.py --table results/allocation_claims.jsonl
    cd benchmarks && python allocation.py --plot-sora results/allocation_claims.jsonl results/allocation_sora.png

Defaults: ``--steps 150 --budget-steps 600`` (four full trials' worth of steps per search), seeds 0 1 2, both data
sets, every claim: 15 configurations × 2 data sets × 3 seeds = 90 searches (per data set and seed: squeeze 3,
increlora 6, bayesian 2, adalora 2, sora 7, diffora 2 configurations, the LoRA baselines shared). Duration, an
*estimate* from a short timing run on this machine (one core; the other core was busy, so the numbers may be
high): about 0.4 s of CPU per training step for LoRA and 0.65 s for the masked allocators (Bayesian-LoRA), and
about 50 s per search for loading, tokenizing and evaluating. A search then takes about 50 + 600 × 0.5 ≈ 350 s,
one data set and seed about 1.5 hours, the full run about 90 × 350 s ≈ 9 hours. Each row records its ``seconds``
and ``cpu_seconds``, so a partial run refines the estimate. Measured at ``--steps 40 --budget-steps 120`` (the
run in BENCHMARKS.md, one process per data set, one per core): 126 s per search on average, 1 hour 37 minutes for
all 90.

Results are appended to ``benchmarks/results/allocation_claims.jsonl`` (``--results``). This replaces the former
equal-budget run (every allocator once at lr 2e-3, plus an outer per-group rank search): its methods are covered
by the claims above except the outer search, which is no allocator's claim. ``--table`` still prints that run's
files (``results/allocation-rt.jsonl``, ``results/allocation-bbc.jsonl``) as it did.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import results_file  # noqa: E402  (benchmarks/results_file.py)
from search_quality import MAX_LENGTH, MINILM, TestSet, write_split  # noqa: E402  (the same data and test measure)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "allocation_claims.jsonl"
TARGETS = "q,k,v,o"
ROLES = set(TARGETS.split(","))
LEARNING_RATES = {"low": 1e-4, "high": 1e-2, "log": True, "default": 1e-3}
"""Pinned first rate: the recorded claims ran before autopeft fitted the first rate to short trials."""
BATCH, EVAL_BATCH = 16, 64
DATASETS = {
    "rotten-tomatoes": {"train": 4000, "validation": 300, "test": 1000},
    "bbc-news": {"train": 1425, "validation": 300, "test": 500},  # 2,225 articles in all
}

CONFIGS: dict[str, tuple[str, dict]] = {
    # name -> (variant, knobs fixed to other than the variant's defaults); every other knob but the learning
    # rate is fixed at the variant's default.
    "LoRA r=2": ("lora", {"r": 2}),
    "LoRA r=4": ("lora", {"r": 4}),
    "LoRA r=8": ("lora", {"r": 8}),
    "LoRA-Squeeze 16→8 post-hoc": ("lora-squeeze", {"source_rank": 16, "mode": "rank", "target_rank": 8, "continue_fraction": 0.2, "schedule": "post-hoc"}),
    "LoRA-Squeeze 16→8 in-squeeze": ("lora-squeeze", {"source_rank": 16, "mode": "rank", "target_rank": 8, "continue_fraction": 0.2, "schedule": "in-squeeze"}),
    "IncreLoRA →2": ("increlora", {"init_r": 1, "target_rank": 2}),
    "IncreLoRA →4": ("increlora", {"init_r": 1, "target_rank": 4}),
    "IncreLoRA →8": ("increlora", {"init_r": 1, "target_rank": 8}),
    "Bayesian-LoRA ≤8": ("bayesian-lora", {"max_rank": 8}),
    "AdaLoRA 16→8": ("adalora", {"init_r": 16, "target_ratio": 0.5}),
    "SoRA 16→1": ("sora", {"max_rank": 16, "target_rank": 1}),
    "SoRA 16→2": ("sora", {"max_rank": 16, "target_rank": 2}),
    "SoRA 16→4": ("sora", {"max_rank": 16, "target_rank": 4}),
    "SoRA 16→8": ("sora", {"max_rank": 16, "target_rank": 8}),
    "DiffoRA 16, keep 50%": ("diffora", {"rank": 16, "rho": 0.5}),
}


@dataclass(frozen=True)
class Comparison:
    """A per-seed effect ``Σ weight × row[key]`` over configurations, and the direction the claim expects."""

    label: str
    weights: dict[str, float]
    expects: str = "better"  # "better": the effect is > 0; "no worse": it is not < 0 by more than its spread
    key: str = "test_accuracy"


@dataclass(frozen=True)
class Claim:
    title: str
    configs: tuple[str, ...]
    comparisons: tuple[Comparison, ...]
    columns: tuple[str, ...] = ()
    """Extra columns of this claim's table (keys of the rows)."""


def gain_over(method: str, baseline: str) -> dict[str, float]:
    return {method: 1.0, baseline: -1.0}


CLAIMS: dict[str, Claim] = {
    "squeeze": Claim(
        "LoRA-Squeeze: compressing a rank-16 LoRA to rank 8 beats training at rank 8 directly",
        ("LoRA r=8", "LoRA-Squeeze 16→8 post-hoc", "LoRA-Squeeze 16→8 in-squeeze"),
        (
            Comparison("post-hoc − LoRA r=8", gain_over("LoRA-Squeeze 16→8 post-hoc", "LoRA r=8")),
            Comparison("in-squeeze − LoRA r=8", gain_over("LoRA-Squeeze 16→8 in-squeeze", "LoRA r=8")),
        ),
    ),
    "increlora": Claim(
        "IncreLoRA gains most over LoRA of the same average rank at low budgets (2 and 4 against 8)",
        ("LoRA r=2", "IncreLoRA →2", "LoRA r=4", "IncreLoRA →4", "LoRA r=8", "IncreLoRA →8"),
        tuple(
            comparison
            for k in (2, 4)
            for comparison in (
                Comparison(f"gain at {k}: IncreLoRA →{k} − LoRA r={k}", gain_over(f"IncreLoRA →{k}", f"LoRA r={k}")),
                Comparison(
                    f"gain at {k} − gain at 8",
                    {f"IncreLoRA →{k}": 1.0, f"LoRA r={k}": -1.0, "IncreLoRA →8": -1.0, "LoRA r=8": 1.0},
                ),
            )
        ),
    ),
    "bayesian": Claim(
        "Bayesian-LoRA: fewer bit operations than uniform 16-bit LoRA rank 8, no less accurate",
        ("LoRA r=8", "Bayesian-LoRA ≤8"),
        (
            Comparison("bops_per_token saved: LoRA r=8 − Bayesian-LoRA", gain_over("LoRA r=8", "Bayesian-LoRA ≤8"), key="bops_per_token"),
            Comparison("accuracy: Bayesian-LoRA − LoRA r=8", gain_over("Bayesian-LoRA ≤8", "LoRA r=8"), expects="no worse"),
        ),
        columns=("bops_per_token", "adapter_bops_16", "adapter_bytes", "bits_histogram"),
    ),
    "adalora": Claim(
        "AdaLoRA (16 → average 8) beats LoRA rank 8 at equal budget",
        ("LoRA r=8", "AdaLoRA 16→8"),
        (Comparison("AdaLoRA − LoRA r=8", gain_over("AdaLoRA 16→8", "LoRA r=8")),),
    ),
    "sora": Claim(
        "SoRA at a target average rank beats LoRA of that rank (its λ sweep: --plot-sora)",
        ("SoRA 16→1", "LoRA r=2", "SoRA 16→2", "LoRA r=4", "SoRA 16→4", "LoRA r=8", "SoRA 16→8"),
        tuple(Comparison(f"SoRA 16→{k} − LoRA r={k}", gain_over(f"SoRA 16→{k}", f"LoRA r={k}")) for k in (2, 4, 8)),
    ),
    "diffora": Claim(
        "DiffoRA (half of the modules at rank 16) beats LoRA rank 8 on all of them, at equal size",
        ("LoRA r=8", "DiffoRA 16, keep 50%"),
        (Comparison("DiffoRA − LoRA r=8", gain_over("DiffoRA 16, keep 50%", "LoRA r=8")),),
    ),
}


# --------------------------------------------------------------------------------------------------------------
# One search: the learning rate tuned with every other knob fixed, the export measured as PEFT loads it
# --------------------------------------------------------------------------------------------------------------


def fixed_knobs(variant: str, chosen: dict) -> dict:
    """Every knob of ``variant`` except the learning rate: the values in ``chosen``, the declared default for the
    rest (knobs whose condition fails are left out, as the sampler would)."""
    from autopeft.registry import load_registry

    space = load_registry().variant(variant).search_space()
    unknown = set(chosen) - set(space)
    if unknown:
        raise SystemExit(f"configuration of {variant!r} names knobs it does not have: {sorted(unknown)}; it has {sorted(space)}")
    values: dict = {}
    for name, param in space.items():
        if name != "learning_rate" and all(values.get(k) in allowed for k, allowed in param.condition.items()):
            values[name] = chosen.get(name, TARGETS if name == "target_modules" else param.default)
    return values


def search_spec(variant: str, knobs: dict, data_dir: Path, out: Path, seed: int, steps: int, budget_steps: int) -> dict:
    from autopeft.space import SHARED_PARAMS

    space = {"learning_rate": LEARNING_RATES, **{(k if k in SHARED_PARAMS else f"{variant}.{k}"): v for k, v in knobs.items()}}
    return {
        "model": {"id": MINILM},
        "data": {"source": {s: str(data_dir / f"{s}.csv") for s in ("train", "validation", "test")}, "max_length": MAX_LENGTH},
        "search": {"variants": [variant], "space": space, "budget": f"{budget_steps} steps", "seed": seed},
        "training": {"max_steps": steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH, "threads": 1},
        "output": {"dir": str(out)},
    }


def plan_for(raw: dict, name: str):
    """The plan of ``raw``, refused unless the learning rate is its only searched parameter."""
    from autopeft.plan import make_plan
    from autopeft.space import CategoricalParam
    from autopeft.spec import parse_spec

    plan = make_plan(parse_spec(raw, name))
    for variant, space in plan.spaces.items():
        fixed = {n: p.choices[0] for n, p in space.items() if isinstance(p, CategoricalParam) and len(p.choices) == 1}
        live = [n for n, p in space.items() if all(fixed.get(k) in allowed for k, allowed in p.condition.items())]
        searched = [n for n in live if n != "learning_rate" and n not in fixed]
        if searched:
            raise SystemExit(f"{name}: {variant} would also search {searched}; the benchmark fixes every knob but the learning rate")
    return plan


def steps_and_trials(run_dir: Path) -> tuple[int, int]:
    """Training steps every finished trial of the search used, and the number of those trials."""
    with open(run_dir / "trials.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["state"] in ("COMPLETE", "PRUNED") and r["steps"]]
    return sum(int(float(r["steps"])) for r in rows), len(rows)


def exported_sizes(best: Path, modules: list[dict]) -> dict:
    """What the export holds: LoRA parameters, average rank over the candidate modules, the bits of each module
    with an adapter (16 when ``adapter_bits.json`` does not lower them) and the adapters' bit operations per
    token at 16-bit activations (each module's multiply-adds, r·(in + out), times its bits times 16)."""
    from safetensors.torch import load_file

    tensors = load_file(str(best / "adapter_model.safetensors"))
    bits_file = best / "adapter_bits.json"
    bits = json.loads(bits_file.read_text()) if bits_file.is_file() else {}
    macs: Counter = Counter()
    for key, tensor in tensors.items():
        if ".lora_A" in key or ".lora_B" in key:  # AdaLoRA's lora_E (its singular values) is a scale, not a product
            macs[key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]] += tensor.numel()
    candidates = [m for m in modules if m["role"] in ROLES]
    adapted = [m for m in candidates if m["rank"]]
    return {
        "lora_params": sum(t.numel() for k, t in tensors.items() if ".lora_" in k),
        "average_rank": statistics.mean(m["rank"] for m in candidates) if candidates else 0.0,
        "modules_with_adapter": len(adapted),
        "ranks": [m["rank"] for m in candidates],
        "adapter_bits": bits,
        "bits_histogram": {str(b): n for b, n in sorted(Counter(bits.get(m["name"], 16) for m in adapted).items())},
        "adapter_bops_16": sum(n * bits.get(name, 16) * 16 for name, n in macs.items()),
    }


def run_config(config: str, data_dir: Path, scratch: Path, seed: int, steps: int, budget_steps: int, tests: TestSet) -> dict:
    """One learning-rate search of ``config``; its chosen configuration measured."""
    from rich.console import Console

    from autopeft.orchestrators.local import run_search

    variant, chosen = CONFIGS[config]
    knobs = fixed_knobs(variant, chosen)
    run_dir = scratch / "runs" / config.replace(" ", "_").replace("/", "_")
    plan = plan_for(search_spec(variant, knobs, data_dir, run_dir, seed, steps, budget_steps), f"allocation:{config}:{seed}")
    started, cpu_started = time.perf_counter(), time.process_time()
    run_search(plan, Console(quiet=True))
    tested = tests.accuracy(run_dir / "best")
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    info = json.loads((run_dir / "best" / "autopeft.json").read_text())
    used, trials = steps_and_trials(run_dir)
    return {
        "variant": variant,
        "knobs": knobs,
        "learning_rate": info["params"]["learning_rate"],
        "validation_accuracy": info["validation"]["accuracy"],
        "test_accuracy": tested,
        "autopeft_test_accuracy": info["test"]["accuracy"],
        "bops_per_token": info["costs"]["bops_per_token"],
        "adapter_bytes": info["costs"]["adapter_bytes"],
        "trainable_params": info["trainable_params"],
        **exported_sizes(run_dir / "best", info["modules"]),
        "trials": trials,
        "steps_used": used,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # what the run cost even when the core was shared
    }


def configs_of(claims: list[str]) -> list[str]:
    """The configurations these claims need, each once, in the order of CONFIGS."""
    needed = {c for claim in claims for c in CLAIMS[claim].configs}
    return [c for c in CONFIGS if c in needed]


def done_keys(path: Path) -> set[tuple]:
    """(data set, seed, configuration, steps, budget) of the runs already recorded without an error."""
    if not path.is_file():
        return set()
    return {(r["dataset"], r["seed"], r["config"], r["steps"], r["budget_steps"]) for r in results_file.read([str(path)]) if "config" in r and "error" not in r}


def measure(args: argparse.Namespace) -> None:
    import torch

    from autopeft.models import resolve_model

    torch.set_num_threads(1)
    results = Path(args.results)
    configs = configs_of(args.claims)
    for dataset in args.datasets:
        for seed in args.seeds:
            todo = [c for c in configs if (dataset, seed, c, args.steps, args.budget_steps) not in done_keys(results)]
            if not todo:
                continue
            with tempfile.TemporaryDirectory(prefix="autopeft-allocation-") as scratch:
                scratch = Path(scratch)
                sizes = DATASETS[dataset]
                data_dir, classes = write_split(dataset, seed, scratch / "data", sizes["train"], sizes["validation"], sizes["test"])
                probe = plan_for(search_spec("lora", fixed_knobs("lora", {}), data_dir, scratch / "probe", seed, args.steps, args.budget_steps), "allocation:probe")
                tests = TestSet(resolve_model(probe.spec.model, probe.registry, Path.cwd()).path, data_dir, classes)
                for config in todo:
                    row = {
                        "dataset": dataset, "seed": seed, "config": config, "steps": args.steps, "budget_steps": args.budget_steps,
                        "examples": sizes, "load_before": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M"),
                    }
                    try:
                        row.update(run_config(config, data_dir, scratch, seed, args.steps, args.budget_steps, tests))
                    except Exception as exc:  # a method that fails is a result too; the others still run
                        row["error"] = f"{type(exc).__name__}: {exc}"
                    results_file.record(row, results)


# --------------------------------------------------------------------------------------------------------------
# The table and the verdicts
# --------------------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    sd = spread(values)
    return format(statistics.mean(values), fmt) + (f" ± {format(sd, fmt.lstrip('+'))}" if sd is not None else "")


def effect(comparison: Comparison, by_seed: dict[int, dict[str, dict]]) -> list[float]:
    """The comparison's effect on every seed where all its configurations ran."""
    return [
        sum(w * rows[c][comparison.key] for c, w in comparison.weights.items())
        for rows in by_seed.values()
        if all(c in rows for c in comparison.weights)
    ]


def verdict(comparison: Comparison, effects: list[float]) -> str:
    """holds / does not hold here / inconclusive, from the mean and spread of the per-seed effects."""
    if len(effects) < 2:
        return "inconclusive (fewer than 2 seeds)"
    gap, sd = statistics.mean(effects), statistics.stdev(effects)
    if comparison.expects == "no worse":
        return "holds" if gap >= -sd else "does not hold here"
    if gap > sd:
        return "holds"
    if gap <= -sd:
        return "does not hold here"
    return "inconclusive"


def overall(verdicts: list[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if any(v == "does not hold here" for v in verdicts):
        return "does not hold here"
    return "inconclusive"


def cell(key: str, rows: list[dict]) -> str:
    values = [r[key] for r in rows]
    if key == "bits_histogram":
        totals: Counter = Counter()
        for value in values:
            totals.update(value)
        return ", ".join(f"{b}-bit: {n / len(values):g}" for b, n in sorted(totals.items(), key=lambda item: int(item[0])))
    if key in ("bops_per_token", "adapter_bops_16", "adapter_bytes"):
        return f"{statistics.mean(values):,.0f}"
    return mean_sd(values)


def print_claims(rows: list[dict]) -> None:
    ok = [r for r in rows if "error" not in r]
    for name, claim in CLAIMS.items():
        present = [r for r in rows if r["config"] in claim.configs]
        if not any(not r["config"].startswith("LoRA r=") for r in present):
            continue  # only the LoRA baselines it shares with other claims ran
        print(f"\n## {name}: {claim.title}\n")
        columns = ("test accuracy", "validation", "learning rate (median)", "average rank", "LoRA params", "seeds", *claim.columns)
        print("| data | configuration | " + " | ".join(columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        verdicts, lines = [], []
        for dataset in dict.fromkeys(r["dataset"] for r in present):
            for config in claim.configs:
                runs = [r for r in ok if r["dataset"] == dataset and r["config"] == config]
                errors = sorted({r["error"] for r in present if r["dataset"] == dataset and r["config"] == config and "error" in r})
                if not runs:
                    if errors:
                        print(f"| {dataset} | {config} | failed: {'; '.join(errors)} |" + " |" * (len(columns) - 1))
                    continue
                cells = [
                    mean_sd([r["test_accuracy"] for r in runs]),
                    mean_sd([r["validation_accuracy"] for r in runs]),
                    f"{statistics.median(r['learning_rate'] for r in runs):.2g}",
                    f"{statistics.mean(r['average_rank'] for r in runs):.2f}",
                    f"{statistics.mean(r['lora_params'] for r in runs):,.0f}",
                    ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])) + (f" ({len(errors)} failed)" if errors else ""),
                    *(cell(key, runs) for key in claim.columns),
                ]
                print(f"| {dataset} | {config} | " + " | ".join(cells) + " |")
            by_seed: dict[int, dict[str, dict]] = {}
            for r in ok:
                if r["dataset"] == dataset:
                    by_seed.setdefault(r["seed"], {})[r["config"]] = r
            for comparison in claim.comparisons:
                effects = effect(comparison, by_seed)
                if not effects:
                    lines.append(f"- {dataset}: {comparison.label}: not measured")
                    verdicts.append("inconclusive")
                    continue
                shown = mean_sd(effects, "+.3f" if comparison.key.endswith("accuracy") else "+,.0f")
                verdicts.append(verdict(comparison, effects))
                lines.append(f"- {dataset}: {comparison.label} = {shown} over {len(effects)} seed(s): {verdicts[-1]}")
        print()
        print("\n".join(lines))
        print(f"\n**Verdict: {overall(verdicts)}.**")
    mismatched = [r for r in ok if abs(r["test_accuracy"] - r["autopeft_test_accuracy"]) > 1e-9]
    if mismatched:
        print(f"\nNote: on {len(mismatched)} run(s) the test accuracy as PEFT loads the export differs from autopeft's own:")
        for r in mismatched:
            print(f"- {r['dataset']} seed {r['seed']} {r['config']}: {r['test_accuracy']:.4f} against {r['autopeft_test_accuracy']:.4f}")


def print_equal_budget_table(results: list[dict]) -> None:
    """The former equal-budget run's table (rows with ``method``): mean ± sd over seeds of each method."""
    seeds = sorted({r["seed"] for r in results})
    print(f"\nBudget: 147,456 LoRA parameters (uniform rank 8 on q, k, v, o of 6 layers). Mean ± sd over seeds {seeds}.\n")
    print("| data | method | test accuracy | validation accuracy | LoRA parameters | modules with an adapter |")
    print("|---|---|---|---|---|---|")
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        for method in dict.fromkeys(r["method"] for r in results if r["dataset"] == dataset):
            rows = [r for r in results if r["dataset"] == dataset and r["method"] == method and "error" not in r]
            if not rows:
                errors = {r["error"] for r in results if r["dataset"] == dataset and r["method"] == method}
                print(f"| {dataset} | {method} | failed: {'; '.join(errors)} | | | |")
                continue
            params = statistics.mean(r["lora_params"] for r in rows)
            modules = statistics.mean(r["modules_with_adapter"] for r in rows)
            print(
                f"| {dataset} | {method} | {mean_sd([r['test_accuracy'] for r in rows])} | {mean_sd([r['validation_accuracy'] for r in rows])} "
                f"| {params:,.0f} | {modules:g} |"
            )


def table(paths: list[str]) -> None:
    rows = results_file.read(paths)
    legacy = [r for r in rows if "config" not in r]
    if legacy:
        print_equal_budget_table(legacy)
    print_claims([r for r in rows if "config" in r])


def plot_sora(paths: list[str], out: str) -> None:
    """Test accuracy against exported LoRA parameters: SoRA at each target rank, and LoRA at ranks 2, 4 and 8;
    one panel per data set, mean and standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results_file.read(paths) if "config" in r and "error" not in r]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows if r["config"].startswith("SoRA")))
    if not datasets:
        raise SystemExit(f"no SoRA results in {', '.join(paths)}; run --claims sora first")
    figure, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for family, marker, label, separator in (("SoRA", "o", "SoRA (16 slots), target rank", "→"), ("LoRA r=", "s", "LoRA, rank", "=")):
            names = [c for c in CONFIGS if c.startswith(family) and any(r["config"] == c and r["dataset"] == dataset for r in rows)]
            points = []
            for name in names:
                runs = [r for r in rows if r["config"] == name and r["dataset"] == dataset]
                tests = [r["test_accuracy"] for r in runs]
                points.append((statistics.mean(r["lora_params"] for r in runs), statistics.mean(tests), spread(tests) or 0.0, name))
            points.sort()
            if not points:
                continue
            axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker=marker, capsize=3, label=label)
            for x, y, _, name in points:
                axis.annotate(name.rsplit(separator, 1)[-1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel("exported LoRA parameters")
        axis.set_ylabel("test accuracy (PEFT-loaded)")
        axis.set_title(dataset)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("SoRA's sparsity sweep and LoRA (mean ± sd over seeds)")
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=list(CLAIMS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="training steps of one trial")
    parser.add_argument("--budget-steps", type=int, default=600, help="search.budget of each learning-rate search, in steps")
    parser.add_argument("--results", default=str(RESULTS), help="results are appended here, one JSON line per run")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="print the claims' table of these results files")
    parser.add_argument("--plot-sora", nargs=2, metavar=("RESULTS", "OUT_PNG"), help="draw SoRA's size–accuracy curve")
    args = parser.parse_args()
    if args.table:
        table(args.table)
    elif args.plot_sora:
        plot_sora([args.plot_sora[0]], args.plot_sora[1])
    else:
        measure(args)


if __name__ == "__main__":
    main()
