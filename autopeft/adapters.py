"""Helpers shared by variants and the trial runner for PEFT models: removing an adapter and counting its size."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def detach_peft_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``get_peft_model``: return the base model with its original modules, weights untouched.

    ``PeftModel.unload()`` alone would leave the *trained copy* of task heads (``modules_to_save``) in the base
    model; the original head is put back first so the next trial starts from the same base.
    """
    from peft import PeftModel
    from peft.utils import ModulesToSaveWrapper

    if not isinstance(model, PeftModel):
        return model
    inner = model.base_model.model
    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child = name.rpartition(".")
            parent = inner.get_submodule(parent_name) if parent_name else inner
            setattr(parent, child, module.original_module)
    base = model.unload()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    return base


def strip_tuner_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Put back every original module a failed ``get_peft_model`` may have left wrapped inside ``model``.

    PEFT replaces modules one by one; when attaching fails half-way the base model holds a mix. This undoes it
    without needing the ``PeftModel`` that never came to be.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)) and name:
            original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module.get_base_layer()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, original)
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients (adapter and task head)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank_kwargs(ranks: dict[str, int], alpha_ratio: float) -> dict:
    """``LoraConfig`` arguments for a rank per module (full module names; rank 0 means no adapter there).

    The most common rank becomes ``r`` and the others go to ``rank_pattern`` / ``alpha_pattern`` under
    regex-escaped full names, so a key can only match the module it names (PEFT matches ``(.*\\.)?(key)$`` and
    silently ignores keys that match nothing: :func:`verify_ranks` checks the result).
    """
    import re
    from collections import Counter

    active = {name: rank for name, rank in ranks.items() if rank > 0}
    if not active:
        raise ValueError("every module has rank 0: there is nothing to train")
    common = Counter(active.values()).most_common(1)[0][0]
    return {
        "target_modules": sorted(active),
        "r": common,
        "lora_alpha": alpha_ratio * common,
        "rank_pattern": {re.escape(name): rank for name, rank in sorted(active.items()) if rank != common},
        "alpha_pattern": {re.escape(name): alpha_ratio * rank for name, rank in sorted(active.items()) if rank != common},
    }


def adapter_ranks(model: torch.nn.Module) -> dict[str, int]:
    """The rank of every LoRA-style layer of a PEFT model, by module name in the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    ranks = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and isinstance(getattr(module, "r", None), dict) and module.r:
            ranks[name.removeprefix(prefix)] = int(next(iter(module.r.values())))
    return ranks


def verify_ranks(model: torch.nn.Module, ranks: dict[str, int]) -> None:
    """Raise ``ValueError`` unless the PEFT model has exactly the intended rank on exactly the intended modules."""
    wanted = {name: rank for name, rank in ranks.items() if rank > 0}
    actual = adapter_ranks(model)
    if actual != wanted:
        wrong = sorted(set(wanted.items()) ^ set(actual.items()))[:6]
        raise ValueError(f"the adapter's ranks differ from the ones intended (first differences, name and rank: {wrong})")
