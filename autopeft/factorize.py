"""Matrix factorizations of adapted weights, shared by the variants built on them (SVFit, LoLDU, LoRA-SB, Comp-LoRA).

Every function works on a weight as ``out × in`` in float32, whatever the model's dtype and whether the layer
stores its weight transposed (``fan_in_fan_out``, GPT-2's ``Conv1D``): a decomposition in bfloat16 would lose the
small singular values and pivots these methods depend on. The results are moved back to the adapter's dtype by
the caller. Torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from autopeft.errors import TrialFailed

if TYPE_CHECKING:
    import torch


def as_out_in(matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``matrix`` (a weight or its gradient, as stored) as a float32 ``out × in`` matrix."""
    matrix = matrix.detach().float()
    return matrix.T if fan_in_fan_out else matrix


def layer_weight(layer: Any) -> torch.Tensor:
    """The frozen base weight of a PEFT LoRA layer as a float32 ``out × in`` matrix."""
    return as_out_in(layer.get_base_layer().weight, getattr(layer, "fan_in_fan_out", False))


def truncated_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triples ``(U_k, S_k, Vh_k)`` of ``matrix``, computed exactly in float32.

    ``U_k`` is ``out × k`` and ``Vh_k`` is ``k × in``, both with orthonormal columns / rows, so
    ``U_k · diag(S_k) · Vh_k`` is the best rank-``k`` approximation of ``matrix``.
    """
    import torch

    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def best_rank_approximation(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-``k`` approximation of ``matrix`` (Eckart–Young), in float32."""
    u, s, vh = truncated_svd(matrix, k)
    return (u * s) @ vh


def ldu(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pivoted LDU factors ``(P, L, D, U)`` of ``matrix`` (``out × in``) with ``matrix = P · L · diag(D) · U``.

    ``P`` is the ``out × out`` row permutation of partial pivoting, ``L`` (``out × m``) unit lower triangular,
    ``U`` (``m × in``) unit upper triangular and ``D`` the ``m`` pivots, ``m = min(out, in)``. A zero pivot (a
    rank-deficient weight) keeps its row of ``U`` unnormalised with ``D = 1`` there, so the product stays exact.
    """
    import torch

    p, lower, upper = torch.linalg.lu(matrix.float())
    pivots = torch.diagonal(upper)
    pivots = torch.where(pivots == 0, torch.ones_like(pivots), pivots)
    return p, lower, pivots, upper / pivots[:, None]


def require_rank(model: Any, module_names: list[str], rank: int, method: str, what: str = "rank") -> None:
    """Fail the trial unless every named module's weight has at least ``rank`` components (min(out, in))."""
    for name in module_names:
        shape = tuple(model.get_submodule(name).weight.shape)
        if min(shape) < rank:
            raise TrialFailed(f"{method} {what} {rank} exceeds min(out, in) of {name} ({shape[0]}x{shape[1]})")


@lru_cache(maxsize=None)
def diagonal_after_basis_class():
    """The ``DiagonalAfterBasis`` module class, defined on first use so that this module does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class DiagonalAfterBasis(nn.Module):
        """``x ↦ diag(g·d − d₀)·A·x`` with A (r × in) frozen and the r numbers d (and optionally g) trained.

        Used as PEFT's ``lora_A`` in front of a frozen ``lora_B``, so the update is ``B · diag(g·d − d₀) · A``:
        only a diagonal between two frozen factors moves. ``d`` starts at ``d₀`` and ``g`` at 1, so the update
        starts at exactly zero; with ``d₀ = 0`` and no ``g`` the diagonal is itself the update (a delta).
        """

        def __init__(self, basis: torch.Tensor, start: torch.Tensor, train_scale: bool) -> None:
            super().__init__()
            # Not persistent: the bases come from W, and the export stores the materialised product instead.
            self.register_buffer("basis", basis, persistent=False)
            # 1 × r rows rather than vectors: PEFT reads 1-D LoRA tensors as unsharded ZeRO-3 shards.
            self.register_buffer("start", start.reshape(1, -1).clone(), persistent=False)
            self.diagonal = nn.Parameter(start.reshape(1, -1).clone())
            self.scale = nn.Parameter(torch.ones(1, 1, dtype=basis.dtype, device=basis.device)) if train_scale else None

        def effective_diagonal(self) -> torch.Tensor:
            """The r numbers between the frozen factors: ``g·d − d₀``."""
            diagonal = self.diagonal if self.scale is None else self.scale * self.diagonal
            return (diagonal - self.start)[0]

        @property
        def weight(self) -> torch.Tensor:
            return self.effective_diagonal()[:, None] * self.basis

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Through ``weight``, so the exported matrix computes exactly what was trained.
            return F.linear(x, self.weight)

    return DiagonalAfterBasis
