"""LoRA-Squeeze: train a high-rank LoRA, compress each module by truncated SVD, continue at the lower rank.

Paper: Vulić et al., "LoRA-Squeeze: Simple and Effective Post-Tuning and In-Tuning Compression of LoRA
Modules", arXiv:2602.10993.

What it follows. Post-tuning compression (``schedule: post-hoc``: one SVD, then ``continue_fraction`` of the
steps at the compressed rank) and the paper's in-tuning compression (``schedule: in-squeeze``: the rank is
annealed down over several SVD stages), to a fixed rank or to a kept fraction of the energy Σσ².

Simplifies / leaves out: the SVD is computed exactly from the factors (QR of ``B`` and ``Aᵀ``, then the SVD of
the ``r × r`` core) instead of a randomized SVD of the materialised ``ΔW`` (same truncation), and the
optimizer's moments are not reset after a compression (masks, not optimizer surgery).
"""

from __future__ import annotations

import math
from typing import Any

from autopeft import AttachContext, CategoricalParam, FloatParam, IntParam
from autopeft.allocator_base import Allocator, allocator_state, set_allocator_state


class LoRASqueeze(Allocator):
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
        set_allocator_state(model, plan=plan, params=params, squeezed=False)
        return model

    def allocate(self, model, step: int, context: AttachContext) -> None:
        progress = allocator_state(model).plan.get(step)
        if progress is not None:
            self._squeeze(model, progress)

    def settle(self, model) -> None:
        """Complete the compression to the target (once)."""
        self._squeeze(model, 1.0)

    def _squeeze(self, model, progress: float) -> None:
        """Compress every module to the rank (or energy) ``progress`` of the way from the source to the target."""
        import torch

        from autopeft import masked_lora

        state = allocator_state(model)
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
