"""Allocators that decide ranks (and bits, and placement) while the adapter trains, each exported as plain LoRA.

All five are built on :mod:`autopeft.masked_lora`: a PEFT LoRA model with ``r_max`` slots per module and a gate
per slot between ``A`` and ``B``. They differ only in how the gates move during training. Each ends in a
standard PEFT LoRA folder whose ``rank_pattern`` / ``alpha_pattern`` (regex-escaped full module names) give each
module the rank it ended with; modules that ended with rank 0 are left out. Schedules are fractions of
``context.total_steps`` and every knob of the allocators is part of the searched space.

Per-trial state (step counters, score averages, the α optimizer of DiffoRA) lives on the model object, so a
variant instance can serve any number of trials.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from autopeft import AttachContext, CategoricalParam, FloatParam, IntParam, Variant, hookimpl, shared
from autopeft.space import PROBABILITY

_STATE = "_autopeft_allocator_state"


def _state(model) -> SimpleNamespace:
    return model.__dict__[_STATE]


def _set_state(model, **values: Any) -> SimpleNamespace:
    model.__dict__[_STATE] = SimpleNamespace(final=False, **values)
    return model.__dict__[_STATE]


class _Allocator(Variant):
    """Shared plumbing: the common space, and the end of training.

    ``on_step`` runs the allocator's :meth:`allocate` and, at the last step, :meth:`finalize`: the pending
    allocation is completed (:meth:`settle`) and the model becomes, in place, a plain PEFT LoRA model with the
    final per-module ranks (:func:`autopeft.masked_lora.finalize`), so the last evaluation, the cost measures
    and the export all see exactly the adapter that is saved.
    """

    export_format = "lora"
    supports_quantized_base = True  # masked_lora is PEFT's LoRA, which has HQQ layers

    def _space(self, **own) -> dict:
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            **own,
            "alpha_ratio": CategoricalParam((0.5, 1.0, 2.0, 4.0), default=2.0, help="LoRA scaling (lora_alpha / r) of every module"),
            "dropout": FloatParam(0.0, 0.2, default=0.05, legal=PROBABILITY, help="dropout on the adapter's input"),
        }

    def on_step(self, model, step: int, context: AttachContext) -> None:
        if _state(model).final:
            return
        self.allocate(model, step, context)
        if step >= context.total_steps:
            self.finalize(model)

    def allocate(self, model, step: int, context: AttachContext) -> None:
        """The allocator's work after optimizer step ``step``."""

    def settle(self, model) -> None:
        """Complete any allocation still pending before the model is finalized."""

    def finalize(self, model) -> dict[str, int]:
        from autopeft import masked_lora

        state = _state(model)
        if not state.final:
            self.settle(model)
            masked_lora.finalize(model)
            state.final = True
        return masked_lora.final_ranks(model)

    def export(self, model, out_dir) -> None:
        from autopeft import masked_lora

        self.finalize(model)
        masked_lora.save(model, out_dir)


# --------------------------------------------------------------------------------------------------------------
# IncreLoRA: grow ranks where the update matters most
# --------------------------------------------------------------------------------------------------------------


class IncreLoRA(_Allocator):
    """Start every module at ``init_r`` ranks and grow them by importance up to an average ``target_rank``.

    After a warm-up (``warmup_fraction`` of the steps), every ``interval`` steps the ``top_fraction`` of modules
    with the highest score gain ``rank_step`` slots, until the average rank reaches ``target_rank`` (or
    ``growth_end_fraction`` of the steps have passed). The score of a module is ``Σ|ΔW ⊙ ∂L/∂ΔW| / √numel``,
    smoothed like AdaLoRA's (EMA of sensitivity times EMA of its uncertainty, both with ``beta``); the interval is
    chosen so the budget is spent by ``growth_end_fraction``. Growing is unmasking a slot; with ``reserve`` the
    next slots are trained in advance behind a fixed gate of 1e-5, as in the paper, and a newly opened slot's
    trainable gate starts at that value. Each module's update is scaled by ``α / r_k`` with
    ``α = alpha_ratio · target_rank`` (the paper's α/r per module). Simplifications: each module has at most
    ``r_max = ⌈max_rank_ratio · target_rank⌉`` slots (the paper has no cap), and AdaLoRA's orthogonality
    penalty on the factors is left out.

    Default form: ``reserve = True``, the paper's "advance learning" — the next ``rank_step`` slots of every
    module train behind a fixed 1e-5 gate before they open, so a slot that opens already points in a useful
    direction instead of starting from zero. ``reserve = False`` (plain unmasking) is the searchable
    alternative. The budget is ``target_rank``: growing stops when the candidate modules hold
    ``target_rank`` ranks on average.
    """

    name = "increlora"
    size_decided_in_training = True
    summary = "grows each module's rank from a small start, giving new ranks to the modules whose update matters most"
    paper = "Zhang et al., IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning, arXiv:2308.12043"
    RESERVE_GATE = 1e-5

    def search_space(self):
        return self._space(
            init_r=IntParam(1, 4, default=2, help="active rank of every module at the start"),
            target_rank=IntParam(2, 16, default=8, log=True, help="average rank when growing stops (the budget)"),
            max_rank_ratio=CategoricalParam((1.5, 2.0, 3.0), default=2.0, help="a module's rank cap, as a multiple of target_rank"),
            rank_step=IntParam(1, 4, default=2, help="slots a chosen module gains per growth round"),
            top_fraction=FloatParam(0.05, 0.5, default=0.2, help="fraction of modules that grow at each round"),
            warmup_fraction=FloatParam(0.0, 0.3, default=0.1, help="fraction of steps before the first growth"),
            growth_end_fraction=FloatParam(0.3, 0.9, default=0.6, help="fraction of steps by which the budget is spent"),
            beta=FloatParam(0.5, 0.95, default=0.85, help="EMA factor of the sensitivity and uncertainty scores"),
            reserve=CategoricalParam((True, False), default=True, help="pre-train the next slots behind a 1e-5 gate"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from autopeft import masked_lora

        init_r, target = params["init_r"], params["target_rank"]
        r_max = max(init_r, math.ceil(params["max_rank_ratio"] * target))
        model = masked_lora.attach(
            model, context, r_max, params["alpha_ratio"], params["dropout"],
            gate_factory=lambda linear: masked_lora.SlotGate(linear, trainable_gate=True, init_gate=self.RESERVE_GATE),
        )
        gates = masked_lora.gates(model)
        for gate in gates.values():
            gate.gate.data[0, :init_r] = 1.0
            gate.mask.zero_()
            self._open(gate, 0, init_r, target, params["reserve"], params["rank_step"])
        steps = context.total_steps
        top = max(1, round(params["top_fraction"] * len(gates)))
        warmup = round(params["warmup_fraction"] * steps)
        end = max(warmup + 1, round(params["growth_end_fraction"] * steps))
        rounds = max(1, math.ceil((target - init_r) * len(gates) / (top * params["rank_step"])))
        _set_state(
            model, tracker=masked_lora.DeltaSensitivity(model, params["beta"], params["beta"]), budget=target * len(gates),
            top=top, warmup=warmup, end=end, interval=max(1, (end - warmup) // rounds), params=params, growing=True,
        )
        return model

    def _open(self, gate, start: int, stop: int, target: int, reserve: bool, rank_step: int) -> None:
        """Make slots ``start:stop`` active, put the next ``rank_step`` in reserve, rescale by α / r_k."""
        gate.mask[start:stop] = 1.0
        gate.reserve.zero_()
        if reserve:
            gate.reserve[stop : stop + rank_step] = self.RESERVE_GATE
        gate.multiplier.fill_(target / max(stop, 1))

    def allocate(self, model, step: int, context: AttachContext) -> None:
        from autopeft import masked_lora

        state = _state(model)
        if not state.growing:
            return
        state.tracker.update()
        ranks = masked_lora.active_ranks(model)
        if step > state.warmup and (step - state.warmup) % state.interval == 0 and sum(ranks.values()) < state.budget:
            gates, scores, p = masked_lora.gates(model), state.tracker.scores(), state.params
            room = [name for name in gates if ranks[name] < gates[name].r_max]
            left = state.budget - sum(ranks.values())
            for name in sorted(room, key=lambda n: -scores[n])[: state.top]:
                grow = min(p["rank_step"], gates[name].r_max - ranks[name], left)
                if grow <= 0:
                    break
                self._open(gates[name], ranks[name], ranks[name] + grow, p["target_rank"], p["reserve"], p["rank_step"])
                left -= grow
        if step >= state.end or sum(masked_lora.active_ranks(model).values()) >= state.budget:
            self.settle(model)

    def settle(self, model) -> None:
        from autopeft import masked_lora

        state = _state(model)
        if state.growing:
            state.tracker.remove()
            for gate in masked_lora.gates(model).values():
                gate.reserve.zero_()
            state.growing = False


# --------------------------------------------------------------------------------------------------------------
# SoRA: a sparse gate per slot, soft-thresholded after each step
# --------------------------------------------------------------------------------------------------------------


class SoRA(_Allocator):
    """``h = W x + B (g ⊙ A x)`` with a gate ``g`` per slot, as in the reference code (TsinghuaC3I/SoRA): the
    gates start from a standard normal draw, are trained by their own Adam step (at the trial's learning rate,
    outside autopeft's optimizer, as SoRA trains them with a separate ``SparseAdamW``) and after each of those
    steps take the proximal step of an L1 penalty, ``g ← sign(g)·max(|g| − ξ_t, 0)``, which sets gates exactly
    to 0. A module's rank is its number of non-zero gates; at the end the gates are folded into ``B``.

    The budget is ``target_rank``: the exported adapter holds about ``target_rank · Σ_m (in_m + out_m)``
    parameters over the candidate modules (an average rank of ``target_rank`` out of ``max_rank`` slots). It is
    the knob the outer search tunes. ``ξ_t`` rises in ``stages`` equal stages over the first
    ``sparsify_fraction`` of the steps (stage k uses k times a base threshold, as SoRA's ``lambda_schedule``
    raises its sparsity weight in stages); the base is set at attach so that the thresholds of the whole phase
    add up to the magnitude the initial gates would have to lose to meet the budget. Gates the task loss
    pushes up survive; the others reach 0. Two rules make the budget a target rather than a hope: a step's
    threshold never exceeds the one that would leave exactly the budget (so thresholding never undershoots),
    and at the end of the phase a last proximal step uses exactly that threshold if the gates are still over
    budget. Then the closed slots stay closed and the open gates keep training, without threshold.

    Simplifications: SoRA's threshold is ``η·λ`` with a hand-set ``λ`` schedule and no budget (one run traces
    an accuracy–size curve); here ``ξ_t`` is derived from the budget and the number of steps.
    """

    name = "sora"
    size_decided_in_training = True
    summary = "a trainable gate per rank slot, made sparse by a proximal soft-threshold that rises in stages to a budget"
    paper = "Ding et al., Sparse Low-rank Adaptation of Pre-trained Language Models, arXiv:2311.11696"

    def search_space(self):
        return self._space(
            max_rank=IntParam(4, 32, default=16, log=True, help="slots per module (the highest rank a module can keep)"),
            target_rank=IntParam(1, 16, default=8, log=True, help="average rank over the candidate modules at the end (the budget)"),
            stages=IntParam(1, 5, default=3, help="stages of the rising threshold"),
            sparsify_fraction=FloatParam(0.3, 0.9, default=0.7, help="fraction of the steps by which the budget is met"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch

        from autopeft import masked_lora

        model = masked_lora.attach(model, context, params["max_rank"], params["alpha_ratio"], params["dropout"])
        layers = masked_lora.slot_layers(model)
        gates = []
        for layer in layers.values():
            gate = masked_lora.gate_of(layer).gate
            gate.normal_()
            # Trained by the gates' own Adam step in allocate, not by autopeft's optimizer (a buffer is not in
            # model.parameters()), so weight decay and gradient clipping of the factors never touch it.
            gate.requires_grad_(True)
            gates.append(gate)
        cost = torch.cat([torch.full((gate.numel(),), float(layer.in_features + layer.out_features)) for layer, gate in zip(layers.values(), gates)])
        budget = min(params["target_rank"], params["max_rank"]) * sum(layer.in_features + layer.out_features for layer in layers.values())
        end = max(1, round(params["sparsify_fraction"] * context.total_steps))
        stage = [min(params["stages"], (s - 1) * params["stages"] // end + 1) for s in range(1, end + 1)]
        state = _set_state(
            model, gates=gates, cost=cost, budget=budget, end=end, stage=stage, sparse=True,
            optimizer=torch.optim.Adam(gates, lr=params["learning_rate"]),
        )
        state.base = self._budget_threshold(state) / sum(stage)
        return model

    @staticmethod
    def _budget_threshold(state) -> float:
        """The smallest ξ whose soft-threshold leaves gates costing at most the budget (0 if they already do)."""
        import torch

        magnitude = torch.cat([gate.detach().flatten().abs().float().cpu() for gate in state.gates])
        order = torch.argsort(magnitude, descending=True)
        kept = int((state.cost[order].cumsum(0) <= state.budget).sum())
        return float(magnitude[order[kept]]) if kept < len(order) else 0.0

    @staticmethod
    def _soft_threshold(state, xi: float) -> None:
        """The proximal step of ``ξ·|g|``: ``g ← sign(g)·max(|g| − ξ, 0)``."""
        import torch

        with torch.no_grad():
            for gate in state.gates:
                gate.copy_(gate.sign() * (gate.abs() - xi).clamp_min(0.0))

    def allocate(self, model, step: int, context: AttachContext) -> None:
        from autopeft import masked_lora

        state = _state(model)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if not state.sparse:
            return
        cap = self._budget_threshold(state)
        if step < state.end:
            self._soft_threshold(state, min(state.base * state.stage[step - 1], cap))
            return
        self._soft_threshold(state, cap)
        for gate in masked_lora.gates(model).values():
            gate.mask.mul_((gate.gate[0] != 0).to(gate.mask.dtype))  # closed slots stay closed from now on
        state.sparse = False

    def settle(self, model) -> None:
        state = _state(model)
        if state.sparse:
            self.allocate(model, max(state.end, 1), None)


# --------------------------------------------------------------------------------------------------------------
# LoRA-Squeeze: train high, compress by SVD, continue
# --------------------------------------------------------------------------------------------------------------


class LoRASqueeze(_Allocator):
    """Train at ``source_rank``; at ``1 − continue_fraction`` of the steps rebuild each module's ``ΔW = s·B A``,
    compress it by truncated SVD to ``target_rank`` (mode ``rank``) or to the smallest rank keeping an
    ``energy`` fraction of Σσ² (mode ``energy``, which gives each module its own rank and drops modules whose
    update is zero), write ``U√Σ`` and ``√Σ Vᵀ`` into the first slots, mask the others and keep training at the
    compressed rank (``continue_fraction = 0``: pure post-hoc compression at the last step). That is
    ``schedule: post-hoc``. With ``schedule: in-squeeze`` the paper's in-tuning compression is followed: the
    rank is annealed during training, compressed by the same SVD at ``ANNEAL_STAGES`` evenly spaced steps up
    to ``1 − continue_fraction`` of the steps, to ranks falling linearly from ``source_rank`` to
    ``target_rank`` (mode ``energy``: a kept energy falling linearly from 1 to ``energy``), with training in
    between. The budget is ``target_rank`` (mode ``rank``): the exported rank of every module is exactly it,
    unless a module's update has lower rank.

    The SVD is computed exactly from the factors (QR of ``B`` and ``Aᵀ``, then the SVD of the small
    ``r × r`` core): the same truncation as the paper's randomized SVD of the materialised ``ΔW``, without
    building the ``out × in`` matrix. The optimizer's moments are not reset after compression (masks, not
    optimizer surgery).
    """

    name = "lora-squeeze"
    size_decided_in_training = True
    summary = "trains a high-rank LoRA, then compresses each module by SVD to a lower rank and continues training"
    paper = "Vulić et al., LoRA-Squeeze: Simple and Effective Post-Tuning and In-Tuning Compression of LoRA Modules, arXiv:2602.10993"
    ANNEAL_STAGES = 4

    def search_space(self):
        return self._space(
            source_rank=IntParam(8, 64, default=16, log=True, help="rank trained before compression"),
            mode=CategoricalParam(("rank", "energy"), default="rank", help="compress to a fixed rank or by kept energy"),
            target_rank=IntParam(1, 16, default=4, log=True, help="rank after compression", condition={"mode": ["rank"]}),
            energy=FloatParam(0.5, 0.99, default=0.9, help="fraction of Σσ² each module keeps", condition={"mode": ["energy"]}),
            continue_fraction=FloatParam(0.0, 0.5, default=0.2, help="fraction of the steps trained after compression"),
            schedule=CategoricalParam(("post-hoc", "in-squeeze"), default="post-hoc", help="compress once, or anneal the rank down during training"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from autopeft import masked_lora

        model = masked_lora.attach(model, context, params["source_rank"], params["alpha_ratio"], params["dropout"])
        squeeze_at = max(1, round((1 - params["continue_fraction"]) * context.total_steps))
        stages = min(self.ANNEAL_STAGES, squeeze_at) if params.get("schedule") == "in-squeeze" else 1
        # Step at which each compression happens -> the fraction of the way from the source to the target.
        plan = {round(squeeze_at * k / stages): k / stages for k in range(1, stages + 1)}
        _set_state(model, plan=plan, params=params, squeezed=False)
        return model

    def allocate(self, model, step: int, context: AttachContext) -> None:
        progress = _state(model).plan.get(step)
        if progress is not None:
            self._squeeze(model, progress)

    def settle(self, model) -> None:
        """Complete the compression to the target (once)."""
        self._squeeze(model, 1.0)

    def _squeeze(self, model, progress: float) -> None:
        """Compress every module to the rank (or energy) ``progress`` of the way from the source to the target."""
        import torch

        from autopeft import masked_lora

        state = _state(model)
        if state.squeezed:
            return
        with torch.no_grad():
            for layer in masked_lora.slot_layers(model).values():
                a, b = masked_lora.factor_weights(layer)
                gate = masked_lora.gate_of(layer)
                q_b, r_b = torch.linalg.qr((b * gate.slot_values()).float())
                q_a, r_a = torch.linalg.qr(a.float().T)
                u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
                k = self._rank(sigma, state.params, progress)
                root = sigma[:k].sqrt()
                a.zero_()
                b.zero_()
                a[:k] = (root[:, None] * (q_a @ vh.T)[:, :k].T).to(a.dtype)
                b[:, :k] = ((q_b @ u)[:, :k] * root).to(b.dtype)
                gate.gate.fill_(1.0)
                gate.multiplier.fill_(1.0)
                gate.mask.zero_()
                gate.mask[:k] = 1.0
        state.squeezed = progress >= 1.0

    @staticmethod
    def _rank(sigma, params: dict[str, Any], progress: float = 1.0) -> int:
        nonzero = int((sigma > sigma.max() * 1e-6).sum()) if sigma.numel() and sigma.max() > 0 else 0
        if params["mode"] == "rank":
            source, target = params["source_rank"], params["target_rank"]
            return min(math.ceil(source - (source - target) * progress), nonzero)
        energy = (sigma**2).cumsum(0)
        if nonzero == 0:
            return 0
        wanted = 1.0 - (1.0 - params["energy"]) * progress
        return min(nonzero, int((energy < wanted * energy[-1]).sum()) + 1)


# --------------------------------------------------------------------------------------------------------------
# DiffoRA: which modules get an adapter, by a differentiable relaxation
# --------------------------------------------------------------------------------------------------------------


def _arch_gate(linear):
    import torch

    from autopeft.masked_lora import SlotGate

    class ArchGate(SlotGate):
        """A slot gate scaled by ``σ(α_m)`` while the search runs; ``α_m`` is trained only by the α steps."""

        def __init__(self, linear) -> None:
            super().__init__(linear)
            self.arch = torch.nn.Parameter(torch.zeros((1, 1), device=linear.weight.device), requires_grad=False)
            self.searching = True

        def slot_values(self):
            values = super().slot_values()
            return values * torch.sigmoid(self.arch[0]).to(values.dtype) if self.searching else values

    return ArchGate(linear)


class DiffoRA(_Allocator):
    """One continuous coefficient ``α_m`` per candidate module: ``y = W x + σ(α_m)·B_m A_m x``.

    For the first ``search_fraction`` of the steps, every LoRA step (autopeft's optimizer, training batches) is
    followed by an α step: the loss on a batch from a second stream of *training* batches
    (``context.calibration_batches``, offset so that it never shows the batch the LoRA step just used) is
    differentiated with respect to the α alone and Adam with ``alpha_lr`` updates them (first-order DARTS; the
    validation and test splits are never used). Then the top ``rho`` fraction of modules by ``σ(α_m)`` are kept,
    ``σ(α_m)`` is folded into their ``B``, the other modules are switched off (rank 0, left out of the export)
    and training continues on the kept ones. Simplification: the paper's weight-sharing discretisation is
    reduced to this top-ρ selection, and every kept module has the same ``rank``.

    Budget: ``rho`` (with ``rank``): the export holds ``round(ρ · M)`` modules at ``rank``, an average rank of
    ``ρ · rank`` over the ``M`` candidates; the outer search tunes both.
    """

    name = "diffora"
    size_decided_in_training = True
    summary = "learns a continuous weight per module on a separate batch stream (DARTS-like) and keeps the top modules"
    paper = (
        "Jiang et al., DiffoRA: Enabling Parameter-Efficient LLM Fine-Tuning via Differential Low-Rank Matrix Adaptation, "
        "arXiv:2502.08905"
    )

    def search_space(self):
        return self._space(
            rank=IntParam(2, 32, default=8, log=True, help="rank of every kept module"),
            rho=FloatParam(0.1, 1.0, default=0.5, help="fraction of candidate modules kept"),
            alpha_lr=FloatParam(1e-3, 1e-1, default=1e-2, log=True, help="Adam learning rate of the module coefficients"),
            search_fraction=FloatParam(0.1, 0.6, default=0.3, help="fraction of the steps spent learning the coefficients"),
        )

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import itertools

        import torch

        from autopeft import masked_lora

        if context.calibration_batches is None:
            raise ValueError("diffora needs context.calibration_batches for its coefficient steps")
        model = masked_lora.attach(model, context, params["rank"], params["alpha_ratio"], params["dropout"], gate_factory=_arch_gate)
        search_steps = max(1, round(params["search_fraction"] * context.total_steps))
        # The same seeded stream as training: skipping search_steps batches keeps the two apart during the search.
        stream = itertools.islice(context.calibration_batches(2 * search_steps), search_steps, None)
        arch = [gate.arch for gate in masked_lora.gates(model).values()]
        _set_state(
            model, stream=stream, search_steps=search_steps, rho=params["rho"], selected=False,
            optimizer=torch.optim.Adam(arch, lr=params["alpha_lr"]),
        )
        return model

    def allocate(self, model, step: int, context: AttachContext) -> None:
        import torch

        from autopeft import masked_lora

        state = _state(model)
        if state.selected:
            return
        batch = next(state.stream, None)
        if batch is not None:
            arch = [gate.arch for gate in masked_lora.gates(model).values()]
            for alpha in arch:
                alpha.requires_grad_(True)
            try:
                grads = torch.autograd.grad(model(**batch).loss, arch, allow_unused=True)
            finally:
                for alpha in arch:
                    alpha.requires_grad_(False)
            for alpha, grad in zip(arch, grads):
                alpha.grad = grad
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        if step >= state.search_steps:
            self.settle(model)

    def settle(self, model) -> None:
        """Keep the top-ρ modules (once), fold σ(α) into their B and switch the others off."""
        import torch

        from autopeft import masked_lora

        state = _state(model)
        if state.selected:
            return
        layers = masked_lora.slot_layers(model)
        weights = {name: float(torch.sigmoid(masked_lora.gate_of(layer).arch)) for name, layer in layers.items()}
        keep = set(sorted(weights, key=lambda n: -weights[n])[: max(1, round(state.rho * len(weights)))])
        with torch.no_grad():
            for name, layer in layers.items():
                gate = masked_lora.gate_of(layer)
                gate.searching = False
                if name in keep:
                    masked_lora.factor_weights(layer)[1].mul_(weights[name])
                else:
                    gate.mask.zero_()
        state.selected = True


# --------------------------------------------------------------------------------------------------------------
# Bayesian-LoRA: hard-concrete gates for ranks and for quantization bits
# --------------------------------------------------------------------------------------------------------------

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


class BayesianLoRA(_Allocator):
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
        _set_state(model, lambda_rank=params["lambda_rank"], lambda_bits=params["lambda_bits"], warmup=warmup)
        return model

    def regularizer(self, model, step: int, context: AttachContext):
        from autopeft import masked_lora

        state = _state(model)
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

        state = _state(model)
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
        write_adapter_bits(_state(model).bits, Path(out_dir))


@hookimpl
def autopeft_variants() -> list[Variant]:
    return [IncreLoRA(), SoRA(), LoRASqueeze(), DiffoRA(), BayesianLoRA()]
