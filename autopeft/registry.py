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
from typing import Any

import pluggy

from autopeft import hookspecs
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


@dataclass
class Registry:
    """Everything the loaded plugins declare."""

    variants: dict[str, Found] = field(default_factory=dict)
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
    except Exception as exc:  # a plugin's bug must not stop the others
        registry.broken.append(BrokenPlugin(plugin, source, f"{hook}() raised {type(exc).__name__}: {exc}"))
        return []
    if result is None:
        return []
    if not isinstance(result, (list, tuple)):
        registry.broken.append(BrokenPlugin(plugin, source, f"{hook}() returned {type(result).__name__}, not a list"))
        return []
    return list(result)


def _variant_problems(variant: Any) -> list[str]:
    if not isinstance(variant, Variant):
        return [f"{variant!r} is not an autopeft.Variant"]
    if not variant.name or not isinstance(variant.name, str):
        return [f"{type(variant).__name__} has no name"]
    if variant.export_format not in ("native", "lora", "merged"):
        return [f"export_format {variant.export_format!r} is not one of native, lora, merged"]
    try:
        space = variant.search_space()
    except Exception as exc:
        return [f"search_space() raised {type(exc).__name__}: {exc}"]
    if not isinstance(space, dict) or not space:
        return ["search_space() must return a non-empty dict of parameters"]
    return check_space(space)


def _collect(registry: Registry, pm: pluggy.PluginManager, plugin: Any, plugin_name: str, source: str) -> None:
    hooks = pm.hook
    for impl in hooks.autopeft_variants.get_hookimpls():
        if impl.plugin is not plugin:
            continue
        for variant in _call(registry, "autopeft_variants", plugin_name, source, impl):
            problems = _variant_problems(variant)
            name = getattr(variant, "name", "?")
            if not problems and name in registry.variants:
                problems = [f"variant name {name!r} is already provided by {registry.variants[name].source}"]
            if problems:
                registry.broken.append(BrokenPlugin(plugin_name, source, f"variant {name!r}: " + "; ".join(problems)))
            else:
                registry.variants[name] = Found(variant, plugin_name, source)
    for impl in hooks.autopeft_model_sources.get_hookimpls():
        if impl.plugin is plugin:
            for model_source in _call(registry, "autopeft_model_sources", plugin_name, source, impl):
                if isinstance(model_source, ModelSource):
                    registry.model_sources.append(Found(model_source, plugin_name, source))
                else:
                    registry.broken.append(BrokenPlugin(plugin_name, source, f"{model_source!r} is not a ModelSource"))
    for impl in hooks.autopeft_corpora.get_hookimpls():
        if impl.plugin is plugin:
            for corpus in _call(registry, "autopeft_corpora", plugin_name, source, impl):
                if not isinstance(corpus, Corpus):
                    registry.broken.append(BrokenPlugin(plugin_name, source, f"{corpus!r} is not a Corpus"))
                elif corpus.name in registry.corpora:
                    registry.broken.append(
                        BrokenPlugin(plugin_name, source, f"corpus {corpus.name!r} is already provided by {registry.corpora[corpus.name].source}")
                    )
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
        except Exception as exc:
            registry.broken.append(BrokenPlugin(plugin_name, source, f"failed to load: {type(exc).__name__}: {exc}"))
            continue
        _collect(registry, pm, plugin, plugin_name, source)
    return registry
