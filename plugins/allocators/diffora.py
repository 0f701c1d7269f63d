"""DiffoRA: which modules get an adapter, chosen by a differentiable relaxation (first-order DARTS).

Paper: Jiang et al., "DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix
Adaptation", arXiv:2502.08905.

What it follows. One coefficient ``α_m`` per candidate module, ``y = W x + σ(α_m)·B_m A_m x``, trained by
Adam on a second stream of training batches (never the validation or test splits) during the first
``search_fraction`` of the steps; then the top ``rho`` fraction of modules are kept with ``σ(α_m)`` folded into
their ``B`` and the others get no adapter.

Simplifies / leaves out: the paper's weight-sharing discretisation is reduced to this top-ρ selection, and
every kept module has the same ``rank``.
"""

from __future__ import annotations

from typing import Any

from autopeft import AttachContext, FloatParam, IntParam
from autopeft.allocator_base import Allocator, allocator_state, set_allocator_state


def _arch_gate(linear):
    import torch

    from autopeft.masked_lora import SlotGate

    class ArchGate(SlotGate):
        """A slot gate scaled by ``σ(α_m)`` while the search runs; ``α_m`` is trained only by the α steps."""

        def __init__(self, linear) -> None:
            super().__init__(linear)
            self.arch = torch.nn.Parameter(torch.zeros((1, 1), device=linear.weight.device), requires_grad=False)
            self.searching = True

        def slot_values(self):
            values = super().slot_values()
            return values * torch.sigmoid(self.arch[0]).to(values.dtype) if self.searching else values

    return ArchGate(linear)


class DiffoRA(Allocator):
    """One continuous coefficient ``α_m`` per candidate module: ``y = W x + σ(α_m)·B_m A_m x``.

    For the first ``search_fraction`` of the steps, every LoRA step (autopeft's optimizer, training batches) is
    followed by an α step: the loss on a batch from a second stream of *training* batches
    (``context.calibration_batches``, offset so that it never shows the batch the LoRA step just used) is
    differentiated with respect to the α alone and Adam with ``alpha_lr`` updates them (first-order DARTS; the
    validation and test splits are never used). Then the top ``rho`` fraction of modules by ``σ(α_m)`` are kept,
    ``σ(α_m)`` is folded into their ``B``, the other modules are switched off (rank 0, left out of the export)
    and training continues on the kept ones. Simplification: the paper's weight-sharing discretisation is
    reduced to this top-ρ selection, and every kept module has the same ``rank``.

    Budget: ``rho`` (with ``rank``): the export holds ``round(ρ · M)`` modules at ``rank``, an average rank of
    ``ρ · rank`` over the ``M`` candidates; the outer search tunes both.
    """

    name = "diffora"
    size_decided_in_training = True
    summary = "learns a continuous weight per module on a separate batch stream (DARTS-like) and keeps the top modules"
    paper = (
        "Jiang et al., DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix Adaptation, "
        "arXiv:2502.08905"
    )

    def search_space(self):
        return self._space(
            rank=IntParam(2, 32, default=8, log=True, help="rank of every kept module"),
            rho=FloatParam(0.1, 1.0, default=0.5, help="fraction of candidate modules kept"),
            alpha_lr=FloatParam(1e-3, 1e-1, default=1e-2, log=True, help="Adam learning rate of the module coefficients"),
            search_fraction=FloatParam(0.1, 0.6, default=0.3, help="fraction of the steps spent learning the coefficients"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import itertools

        import torch

        from autopeft import masked_lora

        if context.calibration_batches is None:
            raise ValueError("diffora needs context.calibration_batches for its coefficient steps")
        model = masked_lora.attach(model, context, params["rank"], params["alpha_ratio"], params["dropout"], gate_factory=_arch_gate)
        search_steps = max(1, round(params["search_fraction"] * context.total_steps))
        # The same seeded stream as training: skipping search_steps batches keeps the two apart during the search.
        stream = itertools.islice(context.calibration_batches(2 * search_steps), search_steps, None)
        arch = [gate.arch for gate in masked_lora.gates(model).values()]
        set_allocator_state(
            model, stream=stream, search_steps=search_steps, rho=params["rho"], selected=False,
            optimizer=torch.optim.Adam(arch, lr=params["alpha_lr"]),
        )
        return model

    def allocate(self, model, step: int, context: AttachContext) -> None:
        import torch

        from autopeft import masked_lora

        state = allocator_state(model)
        if state.selected:
            return
        batch = next(state.stream, None)
        if batch is not None:
            arch = [gate.arch for gate in masked_lora.gates(model).values()]
            for alpha in arch:
                alpha.requires_grad_(True)
            try:
                grads = torch.autograd.grad(model(**batch).loss, arch, allow_unused=True)
            finally:
                for alpha in arch:
                    alpha.requires_grad_(False)
            for alpha, grad in zip(arch, grads):
                alpha.grad = grad
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        if step >= state.search_steps:
            self.settle(model)

    def settle(self, model) -> None:
        """Keep the top-ρ modules (once), fold σ(α) into their B and switch the others off."""
        import torch

        from autopeft import masked_lora

        state = allocator_state(model)
        if state.selected:
            return
        layers = masked_lora.slot_layers(model)
        weights = {name: float(torch.sigmoid(masked_lora.gate_of(layer).arch)) for name, layer in layers.items()}
        keep = set(sorted(weights, key=lambda n: -weights[n])[: max(1, round(state.rho * len(weights)))])
        with torch.no_grad():
            for name, layer in layers.items():
                gate = masked_lora.gate_of(layer)
                gate.searching = False
                if name in keep:
                    masked_lora.factor_weights(layer)[1].mul_(weights[name])
                else:
                    gate.mask.zero_()
        state.selected = True
