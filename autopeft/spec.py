"""The spec: one YAML file that says what to search, validated into typed objects before anything heavy loads.

Sections: ``model``, ``data``, ``search``, ``training``, ``output`` and an optional list of ``plugins``. Unknown
keys are errors (a typo must not be silently ignored). Paths in ``data`` and ``plugins`` are relative to the spec
file; ``output.dir`` is relative to the working directory, like ``--output_dir`` in Hugging Face scripts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from autopeft.errors import SpecError, SpecErrors

METRICS = {
    "sequence-classification": {"accuracy": "maximize", "macro_f1": "maximize", "eval_loss": "minimize"},
    "causal-lm": {"eval_loss": "minimize", "perplexity": "minimize"},
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSpec(_Section):
    id: str = Field(description="hub id (e.g. sentence-transformers/all-MiniLM-L6-v2) or a local folder")
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
    source: Union[str, dict[str, str]] = Field(
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
    preset: Optional[str] = Field(None, description="a search-space preset from search_spaces/ or a YAML file")
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
    baseline: bool = Field(True, description="run each variant's default configuration first")
    backend: Literal["optuna"] = "optuna"
    allocation: Optional[AllocationSpec] = Field(None, description="search a rank per module type/band/module instead of one rank")
    base_bits: list[Literal[4, 8, 16]] = Field(default_factory=lambda: [16], min_length=1, description="base-model weight bits to search (16 = not quantized)")

    @field_validator("constraints")
    @classmethod
    def _constraints(cls, value: list[str]) -> list[str]:
        for text in value:
            match = _CONSTRAINT.match(text)
            if not match:
                raise ValueError(f"{text!r} is not a constraint; write 'name <= number' or 'name >= number'")
            float(match.group(3).replace("_", ""))
        return value

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

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
        if seconds <= 0:
            raise ValueError("the timeout must be positive")
        return seconds


class TrainingSpec(_Section):
    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_every: Optional[int] = Field(None, ge=1, description="steps between evaluations (null: only at the end)")
    eval_batch_size: int = Field(64, ge=1)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    threads: Optional[int] = Field(None, ge=1, description="CPU threads torch uses (null: torch's default, one per core)")


class OutputSpec(_Section):
    dir: Optional[str] = Field(None, description="run folder; default runs/<spec file name>")


class Spec(_Section):
    version: Literal[1] = 1
    name: Optional[str] = None
    model: ModelSpec
    data: DataSpec
    search: SearchSpec = Field(default_factory=SearchSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    plugins: list[str] = Field(default_factory=list, description="plugin files or folders to load")

    # Set by load_spec; not part of the YAML.
    _path: Optional[Path] = None

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


def parse_spec(raw: Any, file: str = "<spec>") -> Spec:
    """Validate an already-parsed YAML document into a :class:`Spec` (schema only, no file-system checks)."""
    if not isinstance(raw, dict):
        raise SpecError(file, "(top level)", raw, "a spec is a mapping with keys model, data, search, training, output")
    try:
        return Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecErrors([_spec_error(file, raw, e) for e in exc.errors()]) from None


def load_spec(path: str | Path) -> Spec:
    """Read a spec file with ``yaml.safe_load`` and validate its schema. Raises :class:`SpecError(s)`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), "(file)", str(path), "the spec file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise SpecError(str(path), where, getattr(exc, "problem", str(exc)), "the file is not valid YAML") from None
    spec = parse_spec(raw, str(path))
    spec._path = path.resolve()
    return spec
