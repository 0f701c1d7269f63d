"""Optimizers for variants that change the update rule of a plain PEFT LoRA rather than its layers.

A variant returns one of these from :meth:`autopeft.hookspecs.Variant.optimizer`. Each is a
``torch.optim.AdamW`` subclass: the task head and any other trainable parameter get AdamW's ordinary update,
autopeft's learning-rate schedule scales every ``param_groups[i]["lr"]`` as usual, and only the LoRA factors
follow the method's rule:

- :class:`RowNormAdamW` (ALLoRA): each row of A and B moves by AdamW's step times ``1/√(1 + η²·‖row‖²)``.
- :class:`AlternatingProjection` (AltLoRA): odd steps update only B, even steps only A, each by the projection
  of the full-weight gradient onto the other factor's span, with momentum carried along in the low-rank space.
- :class:`PerturbedAdamW` (LoRA-GGPO): the forward passes of a training step see the merged weight plus a
  random perturbation sized by weight and gradient norms; ``step()`` drops it, so evaluation and export see the
  weights AdamW produced.

:func:`attach_lora` builds the plain PEFT LoRA model they train and :func:`lora_factors` finds its factors.
This module imports torch at import time: plugins import it inside their methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from autopeft.errors import TrialFailed

ADAPTER = "default"
PREFIX = "base_model.model."
_OPTIONS = "_autopeft_optimizer_options"


@dataclass
class LoraFactors:
    """The trained factors of one PEFT LoRA layer: ``ΔW = scale · B · A``."""

    name: str
    """Full module name in the base model."""
    layer: nn.Module
    """The PEFT ``LoraLayer`` wrapping the base linear."""
    a: nn.Parameter
    """``lora_A`` weight, r × in."""
    b: nn.Parameter
    """``lora_B`` weight, out × r."""
    scale: float
    """PEFT's ``scaling`` (lora_alpha / r)."""


def attach_lora(model: nn.Module, context: Any, r: int, alpha_ratio: float, dropout: float = 0.0, **options: Any) -> nn.Module:
    """A plain PEFT LoRA model with ``lora_alpha = alpha_ratio · r`` on ``context.target_modules``, or with the
    per-module ranks of ``context.ranks`` when the outer search chose them.

    ``options`` (the trial's settings of the update rule) stay with the model for :func:`optimizer_options`:
    ``Variant.optimizer`` is not given the trial's parameters, and a variant instance serves every trial.
    """
    from peft import LoraConfig, get_peft_model

    from autopeft.adapters import lora_rank_kwargs

    if context.ranks is not None:
        shape = lora_rank_kwargs(context.ranks, alpha_ratio)
    else:
        shape = {"target_modules": list(context.target_modules), "r": r, "lora_alpha": alpha_ratio * r}
    peft_model = get_peft_model(model, LoraConfig(task_type=context.peft_task_type, lora_dropout=dropout, **shape))
    # In __dict__, not as a module attribute: the settings go away with the PeftModel when the adapter detaches.
    peft_model.__dict__[_OPTIONS] = dict(options)
    return peft_model


def optimizer_options(model: nn.Module) -> dict[str, Any]:
    """The ``options`` given to :func:`attach_lora` for this model."""
    return model.__dict__[_OPTIONS]


def lora_factors(model: nn.Module) -> list[LoraFactors]:
    """The factors of every PEFT LoRA layer of ``model`` that holds the default adapter, in module order."""
    from peft.tuners.lora import LoraLayer

    return [
        LoraFactors(name.removeprefix(PREFIX), module, module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight, float(module.scaling[ADAPTER]))
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    ]


def _split(trainable: Iterable[nn.Parameter], factors: list[LoraFactors]) -> list[nn.Parameter]:
    """The trainable parameters that are not LoRA factors (the task head), in their given order."""
    factor_ids = {id(p) for f in factors for p in (f.a, f.b)}
    return [p for p in trainable if id(p) not in factor_ids]


def _groups(lora: list[nn.Parameter], others: list[nn.Parameter], **lora_options: Any) -> list[dict[str, Any]]:
    groups = [{"params": lora, **lora_options}]
    return groups + ([{"params": others}] if others else [])


# --------------------------------------------------------------------------------------------------------------
# ALLoRA
# --------------------------------------------------------------------------------------------------------------


def row_rates(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """ALLoRA's learning-rate factor of each row: ``1/√(1 + η²‖row‖²)``, 1 at a zero row, ``≈ 1/(η‖row‖)`` for
    large rows. (The paper's ``1/√(‖row‖² + 1/η²)`` times ``1/η``, a constant the searched learning rate absorbs.)"""
    norms = weight.detach().float().norm(dim=1)
    return torch.rsqrt(1.0 + (eta * norms) ** 2)


class RowNormAdamW(torch.optim.AdamW):
    """AdamW whose step on each row of a LoRA factor is scaled by :func:`row_rates` of that row before the step.

    Huang and Balestriero, ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws, arXiv:2410.09692. Rows of
    B start at zero and move at the full rate; rows that have grown move more slowly, which stands in for both
    LoRA's dropout and its α/r scaling.
    """

    def __init__(self, factors: list[LoraFactors], trainable: list[nn.Parameter], lr: float, weight_decay: float, eta: float) -> None:
        lora = [p for f in factors for p in (f.a, f.b)]
        super().__init__(_groups(lora, _split(trainable, factors), row_eta=eta), lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        scaled = [
            (p, p.clone(), row_rates(p, group["row_eta"]).to(p.dtype).unsqueeze(1))
            for group in self.param_groups
            if group.get("row_eta") is not None
            for p in group["params"]
            if p.grad is not None
        ]
        loss = super().step(closure)
        for p, before, rates in scaled:
            # before + rate · (AdamW's step), row by row; AdamW's moments stay those of the raw gradients.
            p.copy_(torch.lerp(before, p, rates))
        return loss


# --------------------------------------------------------------------------------------------------------------
# AltLoRA
# --------------------------------------------------------------------------------------------------------------


def _gram_solve(gram: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """``(gram + δI)⁻¹ · rhs`` for an r × r Gram matrix, δ relative to its mean eigenvalue (so a factor that is
    still zero, or nearly rank-deficient, gives a bounded answer instead of a singular solve)."""
    r = gram.shape[0]
    # Relative, not absolute: the factors of a small model can be 1e-8 after a step; `tiny` only for an all-zero B.
    delta = damping * gram.diagonal().mean() + torch.finfo(gram.dtype).tiny
    return torch.linalg.solve(gram + delta * torch.eye(r, dtype=gram.dtype, device=gram.device), rhs)


class AlternatingProjection(torch.optim.AdamW):
    """AltLoRA: alternating updates of B (odd steps) and A (even steps), each along the best approximation of the
    full-weight gradient G that the moving factor can express, with momentum kept in the low-rank space.

    Yu, Wang, Chen and Xue, AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation with
    Alternating Projections, arXiv:2505.12455. With ``ΔW = s·B·A``, PEFT's gradients are ``∇B = s·G·Aᵀ`` and
    ``∇A = s·Bᵀ·G``. The B step uses ``P_B = ∇B·(A·Aᵀ)⁻¹/s²``, for which ``s·P_B·A = G·Aᵀ(A·Aᵀ)⁻¹·A`` is the
    projection of G onto A's row space (the least-squares best); the A step uses ``P_A = (Bᵀ·B)⁻¹·∇A/s²``
    symmetrically. B starts at zero, so B moves first. The first moment of each factor lives in that factor's
    shape (r·(in + out) numbers, not out·in); before it is used again it is carried to the other factor's new
    basis by the same least-squares projection. ``second_moment=True`` (AltLoRA+) divides the step by the root of
    an elementwise second moment of the projected gradients, which is not carried over between bases.
    """

    def __init__(
        self,
        factors: list[LoraFactors],
        trainable: list[nn.Parameter],
        lr: float,
        weight_decay: float,
        second_moment: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        damping: float = 1e-6,
    ) -> None:
        lora = [p for f in factors for p in (f.a, f.b)]
        groups = _groups(lora, _split(trainable, factors), alternating=True, second_moment=second_moment, damping=damping, turns=0)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.factors = factors

    def _lora_group(self) -> dict[str, Any]:
        return next(group for group in self.param_groups if group.get("alternating"))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self._lora_group()
        group["turns"] += 1
        update_b = group["turns"] % 2 == 1
        for factors in self.factors:
            self._update(factors, update_b, group)
        # AdamW for everything else: it skips parameters without a gradient, so hide the factors' for a moment.
        hidden = [(p, p.grad) for p in group["params"]]
        for p, _ in hidden:
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        return loss

    def _update(self, f: LoraFactors, update_b: bool, group: dict[str, Any]) -> None:
        param, other = (f.b, f.a) if update_b else (f.a, f.b)
        if param.grad is None:
            return
        grad = param.grad.float()
        basis = other.detach().float()
        damping, s2 = group["damping"], f.scale**2
        if update_b:  # P_B = ∇B·(A·Aᵀ)⁻¹/s², computed as ((A·Aᵀ)⁻¹·∇Bᵀ)ᵀ
            projected = _gram_solve(basis @ basis.T, grad.T, damping).T / s2
        else:  # P_A = (Bᵀ·B)⁻¹·∇A/s²
            projected = _gram_solve(basis.T @ basis, grad, damping) / s2
        state = self.state[param]
        if not state:
            state["turn"] = 0
            state["momentum"] = torch.zeros_like(projected)
            state["basis"] = basis.clone()
            if group["second_moment"]:
                state["second"] = torch.zeros_like(projected)
        momentum = state["momentum"]
        if state["turn"] > 0:
            # Carry the momentum to the new basis: the factor that best reproduces, with today's other factor,
            # the full-weight momentum it stood for with the old one.
            old = state["basis"]
            if update_b:  # M·A_old ≈ M'·A  →  M' = M·A_old·Aᵀ·(A·Aᵀ)⁻¹
                momentum.copy_(_gram_solve(basis @ basis.T, (momentum @ old @ basis.T).T, damping).T)
            else:  # B_old·M ≈ B·M'  →  M' = (Bᵀ·B)⁻¹·Bᵀ·B_old·M
                momentum.copy_(_gram_solve(basis.T @ basis, basis.T @ old @ momentum, damping))
        state["turn"] += 1
        state["basis"].copy_(basis)
        beta1, beta2 = group["betas"]
        momentum.mul_(beta1).add_(projected, alpha=1 - beta1)
        direction = momentum / (1 - beta1 ** state["turn"])
        if group["second_moment"]:
            second = state["second"]
            second.mul_(beta2).addcmul_(projected, projected, value=1 - beta2)
            direction = direction / ((second / (1 - beta2 ** state["turn"])).sqrt() + group["eps"])
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(direction.to(param.dtype), alpha=-group["lr"])


# --------------------------------------------------------------------------------------------------------------
# LoRA-GGPO
# --------------------------------------------------------------------------------------------------------------


class PerturbedAdamW(torch.optim.AdamW):
    """AdamW on LoRA whose training forward passes see each merged weight ``W' = W + s·B·A`` plus a perturbation
    ε; ``step()`` drops ε, and forward passes in eval mode never see one.

    Chang, Guo, Chang and Wu, LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided
    Perturbation Optimization, arXiv:2502.14538. Row i of ε is Gaussian with variance
    ``σ²/n · (‖W'ᵢ‖² + β·‖Gᵢ‖²·‖W'‖²/‖G‖²)``: n is the layer's input size, W' the merged weight before the step
    and G the gradient of the loss with respect to the merged weight at the previous step (none at the first),
    rescaled to the weight's total energy so that β weighs the two norms on the same footing. The gradients of
    A and B are thus taken at the perturbed point (one forward and backward per step, not SAM's two).

    ε is applied as ``x·εᵀ`` added to the layer's output by a forward hook, never written into W: the base
    weights stay bitwise untouched. G's row norms come from the gradient autograd gives ε (a leaf tensor); the
    dense gradient lives only until its row norms are read.
    """

    def __init__(
        self,
        factors: list[LoraFactors],
        trainable: list[nn.Parameter],
        lr: float,
        weight_decay: float,
        sigma: float,
        beta: float,
        seed: int,
    ) -> None:
        super().__init__(trainable, lr=lr, weight_decay=weight_decay)
        for f in factors:
            base = f.layer.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise TrialFailed(f"{f.name}: perturbing the merged weight needs an nn.Linear base layer, not {type(base).__name__}")
        self.factors = factors
        self.sigma, self.beta = sigma, beta
        self.perturbations: dict[int, torch.Tensor] = {}
        """The current step's ε per layer index, drawn at the layer's first training forward after a step."""
        self.gradient_rows: dict[int, torch.Tensor] = {}
        """``‖Gᵢ‖²`` per layer index, from the last backward pass."""
        device = factors[0].a.device if factors else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.hooks = [f.layer.register_forward_hook(self._hook(i)) for i, f in enumerate(factors)]

    def _hook(self, index: int) -> Callable[..., torch.Tensor | None]:
        def add_perturbation(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not module.training:
                return None
            epsilon = self.perturbations.get(index)
            if epsilon is None:
                epsilon = self.perturbations[index] = self._draw(index)
            return output + F.linear(args[0].to(epsilon.dtype), epsilon).to(output.dtype)

        return add_perturbation

    def _draw(self, index: int) -> torch.Tensor:
        f = self.factors[index]
        with torch.no_grad():
            weight = f.layer.get_base_layer().weight
            merged = weight.float() + f.layer.get_delta_weight(ADAPTER).float()
            variance = merged.pow(2).sum(dim=1)
            gradient = self.gradient_rows.get(index)
            if gradient is not None:
                # No branch on the gradient's size: reading a value from an accelerator would wait for it.
                variance = variance + self.beta * gradient * (variance.sum() / gradient.sum().clamp_min(1e-30))
            std = self.sigma * (variance / merged.shape[1]).sqrt()
            epsilon = torch.randn(merged.shape, generator=self.generator, device=merged.device) * std.unsqueeze(1)
        epsilon = epsilon.to(weight.dtype)
        if self.beta > 0:
            epsilon.requires_grad_(True)
            epsilon.register_post_accumulate_grad_hook(self._record(index))
        return epsilon

    def _record(self, index: int) -> Callable[[torch.Tensor], None]:
        def record(epsilon: torch.Tensor) -> None:
            self.gradient_rows[index] = epsilon.grad.detach().float().pow(2).sum(dim=1)
            epsilon.grad = None  # only the row norms are kept: a dense out × in gradient per layer would not fit

        return record

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = super().step(closure)
        self.perturbations.clear()
        return loss

    def remove_hooks(self) -> None:
        """Stop perturbing: remove the forward hooks (detaching the adapter removes the layers, and them, anyway)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        self.perturbations.clear()
