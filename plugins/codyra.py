"""CoDyRA: LoRA whose rank in every module is selected during training by sparse per-rank importance weights.

Paper: Lu et al., "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language
Models with Dynamic Rank-Selective LoRA", arXiv:2412.01004.

What it follows. Every adapted linear computes ``h = W x + s · B · diag(w) · A x`` with ``max_rank`` slots and
one importance weight ``w_i`` per slot (:mod:`autopeft.masked_lora`: the weights are the slots' gates). ``B``
starts at zero and ``A`` as PEFT's LoRA, and ``w`` is drawn uniformly from ``±10 κ`` (κ the full threshold
defined below), as in that implementation. The weights train together with ``A`` and ``B``, by the same optimizer.
After a dense warm-up of ``dense_fraction`` of the steps, every optimizer step is followed by the proximal step
of an L1 penalty on ``w``, a soft-threshold ``w ← sign(w)·max(|w| − κ_t, 0)`` that sets weights exactly to zero.
The threshold is ``κ_t = κ · ramp_t`` with ``κ = sparsity · η`` (``η`` the trial's peak learning rate) and
``ramp_t`` rising linearly from 0 after the warm-up to 1 at the last step, as a public CoDyRA implementation
raises its threshold to ``κ_max`` over the sparse epochs. A slot whose weight is 0 is closed. It can reopen when
the task gradient pushes it past the threshold again, so ranks stay dynamic. A module's rank is its number of non-zero weights. At the last step the open slots are kept with ``w`` folded
into ``B`` (:func:`autopeft.masked_lora.finalize`), so the last evaluation, the trial's costs and the export
all see one plain PEFT LoRA with a ``rank_pattern``. The conversion is exact, and modules left with no open
slot get no adapter.

How it differs from SoRA (``sora`` in ``plugins/allocators/sora.py``), which also soft-thresholds one gate per slot:

- SoRA's gates start from a standard normal draw and are trained by a separate Adam step outside autopeft's
  optimizer. CoDyRA's weights start small (``±10 κ``) and train in the same AdamW step as the factors, with
  its clipping and learning-rate schedule.
- SoRA's threshold rises in stages from the first step, sized from a target average rank, and a last exact step
  meets that budget. Then closed slots stay closed. CoDyRA has a dense warm-up without any threshold, then a
  linear ramp. There is no size target: the budget knob is the penalty ``sparsity`` (a larger value keeps
  fewer ranks), and closed slots may reopen until the last step.
- SoRA's threshold is sized from its budget. CoDyRA's is in units of the learning rate: an Adam step moves a
  weight by at most about ``η``, so ``sparsity`` is the share of such a step that each proximal step takes back.
  Its meaning is the same at any learning rate: a weight stays open only where the task gradient moves it
  consistently enough to outgrow the threshold.

Simplifies / leaves out: the continual-learning setting (a sequence of tasks, each task's adapter merged into
the base before the next) is left out: one task, one exported adapter. The L1 term acts only through the
proximal step; that implementation also adds it to the loss. ``κ_max`` is given relative to the learning
rate rather than as an absolute number. The scaling ``α/r`` is fixed at ``ALPHA_RATIO``, and there is no dropout.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from autopeft import AttachContext, FloatParam, IntParam, Variant, shared
from autopeft.space import FRACTION, POSITIVE

ALPHA_RATIO = 2.0
"""PEFT's scaling ``lora_alpha / r`` of every module (kept at export: the slot weights go into ``B``)."""
INIT_SPREAD = 10.0
"""Initial importance weights are uniform in ``±INIT_SPREAD · κ`` (κ the full threshold)."""
_STATE = "_autopeft_proximal_state"


def proximal_state(model) -> SimpleNamespace:
    """The per-trial state a :class:`ProximalRanks` variant keeps on the model object."""
    return model.__dict__[_STATE]


class ProximalRanks(Variant):
    """Shared plumbing of variants whose per-slot weights are made sparse by a proximal L1 step after each optimizer
    step. The variants are built on :mod:`autopeft.masked_lora`, with the weights as the slots' trainable gates,
    and are exported as plain LoRA with a rank per module.

    A subclass's :meth:`attach` builds the slot-gated model and calls :meth:`start`. :meth:`strength` gives, per
    step, the threshold in units of the trial's learning rate. The last step finalizes the model into plain PEFT
    LoRA (the open slots, weights folded into ``B``).
    """

    export_format = "lora"
    size_decided_in_training = True

    def start(self, model, params: dict[str, Any], **state: Any) -> SimpleNamespace:
        """Record the per-trial state on the model (the variant instance itself serves any number of trials)."""
        model.__dict__[_STATE] = SimpleNamespace(final=False, learning_rate=params["learning_rate"], **state)
        return model.__dict__[_STATE]

    def strength(self, state: SimpleNamespace, step: int, context: AttachContext) -> float:
        """The soft-threshold after optimizer step ``step``, as a fraction of the learning rate (0: none)."""
        raise NotImplementedError

    def on_step(self, model, step: int, context: AttachContext) -> None:
        from autopeft import masked_lora

        state = proximal_state(model)
        if state.final:
            return
        strength = self.strength(state, step, context)
        if strength > 0:
            # The peak learning rate, not the scheduled one: as the schedule decays, Adam's steps shrink while the
            # threshold stays, so only weights that grew large against it remain (a fixed κ_max, as in CoDyRA).
            masked_lora.soft_threshold((gate.gate for gate in masked_lora.gates(model).values()), strength * state.learning_rate)
        if step >= context.total_steps:
            self.finalize(model)

    def finalize(self, model) -> dict[str, int]:
        """Turn the model, once, into plain PEFT LoRA of the open slots; return ``{module: rank}``."""
        from autopeft import masked_lora

        state = proximal_state(model)
        if not state.final:
            masked_lora.finalize(model)
            state.final = True
        return masked_lora.final_ranks(model)

    def export(self, model, out_dir: Path) -> None:
        from autopeft import masked_lora

        self.finalize(model)
        masked_lora.save(model, out_dir)


class CoDyRA(ProximalRanks):
    """Per-rank importance weights, sparsified by a soft-threshold that ramps up after a dense warm-up."""

    name = "codyra"
    summary = (
        "per-rank importance weights made sparse by a proximal soft-threshold after a dense warm-up; ranks chosen "
        "per module in training (exported as LoRA with a rank per module)"
    )
    paper = (
        "Lu et al., Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning Vision-Language "
        "Models with Dynamic Rank-Selective LoRA, arXiv:2412.01004"
    )

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "max_rank": IntParam(4, 32, default=16, log=True, help="slots per module (the highest rank a module can keep)"),
            "sparsity": FloatParam(
                0.01, 0.5, default=0.1, log=True, legal=POSITIVE,
                help="full soft-threshold per step, in learning rates (the budget: larger keeps fewer ranks)",
            ),
            "dense_fraction": FloatParam(0.0, 0.8, default=0.5, legal=FRACTION, help="fraction of the steps trained before any threshold"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        from autopeft import masked_lora

        model = masked_lora.attach(
            model, context, params["max_rank"], ALPHA_RATIO,
            gate_factory=lambda linear: masked_lora.SlotGate(linear, trainable_gate=True),
        )
        spread = INIT_SPREAD * params["sparsity"] * params["learning_rate"]
        with torch.no_grad():
            for gate in masked_lora.gates(model).values():
                gate.gate.uniform_(-spread, spread)
        dense = round(params["dense_fraction"] * context.total_steps)
        self.start(model, params, sparsity=params["sparsity"], dense=dense)
        return model

    def strength(self, state: SimpleNamespace, step: int, context: AttachContext) -> float:
        if step <= state.dense:
            return 0.0
        return state.sparsity * (step - state.dense) / max(1, context.total_steps - state.dense)


VARIANTS = [CoDyRA]
