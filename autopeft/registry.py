"""Finding plugins and collecting what they declare.

Plugins come from the entry-point group ``autopeft`` (autopeft's own first-party plugins are registered there
too) and from files or folders a spec lists. A plugin that fails to import, whose hook raises, or that declares
something invalid is recorded in :attr:`Registry.broken` with its reason; the others keep working.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import pluggy

from autopeft import hookspecs
from autopeft.errors import shorten, show
from autopeft.hookspecs import Corpus, ModelSource, Variant
from autopeft.space import check_space

ENTRY_POINT_GROUP = "autopeft"
BUILTIN_DISTRIBUTION = "autopeft"


@dataclass(frozen=True)
class Found:
    """A declaration together with the plugin it came from."""

    item: Any
    plugin: str
    source: str
    """``"built-in"``, ``"<package> <version>"`` or the file path a spec listed."""


@dataclass(frozen=True)
class BrokenPlugin:
    plugin: str
    source: str
    reason: str


@dataclass(frozen=True)
class Unavailable:
    """A variant a plugin knows of but cannot offer, returned from ``autopeft_variants`` next to the variants.

    ``autopeft plugins`` lists it apart with its reason, and a spec that asks for it is refused with that reason.
    """

    name: str
    reason: str


@dataclass
class Registry:
    """Everything the loaded plugins declare."""

    variants: dict[str, Found] = field(default_factory=dict)
    unavailable: dict[str, Found] = field(default_factory=dict)
    """Variants declared :class:`Unavailable`, by name, with their reason in ``item.reason``."""
    model_sources: list[Found] = field(default_factory=list)
    corpora: dict[str, Found] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        return self.variants[name].item


def _import_path(path: Path) -> Any:
    """Import a plugin from a ``.py`` file or a package folder under a private module name."""
    if path.is_dir():
        init = path / "__init__.py"
        if not init.is_file():
            raise ImportError(f"{path} is a folder without __init__.py; list a .py file or a package folder")
        spec = importlib.util.spec_from_file_location(f"autopeft_local_{path.name}", init, submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(f"autopeft_local_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _call(registry: Registry, hook: str, plugin: str, source: str, impl: Any) -> list[Any]:
    try:
        result = impl.function()
    except (Exception, SystemExit) as exc:  # a plugin's bug (even sys.exit) must not stop the others
        registry.broken.append(BrokenPlugin(plugin, source, f"{hook}() raised {type(exc).__name__}: {shorten(str(exc))}"))
        return []
    if result is None:
        return []
    if not isinstance(result, (list, tuple)):
        registry.broken.append(BrokenPlugin(plugin, source, f"{hook}() returned {type(result).__name__}, not a list"))
        return []
    return list(result)


def _variant_problems(variant: Any) -> list[str]:
    if not isinstance(variant, Variant):
        return [f"{show(variant)} is not an autopeft.Variant"]
    if not isinstance(variant.name, str) or not variant.name:
        return [f"{type(variant).__name__} has no name (a non-empty string)"]
    if variant.export_format not in ("native", "lora", "merged"):
        return [f"export_format {show(variant.export_format)} is not one of native, lora, merged"]
    try:
        space = variant.search_space()
    except Exception as exc:
        return [f"search_space() raised {type(exc).__name__}: {shorten(str(exc))}"]
    if not isinstance(space, dict) or not space:
        return ["search_space() must return a non-empty dict of parameters"]
    return check_space(space)


def _model_source_problems(model_source: Any) -> list[str]:
    if not isinstance(model_source, ModelSource):
        return [f"{show(model_source)} is not a ModelSource"]
    if not isinstance(model_source.model_id, str) or not model_source.model_id:
        return [f"model_id {show(model_source.model_id)} is not a non-empty string"]
    if not callable(model_source.locate):
        return [f"model source {model_source.model_id!r}: locate {show(model_source.locate)} is not callable"]
    return []


def _corpus_problems(corpus: Any) -> list[str]:
    if not isinstance(corpus, Corpus):
        return [f"{show(corpus)} is not a Corpus"]
    if not isinstance(corpus.name, str) or not corpus.name:
        return [f"corpus name {show(corpus.name)} is not a non-empty string"]
    problems = []
    if corpus.task not in hookspecs.TASKS:
        problems.append(f"task {show(corpus.task)} is not one of {', '.join(hookspecs.TASKS)}")
    if not isinstance(corpus.columns, (list, tuple)) or not all(isinstance(c, str) for c in corpus.columns):
        problems.append(f"columns {show(corpus.columns)} is not a tuple of column names")
    if not callable(corpus.load):
        problems.append(f"load {show(corpus.load)} is not callable")
    return [f"corpus {corpus.name!r}: {p}" for p in problems]


def _checked(check: Callable[[Any], list[str]], item: Any) -> list[str]:
    """``check(item)``, with any exception it raises on a malformed declaration turned into a problem."""
    try:
        return check(item)
    except Exception as exc:  # a declaration can be malformed in ways no check foresees
        return [f"checking {show(item)} raised {type(exc).__name__}: {shorten(str(exc))}"]


def _name_of(variant: Any) -> Any:
    try:
        return variant.name
    except Exception:  # a broken property; the reason is already among the problems
        return "?"


def _collect(registry: Registry, pm: pluggy.PluginManager, plugin: Any, plugin_name: str, source: str) -> None:
    hooks = pm.hook
    for impl in hooks.autopeft_variants.get_hookimpls():
        if impl.plugin is not plugin:
            continue
        for variant in _call(registry, "autopeft_variants", plugin_name, source, impl):
            if isinstance(variant, Unavailable):
                registry.unavailable.setdefault(variant.name, Found(variant, plugin_name, source))
                continue
            problems = _checked(_variant_problems, variant)
            name = _name_of(variant)
            if not problems and name in registry.variants:
                problems = [f"variant name {name!r} is already provided by {registry.variants[name].source}"]
            if problems:
                registry.broken.append(BrokenPlugin(plugin_name, source, f"variant {show(name)}: " + "; ".join(problems)))
            else:
                registry.variants[name] = Found(variant, plugin_name, source)
    for impl in hooks.autopeft_model_sources.get_hookimpls():
        if impl.plugin is plugin:
            for model_source in _call(registry, "autopeft_model_sources", plugin_name, source, impl):
                problems = _checked(_model_source_problems, model_source)
                if problems:
                    registry.broken.append(BrokenPlugin(plugin_name, source, "; ".join(problems)))
                else:
                    registry.model_sources.append(Found(model_source, plugin_name, source))
    for impl in hooks.autopeft_corpora.get_hookimpls():
        if impl.plugin is plugin:
            for corpus in _call(registry, "autopeft_corpora", plugin_name, source, impl):
                problems = _checked(_corpus_problems, corpus)
                if not problems and corpus.name in registry.corpora:
                    problems = [f"corpus {corpus.name!r} is already provided by {registry.corpora[corpus.name].source}"]
                if problems:
                    registry.broken.append(BrokenPlugin(plugin_name, source, "; ".join(problems)))
                else:
                    registry.corpora[corpus.name] = Found(corpus, plugin_name, source)


def _discover() -> list[tuple[str, str, Any]]:
    """(plugin name, source, loader) for every entry point, built-ins first."""
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else ""
        source = "built-in" if dist == BUILTIN_DISTRIBUTION else f"{dist} {version}".strip()
        found.append((ep.name, source, ep.load))
    found.sort(key=lambda item: item[1] != "built-in")
    return found


@lru_cache(maxsize=None)
def load_registry(extra_paths: tuple[str, ...] = ()) -> Registry:
    """Load every plugin once per process (and per set of spec-listed paths) and collect their declarations."""
    registry = Registry()
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    candidates = _discover() + [(Path(p).stem, str(p), lambda p=p: _import_path(Path(p))) for p in extra_paths]
    for plugin_name, source, load in candidates:
        try:
            plugin = load()
            pm.register(plugin, name=f"{source}:{plugin_name}")
        except (Exception, SystemExit) as exc:  # an import that fails (or exits) must not stop the others
            registry.broken.append(BrokenPlugin(plugin_name, source, f"failed to load: {type(exc).__name__}: {shorten(str(exc))}"))
            continue
        _collect(registry, pm, plugin, plugin_name, source)
    return registry
