"""A real causal LM on CPU: SmolLM2-135M-Instruct (packaged GGUF) tuned on ChatterBot question/answer pairs.

Measures, in one process:

- preparing the packaged model: the first load (GGUF dequantized and saved to a fresh cache folder) and a later
  load from that folder, with the process's peak memory after the first;
- the base model's eval loss and perplexity on the validation and test splits (answer tokens only);
- the search of the spec (default ``examples/smollm2-chatterbot.yaml``): seconds per training step of every
  trial, and the validation and test perplexity of the exported ``best/`` adapter, as PEFT loads it.

It appends one JSON line to ``benchmarks/results/causal_lm.jsonl``, with the machine's load average before and
after (the machine may be shared) and the thread count torch used.

    python benchmarks/causal_lm.py [--spec examples/smollm2-chatterbot.yaml] [--out benchmarks/results/causal_lm.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rich.console import Console  # noqa: E402

import results_file  # noqa: E402  (benchmarks/results_file.py)

from autopeft.orchestrators.local import run_search  # noqa: E402
from autopeft.plan import make_plan  # noqa: E402
from autopeft.rundir import RunDir, open_study  # noqa: E402
from autopeft.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def time_model_loads(model_id: str) -> dict:
    """Seconds to resolve the model the first time (conversion into the empty cache) and again with a load from
    the cache; ``converted`` says whether the first call did convert (the cache must be empty before it)."""
    from transformers import AutoModelForCausalLM

    from autopeft.models import resolve_model
    from autopeft.registry import load_registry
    from autopeft.spec import ModelSpec

    spec = ModelSpec(id=model_id, task="causal-lm")
    registry = load_registry()
    cache = Path(os.environ["AUTOPEFT_CACHE"])
    empty_before = not any(cache.rglob("config.json")) if cache.exists() else True
    started = time.perf_counter()
    resolved = resolve_model(spec, registry)
    first = time.perf_counter() - started
    converted = empty_before and (Path(resolved.path) / "config.json").is_file() and cache in Path(resolved.path).parents
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    resolved = resolve_model(spec, load_registry())
    AutoModelForCausalLM.from_pretrained(resolved.path)
    cached = time.perf_counter() - started
    return {"first_load_seconds": round(first, 1), "converted": converted, "peak_rss_mb_after_first_load": round(peak_mb), "cached_load_seconds": round(cached, 2)}


def base_scores(plan) -> dict:
    """Eval loss and perplexity of the base model (no adapter) on the validation and test splits."""
    from autopeft.trial import Workbench

    workbench = Workbench(plan)
    return {split: workbench.evaluate(workbench.base_model, getattr(workbench.data, split)).metrics for split in ("validation", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "smollm2-chatterbot.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "causal_lm.jsonl"))
    parser.add_argument("--loads-only", action="store_true", help="only time preparing and loading the packaged model")
    args = parser.parse_args()

    import torch

    load_before = os.getloadavg()
    wall = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="autopeft-causal-lm-"))
    os.environ["AUTOPEFT_CACHE"] = str(scratch / "cache")  # a fresh cache: the first load converts the GGUF
    try:
        spec = load_spec(args.spec)
        # First, before anything else in this process can prepare the model.
        loads = time_model_loads(spec.model.id)
        if args.loads_only:
            results_file.record({"benchmark": "causal_lm", "part": "model loads", "model": spec.model.id, "cpu_count": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads(), "load_average_before": [round(x, 2) for x in load_before],
                                 "load_average_after": [round(x, 2) for x in os.getloadavg()], **loads, "torch": torch.__version__,
                                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, args.out)
            return
        spec.output.dir = str(scratch / "run")
        plan = make_plan(spec)
        base = base_scores(plan)
        result = run_search(plan, Console(log_path=False))
        study = open_study(RunDir(spec.run_dir), spec.direction)
        trials = [
            {"trial": t.number, "state": t.state.name, "steps": t.user_attrs.get("steps"),
             "seconds_per_step": round(t.user_attrs["costs"]["train_seconds"] / t.user_attrs["steps"], 3) if t.user_attrs.get("steps") else None,
             "validation_perplexity": t.user_attrs.get("metrics", {}).get("perplexity"), "params": t.params}
            for t in study.trials
        ]
        info = json.loads((RunDir(spec.run_dir).best / "autopeft.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    steps = [t["seconds_per_step"] for t in trials if t["seconds_per_step"] is not None]
    results_file.record({
        "benchmark": "causal_lm",
        "spec": os.path.relpath(args.spec, ROOT),
        "model": spec.model.id,
        "data": spec.data.source,
        "max_length": spec.data.max_length,
        "batch_size": spec.training.batch_size,
        "max_steps": spec.training.max_steps,
        "n_trials": spec.search.n_trials,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        **loads,
        "base": {split: {k: round(v, 4) for k, v in metrics.items()} for split, metrics in base.items()},
        "best_trial": result.best_trial,
        "best": {"validation": {k: round(v, 4) for k, v in info["validation"].items()}, "test": {k: round(v, 4) for k, v in info["test"].items()}},
        "trials": trials,
        "mean_seconds_per_step": round(sum(steps) / len(steps), 3) if steps else None,
        "wall_seconds": round(time.perf_counter() - wall),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, args.out)


if __name__ == "__main__":
    main()
