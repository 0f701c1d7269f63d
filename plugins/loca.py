"""LoCA: a sparse 2-D DCT spectrum of the update, with learned coefficients and learned locations.

Paper: Du et al., "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning", ICLR 2025,
arXiv:2502.06820.

Follows the paper: ``ΔW = C_outᵀ · F · C_in``, the inverse 2-D DCT (orthonormal DCT-II matrices) of a coefficient
matrix ``F`` that is zero except at ``n`` locations, whose values train. Locations are learned too, by the
paper's finite-difference idea: moving a coefficient of value ``a`` from location ``ℓ`` to a neighbouring
frequency ``ℓ'`` changes the loss by about ``a · (G[ℓ'] − G[ℓ])``, where ``G = ∂L/∂F`` is the gradient with
respect to the whole dense spectrum (every location, not only the used ones). During the first half of
training, ``G`` is summed over ``relocate_every`` steps; then each coefficient moves, with its value and its
optimizer state, to the free neighbour (one step along either frequency axis) with the largest estimated
decrease, if there is one; conflicts go to the larger decrease. In the second half the locations are fixed and
only the values train (the paper's alternating schedule, whose last stage trains coefficients alone).

Simplifies: locations start uniformly at random (seeded), not from a warm-up; moves are one frequency step
along an axis per update (the sign of the central difference), never jumps; one coefficient budget ``n`` for
every module; no separate scale α (it is interchangeable with the learning rate under Adam). ``relocate_every:
0`` turns location learning off (a fixed random support, as FourierFT).

Export: PEFT has no DCT method, so ``ΔW`` of each module is written as a plain PEFT LoRA whose rank is the exact
(numerical) rank of ``ΔW`` (an SVD, exact up to float rounding; at most ``min(n, out, in)``, the rank of ``F``),
ranks per module in ``rank_pattern``. The exported folder predicts what the trained model predicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autopeft import AttachContext, IntParam, Variant, shared
from autopeft.space import RANK, Bounds

ADAPTER = "default"
_STATE = "_loca_location_learning"
NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


class LoCA(Variant):
    """Sparse DCT-spectrum adapter: n trained coefficients per module on learned frequency locations."""

    name = "loca"
    summary = "update as the inverse 2-D DCT of n trained coefficients whose frequency locations are learned (exported as LoRA of ΔW's exact rank)"
    paper = "Du et al., LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning, arXiv:2502.06820"
    export_format = "lora"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "n_coefficients": IntParam(16, 20000, default=1000, log=True, legal=RANK, help="trained DCT coefficients per module (capped at out × in)"),
            "relocate_every": IntParam(
                0, 50, default=10, legal=Bounds(0), help="steps between location updates during the first half of training (0: locations fixed)"
            ),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch
        from peft import LoraConfig, get_peft_model

        from autopeft.transforms import dct_matrix, fixed_linear_class, lora_layers, random_support, sparse_coefficients_class

        config = LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=1, lora_alpha=1, lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        FixedLinear, SparseCoefficients = fixed_linear_class(), sparse_coefficients_class()
        generator = torch.Generator().manual_seed(context.seed)
        # One DCT matrix per size, shared by every module of that size.
        bases: dict[int, torch.Tensor] = {}
        for layer in lora_layers(peft_model).values():
            template = layer.lora_A[ADAPTER].weight
            out_features, in_features = layer.out_features, layer.in_features
            for size in (out_features, in_features):
                if size not in bases:
                    bases[size] = dct_matrix(size, dtype=template.dtype, device=template.device)
            count = min(params["n_coefficients"], out_features * in_features)
            support = random_support(out_features, in_features, count, generator)
            values = torch.zeros(count, dtype=template.dtype, device=template.device)
            layer.lora_A[ADAPTER] = FixedLinear(bases[in_features])
            layer.lora_B[ADAPTER] = SparseCoefficients((out_features, in_features), support, values, output=bases[out_features].T)
        every = params["relocate_every"]
        if every > 0:
            peft_model.__dict__[_STATE] = {"every": every, "until": context.total_steps // 2, "sums": {}}
            for module in _spectra(peft_model).values():
                module.track_gradient = True
        return peft_model

    def on_step(self, model, step: int, context: AttachContext) -> None:
        state = model.__dict__.get(_STATE)
        if state is None:
            return
        spectra = _spectra(model)
        if step > state["until"]:
            # Location learning is over: stop keeping dense gradients.
            for module in spectra.values():
                module.track_gradient = False
                module.forget_gradient()
            del model.__dict__[_STATE]
            return
        sums = state["sums"]
        for name, module in spectra.items():
            gradient = module.dense_gradient()
            if gradient is not None:
                sums[name] = gradient.detach().float() + sums.get(name, 0)
        if step % state["every"] == 0:
            for name, module in spectra.items():
                if name in sums:
                    relocate(module, sums.pop(name))

    def export(self, model, out_dir: Path) -> None:
        from autopeft.transforms import layer_delta, lora_layers, save_as_lora

        save_as_lora(model, {name: layer_delta(layer) for name, layer in lora_layers(model).items()}, out_dir)


def _spectra(peft_model) -> dict[str, Any]:
    """``{module name: its SparseCoefficients}``."""
    from autopeft.transforms import lora_layers

    return {name: layer.lora_B[ADAPTER] for name, layer in lora_layers(peft_model).items()}


def relocate(module, gradient) -> int:
    """Move each coefficient of ``module`` one frequency step where the loss is estimated to fall; return moves.

    ``gradient`` is ``∂L/∂F`` over the dense spectrum. Moving value ``a`` from ``ℓ`` to ``ℓ'`` changes the loss
    by about ``a · (G[ℓ'] − G[ℓ])`` (a finite difference along the frequency axis); each coefficient takes its
    most negative neighbour, if any, unless another coefficient holds or claims that location first (larger
    decreases claim first). Values, and so the optimizer's state per value, stay with their coefficient.
    """
    import torch

    rows_total, cols_total = module.shape
    support = module.support
    rows, cols = support // cols_total, support % cols_total
    flat = gradient.reshape(-1)
    value = module.values.detach()[0].float()
    here = flat[support]
    best_change = torch.zeros_like(value)
    best_target = support.clone()
    for d_row, d_col in NEIGHBOURS:
        r, c = rows + d_row, cols + d_col
        inside = (r >= 0) & (r < rows_total) & (c >= 0) & (c < cols_total)
        target = r.clamp(0, rows_total - 1) * cols_total + c.clamp(0, cols_total - 1)
        change = value * (flat[target] - here)
        better = inside & (change < best_change)
        best_change = torch.where(better, change, best_change)
        best_target = torch.where(better, target, best_target)
    movers = torch.nonzero(best_change < 0).flatten()
    movers = movers[best_change[movers].argsort()]
    occupied = set(support.tolist())
    new_support = support.clone()
    moved = 0
    for index in movers.tolist():
        target = int(best_target[index])
        if target in occupied:
            continue
        occupied.discard(int(support[index]))
        occupied.add(target)
        new_support[index] = target
        moved += 1
    module.support.copy_(new_support)
    return moved


VARIANTS = [LoCA]
