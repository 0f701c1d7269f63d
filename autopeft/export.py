"""Turning a trial's saved adapter into a folder users load with ``peft.PeftModel.from_pretrained``.

The exported folder holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` (the task head
included where the task has one), ``autopeft.json`` (what was searched and measured), ``test_predictions.csv``
(classification) and a ``README.md`` model card. The adapter is loaded back through PEFT on a clean base model
to measure it, so the recorded scores are the scores of exactly what is in the folder.

An export never deletes what autopeft did not write. It is built in a fresh hidden sibling folder and renamed
into place only when complete; the folder it replaces must be empty or an earlier export (``--force`` allows a
user's folder, but never the run folder, a folder that holds it, or a folder holding a study).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopeft.adapters import adapter_ranks, detach_peft_model
from autopeft.errors import ExportError, RunDirError
from autopeft.plan import Plan
from autopeft.rundir import (
    INTERRUPTED,
    RunDir,
    atomic_write_text,
    foreign_entries,
    interrupted_reason,
    is_empty,
    is_export,
    make_unique_folder,
    trial_record,
    trial_state,
)
from autopeft.trial import TrialConfig, Workbench

if TYPE_CHECKING:
    import optuna

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("autopeft", "torch", "transformers", "peft", "optuna"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def check_target(out_dir: Path, run_dir: RunDir | None = None, force: bool = False) -> Path:
    """The folder an export may be written to, resolved; :class:`ExportError` when writing it would delete or
    overwrite something autopeft did not write.

    Refused: a link (it may point anywhere), a file, a non-empty folder that is not an earlier export (unless
    ``force``), and even with ``force`` the run folder, any folder holding it, and any folder holding a
    ``study.db``. ``..`` is resolved before any of these checks.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise ExportError(f"{out_dir} is a symbolic link (to {os.readlink(out_dir)}); autopeft does not export through a link: give a folder path")
    target = out_dir.resolve()
    if run_dir is not None:
        run = run_dir.path.resolve()
        if target == run or target in run.parents:
            what = "is the run folder" if target == run else f"holds the run folder {run_dir.path}"
            raise ExportError(f"{out_dir} {what}; an export replaces its folder, so it never goes there: give a new folder, e.g. {run.parent / (run.name + '-trial')}")
    if not target.exists():
        return target
    if not target.is_dir():
        raise ExportError(f"{out_dir} is a file, not a folder; an export writes a folder: give a new folder path")
    if (target / "study.db").exists():
        raise ExportError(f"{out_dir} holds a study ({target / 'study.db'}); an export replaces its folder, so it never goes there: give a new folder")
    if is_export(target) or is_empty(target):
        return target
    if not force:
        found = foreign_entries(target)
        what = "no autopeft.json" if not (target / "autopeft.json").is_file() else "files autopeft did not write: " + ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
        raise ExportError(
            f"{out_dir} is not empty and is not an earlier autopeft export ({what}); exporting would delete what is in it. "
            "Give a new or empty folder, or pass --force to replace this one"
        )
    study = _find_study(target)
    if study is not None:
        raise ExportError(f"{out_dir} holds a study ({study}); even with --force an export never replaces it: give a new folder")
    return target


def _find_study(folder: Path) -> Path | None:
    """A ``study.db`` anywhere under ``folder`` (links are not followed), or None."""
    for root, _, files in os.walk(folder):
        if "study.db" in files:
            return Path(root) / "study.db"
    return None


def _sibling(target: Path, purpose: str) -> Path:
    """A new hidden folder next to ``target`` (``.NAME.<purpose>.<random>``), creating the parent folders; the
    random part means it never is, or replaces, a folder someone else made."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return make_unique_folder(target.parent, f".{target.name}.{purpose}.")
    except OSError as exc:
        raise ExportError(f"cannot create a folder in {target.parent} to export to {target}: {exc.strerror or exc}") from None


def replace_folder(staging: Path, target: Path) -> None:
    """Rename the complete folder ``staging`` to ``target``. A folder already at ``target`` is first renamed
    aside and deleted only once the new one is in place, so a failure at any point leaves one of them whole."""
    if not target.exists():
        staging.rename(target)
        return
    aside = make_unique_folder(target.parent, f".{target.name}.old.")
    target.rename(aside)  # onto the empty folder just made: POSIX rename replaces an empty folder
    try:
        staging.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def export_adapter(
    workbench: Workbench, adapter_dir: Path, out_dir: Path, record: dict[str, Any], run_dir: RunDir | None = None, force: bool = False
) -> dict[str, Any]:
    """Export the adapter saved in ``adapter_dir`` to ``out_dir`` and return its ``autopeft.json`` content.

    ``record`` describes the trial (``trial``, ``variant``, ``params``, ``trainable_params``, ``validation``: the
    metrics of the trial's last evaluation, ...). Test scores are measured here on the adapter as loaded by PEFT;
    the validation split is not evaluated again (the trial evaluated this adapter on it as it finished). ``out_dir`` must pass :func:`check_target`
    (``run_dir`` and ``force`` are passed on); it is built in a hidden sibling and replaced atomically.
    """
    target = check_target(out_dir, run_dir, force)
    staging = _sibling(target, "partial")
    try:
        info = _write_export(workbench, adapter_dir, staging, record)
        check_target(out_dir, run_dir, force)  # again: the target may have changed while the adapter was measured
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _write_export(workbench: Workbench, adapter_dir: Path, staging: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Fill the empty folder ``staging`` with the export of the adapter in ``adapter_dir``."""
    from peft import PeftModel

    spec = workbench.plan.spec
    for name in ADAPTER_FILES:
        shutil.copy2(adapter_dir / name, staging / name)
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = spec.model.id
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True))

    bits_file = adapter_dir / "adapter_bits.json"
    bits = json.loads(bits_file.read_text()) if bits_file.is_file() else {}
    if bits:
        shutil.copy2(bits_file, staging / bits_file.name)

    base_bits = record.get("base_bits", 16)
    model = PeftModel.from_pretrained(workbench.base_for(base_bits), str(staging))
    try:
        ranks = adapter_ranks(model)
        test = workbench.evaluate(model, workbench.data.test)
    finally:
        workbench.put_back(base_bits, detach_peft_model(model))
    modules = [
        {"name": site.name, "role": site.role, "layer": site.layer, "rank": ranks.get(site.name, 0), "bits": bits.get(site.name)}
        for site in workbench.sites
    ]

    info = {
        "autopeft_version": package_versions().get("autopeft", ""),
        **record,
        "metric": {"name": spec.metric, "direction": spec.direction},
        "test": test.metrics,
        "base_model": {
            "id": spec.model.id,
            "found_in": workbench.resolved.origin,
            "task": spec.model.task,
            "dtype": str(workbench.dtype).removeprefix("torch."),
            "labels": workbench.data.label_names,
            "quantization": {"bits": base_bits, "method": "hqq"} if base_bits < 16 else None,
        },
        "modules": modules,
        "data": {"source": spec.data.source, "max_length": spec.data.max_length, "sizes": workbench.data.describe()},
        "training": spec.training.model_dump(mode="json"),
        "versions": package_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(staging / "autopeft.json", json.dumps(info, indent=2))
    if test.predictions is not None:
        table = io.StringIO(newline="")
        writer = csv.writer(table)
        # Readable on its own: the text (cut to 200 characters) and label names, with the class ids after them.
        names, longest = workbench.data.label_names, 200
        texts = workbench.data.test_texts or [""] * len(test.predictions)
        writer.writerow(["index", "text", "label", "prediction", "label_id", "prediction_id"])
        for i, (example, text, predicted) in enumerate(zip(workbench.data.test, texts, test.predictions)):
            shown = text if len(text) <= longest else text[: longest - 1] + "…"
            writer.writerow([i, shown, names[example["labels"]], names[predicted], example["labels"], predicted])
        atomic_write_text(staging / "test_predictions.csv", table.getvalue())
    atomic_write_text(staging / "README.md", model_card(info, config))
    return info


def export_trial(
    study: optuna.Study, plan: Plan, workbench: Workbench, run_dir: RunDir, number: int, out_dir: Path, force: bool = False
) -> dict[str, Any]:
    """Export finished trial ``number`` to ``out_dir`` (see :func:`check_target` for what ``force`` allows).

    The best trials' adapters are kept in ``RUN_DIR/adapters``; any other complete trial is trained again from
    its stored parameters and seed (training is deterministic for a given seed and device), in a hidden folder
    next to ``out_dir`` that is deleted afterwards.
    """
    import optuna

    if not 0 <= number < len(study.trials):
        raise RunDirError(f"{run_dir.path} has no trial {number} (it has trials 0 to {len(study.trials) - 1})")
    trial = study.trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        state = trial_state(trial)
        reason = interrupted_reason(trial) if state == INTERRUPTED else trial.user_attrs.get("failure_reason") or trial.user_attrs.get("pruned_reason", "")
        raise RunDirError(f"trial {number} is {state}{': ' + reason if reason else ''}; only complete trials can be exported")
    target = check_target(out_dir, run_dir, force)  # before any retraining: refuse at once
    record = trial_record(study, number)
    adapter_dir = run_dir.saved_adapter(number)
    retrain = None
    try:
        if adapter_dir is None:
            adapter_dir = retrain = _sibling(target, "retrain")
            outcome = workbench.run_trial(TrialConfig.from_json(record["config"]), record["seed"], save_to=adapter_dir)
            record["validation"] = outcome.metrics  # what the retrained adapter scored
        return export_adapter(workbench, adapter_dir, out_dir, record, run_dir, force)
    finally:
        if retrain is not None:
            shutil.rmtree(retrain, ignore_errors=True)


def module_table(modules: list[dict[str, Any]]) -> str:
    """A markdown grid of rank (and bits) per layer and module role; empty when no module has a known rank."""
    if not any(m["rank"] for m in modules):
        return ""
    roles = [r for r in dict.fromkeys(m["role"] for m in modules)]
    layers = sorted({m["layer"] for m in modules})
    cell = {(m["layer"], m["role"]): m for m in modules}

    def show(module: dict[str, Any] | None) -> str:
        if module is None or not module["rank"]:
            return "·"
        return f"{module['rank']}" + (f" ({module['bits']}b)" if module.get("bits") else "")

    header = "| layer | " + " | ".join(roles) + " |\n|---|" + "---|" * len(roles) + "\n"
    rows = "".join(f"| {layer} | " + " | ".join(show(cell.get((layer, role))) for role in roles) + " |\n" for layer in layers)
    return "## Rank per module\n\nRank of the adapter on each module (· = no adapter" + (", bits in brackets" if any(m.get("bits") for m in modules) else "") + ").\n\n" + header + rows + "\n"


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(info: dict[str, Any], adapter_config: dict[str, Any]) -> str:
    """A Hugging Face style model card: front matter, scores, configuration and how to load the adapter."""
    base = info["base_model"]
    classification = base["task"] == "sequence-classification"
    labels = base.get("labels") or []
    metric_rows = "\n".join(
        f"| {name} | {_format(value)} | {_format(info['test'].get(name, ''))} |" for name, value in info["validation"].items()
    )
    param_rows = "\n".join(f"| {name} | {_format(value)} |" for name, value in sorted(info["params"].items()))
    if classification:
        load = (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f"labels = {labels!r}\n"
            f"base = AutoModelForSequenceClassification.from_pretrained(\n"
            f"    {base['id']!r}, num_labels={len(labels)},\n"
            "    id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})\n"
            "model = PeftModel.from_pretrained(base, \"path/to/this/folder\").eval()\n"
            f"tokenizer = AutoTokenizer.from_pretrained({base['id']!r})"
        )
    else:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from peft import PeftModel\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base['id']!r})\n"
            "model = PeftModel.from_pretrained(base, \"path/to/this/folder\").eval()\n"
            f"tokenizer = AutoTokenizer.from_pretrained({base['id']!r})"
        )
    targets = adapter_config.get("target_modules") or []
    quantization = base.get("quantization")
    base_note = (
        f"\n- trained against the base model quantized to {quantization['bits']} bits ({quantization['method']}): "
        "load the base the same way for the scores above" if quantization else ""
    )
    return f"""---
base_model: {base['id']}
library_name: peft
tags:
- autopeft
- {info['variant']}
---

# {info['variant']} adapter for {base['id']}

Found by an autopeft search: trial {info['trial']}, chosen by validation {info['metric']['name']}
({info['metric']['direction']}). The test split was used only to report the scores below.

| metric | validation | test |
|---|---|---|
{metric_rows}

## Configuration

| parameter | value |
|---|---|
{param_rows}

- trainable parameters: {info['trainable_params']:,}{base_note}
- adapter on {len(targets)} modules
- data: {info['data']['source']} ({', '.join(f'{k} {v}' for k, v in info['data']['sizes'].items() if k != 'labels')}), max length {info['data']['max_length']}
- training: {info['training']['max_steps']} steps, batch size {info['training']['batch_size']}

{module_table(info.get("modules") or [])}## Use it

Nothing from autopeft is needed:

```python
{load}
```

Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}.
"""
