"""AltLoRA: alternating updates of A and B along projections of the full-weight gradient, with low-rank momentum.

Yu, Wang, Chen and Xue, "AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation with Alternating
Projections", arXiv:2505.12455.

Follows the paper's alternating scheme (:class:`autopeft.optim.AlternatingProjection`): one factor moves per
step, B on odd steps (it starts at zero, so A's projection would be empty) and A on even steps. Each moves along
the best approximation of the full-weight gradient G it can express with the other factor fixed: the
least-squares ``P_B = argmin ‖s·P·A − G‖`` and ``P_A = argmin ‖s·B·P − G‖``, obtained from PEFT's factor
gradients and the r × r Gram matrix of the fixed factor, so G itself is never formed. The first moment lives in
the factors' shapes and is carried to the new basis by the same projection whenever the other factor has moved.
``second_moment: true`` (the paper's AltLoRA+) also divides by an elementwise second moment; the task head trains
with plain AdamW. Because each step matches G in full-weight space, the α/r scale drops out: ``lora_alpha = r``.

Simplifies: one factor per optimizer step, each step on its own batch; the r × r Gram solves are damped by 1e-6
of their mean eigenvalue; the second moment is not carried between bases.

Export: the trained model is an ordinary PEFT LoRA of rank r with ``lora_alpha = r``, saved as it is (exact).
"""

from __future__ import annotations

from autopeft import CategoricalParam
from autopeft.optimizer_lora import OptimizerLoRA


class AltLoRA(OptimizerLoRA):
    name = "altlora"
    summary = "LoRA trained by alternating A and B steps along projections of the full-weight gradient, momentum in the low-rank space (exported as LoRA rank r)"
    paper = "Yu et al., AltLoRA: Towards Better Gradient Approximation in Low-Rank Adaptation with Alternating Projections, arXiv:2505.12455"

    def rule_space(self):
        return {"second_moment": CategoricalParam((True, False), default=True, help="divide by an elementwise second moment (AltLoRA+) or use momentum alone")}

    def update_rule(self, factors, trainable, learning_rate, weight_decay, rule, context):
        from autopeft.optim import AlternatingProjection

        return AlternatingProjection(factors, trainable, learning_rate, weight_decay, second_moment=rule["second_moment"])


VARIANTS = [AltLoRA]
