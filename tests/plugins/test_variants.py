"""Variants that misbehave on purpose, loaded through a spec's `plugins:` list like any user plugin file."""

import os

from autopeft import CategoricalParam, Variant, hookimpl, shared


class Flaky(Variant):
    name = "flaky"
    summary = "LoRA that fails on demand"

    def search_space(self):
        return {"learning_rate": shared("learning_rate"), "mode": CategoricalParam(("ok", "raise", "nan"), default="ok")}

    def attach(self, model, params, context):
        import torch
        from peft import LoraConfig, get_peft_model

        if params["mode"] == "raise":
            raise RuntimeError("the adapter could not be built")
        peft_model = get_peft_model(model, LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=2))
        if params["mode"] == "nan":
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if "lora_A" in name:
                        parameter.fill_(float("nan"))
        return peft_model


class Interruptible(Variant):
    name = "interruptible"
    summary = "LoRA that simulates Ctrl-C in the trial named by AUTOPEFT_TEST_INTERRUPT_TRIAL"

    def search_space(self):
        return {"learning_rate": shared("learning_rate"), "r": CategoricalParam((2, 4), default=2)}

    def attach(self, model, params, context):
        from peft import LoraConfig, get_peft_model

        self.interrupt = os.environ.get("AUTOPEFT_TEST_INTERRUPT_TRIAL") == str(context.seed)
        return get_peft_model(model, LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=params["r"]))

    def on_step(self, model, step, context):
        if self.interrupt and step == 3:
            raise KeyboardInterrupt


@hookimpl
def autopeft_variants():
    return [Flaky(), Interruptible()]
