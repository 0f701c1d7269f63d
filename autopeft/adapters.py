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


def trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters that receive gradients (adapter and task head)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
