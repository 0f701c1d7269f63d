"""Comp-LoRA: LoRA confined to the complement of each weight's top-k singular subspace.

Paper: Wang et al., "Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot
Classification", arXiv:2501.15040.

Follows the abstract: plain LoRA interferes with the most informative directions of the pretrained weight, so
the low-rank update is optimised in the complementary subspace. Here that subspace is that of the top-k
singular vectors of W (float32 SVD), on both sides: with ``P_out = I − U_k·U_kᵀ`` and ``P_in = I − V_k·V_kᵀ`` the
update is ``ΔW = s·(P_out·B)·(A·P_in)``, so ``U_kᵀ·ΔW = 0`` and ``ΔW·V_k = 0`` throughout training and W's top-k
singular triples stay singular triples of ``W + ΔW``. The projections sit in the forward pass, so gradients are
projected too and B, A train as in LoRA (B from zero, A PEFT's Kaiming init, scaling α/r). Simplifies: the
paper's exact construction is not public in code; the double-sided projection is this module's reading of
"optimise the low-rank matrix in the complementary subspace", and k is a searched knob.

Export: exact, as a plain PEFT LoRA of rank r holding the projected factors ``P_out·B`` and ``A·P_in``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from autopeft import AttachContext, CategoricalParam, IntParam, shared
from autopeft.space import RANK
from autopeft_plugins.frozen_basis import ADAPTER, FrozenBasisVariant, _lora_layers


@lru_cache(maxsize=None)
def _projected_factor_class():
    """The ``ProjectedFactor`` module class, defined on first use so that importing this plugin does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ProjectedFactor(nn.Module):
        """A trained LoRA factor seen through a projection that removes a frozen orthonormal subspace Q.

        ``side="in"`` (``lora_A``, r × in): ``weight = F − (F·Q)·Qᵀ``; ``side="out"`` (``lora_B``, out × r):
        ``weight = F − Q·(Qᵀ·F)``.
        """

        def __init__(self, factor: torch.Tensor, subspace: torch.Tensor, side: str) -> None:
            super().__init__()
            self.factor = nn.Parameter(factor.detach().clone())
            # Not persistent: Q comes from W, and the export stores the projected factor instead.
            self.register_buffer("subspace", subspace, persistent=False)
            self.side = side

        @property
        def weight(self) -> torch.Tensor:
            q = self.subspace
            if self.side == "in":
                return self.factor - (self.factor @ q) @ q.T
            return self.factor - q @ (q.T @ self.factor)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    return ProjectedFactor


class CompLoRA(FrozenBasisVariant):
    """LoRA whose update is kept out of the top-k left and right singular subspaces of W."""

    name = "comp-lora"
    summary = "LoRA confined to the complement of each weight's top-k singular subspace (exported as LoRA rank r)"
    paper = (
        "Wang et al., Complementary Subspace Low-Rank Adaptation of Vision-Language Models for Few-Shot "
        "Classification, arXiv:2501.15040"
    )

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=8, log=True, legal=RANK, help="rank of the update"),
            "protected_rank": IntParam(
                1, 256, default=8, log=True, legal=RANK, help="top singular directions of W (k) the update stays orthogonal to"
            ),
            "alpha_ratio": CategoricalParam((0.5, 1.0, 2.0, 4.0), default=2.0, help="lora_alpha = alpha_ratio × r"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch
        from peft import LoraConfig, get_peft_model

        from autopeft.errors import TrialFailed
        from autopeft.factorize import layer_weight, truncated_svd

        r, k = params["r"], params["protected_rank"]
        for name in context.target_modules:
            shape = tuple(model.get_submodule(name).weight.shape)
            if k >= min(shape):
                raise TrialFailed(f"Comp-LoRA protected_rank {k} leaves no complement in {name} ({shape[0]}x{shape[1]})")
        config = LoraConfig(
            task_type=context.peft_task_type, target_modules=context.target_modules, r=r, lora_alpha=params["alpha_ratio"] * r, lora_dropout=0.0
        )
        peft_model = get_peft_model(model, config)
        ProjectedFactor = _projected_factor_class()
        with torch.no_grad():
            for layer in _lora_layers(peft_model).values():
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                u, _, vh = truncated_svd(layer_weight(layer), k)
                layer.lora_A[ADAPTER] = ProjectedFactor(a, vh.T.to(device=a.device, dtype=a.dtype).contiguous(), side="in")
                layer.lora_B[ADAPTER] = ProjectedFactor(b, u.to(device=b.device, dtype=b.dtype).contiguous(), side="out")
        return peft_model


VARIANTS = [CompLoRA]
