"""Every tuner method the installed PEFT ships, as a searchable variant named ``peft:<method>``.

The methods are discovered from ``peft.PEFT_TYPE_TO_CONFIG_MAPPING`` when the plugins load, so a PEFT release
that adds a method adds a variant with no change here. Each variant's search space is derived from its config
dataclass's fields (:func:`dataclasses.fields`): the fields :data:`FIELD_RULES` knows (ranks, alphas, dropouts,
initialisations) get a searched range around PEFT's default; every other plain field is a fixed parameter at
PEFT's default that a spec may override (``space: {peft:hra.apply_GS: true}``); seed fields take the trial's
seed. ``learning_rate`` and ``target_modules`` are the shared parameters.

A method autopeft cannot offer (prompt learning, a config that needs arguments autopeft cannot derive, layers
the transformer blocks do not have) is declared :class:`~autopeft.registry.Unavailable` with the reason:
``autopeft plugins`` lists it apart and ``autopeft validate`` refuses a spec that asks for it.

Reading the config classes means importing PEFT and torch (seconds); what the bridge reads of them is plain data,
kept per PEFT version in autopeft's cache (:func:`cache_file`), so plugin loading stays fast and PEFT is imported
only when a trial builds a config.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import typing
import warnings
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable, Optional

from autopeft import CategoricalParam, FloatParam, IntParam, Variant, hookimpl, shared
from autopeft.errors import TrialFailed
from autopeft.registry import Unavailable
from autopeft.space import PROBABILITY, RANK, SHARED_PARAMS, Param
from autopeft_plugins.peft_variants import PeftVariant

PREFIX = "peft:"
INIT_FIELDS = ("init_weights", "init_lora_weights")
# Initialisations that read calibration data or rewrite the base weights: `lora-init` runs them with the care they
# need (calibration passes, base weights restored, export converted); offered bare they would change the base.
DATA_OR_BASE_INITS = frozenset({"eva", "olora", "pissa", "corda", "loftq", "lora_ga", "mica"})
SEED_FIELDS = ("projection_prng_key", "random_loc_seed", "random_seed", "projection_seed", "proj_seed", "generator_seed")
# Fields that are not searched and not offered for override: they decide what is trained beyond the adapter
# (biases), how the weights are stored or saved, or where the adapter goes (autopeft's placement decides that).
HIDDEN_FIELDS = (
    "target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern", "*_pattern",
    "bias", "*_bias", "fan_in_fan_out", "megatron_*", "save_*", "progressbar", "runtime_*", "target_parameters",
    "ensure_weight_tying", "use_qalora", "qalora_group_size", "use_effective_conv2d", "inference_mode",
)
# Methods nothing in their config class shows autopeft cannot offer, by PEFT type name in lower case.
KNOWN_UNAVAILABLE = {
    # the layers they tune are not the transformer blocks' linear layers
    "ln_tuning": "tunes LayerNorm modules, not the linear layers autopeft places adapters on",
    "trainable_tokens": "trains rows of the embedding matrix for given token ids, not linear layers",
    # inputs autopeft's training does not give the model
    "poly": "it routes each example by a task id passed to forward, which a single-task search does not have",
    # a hand-written variant runs it: its config needs what only a trial knows
    "adalora": "its rank schedule is counted in a trial's steps: use the adalora variant",
}
# Methods whose PEFT implementation fails on BERT- and Llama-style models, up to the PEFT version checked: a later
# release is offered again (and the bridge's conformance test says whether it works).
BROKEN_UP_TO = {
    "shadow": ("0.21.2", "PEFT's implementation fails in forward on BERT and Llama models ('ShadowCarrier' object has no attribute 'view')"),
}


def _feedforward_modules(model, context) -> list[str]:
    """IA³ scales the input of the second feed-forward layer and the output of the others: the targets whose
    placement role is ``down``."""
    from autopeft.placement import adapter_sites

    roles = {site.name: site.role for site in adapter_sites(model)}
    return [name for name in context.target_modules if roles.get(name) == "down"]


# Fields whose value follows from the model and autopeft's placement, not from the search.
DERIVED_FIELDS: dict[str, Callable[[Any, Any], Any]] = {"feedforward_modules": _feedforward_modules}

# Sizes PEFT requires to divide every target layer's input (and output) width, by field name: which widths. The
# search samples them without knowing the model; the trial rounds the sampled value down to the largest size that
# fits (PEFT's own advice for C3A: the greatest common divisor of the widths), so a model whose widths are not
# powers of two (MiniLM's 384) is searched rather than failing every trial.
DIVISOR_FIELDS: dict[str, tuple[str, ...]] = {
    "block_size": ("in_features", "out_features"),  # C3A
    "boft_block_size": ("in_features",),  # BOFT
    "vector_length": ("in_features", "out_features"),  # VB-LoRA: sub-vectors tile every weight exactly
    "gralora_k": ("in_features", "out_features"),  # GraLoRA: k x k sub-blocks of every weight
}

MULTIPLE_FIELDS: dict[str, str] = {
    "r": "gralora_k",  # GraLoRA: the rank is split evenly among the k sub-blocks
}
"""Fields PEFT requires to be a multiple of another field of the same config, when the config has that field
(``{field: the field it must be a multiple of}``). A trial rounds the sampled value down to a multiple (at least one)."""


def largest_divisor_at_most(number: int, limit: int) -> int:
    """The largest divisor of ``number`` that is at most ``limit`` (1 when ``limit`` is below 1)."""
    return max((d for d in range(1, min(number, max(limit, 1)) + 1) if number % d == 0), default=1)


def fit_divisor_fields(model, target_modules: list[str], fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with each :data:`DIVISOR_FIELDS` value rounded down to a size that divides every target layer's
    widths it must divide, then each :data:`MULTIPLE_FIELDS` value rounded down to a multiple of its unit; the other
    fields as they are."""
    fitted = dict(fields)
    layers = [model.get_submodule(target) for target in target_modules]
    for name, widths in DIVISOR_FIELDS.items():
        if _count_value(fitted.get(name)) and layers:
            common = math.gcd(*(int(getattr(layer, width)) for layer in layers for width in widths))
            fitted[name] = largest_divisor_at_most(common, fitted[name])
    for name, unit in MULTIPLE_FIELDS.items():
        if _count_value(fitted.get(name)) and _count_value(fitted.get(unit)) and fitted[unit] >= 1:
            fitted[name] = max(fitted[unit], fitted[name] - fitted[name] % fitted[unit])
    return fitted


def _count_value(value: Any) -> bool:
    """An integer that is not a bool (PEFT's booleans are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(default: Any, literals: list) -> Optional[Param]:
    """Ranks and other counts: a log-scale range from a quarter to four times PEFT's default."""
    if not _count_value(default) or default < 1:
        return None  # 0 or None mean "derive it from another field" in PEFT
    return IntParam(max(1, default // 4), default * 4, default=default, log=True, legal=RANK, help="searched around PEFT's default")


def _scale(default: Any, literals: list) -> Optional[Param]:
    """Alphas and scalings: half, the same or twice PEFT's default."""
    if not _number(default) or default <= 0:
        return None
    kind = int if isinstance(default, int) and default % 2 == 0 else float
    return CategoricalParam(tuple(kind(default * f) for f in (0.5, 1, 2)), default=default, help="scale of the update")


def _dropout(default: Any, literals: list) -> Optional[Param]:
    if not _number(default) or not 0 <= default < 1:
        return None
    return FloatParam(0.0, max(0.2, float(default)), default=float(default), legal=PROBABILITY, help="dropout probability")


def _init(default: Any, literals: list) -> Optional[Param]:
    """PEFT's default and the named initialisations its type annotation lists (Literal or enum values)."""
    named = [v for v in literals if isinstance(v, str) and "[" not in v and v not in DATA_OR_BASE_INITS]
    choices = tuple(dict.fromkeys([default, *named]))
    if len(choices) < 2 or not all(_plain(c) for c in choices):
        return None
    return CategoricalParam(choices, default=default, help="initialisation of the adapter weights")


# The one table of fields searched: (field name patterns, rule). The first matching rule that yields a parameter wins.
FIELD_RULES: tuple[tuple[tuple[str, ...], Callable[[Any, list], Optional[Param]]], ...] = (
    (("r", "rank", "n_frequency", "block_size", "boft_block_size", "oft_block_size", "num_vectors"), _count),
    (("alpha", "*_alpha", "scaling"), _scale),
    (("dropout", "*_dropout"), _dropout),
    (INIT_FIELDS, _init),
)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, str)) or (_number(value) and value == value)


def _literal_values(annotation: Any) -> list[Any]:
    """Every Literal value and enum member value inside a (possibly nested Optional/Union) type annotation."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [member.value for member in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [value for arg in typing.get_args(annotation) for value in _literal_values(arg)]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _annotations(config_class: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_class)
    except Exception:  # an annotation naming something the module does not import: fall back to the raw ones
        return {f.name: f.type for f in dataclasses.fields(config_class)}


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default.value if isinstance(field.default, enum.Enum) else field.default
    return dataclasses.MISSING  # a factory (a dict or a sub-config): not a scalar autopeft can offer


def describe_fields(config_class: type) -> list[dict[str, Any]]:
    """``[{name, default, literals}]`` for the config's own fields whose default is a plain value (JSON-ready)."""
    from peft.config import PeftConfig

    base_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    hints = _annotations(config_class)
    described = []
    for field in dataclasses.fields(config_class):
        default = _field_default(field)
        if field.name in base_fields or default is dataclasses.MISSING or not _plain(default):
            continue
        literals = [v for v in _literal_values(hints.get(field.name)) if _plain(v)]
        described.append({"name": field.name, "default": default, "literals": literals})
    return described


def derive_space(fields: list[dict[str, Any]]) -> dict[str, Param]:
    """The search space of a config described by :func:`describe_fields`: the shared parameters, then one
    parameter per plain field, searched by :data:`FIELD_RULES` or fixed at PEFT's default."""
    space: dict[str, Param] = {"learning_rate": shared("learning_rate"), "target_modules": shared("target_modules")}
    names = {field["name"] for field in fields}
    for field in fields:
        name, default = field["name"], field["default"]
        if name in SHARED_PARAMS or name in SEED_FIELDS or name in DERIVED_FIELDS or _matches(name, HIDDEN_FIELDS):
            continue
        if default is None:
            continue  # None means "derived by PEFT from other fields"
        searched = next((p for patterns, rule in FIELD_RULES if _matches(name, patterns) and (p := rule(default, field["literals"])) is not None), None)
        if searched is not None and name in DIVISOR_FIELDS:
            searched = dataclasses.replace(searched, help=f"{searched.help}; a trial rounds it down to divide the target layers' widths")
        if searched is not None and MULTIPLE_FIELDS.get(name) in names:
            searched = dataclasses.replace(searched, help=f"{searched.help}; a trial rounds it down to a multiple of {MULTIPLE_FIELDS[name]}")
        space[name] = searched or CategoricalParam((default,), default=default, help=f"PEFT's default; set it with space: {{<variant>.{name}: value}}")
    return space


def peft_config(method: str | type, model, context, **fields: Any):
    """PEFT's config for ``method`` (a ``PeftType`` name such as ``"VERA"``, or a config class) at autopeft's
    placement: the task type, the target modules, the trial's seed in every seed field and the fields derived from
    the placement, then ``fields``."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftType

    config_class = method if isinstance(method, type) else PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[method]]
    names = {f.name for f in dataclasses.fields(config_class)}
    automatic = {name: context.seed for name in SEED_FIELDS if name in names}
    automatic |= {name: derive(model, context) for name, derive in DERIVED_FIELDS.items() if name in names}
    return config_class(task_type=context.peft_task_type, target_modules=context.target_modules, **(automatic | fields))


class BridgedVariant(PeftVariant):
    """One PEFT tuner, its config built from the sampled fields, the trial's seed and autopeft's placement."""

    summary = ""
    paper = ""

    def __init__(self, description: dict[str, Any]) -> None:
        self.name = PREFIX + description["type"].lower()
        self.peft_type = description["type"]
        self.summary = f"PEFT's {description['config']}" + (f": {description['doc']}" if description["doc"] else "")
        self._space = derive_space(description["fields"])

    def search_space(self) -> dict[str, Param]:
        return dict(self._space)

    def build_config(self, model, params, context):
        """The config of the sampled fields, with the sizes PEFT requires to divide the layers' widths (or to be a
        multiple of another field) fitted to them (:func:`fit_divisor_fields`; the export's ``adapter_config.json``
        holds the size trained)."""
        fields = {k: v for k, v in params.items() if k not in SHARED_PARAMS}
        return peft_config(self.peft_type, model, context, **fit_divisor_fields(model, context.target_modules, fields))

    def attach(self, model, params, context):
        """PEFT checks shapes and field combinations as it builds the config and wraps the layers: what it rejects
        (a block size that does not divide a layer, a rank above a layer's width) fails the trial with PEFT's reason."""
        try:
            return super().attach(model, params, context)
        except (ValueError, TypeError) as exc:
            raise TrialFailed(f"{self.name}: PEFT rejects this configuration for this model: {exc}") from exc


def _unavailable_reason(method: str, config_class: type) -> Optional[str]:
    """Why autopeft cannot offer this method, or None when it can."""
    if method in KNOWN_UNAVAILABLE:
        return KNOWN_UNAVAILABLE[method]
    if method in BROKEN_UP_TO:
        from importlib.metadata import version

        from packaging.version import Version

        checked, reason = BROKEN_UP_TO[method]
        if Version(version("peft")) <= Version(checked):
            return f"{reason} (PEFT {version('peft')})"
    from peft.config import PromptLearningConfig

    if issubclass(config_class, PromptLearningConfig):
        return "prompt learning: it trains virtual tokens fed to the model, not adapters on linear layers"
    if "target_modules" not in {f.name for f in dataclasses.fields(config_class)}:
        return "its config takes no target_modules: it does not put adapters on the linear layers autopeft places"
    try:
        with warnings.catch_warnings():  # a probe: PEFT's warnings about its defaults are not the user's concern
            warnings.simplefilter("ignore")
            config = config_class(task_type="SEQ_CLS", target_modules=["query"])
    except Exception as exc:
        return f"its config needs arguments autopeft cannot derive ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    if getattr(config, "is_adaption_prompt", False):
        return "adaption prompt: it trains prompts inside Llama-style attention, not adapters on linear layers"
    return None


def describe(peft_type: str, config_class: type) -> dict[str, Any]:
    """What the bridge needs of one PEFT method, as JSON-ready data: its ``PeftType`` name, config class name, first
    doc line, why it is unavailable (or None) and its plain fields."""
    reason = _unavailable_reason(peft_type.lower(), config_class)
    doc = (config_class.__doc__ or "").strip().splitlines()
    description = {"type": peft_type, "config": config_class.__name__, "doc": doc[0].strip() if doc else "", "reason": reason, "fields": []}
    if reason is None:
        try:
            description["fields"] = describe_fields(config_class)
        except Exception as exc:  # a config class autopeft cannot read must not hide the others
            description["reason"] = f"its config fields could not be read ({type(exc).__name__}: {exc})"
    return description


def describe_installed() -> list[dict[str, Any]]:
    """:func:`describe` for every config class in the installed PEFT's ``PEFT_TYPE_TO_CONFIG_MAPPING``."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    return [describe(str(getattr(t, "value", t)), config_class) for t, config_class in PEFT_TYPE_TO_CONFIG_MAPPING.items()]


def cache_file() -> Path:
    """Where the installed PEFT's description is kept. Importing PEFT (and torch) takes seconds, and every
    ``autopeft validate`` and ``autopeft plugins`` loads the plugins: the name changes with PEFT's version, with
    this module and with the installed packages (an optional dependency decides whether a method is available)."""
    from importlib.metadata import distributions, version

    from autopeft_plugins.packaged_models import cache_root

    installed = sorted({(d.metadata["Name"] or "", d.version) for d in distributions()})  # a set: the same one found twice on sys.path
    key = hashlib.sha256(repr((Path(__file__).read_bytes(), installed)).encode()).hexdigest()[:16]
    return cache_root() / "peft-bridge" / f"peft-{version('peft')}-{key}.json"


def installed_methods() -> list[dict[str, Any]]:
    """:func:`describe_installed`, read from :func:`cache_file` when it is there, else computed and saved."""
    path = cache_file()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    methods = describe_installed()
    try:
        from autopeft.rundir import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(methods))  # whole or absent: a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only cache only costs the next process the PEFT import again
    return methods


def bridged(methods: Optional[list[dict[str, Any]]] = None) -> list[Variant | Unavailable]:
    """A ``peft:<method>`` declaration for every described PEFT method (default: the installed ones), available or not."""
    declared: list[Variant | Unavailable] = []
    for description in installed_methods() if methods is None else methods:
        name, reason = PREFIX + description["type"].lower(), description["reason"]
        if reason is None:
            try:
                declared.append(BridgedVariant(description))
                continue
            except Exception as exc:  # fields autopeft cannot turn into a space must not hide the others
                reason = f"its config fields could not be turned into a search space ({type(exc).__name__}: {exc})"
        declared.append(Unavailable(name, reason))
    return declared


@hookimpl
def autopeft_variants() -> list[Variant | Unavailable]:
    return bridged()
