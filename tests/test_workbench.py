"""The base model is loaded once per worker and comes back bitwise unchanged after every trial."""

from __future__ import annotations

import pytest
import torch

from autopeft.plan import make_plan
from autopeft.spec import load_spec
from autopeft.trial import TrialConfig, Workbench
from conftest import write_spec


def test_the_base_model_is_reused_and_bitwise_unchanged_after_several_trials(classification_spec):
    workbench = Workbench(make_plan(load_spec(classification_spec)))
    base = workbench.base_model
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    module_types = {name: type(module) for name, module in base.named_modules()}

    for seed, targets in enumerate(["q,v", "q,k,v,o,up,down", "all"]):
        outcome = workbench.run_trial(TrialConfig("lora", {"learning_rate": 5e-2, "target_modules": targets, "r": 4, "alpha_ratio": 2.0, "dropout": 0.0}), seed)
        assert outcome.costs["trainable_params"] > 0

    assert workbench.base_model is base  # reused, not reloaded
    after = base.state_dict()
    assert set(after) == set(before)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []
    assert {name: type(module) for name, module in base.named_modules()} == module_types
    assert not any(p.requires_grad for p in base.parameters())


def test_the_same_seed_gives_the_same_trial(classification_spec):
    workbench = Workbench(make_plan(load_spec(classification_spec)))
    params = {"learning_rate": 1e-2, "target_modules": "q,v", "r": 4, "alpha_ratio": 2.0, "dropout": 0.1}
    first = workbench.run_trial(TrialConfig("lora", params), seed=3)
    second = workbench.run_trial(TrialConfig("lora", params), seed=3)
    assert first.metrics == second.metrics


def test_training_learns_the_task(tmp_path, tiny_bert, sentiment_csv):
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, training={"max_steps": 80, "batch_size": 16})
    workbench = Workbench(make_plan(load_spec(spec)))
    before = workbench.evaluate(workbench.base_model, workbench.data.validation).metrics
    outcome = workbench.run_trial(TrialConfig("lora", {"learning_rate": 1e-2, "target_modules": "all", "r": 8, "alpha_ratio": 2.0, "dropout": 0.0}), seed=0)
    assert outcome.metrics["eval_loss"] < before["eval_loss"]
    assert outcome.metrics["accuracy"] >= 0.7 > before["accuracy"]


def test_an_attach_that_fails_half_way_leaves_the_base_model_untouched(classification_spec, monkeypatch):
    from autopeft import Variant
    from autopeft.errors import TrialFailed
    from autopeft.space import shared

    class HalfWay(Variant):
        name = "half-way"

        def search_space(self):
            return {"learning_rate": shared("learning_rate")}

        def attach(self, model, params, context):
            from peft import LoraConfig, get_peft_model

            get_peft_model(model, LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=2))
            raise TrialFailed("gave up after wrapping the layers")

    workbench = Workbench(make_plan(load_spec(classification_spec)))
    found = type(workbench.plan.registry.variants["lora"])(HalfWay(), "test", "test")
    monkeypatch.setitem(workbench.plan.registry.variants, "half-way", found)  # the registry is shared: undo after
    before = {name: type(module) for name, module in workbench.base_model.named_modules()}
    with pytest.raises(TrialFailed):
        workbench.run_trial(TrialConfig("half-way", {"learning_rate": 1e-3, "target_modules": "q,v"}), seed=0)
    assert {name: type(module) for name, module in workbench.base_model.named_modules()} == before
    outcome = workbench.run_trial(TrialConfig("lora", {"learning_rate": 1e-2, "target_modules": "q,v", "r": 2, "alpha_ratio": 2.0, "dropout": 0.0}), seed=0)
    assert outcome.costs["trainable_params"] > 0
