"""The spec: one YAML file that says what to search, validated into typed objects before anything heavy loads.

Sections: ``model``, ``data``, ``search``, ``training``, ``output``, ``ray`` (for ``search.backend: ray``) and an
optional list of ``plugins``. Unknown keys are errors (a typo must not be silently ignored). Paths in ``data`` and
``plugins`` are relative to the spec file; ``output.dir`` is relative to the working directory, like
``--output_dir`` in Hugging Face scripts.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autopeft.errors import SpecError, SpecErrors, show

METRICS = {
    "sequence-classification": {"accuracy": "maximize", "macro_f1": "maximize", "eval_loss": "minimize"},
    "causal-lm": {"eval_loss": "minimize", "perplexity": "minimize"},
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")
_STEPS = re.compile(r"^\s*(\d+)\s*steps?\s*$")
_DURATION_WITH_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")


def parse_budget(value: Any) -> tuple[Optional[int], Optional[float]]:
    """``(steps, seconds)`` of a ``search.budget``: an integer or ``'N steps'`` is steps, ``'30m'`` is time."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if isinstance(value, str):
        if match := _STEPS.match(value):
            return int(match.group(1)), None
        if match := _DURATION_WITH_UNIT.match(value):
            return None, float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]
    raise ValueError("a budget is training steps ('4000 steps' or 4000) or a duration with s, m or h ('30m')")
NAME_MAX_BYTES = 255
"""Longest file or folder name most file systems accept (a longer one fails with 'File name too long')."""
PATH_MAX_BYTES = 4096


def _path_text(value: str) -> str:
    """Refuse text no file system can take as a path, so later checks never fail with an OSError on it."""
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL character")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a path must be valid Unicode text (it has an unpaired surrogate)") from None
    if len(encoded) > PATH_MAX_BYTES:
        raise ValueError(f"a path is at most {PATH_MAX_BYTES} bytes long; this one has {len(encoded)}")
    longest = max(value.split("/"), key=lambda part: len(part.encode("utf-8")))
    if len(longest.encode("utf-8")) > NAME_MAX_BYTES:
        raise ValueError(
            f"each file or folder name in a path is at most {NAME_MAX_BYTES} bytes (UTF-8); "
            f"one has {len(longest.encode('utf-8'))}"
        )
    return value


PathText = Annotated[str, AfterValidator(_path_text)]
"""A string used as a path (or a hub id, which may be a path too): one the file system can take."""


class _Section(BaseModel):
    # NaN and infinity pass every ``ge``/``le`` check one way or another and break the search later.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelSpec(_Section):
    id: PathText = Field(description="hub id (e.g. sentence-transformers/all-MiniLM-L6-v2) or a local folder")
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class SplitSpec(_Section):
    """Sizes of the splits made when the data has a single split: a count, or a fraction of the data."""

    train: Optional[Union[int, float]] = Field(None, gt=0, description="cap on training examples (null: the rest)")
    validation: Union[int, float] = Field(0.1, gt=0)
    test: Union[int, float] = Field(0.1, gt=0)
    seed: int = 0

    @field_validator("train", "validation", "test")
    @classmethod
    def _fraction_below_one(cls, value: Any) -> Any:
        if isinstance(value, float) and value >= 1:
            raise ValueError("a fraction must be below 1 (write a whole number for a count)")
        return value


class DataSpec(_Section):
    source: Union[PathText, dict[str, PathText]] = Field(
        description="a built-in corpus name, a csv/jsonl/parquet file, a `datasets` folder, or {split: file}"
    )
    format: Literal["auto", "csv", "jsonl", "json", "parquet", "datasets"] = "auto"
    text_column: Optional[str] = "text"
    label_column: Optional[str] = "label"
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    max_length: int = Field(128, ge=8, le=131072)
    splits: SplitSpec = Field(default_factory=SplitSpec)


class AllocationSpec(_Section):
    """Per-module ranks and placement searched by the outer loop (Bayesian-LoRA / DiffoRA style structure).

    ``granularity`` decides what gets its own rank: ``role`` (one rank per module type), ``role-band`` (per module
    type and band of consecutive layers) or ``module`` (every module). A rank of 0 puts no adapter there.
    """

    granularity: Literal["role", "role-band", "module"] = "role-band"
    bands: int = Field(2, ge=1, description="number of layer bands for role-band")
    roles: Optional[list[Literal["q", "k", "v", "o", "up", "down", "gate"]]] = Field(None, description="candidate module roles (default: every role the model has)")
    ranks: list[int] = Field(default_factory=lambda: [0, 4, 8, 16], min_length=1, description="rank choices per group; 0 = no adapter")
    bits: Optional[list[Literal[2, 3, 4, 8, 16]]] = Field(None, description="adapter weight bits per group (16 = not quantized)")

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, value: list[int]) -> list[int]:
        if any(r < 0 for r in value) or not any(r > 0 for r in value):
            raise ValueError("ranks are >= 0 and at least one must be above 0")
        return value


class ObjectiveSpec(_Section):
    name: str
    direction: Optional[Literal["maximize", "minimize"]] = Field(None, description="default: the metric's natural direction; costs minimize")


class SelectSpec(_Section):
    """How ``best/`` is chosen among the feasible trials (the Pareto front when there are several objectives)."""

    rule: Literal["best-metric", "smallest-within"] = "best-metric"
    tolerance: float = Field(0.01, ge=0, description="smallest-within: how far below the best metric a trial may be")


class PrunerSpec(_Section):
    """Early stopping of weak trials at each evaluation (``training.eval_every`` sets the rungs)."""

    type: Literal["none", "median", "successive-halving", "hyperband", "pareto"] = "none"
    startup_trials: int = Field(3, ge=0, description="trials that finish before any is pruned")
    warmup_steps: int = Field(0, ge=0, description="no trial is pruned before this step")


_CONSTRAINT = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE_]+)\s*$")


class SearchSpec(_Section):
    variants: list[str] = Field(default_factory=lambda: ["lora"], min_length=1)
    preset: Optional[PathText] = Field(None, description="a search-space preset from search_spaces/ or a YAML file")
    space: dict[str, Any] = Field(default_factory=dict, description="overrides: {param: value | [choices] | {low, high, ...}}")
    metric: Optional[str] = Field(None, description="what the search optimises; default accuracy or eval_loss by task")
    objectives: Optional[list[Union[str, ObjectiveSpec]]] = Field(None, min_length=1, description="several objectives give a Pareto front; the first is the metric")
    constraints: list[str] = Field(default_factory=list, description="e.g. 'trainable_params <= 200000'")
    select: SelectSpec = Field(default_factory=SelectSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    sampler: Literal["tpe", "random", "cmaes", "qmc", "nsgaii"] = "tpe"
    seed: int = 0
    n_trials: int = Field(20, ge=1)
    timeout: Optional[Union[float, str]] = Field(None, description="stop starting trials after this long: seconds, or '90s', '30m', '2h'")
    warm_start: Optional[PathText] = Field(
        None, description="an earlier run folder: a fresh search first tries its best configurations (same variants; values outside this space are sampled)"
    )
    budget: Optional[Union[int, str]] = Field(
        None,
        description="what the whole search may spend, instead of a trial count: training steps ('4000 steps') or time ('30m'); "
        "autopeft then tries as many configurations as fit and stops weak ones early (successive halving)",
    )
    baseline: Union[bool, list[str]] = Field(
        True, description="run each variant's default configuration first: true, false, or the variants to do it for"
    )
    backend: Literal["local", "ray"] = Field("local", description="where trials run: local (this process) or ray (a Ray cluster; see the ray section)")
    allocation: Optional[AllocationSpec] = Field(None, description="search a rank per module type/band/module instead of one rank")
    base_bits: list[Literal[4, 8, 16]] = Field(default_factory=lambda: [16], min_length=1, description="base-model weight bits to search (16 = not quantized)")

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, value: list[str]) -> list[str]:
        for text in value:
            match = _CONSTRAINT.match(text)
            if not match:
                raise ValueError(f"{show(text)} is not a constraint; write 'name <= number' or 'name >= number'")
            try:
                bound = float(match.group(3).replace("_", ""))
            except ValueError:
                raise ValueError(f"{show(match.group(3))} in {show(text)} is not a number") from None
            if not math.isfinite(bound):
                raise ValueError(f"the bound in {show(text)} is not a finite number")
        return value

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_alias(cls, value: Any) -> Any:
        # Specs written before the Ray backend existed name the local backend after its sampler library.
        return "local" if value == "optuna" else value

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Optional[Union[int, str]]:
        if value is None:
            return None
        steps, seconds = parse_budget(value)
        if steps is not None and steps < 1 or seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise ValueError("the budget must be a positive number of steps ('4000 steps') or a positive duration ('30m')")
        return value

    @property
    def budget_steps(self) -> Optional[int]:
        """Training steps the whole search may use (``budget: 4000 steps``), or None."""
        return None if self.budget is None else parse_budget(self.budget)[0]

    @property
    def budget_seconds(self) -> Optional[float]:
        """Seconds after which no trial starts (``budget: 30m``), or None."""
        return None if self.budget is None else parse_budget(self.budget)[1]

    @field_validator("timeout")
    @classmethod
    def _seconds(cls, value: Any) -> Optional[float]:
        if value is None:
            return None
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            match = _DURATION.match(value)
            if not match:
                raise ValueError("a duration is a number of seconds or a number with s, m or h (e.g. 30m)")
            seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
        if not math.isfinite(seconds):
            raise ValueError("the timeout must be a finite number of seconds")
        if seconds <= 0:
            raise ValueError("the timeout must be positive")
        return seconds


class TrainingSpec(_Section):
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_every: Optional[int] = Field(
        None, ge=1, description="steps between evaluations (null: only at the end); with successive halving, its first rung (then 4x, 16x, ...)"
    )
    eval_batch_size: int = Field(64, ge=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    threads: Optional[int] = Field(None, ge=1, description="CPU threads torch uses (null: torch's default, one per core)")


class ResourcesSpec(_Section):
    """What one trial reserves on a Ray node."""

    cpu: float = Field(1, gt=0, description="CPU cores per trial (torch uses this many threads unless training.threads is set)")
    gpu: float = Field(0, ge=0, description="GPUs per trial; a fraction (0.5) shares one GPU between trials")

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("more than one GPU per trial must be a whole number (Ray shares a GPU only in fractions of one)")
        return value


_RAY_ADDRESS = re.compile(r"^(auto|\[?[A-Za-z0-9.:_-]+\]?:\d{1,5})$")


class RaySpec(_Section):
    """The Ray cluster ``search.backend: ray`` runs trials on."""

    address: Optional[str] = Field(None, description="null: start Ray on this machine; 'auto' or 'HOST:PORT': join a running cluster")
    max_concurrent: int = Field(2, ge=1, description="trials running at once")
    resources_per_trial: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_failures: int = Field(1, ge=0, description="times a trial whose worker process or node died is run again before it is recorded failed")

    @field_validator("address")
    @classmethod
    def _address(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        if value.startswith("ray://"):
            # Ray Client runs Tune's loop on the head node, away from the study the search process owns.
            raise ValueError(
                "Ray Client addresses (ray://) are not supported: run `autopeft search` on a machine of the cluster "
                "with address 'auto' (or submit it with `ray job submit -- autopeft search SPEC`)"
            )
        if not _RAY_ADDRESS.match(value):
            raise ValueError("give 'auto' (the cluster this machine belongs to) or the head node's HOST:PORT (e.g. 10.0.0.5:6379)")
        return value


class OutputSpec(_Section):
    dir: Optional[PathText] = Field(None, description="run folder; default runs/<spec file name>")
    keep: Literal["best", "front", "all"] = Field(
        "best",
        description="adapters kept in RUN_DIR/adapters: best (the best so far, and the Pareto front with several "
        "objectives), front (the Pareto front of metric and trainable parameters), all (every complete trial: "
        "`autopeft export` of any trial then needs no retraining)",
    )


class Spec(_Section):
    version: Literal[1] = 1
    name: Optional[str] = None
    model: ModelSpec
    data: DataSpec
    search: SearchSpec = Field(default_factory=SearchSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    ray: RaySpec = Field(default_factory=RaySpec, description="the Ray cluster, for search.backend: ray")
    storage: Optional[str] = Field(
        None, description="a study shared by `autopeft worker` processes: a database URL (postgresql+psycopg2://user@host/db) or journal:PATH"
    )
    plugins: list[PathText] = Field(default_factory=list, description="plugin files or folders to load")

    # Set by load_spec; not part of the YAML.
    _path: Optional[Path] = None

    @model_validator(mode="after")
    def _spend_budget(self) -> Spec:
        """A search with a step budget screens configurations early unless the spec chose a pruner: successive
        halving with one objective, Pareto pruning with several (Optuna's pruners judge one objective only). Its
        first rung is a quarter of ``max_steps`` unless ``eval_every`` is set (see
        :func:`autopeft.pruning.evaluation_steps` for the others)."""
        if self.search.budget is None:
            return self
        if "pruner" not in self.search.model_fields_set:
            several = self.search.objectives is not None and len(self.search.objectives) > 1
            self.search.pruner = PrunerSpec(type="pareto" if several else "successive-halving")
        if self.training.eval_every is None and self.training.max_steps >= 4:
            self.training.eval_every = self.training.max_steps // 4
        return self

    @property
    def path(self) -> Optional[Path]:
        return self._path

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in ``data`` and ``plugins`` are resolved against."""
        return self._path.parent if self._path else Path.cwd()

    @property
    def run_dir(self) -> Path:
        if self.output.dir:
            return Path(self.output.dir)
        stem = self._path.stem if self._path else (self.name or "run")
        return Path("runs") / stem

    @property
    def metric(self) -> str:
        """The task metric the search optimises (the first objective)."""
        if self.search.objectives:
            first = self.search.objectives[0]
            return first if isinstance(first, str) else first.name
        return self.search.metric or ("accuracy" if self.model.task == "sequence-classification" else "eval_loss")

    @property
    def direction(self) -> str:
        return METRICS[self.model.task].get(self.metric, "minimize")

    def objectives(self) -> list[tuple[str, str]]:
        """``[(name, direction)]``: the metric first, then any cost objectives."""
        entries = self.search.objectives or [self.metric]
        out = []
        for entry in entries:
            name, direction = (entry, None) if isinstance(entry, str) else (entry.name, entry.direction)
            out.append((name, direction or METRICS[self.model.task].get(name, "minimize")))
        return out

    def constraints(self) -> list[tuple[str, str, float]]:
        """``[(name, "<=" or ">=", bound)]`` parsed from ``search.constraints``."""
        out = []
        for text in self.search.constraints:
            name, op, bound = _CONSTRAINT.match(text).groups()
            out.append((name, op, float(bound.replace("_", ""))))
        return out

    def plugin_paths(self) -> tuple[str, ...]:
        return tuple(str((self.base_dir / p).resolve()) for p in self.plugins)

    def resolve_path(self, path: str) -> Path:
        return (self.base_dir / path).expanduser()

    def to_yaml(self) -> str:
        """The resolved spec (defaults filled in), as written to ``RUN_DIR/spec.yaml``."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# Loading and error messages
# --------------------------------------------------------------------------------------------------------------


def _fields_at(loc: tuple[Any, ...]) -> list[str] | None:
    """Names of the keys allowed at the level of ``loc`` (for 'unknown key' messages)."""
    model: Any = Spec
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return list(model.model_fields)


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _spec_error(file: str, raw: dict, error: dict) -> SpecError:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p in ("int", "float", "str"))))
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _fields_at(loc)
        return SpecError(file, key, _lookup(raw, loc), "unknown key; allowed keys here: " + ", ".join(allowed or []))
    if kind == "missing":
        return SpecError(file, key, None, "this key is required")
    message = error["msg"]
    message = message[0].lower() + message[1:] if message else message
    message = message.removeprefix("value error, ")
    return SpecError(file, key, _lookup(raw, loc), message)


MAX_YAML_BYTES = 1_000_000
"""Largest spec (or preset) file read; a spec is a few kilobytes."""
MAX_YAML_NODES = 100_000
"""Most YAML nodes a document may expand to, counting every use of an alias: a small file of nested aliases
(a 'billion laughs' bomb) would otherwise expand to gigabytes when validated or printed."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of lists and mappings; a spec needs five levels."""

# YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and every user read it as a number.
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _TooLarge(yaml.YAMLError):
    """The document breaks one of the limits above: what it has, what is allowed, and where."""

    def __init__(self, value: str, allowed: str, mark: Any) -> None:
        super().__init__(f"{value}; {allowed}")
        self.value = value
        self.allowed = allowed
        self.mark = mark


class SpecLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and refuses documents that nest or expand too far.

    Every composed node records its expanded size (itself plus the expanded sizes of its children, an alias
    counting the full size of what it refers to), so an alias bomb is refused after composing a few nodes,
    before anything expands it.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise _TooLarge(f"*{event.anchor}", "an alias may not refer to a list or mapping that contains it", event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _TooLarge(f"{self._depth} levels", f"lists and mappings nest at most {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_YAML_NODES:
            raise _TooLarge(f"{size} values", f"a document expands to at most {MAX_YAML_NODES} values (an alias counts what it refers to, each time it is used)", node.start_mark)
        self._sizes[id(node)] = size
        return node


SpecLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def load_yaml(source: str | Path, file: str | None = None) -> Any:
    """Parse a spec, preset or saved spec: ``source`` is a file path (a :class:`Path`) or YAML text (a ``str``).

    Reads ``1e-3`` as a number, refuses files over :data:`MAX_YAML_BYTES`, documents that expand past
    :data:`MAX_YAML_NODES` or nest past :data:`MAX_YAML_DEPTH`, and raises :class:`SpecError` naming ``file``
    (default: the path) and the line for every problem, never a YAML or OS exception.
    """
    if isinstance(source, Path):
        file = file or str(source)
        try:
            with open(source, "rb") as handle:
                data = handle.read(MAX_YAML_BYTES + 1)
                size = max(len(data), os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            raise SpecError(file, "(file)", str(source), f"cannot be read ({exc.strerror or type(exc).__name__})") from None
        if len(data) > MAX_YAML_BYTES:
            raise SpecError(file, "(file)", f"{size} bytes", f"a spec file is at most {MAX_YAML_BYTES} bytes")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError(file, f"(byte {exc.start})", data[exc.start : exc.start + 4], "the file is not UTF-8 text") from None
    else:
        file = file or "<text>"
        text = source
        if len(text) > MAX_YAML_BYTES:
            raise SpecError(file, "(text)", f"{len(text)} characters", f"a spec is at most {MAX_YAML_BYTES} characters")
    try:
        return yaml.load(text, Loader=SpecLoader)  # noqa: S506 - SpecLoader is a SafeLoader
    except _TooLarge as exc:
        raise SpecError(file, _where(exc.mark), exc.value, exc.allowed) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError(file, _where(mark), getattr(exc, "problem", None) or str(exc), "the file is not valid YAML") from None


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"


def non_finite_numbers(raw: Any, loc: str = "") -> Iterator[tuple[str, float]]:
    """``(key path, value)`` of every NaN or infinite number anywhere in a parsed document."""
    if isinstance(raw, float) and not math.isfinite(raw):
        yield loc or "(top level)", raw
    elif isinstance(raw, dict):
        for key, value in raw.items():
            yield from non_finite_numbers(value, f"{loc}.{key}" if loc else str(key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            yield from non_finite_numbers(value, f"{loc}[{i}]")


def parse_spec(raw: Any, file: str = "<spec>") -> Spec:
    """Validate an already-parsed YAML document into a :class:`Spec` (schema only, no file-system checks)."""
    if not isinstance(raw, dict):
        raise SpecError(file, "(top level)", raw, "a spec is a mapping with keys model, data, search, training, output")
    non_finite = [SpecError(file, key, value, "numbers must be finite (no .nan or .inf)") for key, value in non_finite_numbers(raw)]
    if non_finite:
        raise SpecErrors(non_finite)
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecErrors(_merge_union_errors(file, [(e["type"], _spec_error(file, raw, e)) for e in exc.errors()])) from None


def _merge_union_errors(file: str, errors: list[tuple[str, SpecError]]) -> list[SpecError]:
    """One error per key: pydantic reports each branch of a union (``str`` or ``{split: file}``) separately.

    A branch whose type matched says what is wrong with the value, so it wins over branches of another type
    ("input should be a valid dictionary"); when no type matched, the message lists every type allowed.
    """
    by_key: dict[str, list[tuple[str, SpecError]]] = {}
    for kind, error in errors:
        by_key.setdefault(error.key, []).append((kind, error))
    merged = []
    for group in by_key.values():
        matched = [error for kind, error in group if not kind.endswith(("_type", "_parsing"))]
        if matched or len(group) == 1:
            merged += matched or [group[0][1]]
        else:
            first = group[0][1]
            merged.append(SpecError(file, first.key, first.value, " or ".join(error.allowed for _, error in group)))
    return merged


def load_spec(path: str | Path) -> Spec:
    """Read a spec file with :func:`load_yaml` and validate its schema. Raises :class:`SpecError(s)`."""
    path = Path(path)
    try:
        exists = path.is_file()
    except (OSError, ValueError):  # a path too long or malformed for the file system
        exists = False
    if not exists:
        raise SpecError(str(path), "(file)", str(path), "the spec file does not exist")
    spec = parse_spec(load_yaml(path), str(path))
    spec._path = path.resolve()
    return spec
