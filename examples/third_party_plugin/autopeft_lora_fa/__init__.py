"""LoRA-FA: LoRA whose down-projection A stays frozen at its random initialisation; only B is trained.

Zhang et al., "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning",
arXiv:2308.03303. Freezing A halves the adapter's optimizer state and means the activations entering B need
not be stored for A's gradient. The result is an ordinary PEFT LoRA adapter.
"""

from __future__ import annotations

from typing import Any

from autopeft import AttachContext, CategoricalParam, IntParam, Variant, hookimpl, shared


class LoRAFA(Variant):
    name = "lora-fa"
    summary = "LoRA with a frozen random A: only B trains (half the optimizer state)"
    paper = "Zhang et al., LoRA-FA: Memory-efficient Low-rank Adaptation for LLM Fine-tuning, arXiv:2308.03303"

    def search_space(self):
        return {
            # A frozen A learns more slowly: a higher default learning rate suits it.
            "learning_rate": shared("learning_rate", default=3e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(4, 64, default=16, log=True, help="rank of the update"),
            "alpha_ratio": CategoricalParam((1.0, 2.0), default=2.0, help="lora_alpha = alpha_ratio × r"),
        }

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type=context.peft_task_type,
            target_modules=context.target_modules,
            r=params["r"],
            lora_alpha=params["alpha_ratio"] * params["r"],
        )
        peft_model = get_peft_model(model, config)
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
        return peft_model


@hookimpl
def autopeft_variants() -> list[Variant]:
    return [LoRAFA()]
