"""LoLDU: train a diagonal between frozen slices of the pivoted LDU factors of each weight.

Paper: Shi et al., "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning", arXiv:2410.13618 (code: github.com/SKDDJ/LoLDU).

Follows the paper: the pivoted LU of each adapted weight, in float32, written ``W = P·L·diag(D)·U`` with L and U
unit triangular; the first r columns of ``P·L`` and the first r rows of U stay frozen, the r-vector z between
them starts at the pivots ``D_r`` and trains together with one scalar scale σ (starting at 1), so each module
trains r + 1 numbers. The paper replaces W by ``W_res = W − P·L_r·diag(D_r)·U_r`` and adds
``σ·P·L_r·diag(z)·U_r``; here the base weight stays untouched and the adapter adds the same difference
``ΔW = P·L_r·diag(σ·z − D_r)·U_r`` (zero at the start), so detaching needs no copy of W. Leaves out: the
other initialisations of z the reference code offers (uniform, normal, constant); z starts at ``D_r`` as in
its default.

Export: exact, as a plain PEFT LoRA of rank r (``lora_B = P·L_r``, ``lora_A = diag(σ·z − D_r)·U_r``, scaling 1).
"""

from __future__ import annotations

from typing import Any

from autopeft import AttachContext, IntParam, shared
from autopeft.space import RANK
from autopeft_plugins.frozen_basis import ADAPTER, FrozenBasisVariant, _lora_layers, _plain_lora_model


class LoLDU(FrozenBasisVariant):
    """Frozen slices of W's pivoted LU factors with the diagonal between them and one scale trained."""

    name = "loldu"
    summary = "trains the diagonal (and a scale) between frozen rank-r slices of each weight's pivoted LDU factors (exported as LoRA rank r)"
    paper = (
        "Shi et al., LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient "
        "Fine-Tuning, arXiv:2410.13618"
    )

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 256, default=16, log=True, legal=RANK, help="columns of L and rows of U kept; r + 1 numbers trained per module"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        from autopeft.factorize import diagonal_after_basis_class, layer_weight, ldu, require_rank

        r = params["r"]
        require_rank(model, context.target_modules, r, "LoLDU")
        peft_model = _plain_lora_model(model, context, r)
        DiagonalAfterBasis = diagonal_after_basis_class()
        with torch.no_grad():
            for layer in _lora_layers(peft_model).values():
                template = layer.lora_A[ADAPTER].weight
                permutation, lower, pivots, upper = ldu(layer_weight(layer))
                layer.lora_B[ADAPTER].weight.copy_(permutation @ lower[:, :r])
                layer.lora_B[ADAPTER].weight.requires_grad_(False)
                basis = upper[:r].to(device=template.device, dtype=template.dtype).contiguous()
                start = pivots[:r].to(device=template.device, dtype=template.dtype)
                layer.lora_A[ADAPTER] = DiagonalAfterBasis(basis, start, train_scale=True)
        return peft_model


VARIANTS = [LoLDU]
