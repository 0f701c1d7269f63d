"""S2-LoRA: one pair of low-rank factors shared by every layer, with a sparse rank-coefficient vector per module.

Paper: Liu et al., "Sparsely Shared LoRA on Whisper for Child Speech Recognition", arXiv:2309.11756.

What it follows. Every adapted linear computes ``h = W x + s · B · diag(λ_m) · A x``. ``A`` (r × in) and ``B``
(out × r) are globally shared: one ``A`` tensor for all target modules of one input width and one ``B`` tensor
for those of one output width. Where every target module has the same shape (attention projections) there is
exactly one ``A`` and one ``B``; where shapes differ (MLP projections), each shape has its own. Each module keeps
only its rank coefficients ``λ_m`` (one per rank). As in AdaLoRA, which the paper builds on, the coefficients
start at zero (so the update starts at zero) and ``A``, ``B`` start from ``N(0, 0.02²)``. The coefficients are
made sparse by an L1 penalty whose proximal step follows every optimizer step,
``λ ← sign(λ)·max(|λ| − sparsity·η, 0)`` (``η`` the trial's peak learning rate), which sets coefficients
exactly to zero. An Adam step moves a coefficient by at most about ``η``, so a coefficient stays non-zero only
where the task gradient pushes it consistently harder than the share ``sparsity`` of such a step. A module's rank is its number of non-zero coefficients. It is built on
:mod:`autopeft.masked_lora`: the coefficients are the slots' trainable gates, and the gates of all modules wrap
the shared factor tensors.

Export: at the last step each module becomes a plain LoRA layer with the ranks of its non-zero coefficients,
``A_m = A[nz]`` and ``B_m = B[:, nz] · λ_m[nz]`` (:func:`autopeft.masked_lora.finalize`). The result is a PEFT
LoRA with a ``rank_pattern``; it is exact, and modules whose coefficients all reached zero get no adapter. The
export stores the shared factors once per module, so it holds more numbers than the trained adapter.

Simplifies / leaves out: the paper's sparsity constraint is applied as an L1 proximal step (exact zeros, so the
export can drop ranks) with its strength relative to the learning rate. AdaLoRA's orthogonality penalty on the
shared factors is left out. The scaling ``α/r`` is fixed at ``ALPHA_RATIO``, and there is no dropout.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from autopeft import AttachContext, FloatParam, IntParam, shared
from autopeft.space import POSITIVE
from autopeft_plugins.codyra import ALPHA_RATIO, ProximalRanks

FACTOR_STD = 0.02
"""Standard deviation of the shared factors' initial values (AdaLoRA's)."""


class S2LoRA(ProximalRanks):
    """Globally shared ``A`` and ``B``, a per-module rank-coefficient vector made sparse by an L1 proximal step."""

    name = "s2-lora"
    summary = (
        "low-rank factors shared by all layers with a per-module rank-coefficient vector made sparse by an L1 "
        "proximal step (exported as LoRA with a rank per module)"
    )
    paper = "Liu et al., Sparsely Shared LoRA on Whisper for Child Speech Recognition, arXiv:2309.11756"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "r": IntParam(4, 64, default=16, log=True, help="rank of the shared factors (the highest rank a module can keep)"),
            "sparsity": FloatParam(
                0.005, 0.2, default=0.03, log=True, legal=POSITIVE,
                help="soft-threshold per step on the rank coefficients, in learning rates (larger keeps fewer ranks)",
            ),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch
        from torch import nn

        from autopeft import masked_lora

        r = params["r"]
        downs: dict[int, nn.Linear] = {}
        ups: dict[int, nn.Linear] = {}

        def shared_factor(bank: dict[int, nn.Linear], width: int, in_features: int, out_features: int, like: torch.Tensor) -> nn.Linear:
            if width not in bank:
                bank[width] = nn.Linear(in_features, out_features, bias=False, device=like.device, dtype=like.dtype)
                nn.init.normal_(bank[width].weight, std=FACTOR_STD)
            return bank[width]

        def gate(linear: nn.Linear) -> masked_lora.SlotGate:
            # The module's own A is dropped: its gate applies the A shared by every module of its input width.
            down = shared_factor(downs, linear.in_features, linear.in_features, r, linear.weight)
            return masked_lora.SlotGate(down, trainable_gate=True, init_gate=0.0)

        model = masked_lora.attach(model, context, r, ALPHA_RATIO, gate_factory=gate)
        for layer in masked_lora.slot_layers(model).values():
            own = layer.lora_B[masked_lora.ADAPTER]
            up = shared_factor(ups, own.out_features, r, own.out_features, own.weight)
            layer.lora_B[masked_lora.ADAPTER] = masked_lora.SlotB(up, masked_lora.gate_of(layer))
        self.start(model, params, sparsity=params["sparsity"])
        return model

    def strength(self, state: SimpleNamespace, step: int, context: AttachContext) -> float:
        return state.sparsity


VARIANTS = [S2LoRA]
