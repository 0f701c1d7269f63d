"""LoRA with ``r_max`` slots per module and a gate per slot: the shared mechanics of rank allocators.

Each adapted linear layer computes ``h = W x + B · (g ⊙ (A x)) · scaling`` where ``A`` has ``r_max`` rows,
``B`` has ``r_max`` columns and ``g`` is a vector with one value per slot. An allocator grows, shrinks or
reweights a module's rank by changing ``g`` (a trainable gate, a fixed mask, a stochastic gate), never by
resizing tensors, so the optimizer built once by autopeft keeps working. At the end the module is exported as a
plain PEFT LoRA layer of the rank it ended with.

It is built on PEFT itself: :func:`attach` creates an ordinary PEFT LoRA model with ``r = r_max`` and replaces
``lora_A[adapter]`` of every LoRA layer by a :class:`SlotGate` (which applies ``A`` and then multiplies by the
gate); optionally ``lora_B[adapter]`` by a :class:`SlotB` (for allocators that transform ``B``, e.g. fake
quantization). Everything else (dropout, scaling, the task head in ``modules_to_save``, ``unload``) stays
PEFT's, so :func:`autopeft.adapters.detach_peft_model` restores the base model at any point.

:func:`finalize` turns the model, in place, into a standard PEFT LoRA model with a rank per module
(``rank_pattern`` / ``alpha_pattern`` keyed by regex-escaped full module names, modules of rank 0 removed) and
checks that PEFT would load exactly those ranks; :func:`save` writes it with ``save_pretrained``;
:func:`export` does both. Allocators finalize at their last training step, so the last evaluation and the
trial's cost measures see the adapter that is saved.

Third-party allocators subclass :class:`SlotGate` (override :meth:`SlotGate.slot_values`,
:meth:`SlotGate.active`, :meth:`SlotGate.factor_a`, :meth:`SlotGate.factor_b`) and pass it to :func:`attach`.
This module imports torch at import time: plugins import it inside their methods.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER = "default"
PREFIX = "base_model.model."
_RANKS = "_masked_lora_final_ranks"


class SlotGate(nn.Module):
    """Replaces PEFT's ``lora_A[adapter]``: returns ``(A x) ⊙ slot_values()``.

    Buffers and parameters, one value per slot:

    - ``gate``: the gate value (a trainable ``nn.Parameter`` when ``trainable_gate``, else a buffer), initially
      ``init_gate``, stored as a ``1 × r_max`` row (PEFT expects every ``lora_A`` tensor it saves to be 2-D);
    - ``mask``: 1 for a slot in use, 0 for a switched-off one (gradients to a masked slot's ``A`` row and ``B``
      column are zero);
    - ``reserve``: a fixed value added for slots not in use (IncreLoRA's "pre-trained in reserve" components);
    - ``multiplier``: one number scaling the whole module (a per-module scaling such as α/r_k, or σ(α_m)).

    The buffers are not persistent (they never reach a state dict: the export rebuilds plain LoRA layers).

    ``weight`` is ``A``'s weight, so PEFT code that reads ``lora_A[adapter].weight`` (dtype casts) keeps working.
    """

    def __init__(self, linear: nn.Linear, trainable_gate: bool = False, init_gate: float = 1.0) -> None:
        super().__init__()
        self.linear = linear
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        gate = torch.full((1, linear.out_features), float(init_gate), **like)
        if trainable_gate:
            self.gate = nn.Parameter(gate)
        else:
            self.register_buffer("gate", gate, persistent=False)
        self.register_buffer("mask", torch.ones(linear.out_features, **like), persistent=False)
        self.register_buffer("reserve", torch.zeros(linear.out_features, **like), persistent=False)
        self.register_buffer("multiplier", torch.ones((), **like), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def r_max(self) -> int:
        return self.linear.out_features

    def slot_values(self) -> torch.Tensor:
        """The vector multiplying ``A x`` in this forward pass."""
        return (self.gate[0] * self.mask + self.reserve) * self.multiplier

    def export_values(self) -> torch.Tensor:
        """The slot values folded into ``B`` at export (the evaluation-time values)."""
        return self.slot_values().detach()

    def active(self) -> torch.Tensor:
        """Boolean vector: which slots are part of the adapter (kept at export)."""
        return (self.mask != 0) & (self.gate[0] != 0)

    def factor_a(self) -> torch.Tensor:
        """The ``A`` matrix used in the forward pass (override to fake-quantize it)."""
        return self.linear.weight

    def factor_b(self, weight: torch.Tensor) -> torch.Tensor:
        """The ``B`` matrix used in the forward pass when ``B`` is wrapped in a :class:`SlotB`."""
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.factor_a()) * self.slot_values().to(x.dtype)


class SlotB(nn.Module):
    """Replaces PEFT's ``lora_B[adapter]`` when an allocator transforms ``B`` (through its gate's ``factor_b``)."""

    def __init__(self, linear: nn.Linear, gate: SlotGate) -> None:
        super().__init__()
        self.linear = linear
        self.__dict__["owner"] = gate  # a plain reference: the gate is registered under lora_A already

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.owner.factor_b(self.linear.weight), self.linear.bias)


# --------------------------------------------------------------------------------------------------------------
# Attaching and reading
# --------------------------------------------------------------------------------------------------------------


def attach(
    model: nn.Module,
    context: Any,
    r_max: int,
    alpha_ratio: float,
    dropout: float = 0.0,
    gate_factory: Callable[[nn.Linear], SlotGate] | None = None,
    wrap_b: bool = False,
) -> nn.Module:
    """A PEFT LoRA model of rank ``r_max`` on ``context.target_modules`` whose ``lora_A`` are slot gates.

    ``lora_alpha = alpha_ratio · r_max``, so PEFT's ``scaling`` is ``alpha_ratio`` for every module.
    ``gate_factory(linear)`` builds each module's gate (default: a fixed all-ones :class:`SlotGate`).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=context.peft_task_type,
        target_modules=list(context.target_modules),
        r=r_max,
        lora_alpha=alpha_ratio * r_max,
        lora_dropout=dropout,
    )
    peft_model = get_peft_model(model, config)
    factory = gate_factory or (lambda linear: SlotGate(linear))
    for _, layer in _lora_layers(peft_model):
        gate = factory(layer.lora_A[ADAPTER])
        layer.lora_A[ADAPTER] = gate
        if wrap_b:
            layer.lora_B[ADAPTER] = SlotB(layer.lora_B[ADAPTER], gate)
    return peft_model


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [
        (name.removeprefix(PREFIX), module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    ]


def slot_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{full module name in the base model: PEFT LoRA layer}`` for every layer whose ``lora_A`` is a gate."""
    return {name: layer for name, layer in _lora_layers(model) if isinstance(layer.lora_A[ADAPTER], SlotGate)}


def gate_of(layer: nn.Module) -> SlotGate:
    return layer.lora_A[ADAPTER]


def gates(model: nn.Module) -> dict[str, SlotGate]:
    """``{full module name: its SlotGate}``."""
    return {name: gate_of(layer) for name, layer in slot_layers(model).items()}


def active_ranks(model: nn.Module) -> dict[str, int]:
    """The current rank of every module: the number of its active slots."""
    return {name: int(gate.active().sum()) for name, gate in gates(model).items()}


def effective_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, slot values)`` exactly as the forward pass uses them (``B`` through ``factor_b`` if wrapped)."""
    gate = gate_of(layer)
    b = layer.lora_B[ADAPTER]
    b_weight = gate.factor_b(b.linear.weight) if isinstance(b, SlotB) else b.weight
    return gate.factor_a(), b_weight, gate.slot_values()


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """``ΔW = scaling · B · diag(g) · A`` of one layer (out × in), with gradients."""
    a, b, values = effective_factors(layer)
    return (b * values) @ a * layer.scaling[ADAPTER]


def factor_weights(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """The raw ``A`` (r_max × in) and ``B`` (out × r_max) parameters of a layer, for allocators that rewrite them."""
    b = layer.lora_B[ADAPTER]
    return gate_of(layer).linear.weight, (b.linear.weight if isinstance(b, SlotB) else b.weight)


def soft_threshold(values: Iterable[torch.Tensor], threshold: float) -> None:
    """The proximal step of ``threshold · ‖v‖₁`` on each tensor, in place: ``v ← sign(v)·max(|v| − threshold, 0)``.

    It sets every entry within ``threshold`` of zero exactly to zero, which closes that slot's gate
    (:meth:`SlotGate.active`).
    """
    with torch.no_grad():
        for value in values:
            value.copy_(value.sign() * (value.abs() - threshold).clamp_min(0.0))


# --------------------------------------------------------------------------------------------------------------
# Sensitivity of ΔW (IncreLoRA's module score, smoothed like AdaLoRA's)
# --------------------------------------------------------------------------------------------------------------


class DeltaSensitivity:
    """Per-module score ``S = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel``, smoothed: ``Ī ← β1 Ī + (1-β1) S``,
    ``Ū ← β2 Ū + (1-β2) |S - Ī|``, score ``Ī · Ū``.

    ``∂L/∂ΔW = Σ_tokens (∂L/∂y) xᵀ`` is collected by a hook on each LoRA layer during training backward passes
    (the cost of one weight gradient per module). Call :meth:`update` once per optimizer step and
    :meth:`remove` when the scores are no longer needed.
    """

    def __init__(self, model: nn.Module, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.layers = slot_layers(model)
        self.raw = {name: 0.0 for name in self.layers}
        self.ipt = {name: 0.0 for name in self.layers}
        self.unc = {name: 0.0 for name in self.layers}
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]

    def _hook(self, name: str):
        def forward_hook(layer, args, output):
            if layer.training and torch.is_grad_enabled() and output.requires_grad:
                x = args[0].detach()
                output.register_hook(lambda grad: self._accumulate(name, layer, x, grad))

        return forward_hook

    def _accumulate(self, name: str, layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            grad_delta = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            delta = delta_weight(layer).float()
            self.raw[name] += float((delta * grad_delta).abs().sum()) / math.sqrt(delta.numel())

    def update(self) -> None:
        for name, score in self.raw.items():
            self.ipt[name] = self.beta1 * self.ipt[name] + (1 - self.beta1) * score
            self.unc[name] = self.beta2 * self.unc[name] + (1 - self.beta2) * abs(score - self.ipt[name])
            self.raw[name] = 0.0

    def scores(self) -> dict[str, float]:
        return {name: self.ipt[name] * self.unc[name] for name in self.layers}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def check_rank_config(config: Any, module_names: list[str], ranks: dict[str, int], alpha_ratio: float) -> None:
    """Raise ``ValueError`` unless PEFT, loading ``config`` on a model with these module names, puts exactly
    ``ranks`` (rank 0: no adapter) and ``lora_alpha = alpha_ratio · rank`` on exactly those modules.

    Uses PEFT's own matching (``check_target_module_exists`` and ``get_pattern_key``), and checks that every
    ``rank_pattern`` / ``alpha_pattern`` key matches exactly one module.
    """
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    wanted = {name: rank for name, rank in ranks.items() if rank > 0}
    problems = []
    for pattern in (config.rank_pattern, config.alpha_pattern):
        for key in pattern:
            matches = [n for n in module_names if re.match(rf"(.*\.)?({key})$", n)]
            if len(matches) != 1:
                problems.append(f"pattern key {key!r} matches {len(matches)} modules")
    targeted = {n for n in module_names if check_target_module_exists(config, n)}
    if targeted != set(wanted):
        problems.append(f"target_modules select {sorted(targeted ^ set(wanted))[:4]} wrongly")
    for name in sorted(targeted & set(wanted)):
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        if r != wanted[name] or not math.isclose(alpha, alpha_ratio * wanted[name]):
            problems.append(f"{name} would get rank {r}, alpha {alpha} instead of {wanted[name]}, {alpha_ratio * wanted[name]}")
    if problems:
        raise ValueError("the exported LoRA config does not give the intended ranks: " + "; ".join(problems[:6]))


def base_module_names(inner: nn.Module) -> list[str]:
    """The module names the base model had before PEFT wrapped it (what a fresh base model would show)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    names, wrappers = [], {}
    for name, module in inner.named_modules():
        owner = next((w for w in wrappers if name.startswith(w + ".")), None)
        if owner is not None:
            inside = name[len(owner) + 1 :]
            if wrappers[owner] and inside.startswith("original_module."):
                names.append(f"{owner}.{inside.removeprefix('original_module.')}")
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            wrappers[name] = isinstance(module, AuxiliaryTrainingWrapper)
        if name:
            names.append(name)
    return names


def finalize(model: nn.Module, alpha_ratio: float | None = None) -> dict[str, int]:
    """Convert the slot-gated model, in place, into a standard PEFT LoRA model with a rank per module.

    For every module only the active slots are kept: ``A' = A[active]`` and
    ``B' = B[:, active] · g[active] · scaling / alpha_ratio`` (the slot values and any difference of scaling are
    folded into ``B``, so the model computes exactly what it computed in evaluation mode before). ``alpha_ratio``
    (default: the PEFT scaling of the first module) becomes ``lora_alpha / r`` of every module. Modules with no
    active slot lose their LoRA layer (rank 0). Each kept layer is rebuilt by PEFT's own ``update_layer`` from
    the config :func:`autopeft.adapters.lora_rank_kwargs` builds; the config is checked against PEFT's matching
    rules (:func:`check_rank_config`) and the rebuilt model with :func:`autopeft.adapters.verify_ranks`.

    Afterwards the model is an ordinary PEFT LoRA model (its parameter count, state dict and ``adapter_ranks``
    are those of the final adapter; it can go on training) and
    :func:`autopeft.adapters.detach_peft_model` still restores the base. Returns ``{module name: rank}``
    including modules of rank 0. Raises :class:`autopeft.errors.TrialFailed` when every module ended at rank 0.
    """
    from autopeft.adapters import lora_rank_kwargs, verify_ranks
    from autopeft.errors import TrialFailed

    layers = slot_layers(model)
    if not layers:
        raise ValueError("the model has no slot-gated LoRA layer left to finalize")
    if alpha_ratio is None:
        alpha_ratio = float(next(iter(layers.values())).scaling[ADAPTER])
    was_training = model.training
    model.eval()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            a, b, _ = effective_factors(layer)
            gate = gate_of(layer)
            keep = gate.active()
            if not bool(keep.any()):
                factors[name] = None
                continue
            fold = gate.export_values()[keep] * (layer.scaling[ADAPTER] / alpha_ratio)
            factors[name] = (a[keep].clone(), (b[:, keep] * fold).clone())
    ranks = {name: (0 if f is None else f[0].shape[0]) for name, f in factors.items()}
    if not any(ranks.values()):
        raise TrialFailed("every module ended with rank 0: the allocator left no adapter")
    config = dataclasses.replace(model.peft_config[ADAPTER], **lora_rank_kwargs(ranks, alpha_ratio))
    build = dataclasses.replace(config, init_lora_weights=False)

    inner = model.base_model.model
    for name, layer in layers.items():
        if factors[name] is None:
            parent_name, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent_name) if parent_name else inner, child, layer.get_base_layer())
            continue
        a, b = factors[name]
        layer.update_layer(ADAPTER, a.shape[0], alpha_ratio * a.shape[0], build)
        with torch.no_grad():
            layer.lora_A[ADAPTER].to(device=a.device, dtype=a.dtype).weight.copy_(a)
            layer.lora_B[ADAPTER].to(device=b.device, dtype=b.dtype).weight.copy_(b)
    model.peft_config[ADAPTER] = config
    check_rank_config(config, base_module_names(inner), ranks, alpha_ratio)
    verify_ranks(model, ranks)
    model.__dict__[_RANKS] = ranks
    model.train(was_training)
    return ranks


def final_ranks(model: nn.Module) -> dict[str, int] | None:
    """The ranks :func:`finalize` gave the model (rank 0 included), or None if it has not been finalized."""
    return model.__dict__.get(_RANKS)


def save(model: nn.Module, out_dir: Path) -> None:
    """Save a finalized model with ``save_pretrained``, after checking its ranks once more."""
    from autopeft.adapters import verify_ranks

    ranks = final_ranks(model)
    if ranks is None or slot_layers(model):
        raise ValueError("call masked_lora.finalize(model) before saving")
    verify_ranks(model, ranks)
    config = model.peft_config[ADAPTER]
    check_rank_config(config, base_module_names(model.base_model.model), ranks, config.lora_alpha / config.r)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def export(model: nn.Module, out_dir: Path, alpha_ratio: float | None = None) -> dict[str, int]:
    """:func:`finalize` (unless done already) and :func:`save`: a standard PEFT LoRA folder in ``out_dir``."""
    ranks = final_ranks(model) if not slot_layers(model) else None
    if ranks is None:
        ranks = finalize(model, alpha_ratio)
    save(model, out_dir)
    return ranks
