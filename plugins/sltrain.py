"""SLTrain: a low-rank plus a sparse update, the sparse part on a random support fixed for the whole run.

Paper: Han et al., "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining",
NeurIPS 2024, arXiv:2406.02214.

Follows the paper's parameterisation, applied to fine-tuning: ``ΔW = B·A + S`` where ``B·A`` is a rank-r
product and ``S`` is zero except on a support of ``density · out · in`` entries drawn uniformly at random (from
the trial's seed) when the adapter is attached and never changed; only the values on that support train. Like
the paper, the update is formed as a dense matrix (``B·A`` plus the values scattered on the support) for the
layer's input.

Simplifies / changes for fine-tuning: the paper pretrains ``W = B·A + S`` from scratch with random ``B``, ``A``
and ``S``; here it is an update to a frozen pretrained ``W`` that starts at exactly zero (``A`` as PEFT's LoRA
initialises it, ``B = 0``, ``S = 0``), so the model starts at the base. No separate scale on ``B·A`` (the
learning rate takes its role under Adam); no quantization or per-layer updates (the paper's memory extensions).

Export: a PEFT folder holds one adapter, so ``B·A + S`` is written as ONE plain PEFT LoRA holding both parts
exactly: the LoRA of each module is the SVD of its whole ``ΔW`` at its numerical rank (at most ``r + rank(S)``,
full rank at most; exact up to float rounding), ranks per module in ``rank_pattern``. PEFT's SHiRA could hold
``S`` alone but not ``B·A`` beside it in the same folder, and concatenating ``[B, U_S·Σ_S]`` and ``[A; V_Sᵀ]``
would be the same product at a rank never lower than the SVD's.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from autopeft import AttachContext, FloatParam, IntParam, Variant, shared
from autopeft.space import RANK, Bounds

ADAPTER = "default"


@lru_cache(maxsize=None)
def low_rank_plus_sparse_class():
    """The ``LowRankPlusSparse`` module class (defined on first use so that this plugin does not import torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class LowRankPlusSparse(nn.Module):
        """``x ↦ (B·A + S)·x``: PEFT's ``lora_A`` when ``lora_B`` is an identity, so the layer adds the whole update.

        ``A`` (r × in) and ``B`` (out × r) train, and so do the ``values`` of ``S`` on the fixed flat ``support``
        (``row · in + col``, a buffer nothing rewrites).
        """

        def __init__(self, a: torch.Tensor, out_features: int, support: torch.Tensor) -> None:
            super().__init__()
            self.a = nn.Parameter(a.clone())
            self.b = nn.Parameter(a.new_zeros(out_features, a.shape[0]))
            self.register_buffer("support", support.to(a.device), persistent=False)
            # A 1 × n row rather than a vector: PEFT reads 1-D LoRA tensors as unsharded ZeRO-3 shards.
            self.values = nn.Parameter(a.new_zeros(1, support.numel()))

        def sparse(self) -> torch.Tensor:
            """``S`` as a dense ``out × in`` matrix (differentiable in ``values``)."""
            rows, cols = self.b.shape[0], self.a.shape[1]
            return self.values.new_zeros(rows * cols).index_put((self.support,), self.values[0]).view(rows, cols)

        @property
        def weight(self) -> torch.Tensor:
            return self.b @ self.a + self.sparse()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    return LowRankPlusSparse


class SLTrain(Variant):
    """Low-rank B·A plus a sparse S on a random support fixed at attach time."""

    name = "sltrain"
    summary = "update B·A + S, S sparse on a random support fixed for the run (exported as one LoRA of ΔW's exact rank, ≤ r + rank(S))"
    paper = "Han et al., SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining, arXiv:2406.02214"
    export_format = "lora"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=2e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=8, log=True, legal=RANK, help="rank of the low-rank part B·A"),
            "density": FloatParam(0.001, 0.1, default=0.01, log=True, legal=Bounds(0, 1, low_open=True), help="fraction of the entries of S that train"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch
        from peft import LoraConfig, get_peft_model

        from autopeft.transforms import lora_layers, random_support

        r = params["r"]
        config = LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=r, lora_alpha=r, lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        LowRankPlusSparse = low_rank_plus_sparse_class()
        generator = torch.Generator().manual_seed(context.seed)
        for layer in lora_layers(peft_model).values():
            out_features, in_features = layer.out_features, layer.in_features
            count = max(1, round(params["density"] * out_features * in_features))
            support = random_support(out_features, in_features, count, generator)
            layer.lora_A[ADAPTER] = LowRankPlusSparse(layer.lora_A[ADAPTER].weight.detach(), out_features, support)
            layer.lora_B[ADAPTER] = torch.nn.Identity()
        return peft_model

    def export(self, model, out_dir: Path) -> None:
        from autopeft.transforms import layer_delta, lora_layers, save_as_lora

        save_as_lora(model, {name: layer_delta(layer) for name, layer in lora_layers(model).items()}, out_dir)


VARIANTS = [SLTrain]
