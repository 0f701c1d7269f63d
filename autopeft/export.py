"""Turning a trial's saved adapter into a folder users load with ``peft.PeftModel.from_pretrained``.

The exported folder holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` (the task head
included where the task has one), ``autopeft.json`` (what was searched and measured), ``test_predictions.csv``
(classification) and a ``README.md`` model card. The adapter is loaded back through PEFT on a clean base model
to measure it, so the recorded scores are the scores of exactly what is in the folder.
"""

from __future__ import annotations

import csv
import json
import platform
import shutil
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autopeft.adapters import adapter_ranks, detach_peft_model
from autopeft.errors import RunDirError
from autopeft.plan import Plan
from autopeft.rundir import RunDir, trial_record
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


def export_adapter(workbench: Workbench, adapter_dir: Path, out_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Export the adapter saved in ``adapter_dir`` to ``out_dir`` and return its ``autopeft.json`` content.

    ``record`` describes the trial (``trial``, ``variant``, ``params``, ``trainable_params``, ...). Validation and
    test scores are measured here on the adapter as loaded by PEFT. The folder is replaced atomically.
    """
    from peft import PeftModel

    spec = workbench.plan.spec
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(adapter_dir / name, staging / name)
    config_path = staging / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = spec.model.id
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))

    bits_file = adapter_dir / "adapter_bits.json"
    bits = json.loads(bits_file.read_text()) if bits_file.is_file() else {}
    if bits:
        shutil.copy2(bits_file, staging / bits_file.name)

    base_bits = record.get("base_bits", 16)
    model = PeftModel.from_pretrained(workbench.base_for(base_bits), str(staging))
    try:
        ranks = adapter_ranks(model)
        validation = workbench.evaluate(model, workbench.data.validation)
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
        "validation": validation.metrics,
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
    (staging / "autopeft.json").write_text(json.dumps(info, indent=2))
    if test.predictions is not None:
        with open(staging / "test_predictions.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            # Readable on its own: the text (cut to 200 characters) and label names, with the class ids after them.
            names, longest = workbench.data.label_names, 200
            texts = workbench.data.test_texts or [""] * len(test.predictions)
            writer.writerow(["index", "text", "label", "prediction", "label_id", "prediction_id"])
            for i, (example, text, predicted) in enumerate(zip(workbench.data.test, texts, test.predictions)):
                shown = text if len(text) <= longest else text[: longest - 1] + "…"
                writer.writerow([i, shown, names[example["labels"]], names[predicted], example["labels"], predicted])
    (staging / "README.md").write_text(model_card(info, config))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return info


def export_trial(study: optuna.Study, plan: Plan, workbench: Workbench, run_dir: RunDir, number: int, out_dir: Path) -> dict[str, Any]:
    """Export finished trial ``number`` to ``out_dir``.

    The best trials' adapters are kept in ``RUN_DIR/adapters``; any other complete trial is trained again from
    its stored parameters and seed (training is deterministic for a given seed and device).
    """
    import optuna

    if not 0 <= number < len(study.trials):
        raise RunDirError(f"{run_dir.path} has no trial {number} (it has trials 0 to {len(study.trials) - 1})")
    trial = study.trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE:
        reason = trial.user_attrs.get("failure_reason", "")
        raise RunDirError(f"trial {number} is {trial.state.name}{': ' + reason if reason else ''}; only complete trials can be exported")
    record = trial_record(study, number)
    adapter_dir = run_dir.adapter(number)
    if not (adapter_dir / "adapter_config.json").is_file():
        adapter_dir = out_dir.with_name(out_dir.name + ".retrain")
        shutil.rmtree(adapter_dir, ignore_errors=True)
        workbench.run_trial(TrialConfig.from_json(record["config"]), record["seed"], save_to=adapter_dir)
    try:
        return export_adapter(workbench, adapter_dir, out_dir, record)
    finally:
        if adapter_dir.name.endswith(".retrain"):
            shutil.rmtree(adapter_dir, ignore_errors=True)


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
