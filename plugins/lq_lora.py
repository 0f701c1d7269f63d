"""LQ-LoRA: each weight split into a frozen quantized part and a trained low-rank part, ``W ≈ Q + L1·L2``.

Paper: Guo et al., "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model
Finetuning", ICLR 2024, arXiv:2311.12023.

Follows the paper's decomposition: starting from ``Q = 0``, a few alternating rounds of ``L1·L2 ← best rank-r
approximation of W − Q`` (truncated SVD) and ``Q ← quantize(W − L1·L2)``, with a last SVD fitted to the final
``Q``; the round with the lowest ``‖W − (Q + L1·L2)‖_F`` is kept. During training the base really is quantized:
each adapted ``nn.Linear`` is replaced by an HQQ layer holding ``Q`` (``bits``-bit weights, the quantizer
``search.base_bits`` uses, group size 64 or the largest of 32/16/8 dividing the input width), frozen; PEFT's LoRA
on top starts at ``B = L1``, ``A = L2`` (scaling 1) and trains. ``detach()`` puts the original ``nn.Linear``
modules back, so the base is restored bitwise.

Simplifies: one bit width for every matrix (``bits``), not the paper's integer-linear-programming choice of
bits and group size per matrix under a memory budget; no data-aware (Fisher-weighted) decomposition; HQQ in
place of NormalFloat quantization.

Export: the folder must load on the ORIGINAL (unquantized) base with plain PEFT, so it holds the whole update
``ΔW = (Q + L1'·L2') − W`` of each module. ``Q − W`` (the quantization residual) is not low-rank, so this LoRA
has the exact numerical rank of ``ΔW`` (an SVD, exact up to float rounding), which is usually full rank: the
adapter stores about ``min(out, in) · (out + in)`` numbers per module, more than the weight itself. That is the
price of an exact, plain-PEFT folder on the original base; the predictions match the trained model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autopeft import AttachContext, CategoricalParam, IntParam, Variant, shared
from autopeft.errors import TrialFailed
from autopeft.space import RANK

ADAPTER = "default"
_ORIGINALS = "_lq_lora_original_linears"
GROUP_SIZES = (64, 32, 16, 8)


class LQLoRA(Variant):
    """Quantized base plus a trained low-rank part, both from an alternating quantize / SVD decomposition of W."""

    name = "lq-lora"
    summary = "W split as frozen HQQ-quantized Q plus trained LoRA L1·L2 by alternating quantize/SVD (exported as LoRA of (Q + L1·L2) − W at its exact rank)"
    paper = "Guo et al., LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model Finetuning, arXiv:2311.12023"
    export_format = "lora"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=1e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=16, log=True, legal=RANK, help="rank of the trained part L1·L2"),
            "bits": CategoricalParam((2, 3, 4, 8), default=4, help="bits of the frozen quantized part Q"),
            "rounds": IntParam(1, 10, default=3, legal=RANK, help="alternating quantize / SVD rounds of the decomposition"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch
        from peft import LoraConfig, get_peft_model

        from autopeft.factorize import require_rank
        from autopeft.transforms import lora_layers

        r = params["r"]
        originals: dict[str, torch.nn.Linear] = {}
        factors = {}
        try:
            for name in context.target_modules:
                linear = model.get_submodule(name)
                if type(linear) is not torch.nn.Linear:
                    raise TrialFailed(f"lq-lora quantizes nn.Linear layers; {name} is a {type(linear).__name__}")
                require_rank(model, [name], r, "LQ-LoRA")
                quantized, b, a, _ = decompose(linear, r, params["bits"], params["rounds"])
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
                originals[name] = linear
                factors[name] = (b, a)
            config = LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=r, lora_alpha=r, lora_dropout=0.0)
            peft_model = get_peft_model(model, config)
        except BaseException:
            from autopeft.adapters import strip_tuner_layers

            _put_back(strip_tuner_layers(model), originals)
            raise
        with torch.no_grad():
            for name, layer in lora_layers(peft_model).items():
                b, a = factors[name]
                layer.lora_A[ADAPTER].weight.copy_(a)
                layer.lora_B[ADAPTER].weight.copy_(b)
        peft_model.__dict__[_ORIGINALS] = originals
        return peft_model

    def export(self, model, out_dir: Path) -> None:
        from autopeft.transforms import layer_delta, lora_layers, save_as_lora

        originals = model.__dict__[_ORIGINALS]
        deltas = {}
        for name, layer in lora_layers(model).items():
            quantized = layer.get_base_layer().dequantize().float()
            deltas[name] = quantized + layer_delta(layer) - originals[name].weight.detach().float()
        save_as_lora(model, deltas, out_dir)

    def detach(self, model):
        from autopeft.adapters import detach_peft_model

        originals = model.__dict__.pop(_ORIGINALS, {})
        return _put_back(detach_peft_model(model), originals)


def _put_back(model, originals: dict) -> Any:
    """Put each original ``nn.Linear`` back in place of the quantized layer that stood for it."""
    for name, linear in originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def quantize(weight, bits: int, bias=None):
    """An HQQ layer holding ``weight`` (``out × in``) at ``bits`` bits, as :func:`autopeft.models.quantize_base`
    quantizes a base (group size 64 or the largest of 32/16/8 dividing the input width)."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    group_size = next((g for g in GROUP_SIZES if weight.shape[1] % g == 0), None)
    if group_size is None:
        raise TrialFailed(f"lq-lora: an input width of {weight.shape[1]} is not a multiple of 8, which HQQ groups need")
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    return HQQLinear.from_weights(weight.contiguous(), bias, config, compute_dtype=weight.dtype, device=str(weight.device), del_orig=True)


def decompose(linear, r: int, bits: int, rounds: int):
    """LQ-LoRA's decomposition of ``linear.weight``: ``(HQQ layer holding Q, L1, L2, errors per round)``.

    Rounds alternate ``L ← SVD_r(W − Q)`` (from ``Q = 0``) and ``Q ← quantize(W − L)``, each followed by a last
    ``L ← SVD_r(W − Q)``; the round with the lowest Frobenius error ``‖W − Q − L1·L2‖`` is returned. The HQQ layer
    keeps the linear's bias; ``L1 = U·√S`` (out × r) and ``L2 = √S·Vᴴ`` (r × in), in the weight's dtype.
    """
    import torch

    try:
        import hqq  # noqa: F401
    except ImportError:
        raise TrialFailed("lq-lora quantizes with HQQ: pip install 'autopeft[quantization]'") from None
    from autopeft.factorize import truncated_svd

    weight = linear.weight.detach()
    target = weight.float()

    def low_rank(matrix):
        u, s, vh = truncated_svd(matrix, r)
        return u * s.sqrt(), s.sqrt()[:, None] * vh

    b, a = low_rank(target)
    best, errors = None, []
    for _ in range(rounds):
        quantized = quantize((target - b @ a).to(weight.dtype), bits, linear.bias)
        q = quantized.dequantize().float()
        b, a = low_rank(target - q)
        errors.append(float(torch.linalg.matrix_norm(target - q - b @ a)))
        if best is None or errors[-1] < best[0]:
            best = (errors[-1], quantized, b, a)
    _, quantized, b, a = best
    return quantized, b.to(weight.dtype), a.to(weight.dtype), errors


VARIANTS = [LQLoRA]
