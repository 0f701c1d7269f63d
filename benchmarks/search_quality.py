"""Search quality at equal compute: autopeft's default search against what users do today.

MiniLM (the packaged ``sentence-transformers/all-MiniLM-L6-v2``) on Rotten Tomatoes and BBC News, each seed with its
own data split (written once to CSV files every method reads) and its own sampler seed. Every trial trains
``--steps`` steps (batch 16, 64 tokens); the searches get ``--trials`` trials' worth of steps. The methods:

1. ``peft-default lr=…``: PEFT's defaults (``LoraConfig(r=8, lora_alpha=8, lora_dropout=0)`` on query,value) at the
   learning rates blogs copy, 1e-4, 2e-4 and 1e-3: one run each;
2. ``random``: random search over autopeft's default LoRA space, every trial run to the end;
3. ``trainer-optuna``: Transformers' ``Trainer.hyperparameter_search(backend="optuna")`` over the learning rate and the
   rank, with a ``model_init`` that attaches LoRA (its documentation's recipe), the same steps per trial; its best
   configuration is trained once more and saved, as a user would;
4. ``tpe``: Optuna's TPE over the same space, every trial run to the end, no baseline trial (what a user writes);
5. ``autopeft``: the default search, given only ``search.budget`` = the same number of steps;
6. ``autopeft-size`` (not a default): the same budget, with trainable parameters as a second objective and
   ``best/`` the smallest adapter within half a point of the best validation accuracy;
7. ``autopeft-quarter`` (not a default): the same budget, for a user who wants the most accurate adapter at a
   quarter of the size of PEFT's default: the ``small-adapters`` preset (LoRA from rank 1, NoLA, LoKr, LoRA-XS)
   and the constraint ``trainable_params <= N``, N a quarter of the default adapter's trainable parameters on
   that data set (task head included, as in every size here);
8. ``autopeft-warm`` (not a default): the default search with ``search.warm_start`` naming an earlier run of the
   default search on the other data set (same model, new data; its own split and sampler seed, seed + 100), which
   is run first and not counted: its three best configurations are this search's first trials.

Methods 1, 2, 4 and 5 train with autopeft's loop (AdamW, 6% warm-up, linear decay, clipping at 1); method 3 with
Trainer's. For each run: the best validation accuracy, the test accuracy of the selected adapter as
``peft.PeftModel.from_pretrained`` loads it, its trainable parameters, the training steps used, and the steps
until the search first came within 0.5 points of its own final best (validation). For the searches run by autopeft
the test accuracy of every successive incumbent is measured too, so the table can say how many steps autopeft
needed to reach each alternative's final test accuracy.

    cd benchmarks && taskset -c 0 python search_quality.py --seeds 0 1 2 --steps 40 --trials 6
    cd benchmarks && python search_quality.py --table results/search_quality.jsonl

``--table`` reads several files in order; a later file's row for the same (data set, seed, method) replaces an
earlier one, so one method can be rerun after a change (``--methods autopeft --results results/new.jsonl``) and
read against the others' earlier runs.

Appends one JSON line per (data set, seed, method) to ``benchmarks/results/search_quality.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import results_file  # noqa: E402  (benchmarks/results_file.py)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "search_quality.jsonl"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DATASETS = ("rotten-tomatoes", "bbc-news")
BATCH, EVAL_BATCH, MAX_LENGTH = 16, 64, 64
BLOG_RATES = (1e-4, 2e-4, 1e-3)
WITHIN = 0.005
"""Half a point of accuracy."""


# --------------------------------------------------------------------------------------------------------------
# Data: one split per seed, written once, read by every method
# --------------------------------------------------------------------------------------------------------------


def write_split(dataset: str, seed: int, folder: Path, train: int, validation: int, test: int) -> tuple[Path, int]:
    """Shuffle the corpus with ``seed``, write train/validation/test CSVs (label as a class id); return the folder
    and the number of classes."""
    from autopeft_plugins.corpora import load_bbc_news, load_rotten_tomatoes

    corpus = (load_rotten_tomatoes if dataset == "rotten-tomatoes" else load_bbc_news)().shuffle(seed=seed)
    classes = len(corpus.features["label"].names)
    train = min(train, len(corpus) - validation - test)
    bounds = {"validation": (0, validation), "test": (validation, validation + test), "train": (validation + test, validation + test + train)}
    folder.mkdir(parents=True, exist_ok=True)
    for split, (start, end) in bounds.items():
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for row in corpus.select(range(start, end)):
                writer.writerow([row["text"], row["label"]])
    return folder, classes


def read_split(folder: Path, split: str) -> tuple[list[str], list[int]]:
    with open(folder / f"{split}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


# --------------------------------------------------------------------------------------------------------------
# Measuring an adapter as PEFT loads it
# --------------------------------------------------------------------------------------------------------------


class TestSet:
    """The test split, tokenized once, and a fresh base model per adapter."""

    def __init__(self, model_dir: Path, data_dir: Path, classes: int) -> None:
        from transformers import AutoTokenizer

        self.model_dir, self.classes = model_dir, classes
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts, self.labels = read_split(data_dir, "test")
        self.encoded = [self.tokenizer(t, truncation=True, max_length=MAX_LENGTH) for t in texts]

    def accuracy(self, adapter_dir: Path) -> float:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

        base = AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=self.classes)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        collator = DataCollatorWithPadding(self.tokenizer)
        correct = 0
        with torch.no_grad():
            for start in range(0, len(self.encoded), EVAL_BATCH):
                batch = collator([dict(e) for e in self.encoded[start : start + EVAL_BATCH]])
                predictions = model(**batch).logits.argmax(-1).tolist()
                correct += sum(p == y for p, y in zip(predictions, self.labels[start : start + EVAL_BATCH]))
        return correct / len(self.labels)


def within_steps(trajectory: list[dict]) -> int:
    """Steps until the best validation accuracy first came within half a point of its final value."""
    final = trajectory[-1]["best_validation"]
    return next(point["steps"] for point in trajectory if point["best_validation"] is not None and point["best_validation"] >= final - WITHIN)


# --------------------------------------------------------------------------------------------------------------
# Methods run by autopeft (1, 2, 4, 5)
# --------------------------------------------------------------------------------------------------------------


def autopeft_spec(data_dir: Path, out: Path, steps: int, seed: int, search: dict, threads: int) -> dict:
    return {
        "model": {"id": MINILM},
        "data": {"source": {s: str(data_dir / f"{s}.csv") for s in ("train", "validation", "test")}, "max_length": MAX_LENGTH},
        "search": {**({} if "preset" in search else {"variants": ["lora"]}), "seed": seed, **search},
        "training": {"max_steps": steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH, "threads": threads},
        "output": {"dir": str(out), "keep": "all"},
    }


def search(spec: dict, folder: Path) -> float:
    """Write ``spec`` into ``folder`` and run ``autopeft search`` on it in this process; its wall time in seconds."""
    import yaml

    from autopeft.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    code = main(["search", str(spec_path)])
    if code:
        raise SystemExit(f"autopeft search failed with exit {code}: {spec_path}")
    return time.perf_counter() - started


def warm_start_source(dataset: str, seed: int, folder: Path, args: argparse.Namespace) -> Path:
    """The earlier run a warm start reads: autopeft's default search on the *other* data set (same model, new data:
    the common case), with its own split and sampler seed, ``seed + 100``: with this seed the sampler would draw
    exactly the configurations the warm search draws itself. Its own results are not recorded."""
    other, earlier_seed = next(d for d in DATASETS if d != dataset), seed + 100
    data_dir, _ = write_split(other, earlier_seed, folder / "data", args.train, args.validation, args.test)
    spec = autopeft_spec(data_dir, folder / "run", args.steps, earlier_seed, {"budget": f"{args.steps * args.trials} steps"}, args.threads)
    search(spec, folder)
    return folder / "run"


def run_autopeft(spec: dict, folder: Path, tests: TestSet) -> dict:
    """Run a search from ``spec`` in this process; its trajectory, selected adapter and test accuracies."""
    import optuna

    from autopeft.rundir import RunDir, open_study

    seconds = search(spec, folder)
    run = RunDir(Path(spec["output"]["dir"]))
    study = open_study(run, "maximize")
    trajectory, steps, best, incumbent_test = [], 0, None, None
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not trial.state.is_finished():
            continue
        steps += int(trial.user_attrs.get("steps") or 0)
        if trial.state == optuna.trial.TrialState.COMPLETE and (best is None or trial.values[0] > best):
            best = trial.values[0]
            incumbent_test = tests.accuracy(run.saved_adapter(trial.number))
        trajectory.append({"steps": steps, "best_validation": best, "incumbent_test": incumbent_test, "trial": trial.number, "state": trial.state.name})
    exported = json.loads((run.path / "best" / "autopeft.json").read_text())
    return {
        "best_validation": exported["validation"]["accuracy"],
        "test": tests.accuracy(run.path / "best"),
        "trainable_params": exported["trainable_params"],
        "chosen": {"trial": exported["trial"], "variant": exported.get("variant"), **exported["params"]},
        "steps": steps,
        "trials": len(trajectory),
        "trajectory": trajectory,
        "seconds": round(seconds, 1),
    }


SIZE_AWARE = {"objectives": ["accuracy", "trainable_params"], "select": {"rule": "smallest-within", "tolerance": WITHIN}}
"""autopeft told that size matters too: accuracy and trainable parameters, the smallest within half a point."""


def quarter_of_default(model_dir: Path, classes: int) -> int:
    """A quarter of the trainable parameters of PEFT's default adapter (r 8 on query,value, with the task head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=classes)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=8, target_modules=["query", "value"]))
    return sum(p.numel() for p in model.parameters() if p.requires_grad) // 4


def size_budget_search(budget: int, most_params: int) -> dict:
    """The most accurate adapter within a size budget: small variants, and the budget as a constraint."""
    return {"preset": "small-adapters", "constraints": [f"trainable_params <= {most_params}"], "budget": f"{budget} steps"}


def default_space_search(sampler: str, trials: int) -> dict:
    return {"sampler": sampler, "n_trials": trials, "baseline": False, "pruner": "none"}


def peft_default(learning_rate: float) -> dict:
    return {"space": {"learning_rate": learning_rate, "target_modules": "q,v", "lora.r": 8, "lora.alpha_ratio": 1.0, "lora.dropout": 0.0}, "n_trials": 1}


# --------------------------------------------------------------------------------------------------------------
# Method 3: Trainer.hyperparameter_search with Optuna
# --------------------------------------------------------------------------------------------------------------


def run_trainer_optuna(data_dir: Path, model_dir: Path, classes: int, out: Path, steps: int, trials: int, seed: int, tests: TestSet) -> dict:
    """``Trainer.hyperparameter_search(backend="optuna")`` over learning rate and rank (LoRA attached in
    ``model_init``), then the best configuration trained again, saved and measured as PEFT loads it."""
    import datasets
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def dataset(split: str):
        texts, labels = read_split(data_dir, split)
        return datasets.Dataset.from_dict({"text": texts, "label": labels}).map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True, remove_columns=["text"]
        )

    train, validation = dataset("train"), dataset("validation")

    def model_init(trial=None):
        rank = trial.suggest_categorical("r", [4, 8, 16, 32]) if trial is not None else 8
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=classes)
        return get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["query", "value"]))

    from autopeft.space import SHARED_PARAMS

    rates = SHARED_PARAMS["learning_rate"]  # the same range as autopeft's default space

    def hp_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", rates.low, rates.high, log=True)}

    def compute_metrics(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    def arguments(folder: Path, learning_rate: float = 5e-5) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(folder), max_steps=steps, per_device_train_batch_size=BATCH, per_device_eval_batch_size=EVAL_BATCH,
            learning_rate=learning_rate, eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, seed=seed, data_seed=seed,
        )

    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model_init=model_init, args=arguments(out / "search"), train_dataset=train, eval_dataset=validation, data_collator=collator, compute_metrics=compute_metrics)
    import optuna

    started = time.perf_counter()
    history: list[float] = []

    def objective(metrics: dict) -> float:
        history.append(metrics["eval_accuracy"])
        return metrics["eval_accuracy"]

    best = trainer.hyperparameter_search(
        direction="maximize", backend="optuna", hp_space=hp_space, n_trials=trials, compute_objective=objective,
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    trajectory, running_best = [], None
    for number, value in enumerate(history):
        running_best = value if running_best is None else max(running_best, value)
        trajectory.append({"steps": (number + 1) * steps, "best_validation": running_best, "incumbent_test": None, "trial": number, "state": "COMPLETE"})

    rank = best.hyperparameters["r"]
    final = Trainer(
        model=get_peft_model(
            AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=classes),
            LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["query", "value"]),
        ),
        args=arguments(out / "final", best.hyperparameters["learning_rate"]), train_dataset=train, eval_dataset=validation, data_collator=collator, compute_metrics=compute_metrics,
    )
    final.train()
    final.model.save_pretrained(str(out / "adapter"))
    trainable = sum(p.numel() for p in final.model.parameters() if p.requires_grad)
    seconds = time.perf_counter() - started
    return {
        "best_validation": best.objective,
        "test": tests.accuracy(out / "adapter"),
        "trainable_params": trainable,
        "chosen": best.hyperparameters,
        "steps": trials * steps,
        "retrain_steps": steps,
        "trials": trials,
        "trajectory": trajectory,
        "seconds": round(seconds, 1),
    }


# --------------------------------------------------------------------------------------------------------------
# The run and the table
# --------------------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> None:
    import torch

    from autopeft.models import resolve_model
    from autopeft.plan import make_plan
    from autopeft.spec import parse_spec

    torch.set_num_threads(args.threads)
    budget = args.steps * args.trials
    for seed in args.seeds:
        for dataset in args.datasets:
            with tempfile.TemporaryDirectory(prefix="autopeft-quality-") as scratch:
                scratch = Path(scratch)
                data_dir, classes = write_split(dataset, seed, scratch / "data", args.train, args.validation, args.test)
                probe = make_plan(parse_spec(autopeft_spec(data_dir, scratch / "probe", args.steps, seed, {}, args.threads), "benchmark"))
                model_dir = resolve_model(probe.spec.model, probe.registry, Path.cwd()).path
                tests = TestSet(model_dir, data_dir, classes)
                runs: dict[str, dict] = {}
                for rate in BLOG_RATES:
                    runs[f"peft-default lr={rate:g}"] = lambda rate=rate, name=f"default-{rate:g}": run_autopeft(
                        autopeft_spec(data_dir, scratch / name / "run", args.steps, seed, peft_default(rate), args.threads), scratch / name, tests
                    )
                runs["random"] = lambda: run_autopeft(autopeft_spec(data_dir, scratch / "random" / "run", args.steps, seed, default_space_search("random", args.trials), args.threads), scratch / "random", tests)
                runs["trainer-optuna"] = lambda: run_trainer_optuna(data_dir, model_dir, classes, scratch / "trainer", args.steps, args.trials, seed, tests)
                runs["tpe"] = lambda: run_autopeft(autopeft_spec(data_dir, scratch / "tpe" / "run", args.steps, seed, default_space_search("tpe", args.trials), args.threads), scratch / "tpe", tests)
                runs["autopeft"] = lambda: run_autopeft(autopeft_spec(data_dir, scratch / "autopeft" / "run", args.steps, seed, {"budget": f"{budget} steps"}, args.threads), scratch / "autopeft", tests)
                # Not a default: the same budget with adapter size as a second objective, and best/ the smallest
                # adapter within half a point of the best validation accuracy.
                runs["autopeft-size"] = lambda: run_autopeft(
                    autopeft_spec(data_dir, scratch / "autopeft-size" / "run", args.steps, seed, SIZE_AWARE | {"budget": f"{budget} steps"}, args.threads),
                    scratch / "autopeft-size", tests,
                )
                runs["autopeft-quarter"] = lambda: run_autopeft(
                    autopeft_spec(data_dir, scratch / "quarter" / "run", args.steps, seed, size_budget_search(budget, quarter_of_default(model_dir, classes)), args.threads),
                    scratch / "quarter", tests,
                )
                runs["autopeft-warm"] = lambda: run_autopeft(
                    autopeft_spec(
                        data_dir, scratch / "warm" / "run", args.steps, seed,
                        {"budget": f"{budget} steps", "warm_start": str(warm_start_source(dataset, seed, scratch / "warm-source", args))}, args.threads,
                    ),
                    scratch / "warm", tests,
                )
                for method, run in runs.items():
                    if args.methods and method.split(" ")[0] not in args.methods:
                        continue
                    load_before = os.getloadavg()[0]
                    result = run()
                    result["steps_to_within_half_point"] = within_steps(result["trajectory"])
                    results_file.record(
                        {
                            "dataset": dataset, "seed": seed, "method": method, "steps_per_trial": args.steps, "budget_steps": budget,
                            "examples": {"train": args.train, "validation": args.validation, "test": args.test}, "threads": args.threads,
                            "load_before": round(load_before, 2), "date": time.strftime("%Y-%m-%d %H:%M"), **result,
                        },
                        args.results,
                    )


def best_of_defaults(runs: list[dict]) -> dict:
    """The three blog-rate runs as one alternative: a user who tries all three and keeps the best on validation."""
    chosen = max(runs, key=lambda r: r["best_validation"])
    return {**chosen, "method": "peft-default best of 3", "steps": sum(r["steps"] for r in runs)}


def incumbent_test_at(trajectory: list[dict], steps: int) -> float | None:
    """Test accuracy of the adapter the search would have handed over after ``steps`` steps."""
    value = None
    for point in trajectory:
        if point["steps"] > steps:
            break
        value = point["incumbent_test"]
    return value


def mean_incumbent_test(runs: list[dict], steps: int) -> float | None:
    """Mean over seeds of the incumbents' test accuracy after ``steps`` steps (None while a seed has none yet)."""
    values = [incumbent_test_at(r["trajectory"], steps) for r in runs]
    return None if any(v is None for v in values) else statistics.mean(values)


def shown(accuracy: float | None) -> str:
    return "  none yet" if accuracy is None else f"{accuracy:10.4f}"


def table(paths: list[str]) -> None:
    """Print each data set's table and autopeft's goals. Of several rows for one (data set, seed, method), the last
    one read counts: a method rerun after a change, into a later file, replaces its earlier runs."""
    latest = {(r["dataset"], r["seed"], r["method"]): r for r in results_file.read(paths)}
    rows = list(latest.values())
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        seeds = sorted({r["seed"] for r in subset})
        for seed in seeds:
            defaults = [r for r in subset if r["seed"] == seed and r["method"].startswith("peft-default lr=")]
            if len(defaults) == len(BLOG_RATES):
                subset.append(best_of_defaults(defaults))
        print(f"\n{dataset} (seeds {seeds}; {subset[0]['steps_per_trial']} steps per trial, budget {subset[0]['budget_steps']} steps)")
        print(f"{'method':<24}{'best val':>9}{'test':>8}{'±':>6}{'trainable':>11}{'steps':>7}{'to 0.5pt':>9}")
        summary = {}
        for method in dict.fromkeys(r["method"] for r in subset):
            runs = [r for r in subset if r["method"] == method]
            tests = [r["test"] for r in runs]
            summary[method] = {
                "test": statistics.mean(tests),
                "steps": statistics.mean(r["steps"] for r in runs),
                "params": statistics.median(r["trainable_params"] for r in runs),
                "runs": runs,
            }
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            print(
                f"{method:<24}{statistics.mean(r['best_validation'] for r in runs):>9.4f}{summary[method]['test']:>8.4f}{spread:>6.3f}"
                f"{summary[method]['params']:>11,.0f}{summary[method]['steps']:>7.0f}{statistics.mean(r['steps_to_within_half_point'] for r in runs):>9.0f}"
            )
        if "autopeft" not in summary:
            continue
        auto = summary["autopeft"]["runs"]
        print("\nautopeft against each alternative (test accuracy, mean over seeds):")
        for method, info in summary.items():
            if method == "autopeft":
                continue
            # The first step count from which the mean test accuracy of autopeft's incumbents stays at or above the
            # alternative's final test accuracy until the end of the search.
            grid = sorted({p["steps"] for r in auto for p in r["trajectory"]})
            held = [steps for steps in grid if mean_incumbent_test(auto, steps) is not None and mean_incumbent_test(auto, steps) >= info["test"]]
            reached = next((steps for steps in held if all(later in held for later in grid if later >= steps)), None)
            goal = info["steps"] / 2
            verdict = "never reached and kept" if reached is None else f"reached and kept from {reached} steps ({'meets' if reached <= goal else 'misses'} the goal of <= {goal:.0f})"
            print(f"  {method:<24} test {info['test']:.4f} in {info['steps']:.0f} steps: {verdict}")
        if "autopeft-warm" in summary:
            warm = summary["autopeft-warm"]["runs"]
            cold = [r for r in auto if r["seed"] in {w["seed"] for w in warm}]  # the same seeds, so the same splits
            print(f"\nwarm start (from the other data set's search) against a cold start, seeds {sorted(r['seed'] for r in warm)}: mean test accuracy of the incumbent")
            for steps in range(subset[0]["steps_per_trial"], subset[0]["budget_steps"] + 1, subset[0]["steps_per_trial"]):
                cold_test, warm_test = (mean_incumbent_test(runs, steps) for runs in (cold, warm))
                print(f"  after {steps:>4} steps: cold {shown(cold_test)}, warm {shown(warm_test)}")
        default_runs = [r for m, i in summary.items() if m.startswith("peft-default") for r in i["runs"]]
        if default_runs:
            default_size = statistics.median(r["trainable_params"] for r in default_runs)
            best_default = max(i["test"] for m, i in summary.items() if m.startswith("peft-default"))
            for name in ("autopeft", "autopeft-size", "autopeft-quarter"):
                if name in summary:
                    ratio, test = summary[name]["params"] / default_size, summary[name]["test"]
                    met = ratio <= 0.25 and test >= best_default - WITHIN
                    print(
                        f"  size: {name}'s adapter {summary[name]['params']:,.0f} trainable parameters (median) against PEFT's default "
                        f"{default_size:,.0f} (ratio {ratio:.2f}; goal <= 0.25 at test accuracy within 0.5 points "
                        f"of the best default: {name} {test:.4f}, best default {best_default:.4f}): {'meets' if met else 'misses'} the goal"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", help="run only these (peft-default, random, trainer-optuna, tpe, autopeft, autopeft-size, autopeft-quarter, autopeft-warm)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of one trial")
    parser.add_argument("--trials", type=int, default=6, help="the searches' budget, in full trials")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="print the table of recorded results")
    args = parser.parse_args()
    if args.table:
        table(args.table)
    else:
        measure(args)


if __name__ == "__main__":
    main()
