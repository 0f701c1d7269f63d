"""LoRA-GGPO: LoRA trained at randomly perturbed merged weights, the perturbation sized by weight and gradient norms.

Chang, Guo, Chang and Wu, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided
Perturbation Optimization", arXiv:2502.14538.

Follows the paper's idea (:class:`autopeft.optim.PerturbedAdamW`): at every training step the forward and
backward passes see each merged weight ``W' = W + s·B·A`` plus a Gaussian perturbation whose row i has variance
``σ²/n · (‖W'ᵢ‖² + β·‖Gᵢ‖²·‖W'‖²/‖G‖²)`` (n the input size, G the gradient with respect to W' at the previous
step), so A and B descend the loss of a neighbourhood rather than of a point, towards flatter minima, at the cost
of one forward and backward per step (not SAM's two). The perturbation is added to the layer's output while the
model is in training mode and dropped by ``step()``: evaluation, the last metrics and the export see the weights
AdamW produced, and the base weights are never written.

Simplifies: the gradient norms are those of the previous step (none at the first step); the gradient term is
rescaled to the weight term's total, so β weighs the two on the same footing (our normalisation, not the
paper's); the α/r scale and dropout are LoRA's defaults here (α = 2r, no dropout). Leaves out: the paper's
hyper-parameter schedule. Needs the base weights (no quantized base).

Export: the trained model is an ordinary PEFT LoRA of rank r with ``lora_alpha = 2r``, saved as it is (exact).
"""

from __future__ import annotations

from autopeft import FloatParam
from autopeft.optimizer_lora import OptimizerLoRA
from autopeft.space import POSITIVE, Bounds


class LoRAGGPO(OptimizerLoRA):
    name = "lora-ggpo"
    summary = "LoRA trained at merged weights perturbed by noise sized by weight and gradient row norms, removed after each step (exported as LoRA rank r)"
    paper = "Chang et al., LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided Perturbation Optimization, arXiv:2502.14538"
    alpha_ratio = 2.0

    def rule_space(self):
        return {
            "sigma": FloatParam(0.005, 0.2, default=0.05, log=True, legal=POSITIVE, help="σ: perturbation size relative to the weight's row norms"),
            "beta": FloatParam(0.0, 4.0, default=1.0, legal=Bounds(0), help="β: weight of the gradient's row norms against the weight's in the perturbation"),
        }

    def update_rule(self, factors, trainable, learning_rate, weight_decay, rule, context):
        from autopeft.optim import PerturbedAdamW

        return PerturbedAdamW(factors, trainable, learning_rate, weight_decay, rule["sigma"], rule["beta"], context.seed)


VARIANTS = [LoRAGGPO]
