"""Fixed transforms, sparse supports and exact LoRA export for adapters whose update is not a LoRA product.

Shared by LoCA (a sparse DCT spectrum), QWHA (sparse Walsh–Hadamard coefficients), SLTrain (a low-rank plus a
sparse matrix on a random support) and LQ-LoRA (a quantized base plus a low-rank part):

- :func:`dct_matrix` and :func:`hadamard_matrix`: orthonormal transform matrices, so a coefficient matrix and
  the weight update it stands for have the same Frobenius norm and the same rank;
- :func:`random_support`: a seeded uniform sample of entries of a matrix, without repetition;
- :func:`sparse_coefficients_class`: a PEFT ``lora_B`` holding trained values on a support (and, optionally, a
  fixed output transform), with :func:`fixed_linear_class` as its ``lora_A`` (the input transform);
- :func:`save_as_lora`: write any dense per-module update ``ΔW`` as an ordinary PEFT LoRA folder whose rank per
  module is the numerical rank of ``ΔW`` (an SVD, exact up to float rounding; full rank at most).

The modules live inside an ordinary PEFT LoRA model (``lora_A`` / ``lora_B`` of each layer replaced), so PEFT's
forward ``lora_B(lora_A(x)) · scaling``, its task-head handling and ``unload`` keep working. Torch is imported
inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ADAPTER = "default"
PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------------------------
# Transforms and supports
# --------------------------------------------------------------------------------------------------------------


def dct_matrix(n: int, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C`` (``n × n``): ``C·x`` is the DCT of ``x`` and ``Cᵀ·X`` its inverse.

    For a coefficient matrix ``F`` (``out × in``), ``C_outᵀ · F · C_in`` is its 2-D inverse DCT.
    """
    import torch

    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype=dtype or torch.get_default_dtype(), device=device)


def hadamard_matrix(n: int, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
    """An orthonormal, symmetric Walsh–Hadamard matrix ``H`` of order ``n`` (``H·H = I``).

    For ``n`` a power of two it is Sylvester's ``H_n / √n``. Otherwise it is block diagonal, one Sylvester block
    per run of ``b`` coordinates, ``b`` the largest power of two dividing ``n`` (384 = 3 × 128: three blocks of
    128); for odd ``n`` that is the identity.
    """
    import torch

    block = n & -n  # the largest power of two dividing n
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < block:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    sylvester = sylvester / math.sqrt(block)
    matrix = torch.block_diag(*[sylvester] * (n // block))
    return matrix.to(dtype=dtype or torch.get_default_dtype(), device=device)


def random_support(rows: int, cols: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct flat indices (``row · cols + col``) of a ``rows × cols`` matrix, uniformly at random.

    Drawn from ``generator`` alone, so the same seed gives the same support. Returned sorted (int64). Draws with
    replacement and keeps first occurrences, which needs memory for ``count`` indices only, not for the matrix.
    """
    import torch

    total = rows * cols
    if not 0 <= count <= total:
        raise ValueError(f"cannot choose {count} entries of a {rows}x{cols} matrix")
    if 2 * count > total:
        return torch.randperm(total, generator=generator)[:count].sort().values
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < count:
        draws = torch.cat([chosen, torch.randint(total, (2 * (count - chosen.numel()) + 16,), generator=generator)])
        values, inverse = torch.unique(draws, return_inverse=True)
        # Keep the first draw of each value, in draw order, so the sample stays uniform when it is cut.
        first = torch.full((values.numel(),), draws.numel(), dtype=torch.long).scatter_reduce(0, inverse, torch.arange(draws.numel()), "amin")
        chosen = draws[first.sort().values]
    return chosen[:count].sort().values


def support_mask(support: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A boolean ``rows × cols`` matrix that is True exactly on the flat indices ``support``."""
    import torch

    mask = torch.zeros(rows * cols, dtype=torch.bool, device=support.device)
    mask[support] = True
    return mask.view(rows, cols)


# --------------------------------------------------------------------------------------------------------------
# Modules that replace PEFT's lora_A / lora_B
# --------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def fixed_linear_class():
    """The ``FixedLinear`` module class (defined on first use so that this module does not import torch)."""
    from torch import nn
    from torch.nn import functional as F

    class FixedLinear(nn.Module):
        """``x ↦ T·x`` with a frozen matrix ``T`` (a transform): used as ``lora_A``, it is the input transform."""

        def __init__(self, matrix: torch.Tensor) -> None:
            super().__init__()
            # Not persistent: the transform is fixed by the layer's shape; the export stores the product instead.
            self.register_buffer("matrix", matrix, persistent=False)

        @property
        def weight(self) -> torch.Tensor:
            return self.matrix

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.matrix)

    return FixedLinear


@lru_cache(maxsize=None)
def sparse_coefficients_class():
    """The ``SparseCoefficients`` module class (defined on first use so that this module does not import torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SparseCoefficients(nn.Module):
        """``h ↦ O·F·h`` where ``F`` (``out × in``) is zero except for trained values on ``support``, and ``O``
        a fixed ``out × out`` output transform (or none: ``h ↦ F·h``). Used as ``lora_B`` after a
        :func:`fixed_linear_class` ``lora_A`` holding the input transform ``T``, the update is ``O·F·T``.

        ``support`` (flat indices ``row · in + col``) is a buffer: a method that learns locations rewrites it in
        place, and each value keeps its optimizer state when its location moves. With ``track_gradient`` set,
        the gradient of the loss with respect to the whole dense ``F`` (every location, not only the support)
        is kept after each backward pass in ``dense_gradient()``.
        """

        def __init__(self, shape: tuple[int, int], support: torch.Tensor, values: torch.Tensor, output: torch.Tensor | None = None) -> None:
            super().__init__()
            self.shape = tuple(shape)
            self.register_buffer("support", support.to(device=values.device), persistent=False)
            # A 1 × n row rather than a vector: PEFT reads 1-D LoRA tensors as unsharded ZeRO-3 shards.
            self.values = nn.Parameter(values.reshape(1, -1).clone())
            if output is not None:
                self.register_buffer("output", output, persistent=False)
            else:
                self.output = None
            self.track_gradient = False
            self._dense: torch.Tensor | None = None

        def dense(self) -> torch.Tensor:
            """``F`` as a dense ``out × in`` matrix (differentiable in ``values``)."""
            flat = self.values.new_zeros(self.shape[0] * self.shape[1]).index_put((self.support,), self.values[0])
            matrix = flat.view(self.shape)
            if self.track_gradient and matrix.requires_grad:
                matrix.retain_grad()
                self._dense = matrix
            return matrix

        def dense_gradient(self) -> torch.Tensor | None:
            """The loss gradient with respect to the dense ``F`` at the last backward pass (when tracked)."""
            return None if self._dense is None else self._dense.grad

        def forget_gradient(self) -> None:
            self._dense = None

        @property
        def weight(self) -> torch.Tensor:
            matrix = self.dense()
            return matrix if self.output is None else self.output @ matrix

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            h = F.linear(h, self.dense())
            return h if self.output is None else F.linear(h, self.output)

    return SparseCoefficients


# --------------------------------------------------------------------------------------------------------------
# The PEFT LoRA model these modules live in, and its export
# --------------------------------------------------------------------------------------------------------------


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """``{base-model module name: PEFT LoRA layer}`` of the adapted modules, sorted by name."""
    from peft.tuners.lora import LoraLayer

    found = {n.removeprefix(PREFIX): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}
    return dict(sorted(found.items()))


def layer_delta(layer: Any) -> torch.Tensor:
    """The update ``ΔW`` (``out × in``, float32) a PEFT LoRA layer adds: ``scaling · lora_B.weight · lora_A.weight``,
    or ``scaling · lora_A.weight`` when ``lora_B`` is an identity (``lora_A`` then computes the whole update)."""
    import torch

    a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    with torch.no_grad():
        delta = a.weight.float() if isinstance(b, torch.nn.Identity) else b.weight.float() @ a.weight.float()
    return delta * float(layer.scaling[ADAPTER])


def exact_lora_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B · A = delta`` up to float rounding, of the smallest such rank (at least 1).

    The rank is the numerical rank of ``delta``: singular values above ``σ_max · max(out, in) · ε`` of the
    float32 grid (the singular values dropped are below what float32 weights can represent anyway). Computed in
    float64; ``B = U·√S`` and ``A = √S·Vᴴ`` share the scale.
    """
    import torch

    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    tolerance = float(s.max()) * max(delta.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    rank = max(1, int((s > tolerance).sum()))
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(delta.dtype), (root[:, None] * vh[:rank]).to(delta.dtype)


def save_as_lora(peft_model: Any, deltas: dict[str, torch.Tensor], out_dir: Path) -> dict[str, int]:
    """Write ``deltas`` (``{module name: ΔW}`` for every LoRA layer of ``peft_model``) as a plain PEFT LoRA folder.

    Each module gets the exact factors of :func:`exact_lora_factors` at scaling 1 (``lora_alpha = r``), ranks
    differing per module through ``rank_pattern``, checked against PEFT's own matching. The task head
    (``modules_to_save``) is saved as PEFT saves it. The model is left exactly as it was: the factor modules and
    the config are swapped in only while ``save_pretrained`` runs. Returns ``{module name: exported rank}``.
    """
    import dataclasses

    import torch
    from torch import nn

    from autopeft.adapters import lora_rank_kwargs
    from autopeft.masked_lora import base_module_names, check_rank_config

    layers = lora_layers(peft_model)
    if set(deltas) != set(layers):
        raise ValueError(f"save_as_lora needs an update for every adapted module; missing {sorted(set(layers) - set(deltas))[:4]}")
    factors = {name: exact_lora_factors(deltas[name].float()) for name in layers}
    ranks = {name: a.shape[0] for name, (_, a) in factors.items()}
    original_config = peft_model.peft_config[ADAPTER]
    config = dataclasses.replace(
        original_config, **lora_rank_kwargs(ranks, 1.0), lora_dropout=0.0, use_rslora=False, use_dora=False, init_lora_weights=True
    )
    check_rank_config(config, base_module_names(peft_model.base_model.model), ranks, 1.0)
    swapped = []
    try:
        for name, layer in layers.items():
            b, a = factors[name]
            template = layer.lora_A[ADAPTER].weight
            linears = []
            for matrix in (a, b):
                linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False, device=template.device, dtype=template.dtype)
                with torch.no_grad():
                    linear.weight.copy_(matrix)
                linears.append(linear)
            swapped.append((layer, layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]))
            layer.lora_A[ADAPTER], layer.lora_B[ADAPTER] = linears
        peft_model.peft_config[ADAPTER] = config
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        # Put the trained modules and the config back: the model stays as it was trained (and detaches normally).
        peft_model.peft_config[ADAPTER] = original_config
        for layer, a_module, b_module in swapped:
            layer.lora_A[ADAPTER], layer.lora_B[ADAPTER] = a_module, b_module
    return ranks
