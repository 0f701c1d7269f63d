"""IncreLoRA: every module starts at a small rank and grows, by importance, up to an average ``target_rank``.

Paper: Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
arXiv:2308.12043.

What it follows. Growing is unmasking slots of an :mod:`autopeft.masked_lora` model, given at fixed intervals to
the modules with the highest score ``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel``, smoothed like AdaLoRA's
(:class:`autopeft.masked_lora.DeltaSensitivity`); the paper's "advance learning" trains the next slots in
reserve behind a 1e-5 gate, and each module's update is scaled by ``α / r_k``.

Simplifies / leaves out: each module has at most ``⌈max_rank_ratio · target_rank⌉`` slots (the paper has no
cap), and AdaLoRA's orthogonality penalty on the factors is left out.
"""

from __future__ import annotations

import math
from typing import Any

from autopeft import AttachContext, CategoricalParam, FloatParam, IntParam
from autopeft.allocator_base import Allocator, allocator_state, set_allocator_state


class IncreLoRA(Allocator):
    """Start every module at ``init_r`` ranks and grow them by importance up to an average ``target_rank``.

    After a warm-up (``warmup_fraction`` of the steps), every ``interval`` steps the ``top_fraction`` of modules
    with the highest score gain ``rank_step`` slots, until the average rank reaches ``target_rank`` (or
    ``growth_end_fraction`` of the steps have passed). The score of a module is ``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel``,
    smoothed like AdaLoRA's (EMA of sensitivity times EMA of its uncertainty, both with ``beta``); the interval is
    chosen so the budget is spent by ``growth_end_fraction``. Growing is unmasking a slot; with ``reserve`` the
    next slots are trained in advance behind a fixed gate of 1e-5, as in the paper, and a newly opened slot's
    trainable gate starts at that value. Each module's update is scaled by ``α / r_k`` with
    ``α = alpha_ratio · target_rank`` (the paper's α/r per module). Simplifications: each module has at most
    ``r_max = ⌈max_rank_ratio · target_rank⌉`` slots (the paper has no cap), and AdaLoRA's orthogonality
    penalty on the factors is left out.

    Default form: ``reserve = True``, the paper's "advance learning" — the next ``rank_step`` slots of every
    module train behind a fixed 1e-5 gate before they open, so a slot that opens already points in a useful
    direction instead of starting from zero. ``reserve = False`` (plain unmasking) is the searchable
    alternative. The budget is ``target_rank``: growing stops when the candidate modules hold
    ``target_rank`` ranks on average.
    """

    name = "increlora"
    size_decided_in_training = True
    summary = "grows each module's rank from a small start, giving new ranks to the modules whose update matters most"
    paper = "Zhang et al., IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning, arXiv:2308.12043"
    RESERVE_GATE = 1e-5

    def search_space(self):
        return self._space(
            init_r=IntParam(1, 4, default=2, help="active rank of every module at the start"),
            target_rank=IntParam(2, 16, default=8, log=True, help="average rank when growing stops (the budget)"),
            max_rank_ratio=CategoricalParam((1.5, 2.0, 3.0), default=2.0, help="a module's rank cap, as a multiple of target_rank"),
            rank_step=IntParam(1, 4, default=2, help="slots a chosen module gains per growth round"),
            top_fraction=FloatParam(0.05, 0.5, default=0.2, help="fraction of modules that grow at each round"),
            warmup_fraction=FloatParam(0.0, 0.3, default=0.1, help="fraction of steps before the first growth"),
            growth_end_fraction=FloatParam(0.3, 0.9, default=0.6, help="fraction of steps by which the budget is spent"),
            beta=FloatParam(0.5, 0.95, default=0.85, help="EMA factor of the sensitivity and uncertainty scores"),
            reserve=CategoricalParam((True, False), default=True, help="pre-train the next slots behind a 1e-5 gate"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from autopeft import masked_lora

        init_r, target = params["init_r"], params["target_rank"]
        r_max = max(init_r, math.ceil(params["max_rank_ratio"] * target))
        model = masked_lora.attach(
            model, context, r_max, params["alpha_ratio"], params["dropout"],
            gate_factory=lambda linear: masked_lora.SlotGate(linear, trainable_gate=True, init_gate=self.RESERVE_GATE),
        )
        gates = masked_lora.gates(model)
        for gate in gates.values():
            gate.gate.data[0, :init_r] = 1.0
            gate.mask.zero_()
            self._open(gate, 0, init_r, target, params["reserve"], params["rank_step"])
        steps = context.total_steps
        top = max(1, round(params["top_fraction"] * len(gates)))
        warmup = round(params["warmup_fraction"] * steps)
        end = max(warmup + 1, round(params["growth_end_fraction"] * steps))
        rounds = max(1, math.ceil((target - init_r) * len(gates) / (top * params["rank_step"])))
        set_allocator_state(
            model, tracker=masked_lora.DeltaSensitivity(model, params["beta"], params["beta"]), budget=target * len(gates),
            top=top, warmup=warmup, end=end, interval=max(1, (end - warmup) // rounds), params=params, growing=True,
        )
        return model

    def _open(self, gate, start: int, stop: int, target: int, reserve: bool, rank_step: int) -> None:
        """Make slots ``start:stop`` active, put the next ``rank_step`` in reserve, rescale by α / r_k."""
        gate.mask[start:stop] = 1.0
        gate.reserve.zero_()
        if reserve:
            gate.reserve[stop : stop + rank_step] = self.RESERVE_GATE
        gate.multiplier.fill_(target / max(stop, 1))

    def allocate(self, model, step: int, context: AttachContext) -> None:
        from autopeft import masked_lora

        state = allocator_state(model)
        if not state.growing:
            return
        state.tracker.update()
        ranks = masked_lora.active_ranks(model)
        if step > state.warmup and (step - state.warmup) % state.interval == 0 and sum(ranks.values()) < state.budget:
            gates, scores, p = masked_lora.gates(model), state.tracker.scores(), state.params
            room = [name for name in gates if ranks[name] < gates[name].r_max]
            left = state.budget - sum(ranks.values())
            for name in sorted(room, key=lambda n: -scores[n])[: state.top]:
                grow = min(p["rank_step"], gates[name].r_max - ranks[name], left)
                if grow <= 0:
                    break
                self._open(gates[name], ranks[name], ranks[name] + grow, p["target_rank"], p["reserve"], p["rank_step"])
                left -= grow
        if step >= state.end or sum(masked_lora.active_ranks(model).values()) >= state.budget:
            self.settle(model)

    def settle(self, model) -> None:
        from autopeft import masked_lora

        state = allocator_state(model)
        if state.growing:
            state.tracker.remove()
            for gate in masked_lora.gates(model).values():
                gate.reserve.zero_()
            state.growing = False
