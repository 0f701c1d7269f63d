"""LoRA with frozen bases and a few trained numbers per module: LoRA-XS and NOLA, which PEFT does not have.

Both are built on a PEFT LoRA model: ``lora_A`` / ``lora_B`` of each layer are swapped for small modules that
compute their matrix from frozen bases and trained coefficients, so PEFT's forward ``lora_B(lora_A(x)) · s``
(and its merge, unload and task-head handling) work unchanged. Each such module exposes its effective matrix as
``weight``; the export swaps in plain ``nn.Linear`` layers holding those matrices for the duration of
``save_pretrained``, so the saved adapter is an ordinary PEFT LoRA adapter.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from autopeft import AttachContext, CategoricalParam, IntParam, Variant, hookimpl, shared
from autopeft.errors import TrialFailed

ADAPTER = "default"
GRADIENT_BATCHES = 4


@lru_cache(maxsize=None)
def _factor_classes():
    """The factor modules, defined on first use so that importing this plugin does not import torch."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class CoreAfterBasis(nn.Module):
        """``x ↦ R·(A·x)`` with A frozen (r × in) and the r × r core R trained; acts as ``lora_A`` = R·A."""

        def __init__(self, basis: torch.Tensor) -> None:
            super().__init__()
            # Not persistent: the basis is derived from W, and the export stores R·A instead.
            self.register_buffer("basis", basis, persistent=False)
            # Zero core: the update B·R·A starts at exactly zero, and R still gets gradient Bᵀ·g·(A·x)ᵀ.
            self.core = nn.Parameter(torch.zeros(basis.shape[0], basis.shape[0], dtype=basis.dtype, device=basis.device))

        @property
        def weight(self) -> torch.Tensor:
            return self.core @ self.basis

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(F.linear(x, self.basis), self.core)

    class BasisMixture(nn.Module):
        """A matrix ``Σ_i c_i·M_i`` of frozen random bases M (k × out × in) with trained coefficients c (1 × k)."""

        def __init__(self, bases: torch.Tensor, coefficients: torch.Tensor) -> None:
            super().__init__()
            # Not persistent: the bases are regenerated from the seed, the coefficients are what NOLA stores.
            self.register_buffer("bases", bases, persistent=False)
            # A 1 × k row rather than a vector: PEFT reads 1-D LoRA tensors in a state dict as unsharded ZeRO-3
            # shards and warns about them.
            self.coefficients = nn.Parameter(coefficients.reshape(1, -1))

        @property
        def weight(self) -> torch.Tensor:
            return torch.einsum("k,koi->oi", self.coefficients[0], self.bases)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    return CoreAfterBasis, BasisMixture


def _lora_layers(peft_model) -> dict[str, Any]:
    """``{base-model module name: PEFT LoRA layer}`` of the adapted modules."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n.removeprefix(prefix): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def _plain_lora_model(model, context: AttachContext, r: int):
    """A PEFT LoRA model with scaling 1 (alpha = r) whose factors the variants then replace."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=r, lora_alpha=r, lora_dropout=0.0)
    return get_peft_model(model, config)


class FrozenBasisVariant(Variant):
    """Shared export: materialise every factor module into an ``nn.Linear`` while PEFT saves the adapter."""

    export_format = "lora"

    def export(self, model, out_dir: Path) -> None:
        import torch
        from torch import nn

        swapped = []
        for layer in _lora_layers(model).values():
            for factors in (layer.lora_A, layer.lora_B):
                module = factors[ADAPTER]
                if isinstance(module, nn.Linear):
                    continue
                weight = module.weight.detach()
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(weight)
                factors[ADAPTER] = linear
                swapped.append((factors, module))
        try:
            model.save_pretrained(str(out_dir), safe_serialization=True)
        finally:
            # Put the trained factor modules back: the model stays as it was trained (and detaches normally).
            for factors, module in swapped:
                factors[ADAPTER] = module


class LoRAXS(FrozenBasisVariant):
    """LoRA-XS: ΔW = B·R·A with B, A frozen from the truncated SVD of W and only the r × r core R trained.

    With ``basis: gradient`` (the LoRA-SB idea) B and A are instead the top singular vectors of the loss gradient
    with respect to W, averaged over a few calibration batches: the directions a full fine-tune would move first.
    """

    name = "lora-xs"
    summary = "frozen SVD bases of each weight with a trained r×r core between them (r² parameters per module)"
    paper = (
        "Bałazy et al., LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters, arXiv:2405.17604; "
        "Ponkshe et al., Initialization using Update Approximation is a Silver Bullet for Extreme Efficient "
        "Low-Rank Fine-Tuning (LoRA-SB), arXiv:2411.19557"
    )

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=16, log=True, help="rank of the frozen bases; the core has r² parameters"),
            "basis": CategoricalParam(("svd", "gradient"), default="svd", help="bases from the SVD of W or of its first gradient"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        r = params["r"]
        small = {n: tuple(model.get_submodule(n).weight.shape) for n in context.target_modules}
        small = {n: s for n, s in small.items() if min(s) < r}
        if small:
            name, (out, inp) = next(iter(small.items()))
            raise TrialFailed(f"LoRA-XS rank {r} exceeds min(out, in) of {name} ({out}x{inp}): its SVD has fewer components")
        # Gradients must be taken on the bare model, before PEFT wraps the layers.
        gradients = _first_gradients(model, context) if params["basis"] == "gradient" else {}
        peft_model = _plain_lora_model(model, context, r)
        CoreAfterBasis, _ = _factor_classes()
        with torch.no_grad():
            for name, layer in _lora_layers(peft_model).items():
                weight = layer.get_base_layer().weight
                template = layer.lora_A[ADAPTER].weight
                if name in gradients:
                    u, _, vh = torch.linalg.svd(gradients[name], full_matrices=False)
                    b, a = u[:, :r], vh[:r]
                else:
                    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
                    b, a = u[:, :r] * s[:r], vh[:r]
                layer.lora_B[ADAPTER].weight.copy_(b)
                layer.lora_B[ADAPTER].weight.requires_grad_(False)
                layer.lora_A[ADAPTER] = CoreAfterBasis(a.to(device=template.device, dtype=template.dtype).contiguous())
        return peft_model


def _first_gradients(model, context: AttachContext) -> dict:
    """The mean gradient of the task loss with respect to each target weight, over a few calibration batches."""
    import torch

    weights = {name: model.get_submodule(name).weight for name in context.target_modules}
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            for batch in context.calibration_batches(GRADIENT_BATCHES):
                model(**batch).loss.backward()
        gradients = {name: w.grad.float() / GRADIENT_BATCHES for name, w in weights.items() if w.grad is not None}
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
            weight.grad = None
    if len(gradients) < len(weights):
        raise TrialFailed("basis=gradient: the loss does not depend on every target module")
    return gradients


class NOLA(FrozenBasisVariant):
    """NOLA: A = Σ α_i·A_i and B = Σ β_j·B_j over k frozen random bases, training only α and β (2k per module).

    Bases are drawn from the trial's seed once per weight shape and shared by the modules of that shape, which
    keeps memory at k·r·(in + out) per distinct shape. β starts at zero, so the update starts at zero.
    """

    name = "nola"
    summary = "LoRA factors as trained linear mixtures of frozen seeded random bases (2k parameters per module)"
    paper = "Koohpayegani et al., NOLA: Compressing LoRA using Linear Combination of Random Basis, arXiv:2310.02556"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 16, default=8, log=True, help="rank of the LoRA factors the bases span"),
            "num_bases": IntParam(16, 512, default=128, log=True, help="random bases per factor (k)"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        r, k = params["r"], params["num_bases"]
        peft_model = _plain_lora_model(model, context, r)
        _, BasisMixture = _factor_classes()
        generator = torch.Generator().manual_seed(context.seed)
        bases: dict[tuple, tuple] = {}
        for name, layer in sorted(_lora_layers(peft_model).items()):
            template = layer.lora_A[ADAPTER].weight
            out_features, in_features = layer.get_base_layer().weight.shape
            shape = (out_features, in_features)
            if shape not in bases:
                # Scaled so A·x and B·h keep the size of their inputs whatever k, r and the layer width are.
                a = torch.randn(k, r, in_features, generator=generator) / in_features**0.5
                b = torch.randn(k, out_features, r, generator=generator) / r**0.5
                bases[shape] = tuple(t.to(device=template.device, dtype=template.dtype) for t in (a, b))
            a, b = bases[shape]
            alpha = (torch.rand(k, generator=generator) * 2 - 1) * (3 / k) ** 0.5
            layer.lora_A[ADAPTER] = BasisMixture(a, alpha.to(device=template.device, dtype=template.dtype))
            layer.lora_B[ADAPTER] = BasisMixture(b, torch.zeros(k, device=template.device, dtype=template.dtype))
        return peft_model


@hookimpl
def autopeft_variants() -> list[Variant]:
    return [LoRAXS(), NOLA()]
