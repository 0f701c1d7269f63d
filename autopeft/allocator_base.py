"""The shared base of the in-training rank allocators: the common search space, per-trial state, the end of training.

An allocator attaches an :mod:`autopeft.masked_lora` model (a PEFT LoRA model with ``r_max`` slots per module
and a gate per slot between ``A`` and ``B``) and moves the gates while the adapter trains (:meth:`Allocator.allocate`
after every optimizer step). At the last step it completes any pending allocation (:meth:`Allocator.settle`) and
the model becomes, in place, a standard PEFT LoRA model whose ``rank_pattern`` / ``alpha_pattern``
(regex-escaped full module names) give each module the rank it ended with; modules that ended with rank 0 are
left out. Schedules are fractions of ``context.total_steps`` and every knob of an allocator is part of the
searched space.

Per-trial state (step counters, score averages, optimizers of the gates) lives on the model object
(:func:`set_allocator_state`, :func:`allocator_state`), so a variant instance can serve any number of trials.
The first-party allocators are in ``plugins/allocators/``, one module per method.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from autopeft.hookspecs import AttachContext, Variant
from autopeft.space import PROBABILITY, CategoricalParam, FloatParam, shared

_STATE = "_autopeft_allocator_state"


def allocator_state(model) -> SimpleNamespace:
    """The allocator's per-trial state stored on ``model`` by :func:`set_allocator_state`."""
    return model.__dict__[_STATE]


def set_allocator_state(model, **values: Any) -> SimpleNamespace:
    """Store a fresh per-trial state on ``model`` (``final=False`` plus ``values``) and return it."""
    model.__dict__[_STATE] = SimpleNamespace(final=False, **values)
    return model.__dict__[_STATE]


class Allocator(Variant):
    """The base of the in-training allocators: the common space, and the end of training.

    ``on_step`` runs the allocator's :meth:`allocate` and, at the last step, :meth:`finalize`: the pending
    allocation is completed (:meth:`settle`) and the model becomes, in place, a plain PEFT LoRA model with the
    final per-module ranks (:func:`autopeft.masked_lora.finalize`), so the last evaluation, the cost measures
    and the export all see exactly the adapter that is saved.
    """

    export_format = "lora"
    supports_quantized_base = True  # masked_lora is PEFT's LoRA, which has HQQ layers

    def _space(self, **own) -> dict:
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            **own,
            "alpha_ratio": CategoricalParam((0.5, 1.0, 2.0, 4.0), default=2.0, help="LoRA scaling (lora_alpha / r) of every module"),
            "dropout": FloatParam(0.0, 0.2, default=0.05, legal=PROBABILITY, help="dropout on the adapter's input"),
        }

    def on_step(self, model, step: int, context: AttachContext) -> None:
        """Run :meth:`allocate`, and :meth:`finalize` at the last step (nothing once finalized)."""
        if allocator_state(model).final:
            return
        self.allocate(model, step, context)
        if step >= context.total_steps:
            self.finalize(model)

    def allocate(self, model, step: int, context: AttachContext) -> None:
        """The allocator's work after optimizer step ``step``."""

    def settle(self, model) -> None:
        """Complete any allocation still pending before the model is finalized."""

    def finalize(self, model) -> dict[str, int]:
        """Settle and turn the model into plain PEFT LoRA (once); return ``{module name: final rank}``."""
        from autopeft import masked_lora

        state = allocator_state(model)
        if not state.final:
            self.settle(model)
            masked_lora.finalize(model)
            state.final = True
        return masked_lora.final_ranks(model)

    def export(self, model, out_dir) -> None:
        """Finalize (unless done) and save the standard PEFT LoRA folder."""
        from autopeft import masked_lora

        self.finalize(model)
        masked_lora.save(model, out_dir)
