"""Bayesian-LoRA: hard-concrete gates choose each module's rank and, Bayesian-Bits style, its quantization bits.

Paper: Meo et al., "Bayesian-LoRA: LoRA based Parameter Efficient Fine-Tuning using Optimal Quantization levels
and Rank Values trough Differentiable Bayesian Gates", arXiv:2406.13046.

What it follows. Hard-concrete gates (temperature 2/3, stretch (−0.1, 1.1)) on the rank slots and on the
residuals of a 2-bit grid refined to 4, 8 and 16 bits, trained under a prior on the expected rank and the
bit operations, with Bayesian Bits' test-time rule (a gate is on when ``P(gate = 0) < 0.34``). The exported
factors are exactly the quantized values the evaluated model used, with the bits in ``adapter_bits.json``.

Simplifies / leaves out: the rank gates are nested (slot ``i`` on only if slots 1..i are, autopeft's choice),
they gate slots of an ordinary LoRA rather than the singular values of an SVD-form adapter, the prior's BOPs
use the expected rank and module size instead of measured MACs, one set of bit gates serves both factors of a
module, quantization ranges follow the weights instead of being learned, activations are not quantized, and
the prior's weight ramps up over ``prior_warmup_fraction`` of the steps (an addition).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from autopeft import AttachContext, FloatParam, IntParam
from autopeft.allocator_base import Allocator, allocator_state, set_allocator_state


HC_BETA, HC_GAMMA, HC_ZETA = 2.0 / 3.0, -0.1, 1.1
HC_OFF_THRESHOLD = 0.34
"""A gate is kept at test time when its probability of being exactly 0 is below this (Bayesian Bits' value)."""
BIT_LADDER = (4, 8, 16)


def _bayesian_gate(linear, gate_lr_multiplier: float):
    import torch

    from autopeft.masked_lora import SlotGate

    def round_ste(x):
        return x + (torch.round(x) - x).detach()

    def prob_nonzero(log_alpha):
        return torch.sigmoid(log_alpha - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))

    def sample(log_alpha):
        u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / HC_BETA)
        return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    class BayesianGate(SlotGate):
        """Rank gates (slot 0 always on, slot i on only if slots 1..i are) and Bayesian-Bits bit gates.

        ``log_alpha = multiplier · θ``: the multiplier is the gates' learning-rate ratio under Adam.
        """

        def __init__(self, linear) -> None:
            super().__init__(linear)
            r, like = linear.out_features, dict(device=linear.weight.device, dtype=torch.float32)
            self.lr_multiplier = gate_lr_multiplier
            # Bayesian Bits' initial values: rank (pruning) gates at 6, bit gates at P(on) ≈ 0.9 before stretching.
            # Rows of 1 × n: PEFT expects every lora_A tensor in a state dict to be 2-D.
            self.rank_theta = torch.nn.Parameter(torch.full((1, r - 1), 6.0 / gate_lr_multiplier, **like))
            self.bits_theta = torch.nn.Parameter(torch.full((1, len(BIT_LADDER)), HC_BETA * math.log(9.0) / gate_lr_multiplier, **like))
            self.bops = 1.0
            self._bit_sample = None

        def rank_log_alpha(self):
            return self.rank_theta[0] * self.lr_multiplier

        def bits_log_alpha(self):
            return self.bits_theta[0] * self.lr_multiplier

        def _nested(self, z):
            return torch.cat([torch.ones(1, device=z.device, dtype=z.dtype), torch.cumprod(z, 0)])

        def kept(self, log_alpha):
            return ((1 - prob_nonzero(log_alpha)) < HC_OFF_THRESHOLD).float()

        def slot_values(self):
            log_alpha = self.rank_log_alpha()
            z = sample(log_alpha) if self.training else self.kept(log_alpha)
            return self._nested(z).to(self.mask.dtype) * self.mask

        def active(self):
            return (self._nested(self.kept(self.rank_log_alpha())) * self.mask) != 0

        def bits(self) -> int:
            bits = 2
            for level, on in zip(BIT_LADDER, self.kept(self.bits_log_alpha()).tolist()):
                if not on:
                    break
                bits = level
            return bits

        def _bit_gates(self):
            if self.training and self._bit_sample is not None:
                return self._bit_sample
            return self.kept(self.bits_log_alpha())

        def forward(self, x):
            self._bit_sample = sample(self.bits_log_alpha()) if self.training else None
            return super().forward(x)

        def quantize(self, w, columns=None):
            """Bayesian Bits: 2-bit base plus residuals on grids 5, 17 and 257 times finer, each gated."""
            gates = self._bit_gates().to(w.dtype)
            magnitude = w.detach().abs() if columns is None else w.detach().abs() * columns
            limit = magnitude.amax(-1, keepdim=True).clamp_min(1e-12) * (1 - 1e-7)
            w = w + (torch.maximum(torch.minimum(w, limit), -limit) - w).detach()
            step = 2 * limit / (1 - 1e-7) / 3
            base = step * round_ste(w / step)
            partial, residuals = base, []
            for previous in (2, 4, 8):
                step = step / (2**previous + 1)
                residual = step * round_ste((w - partial) / step)
                partial = partial + residual
                residuals.append(residual)
            gated = 0
            for residual, gate in zip(reversed(residuals), reversed(gates)):
                gated = gate * (residual + gated)
            return base + gated

        def factor_a(self):
            return self.quantize(self.linear.weight)

        def factor_b(self, weight):
            return self.quantize(weight, columns=self.active().to(weight.dtype))

        def penalty(self):
            """(expected rank / r_max, its BOPs-weighted bit cost): the two terms of the prior."""
            rank = self._nested(prob_nonzero(self.rank_log_alpha())).sum() / self.r_max
            chain = torch.cumprod(prob_nonzero(self.bits_log_alpha()), 0)
            bits = sum(level / 16 * chain[i] for i, level in enumerate(BIT_LADDER))
            return rank, self.bops * rank * bits

    return BayesianGate(linear)


class BayesianLoRA(Allocator):
    """Per-slot hard-concrete gates choose each module's rank; per-module Bayesian-Bits gates choose its bits.

    Rank: ``r_max − 1`` gates with temperature 2/3 and stretch (−0.1, 1.1); slot 0 is always on and slot ``i``
    is on only if the gates of slots 1..i all are. This nesting is autopeft's choice, not taken from the paper
    or its code: it makes a module's rank the count of its leading slots, the way Bayesian Bits nests its bit
    gates, so the rank prior is an expected rank. Bits: ``A`` and
    ``B`` are quantized per row to a 2-bit grid plus residuals on grids 5, 17 and 257 times finer (4, 8, 16 bits),
    each residual switched by its own gate, with straight-through rounding. Prior (``regularizer``):
    ``λ_rank · mean_m E[r_m]/r_max + λ_bits · mean_m BOPs_m · E[r_m]/r_max · Σ_b (b/16)·P(gates up to b on)``
    with ``BOPs_m ∝ (in + out)`` of module m. The gate parameters learn ``gate_lr_multiplier`` times faster
    than the LoRA factors (a reparametrisation, since autopeft uses one learning rate). The prior's weight rises
    linearly from 0 over ``prior_warmup_fraction`` of the steps (an addition to the paper: the LoRA update starts
    at zero, and without it every gate would be pruned before any slot has shown what it is worth).

    At evaluation and export a gate is on when ``P(gate = 0) < 0.34`` (Bayesian Bits' test-time rule); the
    module's rank is its number of nested slots on and its bits the last consecutive bit gate on. The exported
    ``A`` and ``B`` are exactly the quantized values the evaluated model used (each row on the symmetric grid
    of ``2^(b-1) − 1`` levels either side of zero whose largest level is the row's largest magnitude), and
    ``adapter_bits.json`` records the bits. Simplifications: the ranks are gated slots of an ordinary LoRA
    rather than the singular values of an SVD-form adapter, the prior's BOPs use the expected rank and module
    size instead of measured MACs, one set of bit gates serves both factors of a module, quantization ranges
    follow the weights instead of being learned, and activations are not quantized.

    Budget: there is no target size; ``lambda_rank`` (ranks) and ``lambda_bits`` (bits) set it, and the outer
    search tunes them (a larger ``lambda_rank`` gives a smaller adapter). The learned bits reach the trial's
    costs: ``finalize`` puts autopeft's fake quantization on each module at its bits, the trial runner bakes
    them and counts ``adapter_bytes`` and ``bops_per_token`` at those bits.
    """

    name = "bayesian-lora"
    size_decided_in_training = True
    summary = "learns each module's rank and quantization bits with hard-concrete gates under a rank and BOPs prior"
    paper = (
        "Meo et al., Bayesian-LoRA: LoRA based Parameter Efficient Fine-Tuning using Optimal Quantization levels "
        "and Rank Values trough Differentiable Bayesian Gates, arXiv:2406.13046"
    )

    def search_space(self):
        return self._space(
            max_rank=IntParam(4, 32, default=8, log=True, help="slots per module (the highest rank a module can keep)"),
            lambda_rank=FloatParam(1e-4, 1.0, default=1e-2, log=True, help="weight of the expected-rank prior"),
            lambda_bits=FloatParam(1e-4, 1.0, default=1e-2, log=True, help="weight of the bit-operations prior"),
            gate_lr_multiplier=FloatParam(1.0, 1000.0, default=100.0, log=True, help="learning rate of the gates relative to the factors"),
            prior_warmup_fraction=FloatParam(0.0, 0.5, default=0.2, help="fraction of the steps over which the prior weight ramps up"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from autopeft import masked_lora

        model = masked_lora.attach(
            model, context, params["max_rank"], params["alpha_ratio"], params["dropout"],
            gate_factory=lambda linear: _bayesian_gate(linear, params["gate_lr_multiplier"]), wrap_b=True,
        )
        layers = masked_lora.slot_layers(model)
        largest = max(layer.in_features + layer.out_features for layer in layers.values())
        for layer in layers.values():
            masked_lora.gate_of(layer).bops = (layer.in_features + layer.out_features) / largest
        warmup = params["prior_warmup_fraction"] * context.total_steps
        set_allocator_state(model, lambda_rank=params["lambda_rank"], lambda_bits=params["lambda_bits"], warmup=warmup)
        return model

    def regularizer(self, model, step: int, context: AttachContext):
        from autopeft import masked_lora

        state = allocator_state(model)
        if state.final:
            return None
        terms = [gate.penalty() for gate in masked_lora.gates(model).values()]
        rank = sum(t[0] for t in terms) / len(terms)
        bits = sum(t[1] for t in terms) / len(terms)
        weight = min(1.0, step / state.warmup) if state.warmup > 0 else 1.0
        return weight * (state.lambda_rank * rank + state.lambda_bits * bits)

    def finalize(self, model) -> dict[str, int]:
        """Plain LoRA with the kept slots; modules below 16 bits get autopeft's fake quantization at their bits
        (an identity on these values, which already lie on that grid), so the runner's ``bake_adapter_bits``
        and cost measures see the bits."""
        from autopeft import masked_lora
        from autopeft.quantize import apply_adapter_bits

        state = allocator_state(model)
        if state.final:
            return masked_lora.final_ranks(model)
        bits = {name: gate.bits() for name, gate in masked_lora.gates(model).items()}
        ranks = super().finalize(model)
        state.bits = {name: b for name, b in bits.items() if ranks[name] > 0 and b < 16}
        apply_adapter_bits(model, {masked_lora.PREFIX + name: b for name, b in state.bits.items()})
        return ranks

    def export(self, model, out_dir) -> None:
        from autopeft import masked_lora
        from autopeft.quantize import bake_adapter_bits, write_adapter_bits

        self.finalize(model)
        bake_adapter_bits(model)  # a no-op when the trial runner has baked them already
        masked_lora.save(model, out_dir)
        write_adapter_bits(allocator_state(model).bits, Path(out_dir))
