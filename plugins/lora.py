"""LoRA through Hugging Face PEFT: rank, alpha, dropout, placement and learning rate.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
"""

from __future__ import annotations

from typing import Any

from autopeft import AttachContext, CategoricalParam, FloatParam, IntParam, Variant, hookimpl, shared
from autopeft.space import PROBABILITY, RANK


class LoRA(Variant):
    name = "lora"
    summary = "low-rank update B·A added to frozen linear layers"
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685"
    supports_module_ranks = True
    supports_quantized_base = True

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 64, default=8, log=True, legal=RANK, help="rank of the update"),
            "alpha_ratio": CategoricalParam((0.5, 1.0, 2.0, 4.0), default=2.0, help="lora_alpha = alpha_ratio × r"),
            "dropout": FloatParam(0.0, 0.2, default=0.05, legal=PROBABILITY, help="dropout on the adapter's input"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from peft import LoraConfig, get_peft_model

        from autopeft.adapters import lora_rank_kwargs

        if context.ranks is not None:
            shape = lora_rank_kwargs(context.ranks, params["alpha_ratio"])
        else:
            shape = {"target_modules": context.target_modules, "r": params["r"], "lora_alpha": params["alpha_ratio"] * params["r"]}
        config = LoraConfig(task_type=context.peft_task_type, lora_dropout=params["dropout"], **shape)
        return get_peft_model(model, config)


@hookimpl
def autopeft_variants() -> list[Variant]:
    return [LoRA()]
