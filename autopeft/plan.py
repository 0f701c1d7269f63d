"""A plan is a spec checked against what is installed: its variants, their effective spaces and its data.

``make_plan`` does every check that needs no model weights (unknown variant, bad override, missing file,
column not in the data, unknown metric) and reports all problems at once. ``autopeft validate`` stops here.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autopeft.costs import COST_NAMES
from autopeft.data import check_columns, check_source
from autopeft.errors import AutoPeftError, SpecError, SpecErrors, shorten
from autopeft.models import looks_like_local_path
from autopeft.registry import Registry, load_registry
from autopeft.space import SHARED_PARAMS, Param, learning_rate_for_steps, override, qualified_name
from autopeft.spec import METRICS, Spec, load_yaml, non_finite_numbers

PRESET_FOLDER = Path(importlib.util.find_spec("autopeft.search_spaces").submodule_search_locations[0])


@dataclass
class Plan:
    spec: Spec
    registry: Registry
    spaces: dict[str, dict[str, Param]]
    """The effective space of each searched variant (declared space, then preset, then the spec's overrides)."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_FOLDER.glob("*.yaml"))


def load_preset(spec: Spec) -> dict[str, Any]:
    """The preset a spec names: a file in ``search_spaces/`` by name, or a YAML file by path.

    Returns ``{"summary": str, "variants": [str], "space": {param: override}}`` (keys may be absent). Raises
    :class:`SpecError` naming the preset file and key when the preset is not of that shape.
    """
    name = spec.search.preset
    path = PRESET_FOLDER / f"{name}.yaml"
    if not path.is_file():
        path = spec.resolve_path(name)
    if not path.is_file():
        raise SpecError(str(spec.path), "search.preset", name, f"no such preset or file; presets: {', '.join(preset_names())}")
    file = str(path)
    preset = load_yaml(path)
    if preset is None:
        return {}
    if not isinstance(preset, dict):
        raise SpecError(file, "(top level)", preset, "a preset is a mapping with keys summary, variants and space")
    non_finite = [SpecError(file, key, value, "numbers must be finite (no .nan or .inf)") for key, value in non_finite_numbers(preset)]
    if non_finite:
        raise SpecErrors(non_finite)
    unknown = sorted(str(k) for k in preset if k not in ("summary", "variants", "space"))
    if unknown:
        raise SpecError(file, unknown[0], preset[next(k for k in preset if str(k) == unknown[0])], "unknown key; a preset has summary, variants and space")
    variants = preset.get("variants")
    if variants is not None and not (isinstance(variants, list) and variants and all(isinstance(v, str) for v in variants)):
        raise SpecError(file, "variants", variants, "a non-empty list of variant names")
    space = preset.get("space")
    if space is not None and not (isinstance(space, dict) and all(isinstance(k, str) for k in space)):
        raise SpecError(file, "space", space, "a mapping {parameter: override}, as search.space in a spec")
    return preset


def _build_spaces(spec: Spec, registry: Registry, variants: list[str], overrides: dict[str, Any], errors: list[SpecError]) -> dict[str, dict[str, Param]]:
    file = str(spec.path)
    spaces = {name: dict(registry.variant(name).search_space()) for name in variants}
    for space in spaces.values():  # where the baseline trial starts suits the trials' length; a spec's default wins
        if "learning_rate" in space:
            space["learning_rate"] = learning_rate_for_steps(space["learning_rate"], spec.training.max_steps)
    allowed = sorted({qualified_name(v, p) for v, space in spaces.items() for p in space})
    for key, raw in overrides.items():
        variant, _, param = key.rpartition(".")
        targets = [(v, key) for v in spaces if key in spaces[v]] if key in SHARED_PARAMS else [(variant, param)] if variant in spaces and param in spaces[variant] else []
        if not targets:
            errors.append(SpecError(file, f"search.space.{key}", raw, f"not a parameter of the searched variants; parameters: {', '.join(allowed)}"))
            continue
        for v, p in targets:
            try:
                spaces[v][p] = override(spaces[v][p], raw)
            except ValueError as exc:
                errors.append(SpecError(file, f"search.space.{key}", raw, str(exc)))
                break
    return spaces


def _check_objectives(spec: Spec) -> list[SpecError]:
    """Objective, constraint, sampler and pruner choices that do not fit together."""
    file = str(spec.path)
    search = spec.search
    metrics = list(METRICS[spec.model.task])
    names = metrics + list(COST_NAMES)
    key = "search.objectives[0]" if search.objectives else "search.metric"
    if spec.metric not in metrics:
        return [SpecError(file, key, spec.metric, f"the first objective is the task metric; for {spec.model.task} one of {', '.join(metrics)}")]
    errors = []
    for i, (name, _) in enumerate(spec.objectives()):
        if name not in names:
            errors.append(SpecError(file, f"search.objectives[{i}]", name, f"not a metric or cost; allowed: {', '.join(names)}"))
    for i, (name, _, _) in enumerate(spec.constraints()):
        if name not in names:
            errors.append(SpecError(file, f"search.constraints[{i}]", search.constraints[i], f"{name!r} is not a metric or cost; allowed: {', '.join(names)}"))
    several = len(spec.objectives()) > 1
    if search.constraints and search.sampler not in ("tpe", "nsgaii"):
        errors.append(SpecError(file, "search.sampler", search.sampler, "only tpe and nsgaii take constraints into account; choose one of them"))
    if several and search.sampler == "cmaes":
        errors.append(SpecError(file, "search.sampler", "cmaes", "CMA-ES optimises a single objective; with several use tpe, nsgaii, random or qmc"))
    if several and search.pruner.type in ("median", "successive-halving", "hyperband"):
        errors.append(SpecError(file, "search.pruner.type", search.pruner.type, "Optuna's pruners judge one objective; with several objectives use 'pareto' or 'none'"))
    if not several and search.pruner.type == "pareto":
        errors.append(SpecError(file, "search.pruner.type", "pareto", "the pareto pruner needs several objectives; with one use median, successive-halving or hyperband"))
    return errors


def _checked(errors: list[SpecError], file: str, key: str, value: Any, check: Callable[[], Any]) -> Any:
    """Run one check and return its result; whatever it raises becomes an entry of ``errors`` at ``key``.

    A check that fails on a value nobody foresaw (an OSError on a strange path, a plugin that misbehaves)
    must still end in a message naming the key, never in a traceback. Returns None when the check raised.
    """
    try:
        return check()
    except SpecErrors as exc:
        errors.extend(exc.errors)
    except SpecError as exc:
        errors.append(exc)
    except AutoPeftError as exc:
        errors.append(SpecError(file, key, value, str(exc)))
    except Exception as exc:  # the safety net: report it against the key being checked
        errors.append(SpecError(file, key, value, f"cannot be checked ({type(exc).__name__}: {shorten(str(exc))})"))
    return None


def _plugin_paths(spec: Spec, errors: list[SpecError]) -> list[str]:
    """The spec's plugin paths that exist and are ``.py`` files or folders (the registry says when a folder is not a
    package)."""
    file = str(spec.path)
    usable = []
    for i, (given, path) in enumerate(zip(spec.plugins, spec.plugin_paths())):
        where = Path(path)
        if not where.exists():
            errors.append(SpecError(file, f"plugins[{i}]", given, "no such plugin file or folder"))
        elif not where.is_dir() and not (where.is_file() and where.suffix == ".py"):
            errors.append(SpecError(file, f"plugins[{i}]", given, "not a Python plugin; list a .py file or a package folder (with __init__.py)"))
        else:
            usable.append(path)
    return usable


def _check_output(spec: Spec) -> list[SpecError]:
    """The run folder must be a folder autopeft can create or write in: its nearest existing ancestor (or itself)
    must be a folder that accepts a new entry. Tried by creating and removing an empty folder, which works
    whoever runs it (permissions, read-only mounts, root)."""
    file = str(spec.path)
    folder = spec.run_dir
    value = spec.output.dir if spec.output.dir is not None else str(folder)
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it" if existing == folder.absolute() else str(existing)
        return [SpecError(file, "output.dir", value, f"{where} is a file, not a folder; give a folder path for the run")]
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".autopeft-write-check-", dir=existing))
    except OSError as exc:
        return [SpecError(file, "output.dir", value, f"cannot write in {existing} ({exc.strerror or type(exc).__name__}); give a writable folder")]
    return []


def _local_model_config(spec: Spec, registry: Registry) -> Path | None:
    """The model's config.json when it is on this machine (a local folder, the Hugging Face cache or a plugin's
    packaged model), found without loading weights and without the network; None otherwise."""
    local = spec.resolve_path(spec.model.id)
    if local.is_dir():
        return local / "config.json" if (local / "config.json").is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.model.id, "config.json", revision=spec.model.revision)
        if isinstance(cached, str):
            return Path(cached)
    except Exception:  # not a valid hub id, or no cache: other places may still have it
        pass
    for found in registry.model_sources:
        if found.item.model_id == spec.model.id:
            if found.item.is_installed is not None:
                continue  # its files are made on first use (a conversion): validation must not pay for that
            folder = found.item.locate()
            if folder is not None and (Path(folder) / "config.json").is_file():
                return Path(folder) / "config.json"
    return None


def _check_task_head(spec: Spec, registry: Registry) -> list[SpecError]:
    """``task: causal-lm`` needs a model with a causal-LM head; an encoder such as BERT would train a "language
    model" that sees the words it predicts. Checked from config.json alone, when it is on this machine."""
    if spec.model.task != "causal-lm":
        return []
    config_file = _local_model_config(spec, registry)
    if config_file is None:
        return []
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    file = str(spec.path)
    try:
        config = AutoConfig.from_pretrained(config_file.parent, trust_remote_code=False)
    except Exception as exc:
        if spec.model.trust_remote_code:
            return []  # its configuration is code; running it is for the search, not for validation
        return [SpecError(file, "model.id", spec.model.id, f"its config.json cannot be read ({type(exc).__name__}: {shorten(str(exc))})")]
    head_classes = {c for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((names,) if isinstance(names, str) else names)}
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        reason = f"transformers has no causal-LM head for its model type {config.model_type!r}"
    elif architectures and not set(architectures) & head_classes and not getattr(config, "is_decoder", False):
        reason = f"it is a {config.model_type} encoder ({', '.join(architectures)}), not a causal language model"
    else:
        return []
    return [SpecError(file, "model.task", "causal-lm", f"model {spec.model.id!r}: {reason}; use a decoder model (e.g. Llama, GPT-2, Qwen) or task sequence-classification")]


def make_plan(spec: Spec) -> Plan:
    """Check the spec against plugins, presets, data headers, the model's config and the output folder.

    Raises :class:`SpecErrors` with every problem; any exception a check raises becomes one of them.
    """
    file = str(spec.path)
    errors: list[SpecError] = []
    plugin_paths = _checked(errors, file, "plugins", spec.plugins, lambda: _plugin_paths(spec, errors)) or []
    registry = load_registry(tuple(plugin_paths))
    for i, (given, path) in enumerate(zip(spec.plugins, spec.plugin_paths())):
        # The spec asks for this plugin by name: a broken one is an error here, not only a line in `plugins`.
        errors += [SpecError(file, f"plugins[{i}]", given, f"the plugin is broken: {b.reason}") for b in registry.broken if b.source == path]

    variants = list(spec.search.variants)
    overrides: dict[str, Any] = {}
    if spec.search.preset:
        preset = _checked(errors, file, "search.preset", spec.search.preset, lambda: load_preset(spec)) or {}
        if "variants" not in spec.search.model_fields_set and preset.get("variants"):
            variants = list(preset["variants"])
        overrides.update(preset.get("space") or {})
    overrides.update(spec.search.space)

    known = [v for v in variants if v in registry.variants]
    for i, name in enumerate(variants):
        if name in registry.unavailable:
            found = registry.unavailable[name]
            errors.append(SpecError(file, f"search.variants[{i}]", name, f"not available ({found.source}): {found.item.reason}"))
        elif name not in registry.variants:
            broken = [b for b in registry.broken if name in b.reason or b.plugin == name]
            hint = f" (plugin {broken[0].plugin} from {broken[0].source}, which may provide it, is broken: {broken[0].reason})" if broken else ""
            errors.append(SpecError(file, f"search.variants[{i}]", name, f"unknown variant; available: {', '.join(sorted(registry.variants))}{hint}"))
    if len(set(variants)) != len(variants):
        errors.append(SpecError(file, "search.variants", variants, "each variant may be listed once"))
    if isinstance(spec.search.baseline, list):
        for i, name in enumerate(spec.search.baseline):
            if name not in variants:
                errors.append(SpecError(file, f"search.baseline[{i}]", name, f"not a searched variant; searched: {', '.join(variants)}"))
    spaces = (_checked(errors, file, "search.space", spec.search.space, lambda: _build_spaces(spec, registry, known, overrides, errors)) or {}) if known else {}
    if spec.search.allocation is not None:
        for i, name in enumerate(variants):
            if name in known and not registry.variant(name).supports_module_ranks:
                capable = ", ".join(sorted(n for n, f in registry.variants.items() if f.item.supports_module_ranks))
                errors.append(SpecError(file, f"search.variants[{i}]", name, f"cannot take per-module ranks from search.allocation; variants that can: {capable}"))

    quantized = sorted({b for b in spec.search.base_bits if b < 16})
    if quantized:
        for i, name in enumerate(variants):
            if name in known and not registry.variant(name).supports_quantized_base:
                capable = ", ".join(sorted(n for n, f in registry.variants.items() if f.item.supports_quantized_base))
                errors.append(SpecError(file, f"search.variants[{i}]", name, f"cannot train on a quantized base (search.base_bits has {quantized}); variants that can: {capable}"))

    errors += _checked(errors, file, "search", None, lambda: _check_objectives(spec)) or []
    if _checked(errors, file, "model.id", spec.model.id, lambda: looks_like_local_path(spec.model.id) and not spec.resolve_path(spec.model.id).is_dir()):
        errors.append(SpecError(file, "model.id", spec.model.id, "looks like a local folder but does not exist; give an existing folder or a hub id"))
    errors += _checked(errors, file, "model.task", spec.model.task, lambda: _check_task_head(spec, registry)) or []

    source_errors = _checked(errors, file, "data.source", spec.data.source, lambda: check_source(spec, registry))
    if source_errors == []:
        errors += _checked(errors, file, "data.source", spec.data.source, lambda: check_columns(spec, registry)) or []
    else:
        errors += source_errors or []
    errors += _checked(errors, file, "output.dir", spec.output.dir, lambda: _check_output(spec)) or []
    if errors:
        raise SpecErrors(errors)
    return Plan(spec, registry, spaces)
