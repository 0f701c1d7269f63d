"""SVFit: train the top-r singular values of each weight, keeping its singular vectors frozen.

Paper: Sun et al., "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
arXiv:2409.05926.

Follows the paper: the truncated SVD ``W = U_r·diag(s)·V_rᵀ + W_res`` of each adapted weight, in float32; the
top-r left and right singular vectors stay frozen and only the r singular values train, so each module trains
r numbers. Implemented as a trained delta ``δ`` on the diagonal (``s' = s + δ``, ``δ`` starting at 0), which is
the same update ``ΔW = U_r·diag(δ)·V_rᵀ`` while leaving the base weights untouched, so detaching needs no copy;
weight decay then pulls ``s'`` towards ``s`` rather than towards 0. Simplifies: the rank is the searched knob
rather than chosen per module to keep 99% of the spectrum's energy.

Export: exact, as a plain PEFT LoRA of rank r (``lora_B = U_r``, ``lora_A = diag(δ)·V_rᵀ``, scaling 1).
"""

from __future__ import annotations

from typing import Any

from autopeft import AttachContext, IntParam, shared
from autopeft.space import RANK
from autopeft_plugins.frozen_basis import ADAPTER, FrozenBasisVariant, _lora_layers, _plain_lora_model


class SVFit(FrozenBasisVariant):
    """Frozen top-r singular vectors of W with the r singular values trained (r parameters per module)."""

    name = "svfit"
    summary = "trains the top-r singular values of each weight, its singular vectors frozen (exported as LoRA rank r)"
    paper = "Sun et al., SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values, arXiv:2409.05926"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 256, default=16, log=True, legal=RANK, help="number of top singular values trained per module"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        from autopeft.factorize import diagonal_after_basis_class, layer_weight, require_rank, truncated_svd

        r = params["r"]
        require_rank(model, context.target_modules, r, "SVFit")
        peft_model = _plain_lora_model(model, context, r)
        DiagonalAfterBasis = diagonal_after_basis_class()
        with torch.no_grad():
            for layer in _lora_layers(peft_model).values():
                template = layer.lora_A[ADAPTER].weight
                u, _, vh = truncated_svd(layer_weight(layer), r)
                layer.lora_B[ADAPTER].weight.copy_(u)
                layer.lora_B[ADAPTER].weight.requires_grad_(False)
                basis = vh.to(device=template.device, dtype=template.dtype).contiguous()
                layer.lora_A[ADAPTER] = DiagonalAfterBasis(basis, torch.zeros(r, device=basis.device, dtype=basis.dtype), train_scale=False)
        return peft_model


VARIANTS = [SVFit]
