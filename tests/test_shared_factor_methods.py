"""Block-LoRA, S2-LoRA and CoDyRA: shared factors and proximal rank selection, each exported as plain PEFT LoRA.

Each variant passes the conformance check on both tasks. The tests below cover each one's defining mechanism:
Block-LoRA's down-projection is one tensor shared by every block and module; S2-LoRA's factors are shared and its
rank coefficients end sparse; CoDyRA's proximal step closes gates and the export keeps exactly the open ones.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import get_linear_schedule_with_warmup

from autopeft import masked_lora
from autopeft.hookspecs import AttachContext
from autopeft.placement import adapter_sites, select_sites
from autopeft.space import check_space, decode, defaults
from autopeft.testing import PEFT_TASK_TYPES, check_variant, tiny_batch, tiny_model
from autopeft_plugins import paper_methods
from autopeft_plugins.block_lora import BlockLoRA
from autopeft_plugins.codyra import CoDyRA
from autopeft_plugins.s2_lora import S2LoRA

CLS = "sequence-classification"
VARIANTS = {"block-lora": BlockLoRA, "s2-lora": S2LoRA, "codyra": CoDyRA}
SMALL = {"block-lora": {"r": 4}, "s2-lora": {"r": 4}, "codyra": {"max_rank": 4}}


def test_the_three_methods_are_registered_with_a_lora_export():
    """Each module is listed in the papers' entry point and declares its variant, exported as plain LoRA; the two
    whose ranks are chosen in training say so."""
    for module, variant_class in (("block_lora", BlockLoRA), ("s2_lora", S2LoRA), ("codyra", CoDyRA)):
        assert module in paper_methods.METHOD_MODULES
        assert variant_class in importlib.import_module(f"autopeft_plugins.{module}").VARIANTS
        variant = variant_class()
        assert variant.export_format == "lora" and "arXiv" in variant.paper and "exported as LoRA" in variant.summary
        assert not check_space(variant.search_space())
    assert CoDyRA.size_decided_in_training and S2LoRA.size_decided_in_training and not BlockLoRA.size_decided_in_training


@pytest.mark.parametrize("task", [CLS, "causal-lm"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_conforms(name, task):
    check_variant(VARIANTS[name](), params={**SMALL[name], "target_modules": "all"}, task=task)


# --------------------------------------------------------------------------------------------------------------
# Training on the tiny model as autopeft's trial runner does (the variant's optimizer, a linear schedule)
# --------------------------------------------------------------------------------------------------------------


def attach(variant, params: dict, total_steps: int, targets: str = "q,k,v,o"):
    """The variant attached to a tiny BERT with its defaults updated by ``params``; its optimizer and schedule."""
    space = variant.search_space()
    _, values = decode(defaults(variant.name, space), {variant.name: space})
    values.update(params, target_modules=targets)
    base = tiny_model(CLS)
    context = AttachContext(
        task=CLS, peft_task_type=PEFT_TASK_TYPES[CLS], total_steps=total_steps, seed=0,
        target_modules=[s.name for s in select_sites(adapter_sites(base), targets)],
    )
    torch.manual_seed(0)
    model = variant.attach(base, values, context).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = variant.optimizer(model, trainable, values["learning_rate"], 0.0, context) or torch.optim.AdamW(trainable, lr=values["learning_rate"])
    schedule = get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    return model, context, optimizer, schedule


def train(variant, model, context, optimizer, schedule, steps: int) -> None:
    for number in range(1, steps + 1):
        model(**tiny_batch(CLS, seed=number)).loss.backward()
        optimizer.step()
        variant.on_step(model, number, context)
        schedule.step()
        optimizer.zero_grad(set_to_none=True)


def open_slots(model) -> dict[str, int]:
    """Every module's number of non-zero gate values (importance weights, rank coefficients)."""
    return {name: int((gate.gate != 0).sum()) for name, gate in masked_lora.gates(model).items()}


def exported_ranks(folder: Path) -> dict[str, int]:
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    return {name: config["rank_pattern"].get(re.escape(name), config["r"]) for name in config["target_modules"]}


def assert_export_keeps_the_open_slots(variant, model, folder: Path) -> dict[str, int]:
    """Export (which finalizes) and check the rank of every module is its number of open slots, modules with none
    left out; return the open slots."""
    opened = open_slots(model)
    variant.export(model.eval(), folder)
    assert exported_ranks(folder) == {name: k for name, k in opened.items() if k > 0}
    return opened


# --------------------------------------------------------------------------------------------------------------
# Block-LoRA
# --------------------------------------------------------------------------------------------------------------


def test_block_lora_down_projection_is_one_tensor_shared_by_every_block_and_module():
    """A gradient step through one module's adapter alone changes the down-projection every other module uses,
    and leaves their up-projection blocks alone; the trained numbers are one r × 32 tensor plus n blocks per module.

    Catches: down-projection blocks per module (a copy of A_s in each module: the other modules' A stays put and
    the count grows by 7 · r · 32)."""
    variant = BlockLoRA()
    model, _, _, _ = attach(variant, {"r": 4, "blocks": 3}, total_steps=10)
    layers = {name.removeprefix(masked_lora.PREFIX): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 8
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].up.normal_()
    first, other = layers["bert.encoder.layer.0.attention.self.query"], layers["bert.encoder.layer.1.attention.self.value"]
    a_before, b_before = other.lora_A["default"].weight.detach().clone(), other.lora_B["default"].weight.detach().clone()
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) - head == 4 * 32 + 8 * 32 * 3 * 4

    x = torch.randn(5, 32)
    first.lora_B["default"](first.lora_A["default"](x)).square().sum().backward()
    torch.optim.SGD(trainable, lr=0.1).step()
    assert not torch.equal(other.lora_A["default"].weight, a_before)
    assert torch.equal(other.lora_B["default"].weight, b_before)


# --------------------------------------------------------------------------------------------------------------
# S2-LoRA
# --------------------------------------------------------------------------------------------------------------


def test_s2_lora_shares_its_factors_and_its_rank_coefficients_end_sparse(tmp_path):
    """Every module of one input width applies the same A tensor and every module of one output width the same B
    (two widths each on the tiny BERT with all modules); only the r coefficients are per module. After 30 steps
    some coefficients are exactly 0, so some modules keep fewer than r ranks, and the export gives every module
    exactly its non-zero coefficients.

    Catches: removing the proximal soft-threshold (no coefficient is ever exactly 0: every module exports rank r);
    per-module factors (more than two distinct A and B tensors, and more trained numbers)."""
    variant = S2LoRA()
    r = 8
    model, context, optimizer, schedule = attach(variant, {"r": r, "learning_rate": 5e-3}, total_steps=31, targets="all")
    layers = masked_lora.slot_layers(model)
    downs = {id(masked_lora.factor_weights(layer)[0]) for layer in layers.values()}
    ups = {id(masked_lora.factor_weights(layer)[1]) for layer in layers.values()}
    assert len(layers) == 12 and len(downs) == 2 and len(ups) == 2
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) - head
    assert trained == r * (32 + 64) * 2 + 12 * r

    train(variant, model, context, optimizer, schedule, steps=30)
    opened = assert_export_keeps_the_open_slots(variant, model, tmp_path)
    assert 0 < sum(opened.values()) < 12 * r
    assert min(opened.values()) < r


# --------------------------------------------------------------------------------------------------------------
# CoDyRA
# --------------------------------------------------------------------------------------------------------------


def test_codyra_proximal_step_closes_gates_and_the_export_keeps_exactly_the_open_ones(tmp_path):
    """After the dense warm-up the soft-threshold sets importance weights exactly to 0: fewer slots are open than
    exist, modules end with different ranks, and the exported ``rank_pattern`` equals each module's open gates.

    Catches: removing the soft-threshold (every gate stays open, every module exports ``max_rank``)."""
    variant = CoDyRA()
    model, context, optimizer, schedule = attach(
        variant, {"max_rank": 8, "sparsity": 0.1, "dense_fraction": 0.2, "learning_rate": 5e-3}, total_steps=31
    )
    train(variant, model, context, optimizer, schedule, steps=30)
    opened = assert_export_keeps_the_open_slots(variant, model, tmp_path)
    assert 0 < sum(opened.values()) < 8 * 8
    assert len(set(opened.values())) > 1


def test_codyra_keeps_fewer_ranks_as_its_sparsity_knob_rises(tmp_path):
    """``sparsity`` is the budget knob: the same run with a stronger penalty exports fewer ranks in total.

    Catches: a threshold that ignores ``sparsity`` (both runs export the same ranks)."""
    totals = []
    for sparsity in (0.01, 0.3):
        variant = CoDyRA()
        model, context, optimizer, schedule = attach(variant, {"max_rank": 8, "sparsity": sparsity, "learning_rate": 5e-3}, total_steps=30)
        train(variant, model, context, optimizer, schedule, steps=30)
        totals.append(sum(masked_lora.final_ranks(model).values()))
    assert totals[1] < totals[0]
