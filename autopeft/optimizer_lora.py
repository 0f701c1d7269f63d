"""The base of variants that keep PEFT's LoRA layers and change how its factors are updated (ALLoRA, AltLoRA,
LoRA-GGPO): a plain PEFT LoRA of rank ``r``, exported as it is, trained by an optimizer of the method's own.

A subclass declares the parameters of its update rule (:meth:`OptimizerLoRA.rule_space`) and builds the optimizer
from them (:meth:`OptimizerLoRA.update_rule`); the rank, the shared parameters, attaching (with the per-module
ranks of ``search.allocation``) and handing the trial's settings to the optimizer are done here. This module does
not import torch: plugins load it at start-up, and the optimizers in :mod:`autopeft.optim` are imported when a
trial builds one.
"""

from __future__ import annotations

from typing import Any

from autopeft.hookspecs import AttachContext, Variant
from autopeft.space import RANK, IntParam, Param, shared


class OptimizerLoRA(Variant):
    """A PEFT LoRA of rank ``r`` with ``lora_alpha = alpha_ratio · r`` and no dropout, trained by :meth:`update_rule`."""

    export_format = "lora"
    supports_module_ranks = True
    alpha_ratio: float = 1.0
    """``lora_alpha / r`` of the attached LoRA (1: the update is ``B·A``, as methods that drop the α/r scale use)."""

    def rule_space(self) -> dict[str, Param]:
        """The searchable parameters of the update rule, by name; their sampled values reach :meth:`update_rule`."""
        return {}

    def update_rule(self, factors: list, trainable: list, learning_rate: float, weight_decay: float, rule: dict[str, Any], context: AttachContext):
        """Return the trial's ``torch.optim.Optimizer``: ``factors`` are the LoRA layers' factors
        (:func:`autopeft.optim.lora_factors`), ``trainable`` every parameter to train (the task head too), ``rule``
        the sampled values of :meth:`rule_space`."""
        raise NotImplementedError

    def search_space(self) -> dict[str, Param]:
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=8, log=True, legal=RANK, help="rank of the update"),
            **self.rule_space(),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from autopeft.optim import attach_lora

        rule = {name: params[name] for name in self.rule_space()}
        return attach_lora(model, context, params["r"], alpha_ratio=self.alpha_ratio, dropout=0.0, **rule)

    def optimizer(self, model, trainable, learning_rate, weight_decay, context):
        from autopeft.optim import lora_factors, optimizer_options

        return self.update_rule(lora_factors(model), trainable, learning_rate, weight_decay, optimizer_options(model), context)
