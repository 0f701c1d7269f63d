"""Which adapter should I use here? Every variant that applies, each tuned by autopeft at the same compute.

MiniLM (the packaged ``sentence-transformers/all-MiniLM-L6-v2``) on Rotten Tomatoes and BBC News, each seed with
its own data split (written once to CSV files every variant reads; see ``write_split`` in search_quality.py) and
its own sampler seed. The variants are every built-in variant of the registry (``autopeft.registry.load_registry``):
those bridged from PEFT (``peft:<method>``), those written here in ``plugins/`` (the papers' methods of
``plugins/paper_methods.py``, the frozen-basis methods, PEFT's own LoRA family), and the rank allocators. Variants
the registry lists as unavailable are not variants and are not run; ``supports_quantized_base`` does not matter
here, since the base is not quantized. Variants of other installed packages run only when named with
``--variants``.

Each variant is tuned on its own by an autopeft search (``search.variants: [<variant>]``) that may spend
``--budget-steps`` training steps (``search.budget``, so successive halving screens configurations), every
configuration trained for ``--steps`` steps (batch 16, 64 tokens). The search tunes the learning rate and the
variant's main size knob (its rank, coefficient count, target rank, kept fraction, ...: ``size_knob`` below, over
the range the variant declares); every other parameter stays at the variant's default, target modules included.
Its first trial is the variant's defaults, at the learning rate autopeft fits to the trial length (``--first-rate
fitted``, the default) or at the variant's declared rate (``--first-rate declared``: the BBC News rows, run before
autopeft fitted it). A variant whose every trial fails is recorded as failed, with the reason
the study holds for its trials, and the study goes on.

Per (data set, seed, variant), one JSON line: the test accuracy of ``best/`` as PEFT loads it
(``peft.PeftModel.from_pretrained`` onto a fresh base, on the seed's test split: ``TestSet`` of
search_quality.py), the test accuracy autopeft reported for it, its validation accuracy, trainable parameters,
adapter bytes (the size of ``adapter_model.safetensors``, and the trial's ``adapter_bytes`` cost), seconds per
training step (the selected trial's ``train_seconds`` over its steps; they include attaching the adapter and the
validation passes: at the steps a row's ``evaluation_steps`` lists, successive halving's rungs; a row without the
field evaluated at each quarter of the steps, as autopeft did before 2026-11-30), the chosen learning rate and size,
and how many trials completed, were pruned or failed.

    taskset -c 0 .venv/bin/python benchmarks/variants.py --seeds 0 1 2
    taskset -c 0 .venv/bin/python benchmarks/variants.py --datasets bbc-news --first-rate declared   # the BBC News rows
    taskset -c 0 .venv/bin/python benchmarks/variants.py --datasets bbc-news --variants lora dora peft:hra   # a piece
    .venv/bin/python benchmarks/variants.py --table benchmarks/results/variants.jsonl
    .venv/bin/python benchmarks/variants.py --plot benchmarks/results/variants.jsonl benchmarks/results/variants.png
    .venv/bin/python benchmarks/variants.py --table benchmarks/results/variants.jsonl --seeds 0   # only seed 0's rows

With ``--table`` and ``--plot``, ``--variants`` and ``--seeds`` choose the rows read (tuned LoRA is always read),
so a study run further for some variants than for others can be read at one seed for all, or at every seed for
those.

Rows are appended to ``benchmarks/results/variants.jsonl`` (``--results``) as each variant finishes; a run started
again skips every (data set, seed, variant) already recorded there at the same steps and budget (a failure is a
result too), so the study can be run in pieces and an interrupted run loses only the variant it was on.

``--table`` prints, per data set, each variant's mean ± standard deviation over seeds and one verdict on the claim
"a well-tuned plain LoRA matches most variants": LoRA matches a variant when its mean test accuracy is within 0.5
points of the variant's or above it; a comparison whose spread over seeds (standard deviation of the per-seed
differences, same split) is larger than its distance from that half-point line is undecided. The claim holds when
LoRA matches more than half of the compared results, does not hold when at least half are decided against it, and
is inconclusive otherwise (always with one seed: there is no spread to judge by).

Load: run it pinned to one core (``taskset -c 0``, ``--threads 1``, the default), with no other heavy job on the
machine; seconds per step are only comparable between variants measured under the same load.

How long a full run takes on this machine (2 shared cores): an ESTIMATE, not a measurement. The smoke test
(``--budget-steps 8 --steps 4``, one seed, core 1 shared, load 4-5) took 112 s for lora's search on BBC News,
149 s for peft:hra, 157 s for svfit and 82-130 s for sora and lora on Rotten Tomatoes (there a validation pass follows
every step); the search-quality benchmark's autopeft search of the same 240-step budget took
181 s at load 6 (benchmarks/results/search_quality.jsonl). At the defaults (60-step configurations, 240 steps per
variant) one variant on one data set and seed should take 3-5 minutes with its test pass, so the 63 built-in
variants x 2 data sets x 3 seeds (378 searches) take about 20-35 hours. Run it in pieces (``--variants``,
``--datasets``, ``--seeds``) and check ``search_seconds`` in the rows of the first piece.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import results_file  # noqa: E402  (benchmarks/results_file.py)
from search_quality import BATCH, DATASETS, EVAL_BATCH, MAX_LENGTH, MINILM, TestSet, write_split  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "variants.jsonl"
REFERENCE = "lora"
WITHIN = 0.005
"""Half a point of accuracy: LoRA matches a variant when it is at most this much below it."""

SIZE_KNOBS = ("target_rank", "r", "rank", "max_rank", "n_coefficients", "n_frequency", "num_vectors", "num_bases",
              "block_size", "oft_block_size", "boft_block_size", "group_size", "theta_d_length", "init_r")
"""Parameter names that set an adapter's size, most telling first: the first a variant searches is its size knob."""
BUDGET_KNOBS = {"diffora": "rho", "bayesian-lora": "lambda_rank", "adalora": "target_ratio", "nola": "num_bases"}
"""Variants whose size is set by a knob the generic names would miss (the budget knobs the README's allocator table
names; NOLA's trainable coefficients are its bases, not its rank)."""


# --------------------------------------------------------------------------------------------------------------
# Which variants, and what is tuned
# --------------------------------------------------------------------------------------------------------------


def applicable_variants() -> dict[str, Any]:
    """Every built-in variant of the registry, by name (unavailable ones are not among them)."""
    from autopeft.registry import load_registry

    registry = load_registry()
    return {name: found.item for name, found in registry.variants.items() if found.source == "built-in"}


def size_knob(name: str, space: dict[str, Any]) -> str | None:
    """The variant's main size knob: the first size parameter it actually searches (more than one value)."""
    from autopeft.space import CategoricalParam

    def searched(param: Any) -> bool:
        return not (isinstance(param, CategoricalParam) and len(param.choices) < 2)

    candidates = ([BUDGET_KNOBS[name]] if name in BUDGET_KNOBS else []) + list(SIZE_KNOBS)
    return next((knob for knob in candidates if knob in space and searched(space[knob])), None)


FIRST_RATES = ("fitted", "declared")
"""Where each search's first trial puts the learning rate: ``fitted``, autopeft's default (the declared rate scaled to
the trial length, :func:`autopeft.space.learning_rate_for_steps`), or ``declared``, the variant's declared default
(the BBC News rows, run before that prior existed). Rows record it; only rows of one kind are compared."""


def tuned_space(name: str, variant: Any, first_rate: str = "fitted") -> tuple[dict[str, Any], str | None]:
    """The spec's ``search.space`` for one variant: the learning rate and the size knob searched over the ranges the
    variant declares, every other parameter (target modules too) fixed at its default; and the knob's name. The first
    trial's learning rate is as ``first_rate`` says (:data:`FIRST_RATES`)."""
    space = variant.search_space()
    knob = size_knob(name, space)
    fixed: dict[str, Any] = {"learning_rate": {"default": space["learning_rate"].default}} if first_rate == "declared" else {}
    for param_name, param in space.items():
        if param_name in ("learning_rate", knob):
            continue
        fixed[param_name if param_name == "target_modules" else f"{name}.{param_name}"] = [param.default]
    return fixed, knob


def variant_spec(name: str, space: dict[str, Any], data_dir: Path, out: Path, seed: int, args: argparse.Namespace) -> dict:
    """The spec of one variant's tuning search."""
    return {
        "model": {"id": MINILM},
        "data": {"source": {s: str(data_dir / f"{s}.csv") for s in ("train", "validation", "test")}, "max_length": MAX_LENGTH},
        "search": {
            "variants": [name], "space": space, "seed": seed, "budget": f"{args.budget_steps} steps",
            # A cap for a variant whose trials all fail before training (they spend no steps): successive halving
            # at a quarter of the steps tries at most four configurations per full trial of budget.
            "n_trials": max(2, 4 * args.budget_steps // args.steps),
        },
        "training": {"max_steps": args.steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH, "threads": args.threads},
        "output": {"dir": str(out), "keep": "best"},
    }


# --------------------------------------------------------------------------------------------------------------
# One variant's search and what it yields
# --------------------------------------------------------------------------------------------------------------


def failure_reason(study: Any) -> str:
    """Why no trial of ``study`` completed: its failed trials' most common reasons, as the search recorded them."""
    reasons = collections.Counter(t.user_attrs.get("failure_reason") for t in study.get_trials(deepcopy=False) if t.state.name == "FAIL")
    reasons.pop(None, None)
    if not reasons:
        return "no trial completed and none recorded a failure reason"
    return "; ".join(f"{count} x {reason[:300]}" for reason, count in reasons.most_common(2))


def run_variant(name: str, data_dir: Path, out: Path, seed: int, tests: TestSet, args: argparse.Namespace) -> dict:
    """Tune one variant with an autopeft search in ``out``; measure its ``best/`` as PEFT loads it."""
    import json

    from rich.console import Console

    from autopeft.errors import AutoPeftError
    from autopeft.orchestrators.local import run_search
    from autopeft.plan import make_plan
    from autopeft.pruning import evaluation_steps
    from autopeft.rundir import RunDir, open_study
    from autopeft.spec import parse_spec

    space, knob = tuned_space(name, installed_variant(name), args.first_rate)
    row: dict[str, Any] = {"knob": knob}
    started = time.perf_counter()
    try:
        plan = make_plan(parse_spec(variant_spec(name, space, data_dir, out, seed, args), f"variants:{name}"))
        result = run_search(plan, Console(quiet=True))
    except AutoPeftError as exc:  # refused before any trial ran (e.g. a spec the variant cannot take)
        return {**row, "failed": f"{type(exc).__name__}: {exc}", "search_seconds": round(time.perf_counter() - started, 1)}
    if result.interrupted:
        raise KeyboardInterrupt
    row["search_seconds"] = round(time.perf_counter() - started, 1)
    row["evaluation_steps"] = evaluation_steps(plan.spec.training, plan.spec.search.pruner)  # what seconds per step include
    study = open_study(RunDir(out), "maximize")
    trials = study.get_trials(deepcopy=False)
    row["trials"] = dict(collections.Counter(t.state.name.lower() for t in trials))
    row["steps_used"] = sum(int(t.user_attrs.get("steps") or 0) for t in trials if t.state.is_finished())
    failures = sorted({t.user_attrs["failure_reason"][:300] for t in trials if t.state.name == "FAIL" and t.user_attrs.get("failure_reason")})
    if failures:
        row["failures"] = failures
    if result.best_trial is None:
        return {**row, "failed": failure_reason(study)}
    best = trials[result.best_trial]
    exported = json.loads((out / "best" / "autopeft.json").read_text())
    costs = best.user_attrs.get("costs") or {}
    params = exported["params"]
    return {
        **row,
        "trial": result.best_trial,
        "learning_rate": params.get("learning_rate"),
        "knob_value": params.get(f"{name}.{knob}", params.get(knob)) if knob else None,
        "params": params,
        "best_validation": exported["validation"]["accuracy"],
        "test": tests.accuracy(out / "best"),
        "test_reported": exported["test"].get("accuracy"),
        "trainable_params": exported["trainable_params"],
        "adapter_bytes": costs.get("adapter_bytes"),
        "adapter_file_bytes": (out / "best" / "adapter_model.safetensors").stat().st_size,
        "seconds_per_step": costs["train_seconds"] / best.user_attrs["steps"] if costs.get("train_seconds") and best.user_attrs.get("steps") else None,
    }


def installed_variant(name: str) -> Any:
    """Any installed variant by name (built-in or another package's), or a :class:`ValueError` saying why not."""
    from autopeft.registry import load_registry

    registry = load_registry()
    if name in registry.variants:
        return registry.variants[name].item
    why = registry.unavailable[name].item.reason if name in registry.unavailable else "no such variant"
    raise ValueError(f"--variants: {name!r}: {why}; available: {', '.join(sorted(registry.variants))}")


def measure(args: argparse.Namespace) -> None:
    """Run every (data set, seed, variant) not yet in the results file, appending one row as each finishes."""
    import torch

    from autopeft.models import resolve_model
    from autopeft.registry import load_registry
    from autopeft.spec import ModelSpec

    torch.set_num_threads(args.threads)
    names = args.variants or list(applicable_variants())
    done = set()
    if Path(args.results).is_file():
        done = {(r["dataset"], r["seed"], r["variant"]) for r in results_file.read([args.results])
                if r.get("steps_per_trial") == args.steps and r.get("budget_steps") == args.budget_steps and first_rate(r) == args.first_rate}
    for seed in args.seeds:
        for dataset in args.datasets:
            todo = [n for n in names if (dataset, seed, n) not in done]
            if not todo:
                continue
            with tempfile.TemporaryDirectory(prefix="autopeft-variants-") as scratch:
                scratch = Path(scratch)
                data_dir, classes = write_split(dataset, seed, scratch / "data", args.train, args.validation, args.test)
                model_dir = resolve_model(ModelSpec(id=MINILM), load_registry(), Path.cwd()).path
                tests = TestSet(model_dir, data_dir, classes)
                for name in todo:
                    out = scratch / name.replace(":", "_")
                    load_before = os.getloadavg()[0]
                    try:
                        measured = run_variant(name, data_dir, out / "run", seed, tests, args)
                    except KeyboardInterrupt:
                        raise
                    except Exception as exc:  # a variant that breaks the search itself is a result, not the end of the study
                        measured = {"knob": None, "failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    results_file.record(
                        {
                            "dataset": dataset, "seed": seed, "variant": name, "source": _source(name), **measured,
                            "steps_per_trial": args.steps, "budget_steps": args.budget_steps, "first_rate": args.first_rate,
                            "examples": {"train": args.train, "validation": args.validation, "test": args.test},
                            "threads": args.threads, "load_before": round(load_before, 2), "date": time.strftime("%Y-%m-%d %H:%M"),
                        },
                        args.results,
                    )
                    shutil.rmtree(out, ignore_errors=True)  # this run's own folder: adapters of exact-rank exports are large


def _source(name: str) -> str:
    """The plugin a variant comes from (``peft_bridge``, ``paper_methods``, ``allocators``, ...)."""
    from autopeft.registry import load_registry

    found = load_registry().variants.get(name)
    return found.plugin if found else "?"


# --------------------------------------------------------------------------------------------------------------
# The table, the verdict and the plot
# --------------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Per data set and variant: the measured rows, the failed ones, and means over seeds."""
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        entry = out.setdefault(row["dataset"], {}).setdefault(row["variant"], {"ok": [], "failed": []})
        entry["failed" if "failed" in row else "ok"].append(row)
    for variants in out.values():
        for entry in variants.values():
            ok = entry["ok"]
            if not ok:
                continue
            tests = [r["test"] for r in ok]
            entry["test"] = statistics.mean(tests)
            entry["spread"] = statistics.stdev(tests) if len(tests) > 1 else None
            entry["params"] = statistics.median(r["trainable_params"] for r in ok)
            entry["bytes"] = statistics.median(r["adapter_file_bytes"] for r in ok)
            per_step = [r["seconds_per_step"] for r in ok if r.get("seconds_per_step")]
            entry["seconds_per_step"] = statistics.mean(per_step) if per_step else None
    return out


def compare_to_reference(variants: dict[str, dict]) -> dict[str, list[str]]:
    """Sort each measured variant into: LoRA matches it (within half a point or above), it beats LoRA by more, or
    undecided (the spread over seeds of the paired per-seed differences is larger than the distance from the
    half-point line, or there is only one seed)."""
    reference = variants.get(REFERENCE, {})
    by_seed = {r["seed"]: r["test"] for r in reference.get("ok", [])}
    verdicts: dict[str, list[str]] = {"matched": [], "beats lora": [], "undecided": [], "failed": []}
    if not by_seed:
        return verdicts
    for name, entry in variants.items():
        if name == REFERENCE:
            continue
        if not entry["ok"]:
            verdicts["failed"].append(name)
            continue
        differences = [r["test"] - by_seed[r["seed"]] for r in entry["ok"] if r["seed"] in by_seed]
        if not differences:
            verdicts["undecided"].append(name)
            continue
        gap = statistics.mean(differences)
        spread = statistics.stdev(differences) if len(differences) > 1 else None
        if spread is None or spread > abs(gap - WITHIN):
            verdicts["undecided"].append(name)
        else:
            verdicts["matched" if gap <= WITHIN else "beats lora"].append(name)
    return verdicts


def verdict(summary: dict[str, dict[str, dict]]) -> str:
    """One line on "a well-tuned plain LoRA matches most variants", over every (data set, variant) result."""
    counts = collections.Counter()
    for variants in summary.values():
        for kind, names in compare_to_reference(variants).items():
            counts[kind] += len(names)
    compared = counts["matched"] + counts["beats lora"] + counts["undecided"]
    if not compared:
        return f"Claim 'a well-tuned plain LoRA matches most variants': inconclusive: no variant was measured next to {REFERENCE!r}."
    if counts["matched"] * 2 > compared:
        word = "HOLDS"
    elif counts["beats lora"] * 2 >= compared:
        word = "DOES NOT HOLD"
    else:
        word = "INCONCLUSIVE"
    return (
        f"Claim 'a well-tuned plain LoRA matches most variants': {word}: tuned lora is within 0.5 points of or above "
        f"{counts['matched']} of {compared} variant results over {len(summary)} data set(s), {counts['beats lora']} beat it by "
        f"more, {counts['undecided']} undecided (one seed, or a seed spread larger than the gap)" + (f"; {counts['failed']} failed (not counted)" if counts["failed"] else "") + "."
    )


def first_rate(row: dict) -> str:
    """The row's :data:`FIRST_RATES` kind (rows from before the field existed are ``declared``)."""
    return row.get("first_rate", "declared")


def recorded(paths: list[str], variants: list[str] | None = None, seeds: list[int] | None = None, datasets: list[str] | None = None) -> list[dict]:
    """The rows of these results files, only of ``variants`` (and the reference, tuned LoRA), ``seeds`` and
    ``datasets`` if given.
    A data set whose rows mix first-trial rates (:data:`FIRST_RATES`) is refused: its rows would not compare."""
    rows = results_file.read(paths)
    rows = [
        r for r in rows
        if (variants is None or r["variant"] in {*variants, REFERENCE}) and (seeds is None or r["seed"] in seeds) and (datasets is None or r["dataset"] in datasets)
    ]
    for dataset in {r["dataset"] for r in rows}:
        kinds = {first_rate(r) for r in rows if r["dataset"] == dataset}
        if len(kinds) > 1:
            raise SystemExit(f"{dataset}: rows with first-trial rates {sorted(kinds)} do not compare; keep one kind per results file and data set")
    return rows


def table(rows: list[dict]) -> None:
    """Print the per-data-set table (mean ± standard deviation over seeds) and the verdict."""
    summary = summarize(rows)
    for dataset, variants in summary.items():
        seeds = sorted({r["seed"] for r in rows if r["dataset"] == dataset})
        first = next(r for r in rows if r["dataset"] == dataset)
        print(
            f"\n{dataset} (seeds {seeds}; {first['steps_per_trial']} steps per trial, budget {first['budget_steps']} steps per variant; "
            f"first trial at the {first_rate(first)} learning rate)"
        )
        print(f"{'variant':<22}{'test':>8}{'±':>7}{'trainable':>12}{'adapter MB':>11}{'s/step':>8}  {'size knob':<28}notes")
        ordered = sorted(variants.items(), key=lambda item: -item[1].get("test", -1.0))
        for name, entry in ordered:
            failed = entry["failed"]
            if not entry["ok"]:
                print(f"{name:<22}{'failed':>8}{'':>7}{'':>12}{'':>11}{'':>8}  {'':<28}{failed[0]['failed'][:120]}")
                continue
            spread = f"{entry['spread']:.3f}" if entry["spread"] is not None else "-"
            per_step = f"{entry['seconds_per_step']:.2f}" if entry["seconds_per_step"] else "-"
            knobs = ", ".join(f"{r['knob_value']:g}" if isinstance(r.get("knob_value"), (int, float)) else "-" for r in entry["ok"])
            knob = f"{entry['ok'][0]['knob']}={knobs}" if entry["ok"][0].get("knob") else "lr only"
            notes = f"{len(failed)} seed(s) failed: {failed[0]['failed'][:80]}" if failed else ""
            print(f"{name:<22}{entry['test']:>8.4f}{spread:>7}{entry['params']:>12,.0f}{entry['bytes'] / 1e6:>11.3f}{per_step:>8}  {knob[:27]:<28}{notes}")
        groups = compare_to_reference(variants)
        if groups["matched"] or groups["beats lora"] or groups["undecided"]:
            print(f"against tuned {REFERENCE}: matched {len(groups['matched'])}, beat it by more than 0.5 points {len(groups['beats lora'])} "
                  f"({', '.join(groups['beats lora']) or 'none'}), undecided {len(groups['undecided'])}, failed {len(groups['failed'])}")
    print()
    print(verdict(summary))


def plot(rows: list[dict], out: str) -> None:
    """Accuracy against size: one point per variant per data set (mean over seeds), trainable parameters on a log
    scale, one panel per data set, tuned LoRA's accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    figure, axes = plt.subplots(1, len(summary), figsize=(9 * len(summary), 7), squeeze=False)
    for axis, (dataset, variants) in zip(axes[0], summary.items()):
        measured = {name: e for name, e in variants.items() if e["ok"]}
        for name, entry in measured.items():
            highlight = name == REFERENCE
            axis.scatter(entry["params"], entry["test"], s=40 if highlight else 18, color="crimson" if highlight else "tab:blue", zorder=3)
            axis.annotate(name, (entry["params"], entry["test"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if REFERENCE in measured:
            axis.axhline(measured[REFERENCE]["test"], color="crimson", linestyle="--", linewidth=0.8, label=f"tuned {REFERENCE}")
            axis.legend(loc="lower right")
        seeds = sorted({r["seed"] for e in variants.values() for r in e["ok"] + e["failed"]})
        failed = sorted(name for name, e in variants.items() if not e["ok"])
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (median over seeds; includes the task head)")
        axis.set_ylabel("test accuracy as PEFT loads the export (mean over seeds)")
        kind = first_rate(next(r for e in variants.values() for r in e["ok"] + e["failed"]))
        axis.set_title(f"{dataset}, seeds {seeds}, first trial at the {kind} learning rate" + (f"\nfailed: {', '.join(failed)}" if failed else ""), fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", help="run only these variants (default: every built-in variant); with --table or --plot: read only these and tuned lora")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="data sets to run (with --table or --plot: to read)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds to run (with --table or --plot: to read)")
    parser.add_argument("--steps", type=int, default=60, help="training steps of one configuration")
    parser.add_argument("--budget-steps", type=int, default=240, help="training steps each variant's search may spend")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--first-rate", choices=FIRST_RATES, default="fitted", help="the first trial's learning rate: autopeft's fitted one, or the variant's declared default")
    parser.add_argument("--results", default=str(RESULTS), help="JSON lines file the rows are appended to")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="print the table and verdict of recorded results")
    parser.add_argument("--plot", nargs=2, metavar=("RESULTS", "OUT_PNG"), help="draw accuracy against trainable parameters")
    args = parser.parse_args()
    if args.steps < 1 or args.budget_steps < args.steps:
        parser.error(f"--budget-steps ({args.budget_steps}) must be at least --steps ({args.steps}), and --steps at least 1")
    for name in args.variants or []:  # refuse an unknown name before hours of work, not when its turn comes
        try:
            installed_variant(name)
        except ValueError as exc:
            parser.error(str(exc))
    if args.table:
        table(recorded(args.table, args.variants, args.seeds, args.datasets))
    elif args.plot:
        plot(recorded([args.plot[0]], args.variants, args.seeds, args.datasets), args.plot[1])
    else:
        measure(args)


if __name__ == "__main__":
    main()
