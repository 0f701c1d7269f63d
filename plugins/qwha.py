"""QWHA: sparse Walsh–Hadamard coefficients, initialised to cancel the quantization error of the base.

Paper: Jeon et al., "QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning on
Large Language Models", arXiv:2509.17428.

Follows the paper: ``ΔW = F · H⁻¹`` with ``H`` the orthonormal Walsh–Hadamard matrix of the input dimension
(symmetric, so ``H⁻¹ = H``) and ``F`` (``out × in``) zero except at ``n`` trained coefficients. On a quantized base
(``search.base_bits`` 4 or 8: HQQ layers made by :func:`autopeft.models.quantize_base`, which keep a reference
to the weight ``W`` they were made from), the adapter starts at the best approximation of the quantization error
``E = W − Q`` it can hold, so the model starts closer to the unquantized one:

- parameter selection: the budget ``n`` is split over the output rows in proportion to each row's error energy
  ``‖E_i‖²`` (the paper's AdaAlloc idea: rows with large quantization error get more coefficients), and each row
  takes the locations of its largest transformed errors ``|(E·H)_ij|``;
- value refinement: the values are those of ``E·H`` at the chosen locations, which, ``H`` being orthonormal, is the
  least-squares fit of ``E`` on that support (``‖E − F·H‖ = ‖E·H − F‖``).

On an unquantized base there is no error to cancel: the locations are drawn uniformly at random (seeded) and the
values start at zero, so the model starts exactly at the base.

Simplifies: the allocation is proportional to row error energy rather than the paper's tuned allocation rule;
refinement fits the weight error, not the layer's output error on calibration activations; a dimension that is not
a power of two uses a block-diagonal Hadamard matrix (blocks of the largest power of two dividing it); ``F·H`` is
a dense matrix product rather than a fast transform kernel.

Export: PEFT has no Walsh–Hadamard method, so ``ΔW`` of each module is written as a plain PEFT LoRA whose rank is
the exact (numerical) rank of ``ΔW`` (an SVD, exact up to float rounding; at most ``min(n, out, in)``). On a
quantized base the folder is meant for the same quantized base (autopeft's export loads it there), where it
predicts exactly what the trained model predicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autopeft import AttachContext, IntParam, Variant, shared
from autopeft.errors import TrialFailed
from autopeft.space import RANK

ADAPTER = "default"


class QWHA(Variant):
    """Sparse Walsh–Hadamard-domain adapter whose initial value cancels the base's quantization error."""

    name = "qwha"
    summary = "update F·H of n sparse Walsh–Hadamard coefficients, initialised to the base's quantization error (exported as LoRA of ΔW's exact rank)"
    paper = (
        "Jeon et al., QWHA: Quantization-Aware Walsh-Hadamard Adaptation for Parameter-Efficient Fine-Tuning "
        "on Large Language Models, arXiv:2509.17428"
    )
    export_format = "lora"
    supports_quantized_base = True

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "n_coefficients": IntParam(16, 20000, default=1000, log=True, legal=RANK, help="trained Walsh–Hadamard coefficients per module (capped at out × in)"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        import torch
        from peft import LoraConfig, get_peft_model

        from autopeft.transforms import fixed_linear_class, hadamard_matrix, lora_layers, random_support, sparse_coefficients_class

        # The errors are read before PEFT wraps the layers (and before anything can fail half-way).
        errors = {name: quantization_error(model.get_submodule(name), name) for name in context.target_modules}
        config = LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=1, lora_alpha=1, lora_dropout=0.0)
        peft_model = get_peft_model(model, config)
        FixedLinear, SparseCoefficients = fixed_linear_class(), sparse_coefficients_class()
        generator = torch.Generator().manual_seed(context.seed)
        transforms: dict[int, torch.Tensor] = {}
        for name, layer in lora_layers(peft_model).items():
            template = layer.lora_A[ADAPTER].weight
            out_features, in_features = layer.out_features, layer.in_features
            if in_features not in transforms:
                transforms[in_features] = hadamard_matrix(in_features, dtype=template.dtype, device=template.device)
            count = min(params["n_coefficients"], out_features * in_features)
            error = errors[name]
            if error is None or not bool(error.any()):
                support = random_support(out_features, in_features, count, generator)
                values = torch.zeros(count)
            else:
                support, values = error_support(error, hadamard_matrix(in_features, dtype=torch.float32, device=error.device), count)
            layer.lora_A[ADAPTER] = FixedLinear(transforms[in_features])
            layer.lora_B[ADAPTER] = SparseCoefficients(
                (out_features, in_features), support.to(template.device), values.to(device=template.device, dtype=template.dtype)
            )
        return peft_model

    def export(self, model, out_dir: Path) -> None:
        from autopeft.transforms import layer_delta, lora_layers, save_as_lora

        save_as_lora(model, {name: layer_delta(layer) for name, layer in lora_layers(model).items()}, out_dir)


def quantization_error(layer, name: str):
    """``W − Q`` (float32, ``out × in``) of a quantized layer, or None for a layer that is not quantized.

    A quantized layer is one without a ``weight`` that can ``dequantize()`` (HQQ); the weight it was made from
    is the ``unquantized_weight`` that :func:`autopeft.models.quantize_base` leaves on it.
    """
    if getattr(layer, "weight", None) is not None or not hasattr(layer, "dequantize"):
        return None
    original = getattr(layer, "unquantized_weight", None)
    if original is None:
        raise TrialFailed(
            f"qwha: {name} is quantized but does not say what it was quantized from; quantize the base with "
            "autopeft.models.quantize_base (search.base_bits), which keeps that reference"
        )
    return original.float() - layer.dequantize().float()


def error_support(error, transform, count: int):
    """The support (flat indices) and values of QWHA's initialisation for a quantization error ``E``.

    Rows get ``count`` coefficients in proportion to ``‖E_i‖²`` (largest remainders round, at most ``in`` per
    row); each row keeps its largest ``|(E·H)_ij|``, with value ``(E·H)_ij``.
    """
    import torch

    rows, cols = error.shape
    coefficients = error @ transform.T
    energy = error.pow(2).sum(1).double()
    share = count * energy / energy.sum()
    counts = share.floor().long()
    leftover = count - int(counts.sum())
    counts[(share - counts).argsort(descending=True)[:leftover]] += 1
    counts = counts.clamp(max=cols)
    order = coefficients.abs().argsort(dim=1, descending=True)
    keep = torch.arange(cols, device=error.device)[None, :] < counts[:, None].to(error.device)
    flat = (torch.arange(rows, device=error.device)[:, None] * cols + order)[keep].sort().values
    return flat.cpu(), coefficients.reshape(-1)[flat]


VARIANTS = [QWHA]
