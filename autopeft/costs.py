"""Cost measures of a trial, recorded for every trial and usable as objectives.

- ``trainable_params``: parameters that receive gradients (adapter and task head).
- ``adapter_bytes``: size of what the exported adapter stores, each tensor at its bits (quantized adapter weights
  at their bit width plus one 16-bit scale per row, the rest at their dtype's width). Measured on the saved adapter once it is exported; the
  estimate at attach time (used to stop oversized configurations early) is what PEFT would save then.
- ``bops_per_token``: bit operations of one token's forward pass through the adapted linear layers: for each
  transformer-block linear, MACs × weight bits × activation bits, plus the adapter's own MACs × adapter bits ×
  activation bits. Base weights count at the base model's bits (4 or 8 when the base is quantized).
- ``peak_memory_mb``: peak GPU memory allocated (CUDA) or the process's peak resident memory (CPU).

``trainable_params`` and ``adapter_bytes`` are measured on a PEFT model (its parameters, PEFT's state dict, the
saved ``adapter_model.safetensors``). A variant whose trainable state lives elsewhere reports them itself with
:meth:`autopeft.hookspecs.Variant.sizes`; what it reports replaces the measurement, at attach time and after
training alike.
"""

from __future__ import annotations

import math
import resource
from typing import TYPE_CHECKING

from autopeft.adapters import adapter_ranks, trainable_parameters
from autopeft.errors import TrialFailed
from autopeft.placement import AdapterSite

if TYPE_CHECKING:
    import torch

    from autopeft.hookspecs import Variant

COST_NAMES = ("trainable_params", "adapter_bytes", "bops_per_token", "peak_memory_mb", "train_seconds")
SIZE_NAMES = ("trainable_params", "adapter_bytes")
"""The costs a variant may report itself (:meth:`autopeft.hookspecs.Variant.sizes`)."""
SCALE_BITS = 16
"""Bits of the per-row scale a quantized adapter weight stores next to its payload (symmetric per-row grid)."""


def _bytes(tensors: dict[str, torch.Tensor], bits: dict[str, int]) -> int:
    total_bits = 0
    for key, tensor in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if bits.get(module, 16) < 16:
            # A rank-r factor has rows of r (B) or `in` (A) entries, each row with its own scale: for B at 2-4
            # bits the scales weigh as much as the payload, so they are counted.
            rows = tensor.shape[0] if tensor.dim() > 1 else 1
            total_bits += tensor.numel() * bits[module] + rows * SCALE_BITS
        else:
            total_bits += tensor.numel() * tensor.element_size() * 8
    return total_bits // 8


def adapter_bytes(model: torch.nn.Module, bits: dict[str, int]) -> int:
    """Bytes of the adapter's tensors as PEFT would save them now, quantized modules counted at their bits."""
    from peft import get_peft_model_state_dict

    return _bytes(get_peft_model_state_dict(model), bits)


def exported_bytes(adapter_dir, bits: dict[str, int]) -> int:
    """Bytes of an exported adapter's tensors (``adapter_model.safetensors``), at their bits."""
    from safetensors.torch import load_file

    return _bytes(load_file(str(adapter_dir / "adapter_model.safetensors")), bits)


def bops_per_token(model: torch.nn.Module, sites: list[AdapterSite], bits: dict[str, int], base_bits: int, activation_bits: int) -> int:
    """Bit operations of the block linears and their adapters for one token."""
    by_name = {s.name: s for s in sites}
    base = sum(s.in_features * s.out_features for s in sites) * base_bits * activation_bits
    adapters = 0
    for name, rank in adapter_ranks(model).items():
        site = by_name.get(name)
        if site is not None:
            adapters += rank * (site.in_features + site.out_features) * bits.get(name, activation_bits) * activation_bits
    return base + adapters


def peak_memory_mb(device: torch.device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reported_sizes(variant: Variant, model: torch.nn.Module) -> dict[str, float]:
    """The sizes ``variant`` reports of its adapter on ``model`` (:meth:`~autopeft.hookspecs.Variant.sizes`),
    checked; ``{}`` when it reports none. A malformed report fails the trial with :class:`TrialFailed` naming the
    variant, the key and the value, rather than recording a wrong size."""
    sizes = variant.sizes(model)
    if sizes is None:
        return {}
    if not isinstance(sizes, dict):
        raise TrialFailed(f"variant {variant.name!r}: sizes() returned {type(sizes).__name__}; return a dict with keys from {list(SIZE_NAMES)}, or None")
    for key, value in sizes.items():
        if key not in SIZE_NAMES:
            raise TrialFailed(f"variant {variant.name!r}: sizes() reported {key!r}; the sizes a variant may report are {list(SIZE_NAMES)}")
        # bool is an int to Python, but never a size.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise TrialFailed(f"variant {variant.name!r}: sizes() reported {key}={value!r}; a size is a finite number >= 0")
    return dict(sizes)


def measure(
    model: torch.nn.Module,
    sites: list[AdapterSite],
    bits: dict[str, int],
    base_bits: int,
    dtype: torch.dtype,
    reported: dict[str, float] | None = None,
) -> dict[str, float]:
    """Every static cost of the attached adapter (peak memory and seconds are added by the trial runner).

    ``reported`` (from :func:`reported_sizes`) replaces the measurement of the sizes it holds: those are not
    measured at all, since measuring them assumes a PEFT model the variant may not have built.
    """
    reported = reported or {}
    activation_bits = dtype.itemsize * 8
    return {
        "trainable_params": reported["trainable_params"] if "trainable_params" in reported else trainable_parameters(model),
        "adapter_bytes": reported["adapter_bytes"] if "adapter_bytes" in reported else adapter_bytes(model, bits),
        "bops_per_token": bops_per_token(model, sites, bits, base_bits if base_bits < 16 else activation_bits, activation_bits),
    }
