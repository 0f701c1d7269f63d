"""A conformance check for variant plugins, for plugin authors to call from their own tests.

::

    from autopeft.testing import check_variant

    def test_my_variant_conforms():
        check_variant(MyVariant())                       # sequence classification on a tiny BERT
        check_variant(MyVariant(), task="causal-lm")     # causal LM on a tiny Llama

It checks, on a tiny random model built from a config (nothing is downloaded), that the search space is valid,
the variant attaches, trains a few steps, changes the model's output, exports a folder that
``peft.PeftModel.from_pretrained`` loads on a fresh base model with the same predictions, and gives the base
model back bitwise unchanged. A failure raises ``AssertionError`` saying which step failed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autopeft.hookspecs import AttachContext, Variant
from autopeft.placement import adapter_sites, select_sites
from autopeft.space import check_space, decode, defaults, override

TINY_VOCAB = 64
PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def tiny_model(task: str = "sequence-classification", seed: int = 0):
    """A random tiny model (BERT for classification with 2 labels, Llama for causal LM), the same for a seed."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if task == "sequence-classification":
        config = BertConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, num_labels=2)
        model = BertForSequenceClassification(config)
    else:
        config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def tiny_batch(task: str = "sequence-classification", batch_size: int = 8, length: int = 12, seed: int = 0) -> dict:
    """A batch of random token ids with labels for ``task``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, TINY_VOCAB, (batch_size, length), generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator) if task == "sequence-classification" else input_ids.clone()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@dataclass
class ConformanceReport:
    variant: str
    params: dict[str, Any]
    trainable_params: int
    max_output_change: float
    max_reload_difference: float


def _logits(model, batch) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def check_variant(
    variant: Variant,
    params: dict[str, Any] | None = None,
    task: str = "sequence-classification",
    steps: int = 4,
    learning_rate: float = 1e-2,
    tolerance: float = 1e-4,
) -> ConformanceReport:
    """Run the conformance check on ``variant`` with its defaults updated by ``params``; raise on the first failure."""
    import torch

    problems = check_space(variant.search_space())
    assert not problems, f"{variant.name}: invalid search space: {problems}"
    space = {name: override(param, params[name]) if params and name in params else param for name, param in variant.search_space().items()}
    _, values = decode(defaults(variant.name, space), {variant.name: space})

    base = tiny_model(task)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    batch = tiny_batch(task)
    base_logits = _logits(base, batch)

    targets = [s.name for s in select_sites(adapter_sites(base), values.get("target_modules", "q,v"))]
    context = AttachContext(
        task=task,
        peft_task_type=PEFT_TASK_TYPES[task],
        target_modules=targets,
        total_steps=steps,
        seed=0,
        calibration_batches=lambda n: (tiny_batch(task, seed=i + 1) for i in range(n)),
    )
    torch.manual_seed(0)
    model = variant.attach(base, values, context)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, f"{variant.name}: attach() left no parameter to train"

    # The variant's own update rule when it has one, exactly as a trial would train it.
    optimizer = variant.optimizer(model, trainable, learning_rate, 0.0, context)
    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    model.train()
    for step in range(1, steps + 1):
        loss = model(**tiny_batch(task, seed=100 + step)).loss
        penalty = variant.regularizer(model, step, context)
        loss = loss if penalty is None else loss + penalty
        assert torch.isfinite(loss), f"{variant.name}: loss is {loss.item()} at step {step}"
        loss.backward()
        optimizer.step()
        variant.on_step(model, step, context)
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    trained_logits = _logits(model, batch)
    change = (trained_logits - base_logits).abs().max().item()
    assert change > 1e-6, f"{variant.name}: training did not change the model's output"

    with tempfile.TemporaryDirectory() as folder:
        variant.export(model, Path(folder))
        files = {p.name for p in Path(folder).iterdir()}
        assert "adapter_config.json" in files, f"{variant.name}: export wrote no adapter_config.json (wrote {sorted(files)})"
        assert "adapter_model.safetensors" in files, f"{variant.name}: export wrote no adapter_model.safetensors (wrote {sorted(files)})"
        exported_logits = _logits(model, batch)
        base = variant.detach(model)
        restored = base.state_dict()
        changed = [k for k in before if k not in restored or not torch.equal(before[k], restored[k])]
        assert not changed, f"{variant.name}: detach() did not restore the base model; changed: {changed[:5]}"

        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(tiny_model(task), folder).eval()
        difference = (_logits(reloaded, batch) - exported_logits).abs().max().item()
        assert difference <= tolerance * max(1.0, exported_logits.abs().max().item()), (
            f"{variant.name}: the exported adapter, loaded with PeftModel.from_pretrained, predicts differently "
            f"(max logit difference {difference:.2e})"
        )
    return ConformanceReport(variant.name, values, sum(p.numel() for p in trainable), change, difference)
