"""What autopeft adds to the training it runs: one trial against a hand-written PEFT loop, a search against its
trials, and memory that finished trials leave behind.

The floor is :func:`hand_loop`, a PEFT training loop a user writes without autopeft (no autopeft import in its
process): load MiniLM, attach LoRA, train ``--steps`` steps on pre-tokenized Rotten Tomatoes with AdamW, a linear
warm-up schedule and gradient clipping (autopeft's defaults), evaluate accuracy on the validation examples. The
same texts, written once to CSV files, feed a one-trial ``autopeft search`` with the same model, adapter, steps,
batch, optimizer and evaluation set. Both run as fresh processes, alternated ``--repeats`` times, for LoRA r=8 on
``q,v`` and on ``q,k,v,o``. Figures:

- ``trial / loop``: a trial's wall time (the Optuna trial's start to its completion: sampling, attaching, training,
  evaluation, saving the adapter, storage writes) over the loop's (attaching, training, evaluation). Goal <= 1.02.
- ``peak memory``: peak resident memory (VmHWM) of the search process over the loop process's. Goal <= 1.10.
  Both processes also report the memory they held just before training started (model and data loaded), so
  ``training_memory_ratio`` compares what training itself adds (the trial's peak above that, against the loop's);
  the rest of the difference is what the processes import (autopeft also loads Optuna, SQLAlchemy and pydantic;
  it reads the data with ``datasets`` in a forked child, so that library is not in the search process).
- ``search / trials``: a 4-trial search's whole wall time, as the user waits for it (interpreter start-up, imports,
  model loading, tokenization, storage, report, export of ``best/`` with its test predictions) over the sum of its
  trials' training + evaluation (``train_seconds``). Goal <= 1.03.
- ``memory trial 30 / trial 3``: resident memory of a 30-trial search on a random 2-layer BERT, read when trial 3
  and trial 30 have finished. Goal <= 1.05 (nothing of a finished trial stays alive).

Every process runs torch on ``--threads`` threads; pin the whole benchmark to cores that nothing else uses
(``taskset -c 0``) and say what else ran. With ``--profile`` the 4-trial search runs under cProfile and the
functions that took the time outside training are printed.

    cd benchmarks && taskset -c 0 python overhead.py --steps 100 --search-steps 200 --repeats 3
    cd benchmarks && taskset -c 0 python overhead.py --profile        # where a search's time goes
    cd benchmarks && python overhead.py --only trial --steps 40 --repeats 1   # a trial against the loop only
    cd benchmarks && taskset -c 0 python overhead.py --only search --search-steps 200   # the 4-trial search only
    cd benchmarks && taskset -c 0 python overhead.py --only trial --loop-data datasets --steps 40 --repeats 2

``--loop-data datasets`` makes the loop load and tokenize its CSV files with ``datasets`` (``load_dataset`` and
``Dataset.map``, as Hugging Face's guides do) instead of the standard library alone.
    cd benchmarks && python overhead.py --table results/overhead.jsonl

Appends one JSON line per measurement to ``benchmarks/results/overhead.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "overhead.jsonl"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TARGETS = {"q,v": ["query", "value"], "q,k,v,o": ["query", "key", "value", "attention.output.dense"]}
RANK, ALPHA, DROPOUT, LEARNING_RATE = 8, 16, 0.05, 2e-3
BATCH, EVAL_BATCH, MAX_LENGTH, WARMUP, CLIP = 16, 64, 64, 0.06, 1.0
GOALS = {"trial_over_loop": 1.02, "search_over_trials": 1.03, "peak_memory": 1.10, "memory_growth": 1.05}


def peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:"))


def current_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:"))


# --------------------------------------------------------------------------------------------------------------
# The floor: a PEFT loop with no autopeft import (run as its own process)
# --------------------------------------------------------------------------------------------------------------


def hand_loop(data_dir: Path, model_dir: Path, targets: str, steps: int, threads: int, seed: int, loader_kind: str = "csv") -> dict:
    """Train LoRA the way a user writes it by hand and time attach + training + evaluation.

    ``loader_kind``: ``csv`` reads and tokenizes with the standard library and the tokenizer alone (the leanest
    process); ``datasets`` loads and tokenizes with ``datasets.load_dataset`` and ``Dataset.map``, as Hugging
    Face's guides do."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, get_linear_schedule_with_warmup

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = ["rotten", "fresh"]

    def read(split: str) -> list[dict]:
        with open(data_dir / f"{split}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=MAX_LENGTH)
        return [{"input_ids": ids, "attention_mask": mask, "labels": labels.index(row["label"])} for ids, mask, row in zip(encoded["input_ids"], encoded["attention_mask"], rows)]

    def read_with_datasets() -> tuple:
        import datasets

        files = {split: str(data_dir / f"{split}.csv") for split in ("train", "validation")}
        loaded = datasets.load_dataset("csv", data_files=files)

        def encode(batch):
            encoded = tokenizer(batch["text"], truncation=True, max_length=MAX_LENGTH)
            encoded["labels"] = [labels.index(name) for name in batch["label"]]
            return encoded

        tokenized = loaded.map(encode, batched=True, remove_columns=["text", "label"])
        return tokenized["train"], list(tokenized["validation"])

    train, validation = read_with_datasets() if loader_kind == "datasets" else (read("train"), read("validation"))
    collator = DataCollatorWithPadding(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    before = current_rss_mb()
    started = time.perf_counter()
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS[targets]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, int(WARMUP * steps), steps)
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True, collate_fn=collator, generator=torch.Generator().manual_seed(seed))
    batches = iter(loader)
    model.train()
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(validation), EVAL_BATCH):
            batch = collator(validation[start : start + EVAL_BATCH])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "accuracy": correct / len(validation), "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}


# --------------------------------------------------------------------------------------------------------------
# autopeft's side
# --------------------------------------------------------------------------------------------------------------


def write_data(folder: Path, train: int, validation: int, test: int) -> Path:
    """The Rotten Tomatoes texts both sides use, split once and written as CSV files."""
    from autopeft_plugins.corpora import load_rotten_tomatoes

    corpus = load_rotten_tomatoes().shuffle(seed=0)
    names = corpus.features["label"].names
    folder.mkdir(parents=True, exist_ok=True)
    bounds = {"train": (0, train), "validation": (train, train + validation), "test": (train + validation, train + validation + test)}
    for split, (start, end) in bounds.items():
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for row in corpus.select(range(start, end)):
                writer.writerow([row["text"], names[row["label"]]])
    return folder


def search_spec(data_dir: Path, model: str, targets: str, steps: int, trials: int, threads: int, out: Path, eval_every: int | None = None) -> dict:
    learning_rate: object = LEARNING_RATE if trials == 1 else {"low": 1e-3, "high": 3e-3, "log": True}
    return {
        "model": {"id": model},
        "data": {
            "source": {split: str(data_dir / f"{split}.csv") for split in ("train", "validation", "test")},
            "max_length": MAX_LENGTH,
        },
        "search": {
            "variants": ["lora"],
            "space": {"learning_rate": learning_rate, "target_modules": targets, "lora.r": RANK, "lora.alpha_ratio": ALPHA / RANK, "lora.dropout": DROPOUT},
            "n_trials": trials,
            "seed": 0,
        },
        "training": {"max_steps": steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH, "eval_every": eval_every, "warmup_ratio": WARMUP, "max_grad_norm": CLIP, "threads": threads},
        "output": {"dir": str(out)},
    }


def trials_of(run_dir: Path) -> list[dict]:
    """Wall time (Optuna's start to completion) and ``train_seconds`` of each complete trial."""
    import optuna

    from autopeft.rundir import RunDir, open_study

    study = open_study(RunDir(run_dir), "maximize")
    return [
        {"wall": (t.datetime_complete - t.datetime_start).total_seconds(), "train_seconds": t.user_attrs["costs"]["train_seconds"], "accuracy": t.value}
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ]


def run_search_child(spec_path: Path, record_memory: bool, profile: bool) -> dict:
    """Run ``autopeft search`` in this process as the console script does; report peak memory (and, with
    ``record_memory``, resident memory after every trial)."""
    import autopeft.orchestrators.local as local
    from autopeft.cli import main

    after_trial: list[float] = []
    first_trial: dict[str, float] = {}
    run_one = local.run_one

    def measured_run_one(*args, **kwargs):
        if not first_trial:  # the model and data are loaded by now
            first_trial["rss_before_mb"] = current_rss_mb()
        run_one(*args, **kwargs)
        first_trial.setdefault("peak_rss_mb", peak_rss_mb())
        if record_memory:
            after_trial.append(current_rss_mb())

    local.run_one = measured_run_one
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        main(["search", str(spec_path)])
    except SystemExit as exit_:
        if exit_.code:
            raise
    if profile:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative")
        stats.print_stats(os.environ.get("PROFILE_FILTER", ""), int(os.environ.get("PROFILE_LINES", "45")))
    return {"peak_rss_mb": peak_rss_mb(), "rss_after_trial_mb": after_trial, "first_trial": first_trial}


def child(command: list[str]) -> dict:
    """Run this file as a child process and return the JSON it prints last; time it from outside."""
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, __file__, *command], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{command[:2]}: the child process failed (exit {finished.returncode})")
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    report["process_seconds"] = wall
    return report


def write_spec(folder: Path, spec: dict) -> Path:
    import yaml

    path = folder / "spec.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def measure(args: argparse.Namespace) -> None:
    import results_file
    from scaling import tiny_model

    from autopeft.models import resolve_model
    from autopeft.plan import make_plan
    from autopeft.spec import parse_spec

    load_before = os.getloadavg()
    common = {"steps": args.steps, "threads": args.threads, "cpus": sorted(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory(prefix="autopeft-overhead-") as scratch:
        scratch = Path(scratch)
        data_dir = write_data(scratch / "data", args.train, args.validation, args.test)
        plan = make_plan(parse_spec(search_spec(data_dir, MINILM, "q,v", 1, 1, 1, scratch / "unused"), "benchmark"))
        model_dir = resolve_model(plan.spec.model, plan.registry, Path.cwd()).path

        for targets in args.targets if args.only != "search" else []:
            loops, trials = [], []
            for repeat in range(args.repeats):
                loops.append(child(["--loop", str(data_dir), str(model_dir), targets, str(args.steps), str(args.threads), str(repeat), args.loop_data]))
                out = scratch / f"one-{targets}-{repeat}"
                spec_path = write_spec(out, search_spec(data_dir, MINILM, targets, args.steps, 1, args.threads, out / "run"))
                report = child(["--search", str(spec_path)])
                (trial,) = trials_of(out / "run")
                trials.append({**trial, "peak_rss_mb": report["peak_rss_mb"], "process_seconds": report["process_seconds"], **{f"trial_{k}": v for k, v in report["first_trial"].items()}})
            loop_seconds = statistics.median(r["seconds"] for r in loops)
            trial_seconds = statistics.median(t["wall"] for t in trials)
            loop_memory = statistics.median(r["peak_rss_mb"] for r in loops)
            trial_memory = statistics.median(t["peak_rss_mb"] for t in trials)
            # What training itself takes: the peak during the trial (the loop) above the memory held before it.
            loop_training = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in loops)
            trial_training = statistics.median(t["trial_peak_rss_mb"] - t["trial_rss_before_mb"] for t in trials)
            results_file.record(
                {
                    "measure": "trial_over_loop",
                    "targets": targets,
                    "loop_data": args.loop_data,
                    **common,
                    "loop_seconds": [round(r["seconds"], 2) for r in loops],
                    "trial_seconds": [round(t["wall"], 2) for t in trials],
                    "trial_train_seconds": [round(t["train_seconds"], 2) for t in trials],
                    "ratio": round(trial_seconds / loop_seconds, 4),
                    "loop_accuracy": [r["accuracy"] for r in loops],
                    "trial_accuracy": [t["accuracy"] for t in trials],
                    "loop_peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in loops],
                    "search_peak_rss_mb": [round(t["peak_rss_mb"], 1) for t in trials],
                    "memory_ratio": round(trial_memory / loop_memory, 4),
                    "loop_rss_before_mb": [round(r["rss_before_mb"], 1) for r in loops],
                    "trial_rss_before_mb": [round(t["trial_rss_before_mb"], 1) for t in trials],
                    "trial_peak_during_trial_mb": [round(t["trial_peak_rss_mb"], 1) for t in trials],
                    "training_memory_ratio": round(trial_training / loop_training, 4),
                },
                RESULTS,
            )
        if args.only == "trial":
            return

        out = scratch / "four"
        spec_path = write_spec(out, search_spec(data_dir, MINILM, "q,v", args.search_steps, 4, args.threads, out / "run", eval_every=args.search_steps // 2))
        report = child(["--search", str(spec_path)])
        trials = trials_of(out / "run")
        trained = sum(t["train_seconds"] for t in trials)
        results_file.record(
            {
                "measure": "search_over_trials",
                "targets": "q,v",
                **common,
                "steps": args.search_steps,
                "search_seconds": round(report["process_seconds"], 2),
                "trial_train_seconds": [round(t["train_seconds"], 2) for t in trials],
                "overhead_seconds": round(report["process_seconds"] - trained, 2),
                "ratio": round(report["process_seconds"] / trained, 4),
            },
            RESULTS,
        )
        if args.only == "search":
            return

        out = scratch / "thirty"
        model = tiny_model(scratch / "tiny-bert")
        spec = search_spec(data_dir, str(model), "q,v", 20, 30, args.threads, out / "run")
        spec["search"]["space"]["lora.r"] = [2, 4, 8, 16]
        spec["search"]["space"]["target_modules"] = ["q,v", "q,k,v,o"]
        spec["search"]["space"]["learning_rate"] = {"low": 1e-4, "high": 1e-2, "log": True}
        report = child(["--search", str(write_spec(out, spec)), "--memory"])
        after = report["rss_after_trial_mb"]
        results_file.record(
            {
                "measure": "memory_growth",
                **common,
                "steps": 20,
                "rss_after_trial_mb": [round(v, 1) for v in after],
                "ratio": round(after[29] / after[2], 4),
            },
            RESULTS,
        )
    load_after = os.getloadavg()
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


def profile(args: argparse.Namespace) -> None:
    from autopeft.models import resolve_model  # noqa: F401  (imports before the profile starts are not the question)

    with tempfile.TemporaryDirectory(prefix="autopeft-profile-") as scratch:
        scratch = Path(scratch)
        data_dir = write_data(scratch / "data", args.train, args.validation, args.test)
        out = scratch / "four"
        spec_path = write_spec(out, search_spec(data_dir, MINILM, "q,v", args.steps, 4, args.threads, out / "run"))
        subprocess.run([sys.executable, __file__, "--search", str(spec_path), "--profile"], check=True, stdout=subprocess.DEVNULL)


def table(paths: list[str]) -> None:
    import results_file

    for row in results_file.read(paths):
        goal = GOALS[row["measure"]]
        extra = f"  memory {row['memory_ratio']:.3f} (goal <= {GOALS['peak_memory']})" if "memory_ratio" in row else ""
        if "training_memory_ratio" in row:
            extra += f", training memory {row['training_memory_ratio']:.3f}"
        cores = ",".join(map(str, row.get("cpus", [])))
        floor = f" loop data {row.get('loop_data', 'csv')}" if row["measure"] == "trial_over_loop" else ""
        print(f"{row['date']}  cores {cores:<4} {row['measure']:<20} {row.get('targets', ''):<8} ratio {row['ratio']:.3f} (goal <= {goal}){extra}{floor}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--search-steps", type=int, default=200, help="steps per trial of the 4-trial search (evaluated every half)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--validation", type=int, default=300)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="run a 4-trial search under cProfile instead")
    parser.add_argument("--only", choices=["trial", "search"], help="measure only a trial against the loop (time and memory), or only the 4-trial search against its trials")
    parser.add_argument("--targets", nargs="+", default=["q,v", "q,k,v,o"], choices=list(TARGETS), help="adapter placements to compare")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="print recorded results")
    parser.add_argument("--loop", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--loop-data", choices=["csv", "datasets"], default="csv", help="how the hand-written loop loads its data")
    parser.add_argument("--search", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        data_dir, model_dir, targets, steps, threads, seed, loader_kind = args.loop
        print(json.dumps(hand_loop(Path(data_dir), Path(model_dir), targets, int(steps), int(threads), int(seed), loader_kind)))
    elif args.search:
        print(json.dumps(run_search_child(Path(args.search), args.memory, args.profile)))
    elif args.table:
        table(args.table)
    elif args.profile:
        profile(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
