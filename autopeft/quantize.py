"""Adapter-weight quantization: train with fake quantization, export weights that lie on the grid.

Each LoRA factor (``lora_A``, ``lora_B``) of a module with ``bits < 16`` is quantized symmetrically per output
row to ``2**(bits-1) - 1`` levels each side of zero. During training the rounding is bypassed in the backward pass
(straight-through estimator), so gradients flow as if the weights were continuous. Before export the
quantization is baked in: the saved values are exactly on the grid, and ``adapter_bits.json`` records the bits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FULL_PRECISION = 16


def quantize_ste(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row uniform quantization with a straight-through gradient."""
    levels = 2 ** (bits - 1) - 1
    scale = weight.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
    quantized = (weight / scale).round().clamp(-levels, levels) * scale
    return weight + (quantized - weight).detach()


def _fake_quantizer(bits: int):
    import torch

    class FakeQuantize(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bits = bits

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return quantize_ste(weight, self.bits)

    return FakeQuantize()


def _lora_factors(model: torch.nn.Module, name: str) -> list[torch.nn.Linear]:
    import torch

    layer = model.get_submodule(name)
    factors = []
    for attribute in ("lora_A", "lora_B"):
        container = getattr(layer, attribute, None)
        if isinstance(container, torch.nn.ModuleDict):
            factors += [m for m in container.values() if isinstance(m, torch.nn.Linear)]
    return factors


def apply_adapter_bits(model: torch.nn.Module, bits: dict[str, int]) -> None:
    """Fake-quantize the LoRA factors of each named module (PEFT model names) to its number of bits."""
    from torch.nn.utils import parametrize

    for name, module_bits in bits.items():
        if module_bits >= FULL_PRECISION:
            continue
        for factor in _lora_factors(model, name):
            parametrize.register_parametrization(factor, "weight", _fake_quantizer(module_bits))


def bake_adapter_bits(model: torch.nn.Module) -> dict[str, int]:
    """Replace fake quantization by the quantized values themselves; return ``{module name: bits}``.

    Names are those of the base model (PEFT's ``base_model.model.`` prefix removed), as in the exported adapter.
    """
    from torch.nn.utils import parametrize

    baked: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module, "weight"):
            bits = module.parametrizations.weight[0].bits
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            owner = name.rsplit(".lora_", 1)[0].removeprefix("base_model.model.")
            baked[owner] = bits
    return baked


def write_adapter_bits(bits: dict[str, int], out_dir: Path) -> None:
    """Record the bits of each quantized module next to the adapter (read by autopeft's export)."""
    if bits:
        (out_dir / "adapter_bits.json").write_text(json.dumps(dict(sorted(bits.items())), indent=2))
