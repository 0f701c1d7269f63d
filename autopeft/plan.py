"""A plan is a spec checked against what is installed: its variants, their effective spaces and its data.

``make_plan`` does every check that needs no model weights (unknown variant, bad override, missing file,
column not in the data, unknown metric) and reports all problems at once. ``autopeft validate`` stops here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autopeft.costs import COST_NAMES
from autopeft.data import check_columns, check_source
from autopeft.errors import SpecError, SpecErrors
from autopeft.models import looks_like_local_path
from autopeft.registry import Registry, load_registry
from autopeft.space import SHARED_PARAMS, Param, override, qualified_name
from autopeft.spec import METRICS, Spec

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
    """The preset a spec names: a file in ``search_spaces/`` by name, or a YAML file by path."""
    name = spec.search.preset
    path = PRESET_FOLDER / f"{name}.yaml"
    if not path.is_file():
        path = spec.resolve_path(name)
    if not path.is_file():
        raise SpecError(str(spec.path), "search.preset", name, f"no such preset or file; presets: {', '.join(preset_names())}")
    preset = yaml.safe_load(path.read_text()) or {}
    unknown = set(preset) - {"summary", "variants", "space"}
    if unknown:
        raise SpecError(str(path), sorted(unknown)[0], preset[sorted(unknown)[0]], "unknown key; a preset has summary, variants and space")
    return preset


def _build_spaces(spec: Spec, registry: Registry, variants: list[str], overrides: dict[str, Any], errors: list[SpecError]) -> dict[str, dict[str, Param]]:
    file = str(spec.path)
    spaces = {name: dict(registry.variant(name).search_space()) for name in variants}
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


def make_plan(spec: Spec) -> Plan:
    """Check the spec against plugins, presets and data headers. Raises :class:`SpecErrors` with every problem."""
    file = str(spec.path)
    errors: list[SpecError] = []
    for i, path in enumerate(spec.plugin_paths()):
        if not Path(path).exists():
            errors.append(SpecError(file, f"plugins[{i}]", spec.plugins[i], "no such plugin file or folder"))
    registry = load_registry(tuple(p for p in spec.plugin_paths() if Path(p).exists()))

    variants = list(spec.search.variants)
    overrides: dict[str, Any] = {}
    if spec.search.preset:
        try:
            preset = load_preset(spec)
            if "variants" not in spec.search.model_fields_set and preset.get("variants"):
                variants = list(preset["variants"])
            overrides.update(preset.get("space") or {})
        except SpecError as exc:
            errors.append(exc)
    overrides.update(spec.search.space)

    known = [v for v in variants if v in registry.variants]
    for i, name in enumerate(variants):
        if name not in registry.variants:
            broken = [b.reason for b in registry.broken if name in b.reason or b.plugin == name]
            hint = f" (a plugin that may provide it is broken: {broken[0]})" if broken else ""
            errors.append(SpecError(file, f"search.variants[{i}]", name, f"unknown variant; available: {', '.join(sorted(registry.variants))}{hint}"))
    if len(set(variants)) != len(variants):
        errors.append(SpecError(file, "search.variants", variants, "each variant may be listed once"))
    spaces = _build_spaces(spec, registry, known, overrides, errors) if known else {}
    if spec.search.allocation is not None:
        for i, name in enumerate(variants):
            if name in known and not registry.variant(name).supports_module_ranks:
                capable = ", ".join(sorted(n for n, f in registry.variants.items() if f.item.supports_module_ranks))
                errors.append(SpecError(file, f"search.variants[{i}]", name, f"cannot take per-module ranks from search.allocation; variants that can: {capable}"))

    errors += _check_objectives(spec)
    if looks_like_local_path(spec.model.id) and not spec.resolve_path(spec.model.id).is_dir():
        errors.append(SpecError(file, "model.id", spec.model.id, "looks like a local folder but does not exist; give an existing folder or a hub id"))

    source_errors = check_source(spec, registry)
    errors += source_errors or check_columns(spec, registry)
    if errors:
        raise SpecErrors(errors)
    return Plan(spec, registry, spaces)
