"""LoRA-SB: LoRA-XS's trained r × r core, initialised so the adapter starts at the best rank-r approximation of
the first full fine-tuning step.

Paper: Ponkshe et al., "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient
Low-Rank Fine-Tuning", arXiv:2411.19557 (code: github.com/RaghavSinghal10/lora-sb).

Follows the paper and its code: the gradient of the task loss with respect to each adapted weight is averaged
over a few calibration batches (``frozen_basis.GRADIENT_BATCHES``, on the bare model); the first full fine-tuning
step is estimated as Adam's first update ``ΔW₁ = −η·sign(ḡ)`` with η the trial's learning rate; its truncated SVD
``U_r·S_r·V_rᵀ`` gives the frozen ``B = U_r`` and ``A = V_rᵀ`` and the initial core ``R = S_r``. The update
``B·R·A`` therefore starts at the best rank-r approximation of ``ΔW₁`` (it is not zero at step 0), and a
gradient step on R moves W along ``U_r·U_rᵀ·g·V_r·V_rᵀ``, the full gradient projected on the subspaces of the
first update. Scaling is 1: the paper shows the LoRA-XS structure makes it irrelevant. Simplifies: the gradient
is estimated from ``GRADIENT_BATCHES`` training batches rather than a fixed number of samples, and the SVD is
exact instead of randomized.

Export: exact, as a plain PEFT LoRA of rank r (``lora_B = U_r``, ``lora_A = R·V_rᵀ``, scaling 1).
"""

from __future__ import annotations

from typing import Any

from autopeft import AttachContext, IntParam, shared
from autopeft.space import RANK
from autopeft_plugins.frozen_basis import ADAPTER, FrozenBasisVariant, _factor_classes, _first_gradients, _lora_layers, _plain_lora_model


class LoRASB(FrozenBasisVariant):
    """LoRA-XS structure with bases and core from the SVD of the estimated first full fine-tuning update."""

    name = "lora-sb"
    summary = (
        "frozen bases and a trained r×r core initialised to the best rank-r approximation of the first full "
        "fine-tuning step, estimated from a few batches (exported as LoRA rank r)"
    )
    paper = (
        "Ponkshe et al., Initialization using Update Approximation is a Silver Bullet for Extremely Efficient "
        "Low-Rank Fine-Tuning (LoRA-SB), arXiv:2411.19557"
    )

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=16, log=True, legal=RANK, help="rank of the frozen bases; the core has r² parameters"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        from autopeft.factorize import as_out_in, require_rank, truncated_svd

        r = params["r"]
        require_rank(model, context.target_modules, r, "LoRA-SB")
        # Gradients must be taken on the bare model, before PEFT wraps the layers.
        gradients = _first_gradients(model, context)
        peft_model = _plain_lora_model(model, context, r)
        CoreAfterBasis, _ = _factor_classes()
        with torch.no_grad():
            for name, layer in _lora_layers(peft_model).items():
                template = layer.lora_A[ADAPTER].weight
                first_step = -params["learning_rate"] * torch.sign(as_out_in(gradients[name], getattr(layer, "fan_in_fan_out", False)))
                u, s, vh = truncated_svd(first_step, r)
                layer.lora_B[ADAPTER].weight.copy_(u)
                layer.lora_B[ADAPTER].weight.requires_grad_(False)
                core = CoreAfterBasis(vh.to(device=template.device, dtype=template.dtype).contiguous())
                core.core.copy_(torch.diag(s))
                layer.lora_A[ADAPTER] = core
        return peft_model


VARIANTS = [LoRASB]
