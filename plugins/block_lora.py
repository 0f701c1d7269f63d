"""Block-LoRA: LoRA whose factors are split into blocks, all down-projection blocks being one shared tensor.

Paper: Zhou et al., "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot
Learning", arXiv:2501.16720.

What it follows (the structure the abstract states). A LoRA update ``ΔW = B·A`` of rank ``n·r`` is written as
block matrices ``B = [B_1 … B_n]`` (n up-projection blocks, out × r each) and ``A = [A_1; …; A_n]`` (n
down-projection blocks, r × in each), so ``ΔW = Σ_i B_i A_i``. Every down-projection block is the same shared
tensor ``A_s`` ("one head"): ``ΔW = Σ_i B_i A_s = (Σ_i B_i)·A_s``. The n products become one sum of
up-projection blocks ("eight arms") and one product, which is the abstract's matrix multiplication turned into
matrix addition, with fewer trained numbers. ``A_s`` is one tensor for every block of every target module of the
same input width. The blocks are stored as one ``out × n·r`` tensor ``[B_1 … B_n]`` per module. ``A_s`` starts
as PEFT's LoRA ``A`` and the blocks at zero, so the update starts at zero.

Export: PEFT's LoRA of rank ``r`` per module with ``lora_A = A_s`` (materialised once per module) and
``lora_B = Σ_i B_i``, at the same scaling. That is exactly the trained update, so the conversion is exact.

Simplifies / leaves out: the abstract does not say which modules share ``A_s``. Here it is shared across all
target modules of one input width (one tensor per width: one for the attention projections, another for an MLP
down projection), the widest reading of "all down-projection sub-matrices". Within one module only the sum
``Σ_i B_i`` acts, so the n blocks train like one up-projection whose step is n times larger; they are kept as the
paper's structure and as a searched knob. The CLIP few-shot setting and the paper's generalisation bound are out
of scope.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from autopeft import AttachContext, CategoricalParam, IntParam, shared
from autopeft.space import RANK
from autopeft_plugins.frozen_basis import FrozenBasisVariant

ADAPTER = "default"


@lru_cache(maxsize=None)
def _block_classes():
    """The factor modules, defined on first use so that importing this plugin does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SharedDown(nn.Module):
        """``lora_A`` of one module: ``x ↦ A_s·x`` with ``A_s`` (r × in) the one tensor every module of this width holds."""

        def __init__(self, down: nn.Parameter) -> None:
            super().__init__()
            # The same Parameter object in every module: one tensor, one gradient, one optimizer slot.
            self.down = down

        @property
        def weight(self) -> torch.Tensor:
            return self.down

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.down)

    class BlockUp(nn.Module):
        """``lora_B`` of one module: ``h ↦ (Σ_i B_i)·h`` over its n up-projection blocks, stored as ``[B_1 … B_n]``."""

        def __init__(self, out_features: int, rank: int, blocks: int, like: torch.Tensor) -> None:
            super().__init__()
            self.rank, self.blocks = rank, blocks
            # Zero blocks: the update starts at exactly zero (PEFT's LoRA init of B).
            self.up = nn.Parameter(torch.zeros(out_features, blocks * rank, device=like.device, dtype=like.dtype))

        @property
        def weight(self) -> torch.Tensor:
            return self.up.view(self.up.shape[0], self.blocks, self.rank).sum(1)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, self.weight)

    return SharedDown, BlockUp


class BlockLoRA(FrozenBasisVariant):
    """n up-projection blocks per module over one down-projection tensor shared by every block and module."""

    name = "block-lora"
    summary = (
        "LoRA split into n up-projection blocks per module over one down-projection tensor shared by all blocks and "
        "modules (exported as LoRA rank r)"
    )
    paper = (
        "Zhou et al., One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning, "
        "arXiv:2501.16720"
    )

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=8, log=True, legal=RANK, help="rank of each block (the exported LoRA rank)"),
            "blocks": IntParam(1, 8, default=4, legal=RANK, help="up-projection blocks per module sharing the down-projection"),
            "alpha_ratio": CategoricalParam((0.5, 1.0, 2.0, 4.0), default=2.0, help="lora_alpha = alpha_ratio × r"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        r = params["r"]
        config = LoraConfig(
            task_type=context.peft_task_type, target_modules=context.target_modules, r=r, lora_alpha=params["alpha_ratio"] * r, lora_dropout=0.0
        )
        peft_model = get_peft_model(model, config)
        SharedDown, BlockUp = _block_classes()
        downs: dict[int, Any] = {}
        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
        for module in layers:
            own_a, own_b = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
            if own_a.in_features not in downs:
                # The first module of this width lends its PEFT-initialised A: that becomes the shared A_s.
                downs[own_a.in_features] = own_a.weight
            module.lora_A[ADAPTER] = SharedDown(downs[own_a.in_features])
            module.lora_B[ADAPTER] = BlockUp(own_b.out_features, r, params["blocks"], own_b.weight)
        return peft_model


VARIANTS = [BlockLoRA]
