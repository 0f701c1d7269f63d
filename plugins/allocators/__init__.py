"""Allocators that decide ranks (and bits, and placement) while the adapter trains, each exported as plain LoRA.

One module per method, all built on :mod:`autopeft.masked_lora` (a PEFT LoRA model with ``r_max`` slots per
module and a gate per slot between ``A`` and ``B``) and on :class:`autopeft.allocator_base.Allocator` (the
common space, per-trial state and the end of training). They differ only in how the gates move during training:

- :mod:`.increlora` (``increlora``): grows ranks where the update matters most;
- :mod:`.sora` (``sora``): a sparse gate per slot, soft-thresholded after each step;
- :mod:`.lora_squeeze` (``lora-squeeze``): trains high, compresses by SVD, continues;
- :mod:`.diffora` (``diffora``): which modules get an adapter, by a differentiable relaxation;
- :mod:`.bayesian_lora` (``bayesian-lora``): hard-concrete gates for ranks and for quantization bits.

Each ends in a standard PEFT LoRA folder whose ``rank_pattern`` / ``alpha_pattern`` give each module the rank it
ended with.
"""

from __future__ import annotations

from autopeft import Variant, hookimpl
from autopeft_plugins.allocators.bayesian_lora import BayesianLoRA
from autopeft_plugins.allocators.diffora import DiffoRA
from autopeft_plugins.allocators.increlora import IncreLoRA
from autopeft_plugins.allocators.lora_squeeze import LoRASqueeze
from autopeft_plugins.allocators.sora import SoRA

__all__ = ["BayesianLoRA", "DiffoRA", "IncreLoRA", "LoRASqueeze", "SoRA", "autopeft_variants"]


@hookimpl
def autopeft_variants() -> list[Variant]:
    """The five in-training allocators."""
    return [IncreLoRA(), SoRA(), LoRASqueeze(), DiffoRA(), BayesianLoRA()]
