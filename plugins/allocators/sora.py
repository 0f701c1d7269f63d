"""SoRA: a gate per rank slot, made sparse by the proximal step of an L1 penalty, to a budget of ranks.

Paper: Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models", arXiv:2311.11696.

What it follows. As the reference code (TsinghuaC3I/SoRA): ``h = W x + B (g ⊙ A x)``, gates drawn from a
standard normal, trained by their own Adam step outside the main optimizer, each step followed by the
soft-threshold ``g ← sign(g)·max(|g| − ξ_t, 0)`` that rises in stages; a module's rank is its number of
non-zero gates, and the gates are folded into ``B`` at the end.

Simplifies / leaves out: SoRA's threshold is ``η·λ`` with a hand-set ``λ`` schedule and no budget (one run
traces an accuracy–size curve); here ``ξ_t`` is derived from a target average rank and the number of steps.
"""

from __future__ import annotations

from typing import Any

from autopeft import AttachContext, FloatParam, IntParam
from autopeft.allocator_base import Allocator, allocator_state, set_allocator_state


class SoRA(Allocator):
    """``h = W x + B (g ⊙ A x)`` with a gate ``g`` per slot, as in the reference code (TsinghuaC3I/SoRA): the
    gates start from a standard normal draw, are trained by their own Adam step (at the trial's learning rate,
    outside autopeft's optimizer, as SoRA trains them with a separate ``SparseAdamW``) and after each of those
    steps take the proximal step of an L1 penalty, ``g ← sign(g)·max(|g| − ξ_t, 0)``, which sets gates exactly
    to 0. A module's rank is its number of non-zero gates; at the end the gates are folded into ``B``.

    The budget is ``target_rank``: the exported adapter holds about ``target_rank · Σ_m (in_m + out_m)``
    parameters over the candidate modules (an average rank of ``target_rank`` out of ``max_rank`` slots). It is
    the knob the outer search tunes. ``ξ_t`` rises in ``stages`` equal stages over the first
    ``sparsify_fraction`` of the steps (stage k uses k times a base threshold, as SoRA's ``lambda_schedule``
    raises its sparsity weight in stages); the base is set at attach so that the thresholds of the whole phase
    add up to the magnitude the initial gates would have to lose to meet the budget. Gates the task loss
    pushes up survive; the others reach 0. Two rules make the budget a target rather than a hope: a step's
    threshold never exceeds the one that would leave exactly the budget (so thresholding never undershoots),
    and at the end of the phase a last proximal step uses exactly that threshold if the gates are still over
    budget. Then the closed slots stay closed and the open gates keep training, without threshold.

    Simplifications: SoRA's threshold is ``η·λ`` with a hand-set ``λ`` schedule and no budget (one run traces
    an accuracy–size curve); here ``ξ_t`` is derived from the budget and the number of steps.
    """

    name = "sora"
    size_decided_in_training = True
    summary = "a trainable gate per rank slot, made sparse by a proximal soft-threshold that rises in stages to a budget"
    paper = "Ding et al., Sparse Low-rank Adaptation of Pre-trained Language Models, arXiv:2311.11696"

    def search_space(self):
        return self._space(
            max_rank=IntParam(4, 32, default=16, log=True, help="slots per module (the highest rank a module can keep)"),
            target_rank=IntParam(1, 16, default=8, log=True, help="average rank over the candidate modules at the end (the budget)"),
            stages=IntParam(1, 5, default=3, help="stages of the rising threshold"),
            sparsify_fraction=FloatParam(0.3, 0.9, default=0.7, help="fraction of the steps by which the budget is met"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        from autopeft import masked_lora

        model = masked_lora.attach(model, context, params["max_rank"], params["alpha_ratio"], params["dropout"])
        layers = masked_lora.slot_layers(model)
        gates = []
        for layer in layers.values():
            gate = masked_lora.gate_of(layer).gate
            gate.normal_()
            # Trained by the gates' own Adam step in allocate, not by autopeft's optimizer (a buffer is not in
            # model.parameters()), so weight decay and gradient clipping of the factors never touch it.
            gate.requires_grad_(True)
            gates.append(gate)
        cost = torch.cat([torch.full((gate.numel(),), float(layer.in_features + layer.out_features)) for layer, gate in zip(layers.values(), gates)])
        budget = min(params["target_rank"], params["max_rank"]) * sum(layer.in_features + layer.out_features for layer in layers.values())
        end = max(1, round(params["sparsify_fraction"] * context.total_steps))
        stage = [min(params["stages"], (s - 1) * params["stages"] // end + 1) for s in range(1, end + 1)]
        state = set_allocator_state(
            model, gates=gates, cost=cost, budget=budget, end=end, stage=stage, sparse=True,
            optimizer=torch.optim.Adam(gates, lr=params["learning_rate"]),
        )
        state.base = self._budget_threshold(state) / sum(stage)
        return model

    @staticmethod
    def _budget_threshold(state) -> float:
        """The smallest ξ whose soft-threshold leaves gates costing at most the budget (0 if they already do)."""
        import torch

        magnitude = torch.cat([gate.detach().flatten().abs().float().cpu() for gate in state.gates])
        order = torch.argsort(magnitude, descending=True)
        kept = int((state.cost[order].cumsum(0) <= state.budget).sum())
        return float(magnitude[order[kept]]) if kept < len(order) else 0.0

    @staticmethod
    def _soft_threshold(state, xi: float) -> None:
        """The proximal step of ``ξ·|g|``: ``g ← sign(g)·max(|g| − ξ, 0)``."""
        import torch

        with torch.no_grad():
            for gate in state.gates:
                gate.copy_(gate.sign() * (gate.abs() - xi).clamp_min(0.0))

    def allocate(self, model, step: int, context: AttachContext) -> None:
        from autopeft import masked_lora

        state = allocator_state(model)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if not state.sparse:
            return
        cap = self._budget_threshold(state)
        if step < state.end:
            self._soft_threshold(state, min(state.base * state.stage[step - 1], cap))
            return
        self._soft_threshold(state, cap)
        for gate in masked_lora.gates(model).values():
            gate.mask.mul_((gate.gate[0] != 0).to(gate.mask.dtype))  # closed slots stay closed from now on
        state.sparse = False

    def settle(self, model) -> None:
        state = allocator_state(model)
        if state.sparse:
            self.allocate(model, max(state.end, 1), None)
