"""ALLoRA: LoRA without dropout or α/r scaling, with a learning rate per row that shrinks as the row grows.

Huang and Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv:2410.09692.

Follows the paper: no dropout and no scaling factor (``lora_alpha = r``, so ``ΔW = B·A``), and an adaptive
learning rate per row of A and B inversely proportional to the row's ℓ2 norm, ``1/√(‖row‖² + 1/η²)``; a row of B
still at zero moves at the full rate, so B leaves its zero start quickly. Implemented as
:class:`autopeft.optim.RowNormAdamW`: AdamW's step on each row times ``1/√(1 + η²‖row‖²)`` (the paper's factor
times ``1/η``, which the searched learning rate absorbs); the task head trains with plain AdamW.

Simplifies: the factor scales AdamW's step (the paper scales the gradients; under Adam's normalisation a
gradient scale would largely cancel) and uses the norm before the step, per row of each factor matrix rather
than per sample.

Export: the trained model is an ordinary PEFT LoRA of rank r with ``lora_alpha = r``, saved as it is (exact).
"""

from __future__ import annotations

from autopeft import FloatParam
from autopeft.optimizer_lora import OptimizerLoRA
from autopeft.space import POSITIVE


class ALLoRA(OptimizerLoRA):
    name = "allora"
    summary = "LoRA without dropout or α/r scaling; each row of A and B learns at a rate 1/√(1+η²‖row‖²) (exported as LoRA rank r, alpha = r)"
    paper = "Huang and Balestriero, ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws, arXiv:2410.09692"

    def rule_space(self):
        return {"eta": FloatParam(0.1, 10.0, default=1.0, log=True, legal=POSITIVE, help="η: a row of norm 1/η learns at 1/√2 of the rate")}

    def update_rule(self, factors, trainable, learning_rate, weight_decay, rule, context):
        from autopeft.optim import RowNormAdamW

        return RowNormAdamW(factors, trainable, learning_rate, weight_decay, eta=rule["eta"])


VARIANTS = [ALLoRA]
