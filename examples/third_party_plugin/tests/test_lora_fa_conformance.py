"""The plugin's own test: autopeft's conformance check is all a variant author needs to call."""


from autopeft.testing import check_variant, tiny_model
from autopeft_lora_fa import LoRAFA


def test_lora_fa_conforms_for_classification_and_causal_lm():
    check_variant(LoRAFA())
    check_variant(LoRAFA(), task="causal-lm", params={"target_modules": "all"})


def test_only_b_is_trained():
    from autopeft.placement import adapter_sites, select_sites
    from autopeft.testing import PEFT_TASK_TYPES
    from autopeft import AttachContext

    base = tiny_model()
    targets = [s.name for s in select_sites(adapter_sites(base), "q,v")]
    context = AttachContext("sequence-classification", PEFT_TASK_TYPES["sequence-classification"], targets, 4, 0)
    model = LoRAFA().attach(base, {"r": 4, "alpha_ratio": 2.0}, context)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and not any("lora_A" in n for n in trainable)
