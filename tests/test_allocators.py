"""The in-training allocators (IncreLoRA, SoRA, LoRA-Squeeze, DiffoRA, Bayesian-LoRA) and masked_lora under them.

Each allocator must pass the conformance check, really change ranks (or placement, or bits) during training, and
end in a standard PEFT LoRA folder whose per-module ranks are keyed by regex-escaped full module names and which
``PeftModel.from_pretrained`` loads with the same predictions.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from autopeft import masked_lora
from autopeft.adapters import detach_peft_model
from autopeft.cli import main
from autopeft.hookspecs import AttachContext
from autopeft.costs import measure
from autopeft.placement import adapter_sites, select_sites
from autopeft.quantize import apply_adapter_bits, bake_adapter_bits
from autopeft.registry import load_registry
from autopeft.space import decode, defaults
from autopeft.testing import PEFT_TASK_TYPES, check_variant, tiny_batch, tiny_model
from autopeft_plugins.allocators import BayesianLoRA, DiffoRA, IncreLoRA, LoRASqueeze, SoRA
from conftest import write_spec

ALLOCATORS = {"increlora": IncreLoRA, "sora": SoRA, "lora-squeeze": LoRASqueeze, "diffora": DiffoRA, "bayesian-lora": BayesianLoRA}
CLS = "sequence-classification"


def test_every_allocator_is_registered_with_a_lora_export():
    registry = load_registry()
    assert not registry.broken
    for name in ALLOCATORS:
        variant = registry.variant(name)
        assert variant.export_format == "lora" and variant.summary and "arXiv" in variant.paper


@pytest.mark.parametrize(
    ("name", "params", "task"),
    [
        ("increlora", None, CLS),
        ("increlora", {"reserve": False, "init_r": 1, "target_modules": "q,k,v,o"}, "causal-lm"),
        ("sora", {"max_rank": 4, "stages": 1}, CLS),
        ("lora-squeeze", {"mode": "energy", "energy": 0.8}, CLS),
        ("lora-squeeze", {"continue_fraction": 0.0, "source_rank": 32}, "causal-lm"),
        ("diffora", None, CLS),
        ("diffora", {"rho": 0.25, "target_modules": "all"}, "causal-lm"),
        ("bayesian-lora", None, CLS),
        ("bayesian-lora", {"max_rank": 4, "lambda_bits": 1.0}, "causal-lm"),
    ],
)
def test_allocator_conforms(name, params, task):
    check_variant(ALLOCATORS[name](), params=params, task=task)


# --------------------------------------------------------------------------------------------------------------
# Training on the tiny model, as autopeft's trial runner does
# --------------------------------------------------------------------------------------------------------------


def attach(variant, params: dict, steps: int, targets: str = "q,k,v,o", task: str = CLS, calibration=None):
    """Attach with the variant's defaults updated by ``params`` to a tiny model, for a ``steps``-step training.

    ``calibration(i)``: the i-th batch of the second stream (default: fresh random batches)."""
    space = variant.search_space()
    _, values = decode(defaults(variant.name, space), {variant.name: space})
    values.update(params, target_modules=targets)
    base = tiny_model(task)
    context = AttachContext(
        task=task, peft_task_type=PEFT_TASK_TYPES[task], total_steps=steps, seed=0,
        target_modules=[s.name for s in select_sites(adapter_sites(base), targets)],
        calibration_batches=lambda n: ((calibration or (lambda i: tiny_batch(task, seed=1000 + i)))(i) for i in range(n)),
    )
    torch.manual_seed(0)
    model = variant.attach(base, values, context)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model.train(), context, optimizer


def step(variant, model, context, optimizer, number: int, same_batch: bool = False) -> dict[str, int]:
    """One training step as autopeft's trial runner takes it; returns every module's rank afterwards."""
    loss = model(**tiny_batch(context.task, seed=0 if same_batch else number)).loss
    penalty = variant.regularizer(model, number, context)
    (loss if penalty is None else loss + penalty).backward()
    optimizer.step()
    variant.on_step(model, number, context)
    optimizer.zero_grad(set_to_none=True)
    return masked_lora.final_ranks(model) or masked_lora.active_ranks(model)


def train(variant, params: dict, steps: int = 20, same_batch: bool = False, **where):
    """Train ``steps`` steps; return the model and the total rank before training and after every step."""
    model, context, optimizer = attach(variant, params, steps, **where)
    totals = [sum(masked_lora.active_ranks(model).values())]
    for number in range(1, steps + 1):
        totals.append(sum(step(variant, model, context, optimizer, number, same_batch).values()))
    return model.eval(), context, totals


def export_and_reload(variant, model, folder: Path, task: str = CLS) -> dict:
    """Export, check the folder is a standard LoRA adapter that reloads with the same predictions; return its config."""
    batch = tiny_batch(task, seed=7)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    variant.export(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    names = [name for name, _ in tiny_model(task).named_modules()]
    for pattern in (config["rank_pattern"], config["alpha_pattern"]):
        for key in pattern:
            matches = [n for n in names if re.match(rf"(.*\.)?({key})$", n)]
            assert len(matches) == 1 and key == re.escape(matches[0]), key
    assert set(config["target_modules"]) <= set(names)
    reloaded = PeftModel.from_pretrained(tiny_model(task), str(folder)).eval()
    with torch.no_grad():
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5)
    restored, original = detach_peft_model(model).state_dict(), tiny_model(task).state_dict()
    assert restored.keys() == original.keys() and all(torch.equal(restored[k], original[k]) for k in original)
    return config


def exported_ranks(config: dict) -> dict[str, int]:
    return {name: config["rank_pattern"].get(re.escape(name), config["r"]) for name in config["target_modules"]}


def differs(config: dict, candidates: int) -> bool:
    """The exported adapter gives modules different ranks, or leaves some candidate modules out."""
    return len(set(exported_ranks(config).values())) > 1 or len(config["target_modules"]) < candidates


# --------------------------------------------------------------------------------------------------------------
# Each allocator allocates
# --------------------------------------------------------------------------------------------------------------


def test_increlora_grows_ranks_up_to_the_budget(tmp_path):
    variant = IncreLoRA()
    model, _, totals = train(variant, {"init_r": 1, "target_rank": 3, "top_fraction": 0.25, "rank_step": 2})
    assert totals[0] == 8 and totals[-1] == 24  # 8 modules start at rank 1 and grow to the budget of 3 on average
    assert all(later >= earlier for earlier, later in zip(totals, totals[1:]))
    config = export_and_reload(variant, model, tmp_path)
    assert sum(exported_ranks(config).values()) == 24 and differs(config, 8)


def test_increlora_gives_new_ranks_to_the_modules_with_the_highest_scores():
    """At every growth round the modules that gain rank are exactly the top ones by importance score (and their
    scores are positive). Catches: growing modules in any other order (e.g. by name, or the lowest scores)."""
    variant = IncreLoRA()
    params = {"init_r": 1, "target_rank": 3, "top_fraction": 0.25, "rank_step": 1, "max_rank_ratio": 3.0}
    model, context, optimizer = attach(variant, params, steps=20)
    tracker, seen = model.__dict__["_autopeft_allocator_state"].tracker, []
    scores = tracker.scores
    tracker.scores = lambda: seen.append(scores()) or seen[-1]
    ranks, grew = masked_lora.active_ranks(model), 0
    for number in range(1, 13):
        new = step(variant, model, context, optimizer, number)
        grown = {name for name in new if new[name] > ranks[name]}
        if grown:
            top = sorted(seen[-1], key=seen[-1].get, reverse=True)[:2]
            assert grown == set(top) and all(seen[-1][name] > 0 for name in top)
            grew += 1
        ranks = new
    assert grew >= 3


def candidate_sizes(targets: str = "q,k,v,o") -> int:
    """Σ (in + out) over the candidate modules of the tiny model: the parameters of one rank on each."""
    return sum(s.in_features + s.out_features for s in select_sites(adapter_sites(tiny_model()), targets))


def lora_parameters(folder: Path) -> int:
    return sum(w.numel() for k, w in load_file(folder / "adapter_model.safetensors").items() if "lora_" in k)


def test_sora_with_its_defaults_closes_gates_in_stages_down_to_the_budget(tmp_path):
    """Defaults: 16 slots per module, a budget of 8 on average. The gates start from a normal draw, close
    during the sparsifying phase (not only at its end) and the export holds 8 · Σ(in+out) parameters ± 10%.

    Catches: removing the proximal soft-threshold (no gate ever reaches 0: twice the budget is exported);
    removing the staged threshold while keeping the end-of-phase one (nothing closes before step 14); starting
    the gates at 1 (they are all equal at the start)."""
    variant = SoRA()
    model, context, optimizer = attach(variant, {}, steps=20)
    start = torch.cat([g.gate.detach().flatten() for g in masked_lora.gates(model).values()])
    assert start.numel() == 8 * 16 and start.std() > 0.5 and start.min() < 0 < start.max()
    totals = [sum(step(variant, model, context, optimizer, number).values()) for number in range(1, 21)]
    assert totals[6] < 8 * 16  # step 7, halfway through the phase of 14 steps (0.7 of 20)
    assert totals[-1] <= totals[6]
    config = export_and_reload(variant, model.eval(), tmp_path)
    assert differs(config, 8)
    budget = 8 * candidate_sizes()
    assert abs(lora_parameters(tmp_path) - budget) <= 0.1 * budget


BUDGET_RUNS = {
    "sora": {"max_rank": 8, "target_rank": 4},
    "increlora": {"init_r": 1, "target_rank": 4, "max_rank_ratio": 2.0},
    "lora-squeeze": {"source_rank": 8, "target_rank": 4, "mode": "rank"},
    "lora-squeeze-in": {"source_rank": 8, "target_rank": 4, "mode": "rank", "schedule": "in-squeeze"},
    "diffora": {"rank": 8, "rho": 0.5},
}


@pytest.mark.parametrize("run", list(BUDGET_RUNS))
def test_allocator_exports_the_budget_it_is_given(run, tmp_path):
    """An average rank of 4 from 8 slots (the tiny model's version of 8 from 16): the exported LoRA tensors
    hold 4 · Σ(in+out) parameters ± 10%. The budget knob: ``target_rank`` (SoRA, IncreLoRA, LoRA-Squeeze),
    ``rho`` · ``rank`` (DiffoRA). Catches an allocator that ignores its budget (SoRA without the proximal step
    exports 8 ranks per module; IncreLoRA without growth stays at 1; LoRA-Squeeze without compression at 8)."""
    variant = ALLOCATORS[run.removesuffix("-in")]()
    model, _, _ = train(variant, BUDGET_RUNS[run])
    variant.export(model, tmp_path)
    budget = 4 * candidate_sizes()
    assert abs(lora_parameters(tmp_path) - budget) <= 0.1 * budget


def test_bayesian_lora_budget_follows_lambda_rank(tmp_path):
    """Bayesian-LoRA has no target size: ``lambda_rank`` (tuned by the outer search) sets it. A strong rank
    prior exports fewer LoRA parameters than a weak one. Catches: dropping the rank term of the prior."""
    sizes = []
    for strength in (1e-4, 0.5):
        variant = BayesianLoRA()
        params = {"lambda_rank": strength, "lambda_bits": 1e-4, "prior_warmup_fraction": 0.0}
        model, _, _ = train(variant, params, steps=20, same_batch=True)
        variant.export(model, tmp_path / str(strength))
        sizes.append(lora_parameters(tmp_path / str(strength)))
    assert sizes[1] < 0.75 * sizes[0]


def test_lora_squeeze_compresses_each_module_to_the_energy_it_needs(tmp_path):
    variant = LoRASqueeze()
    model, _, totals = train(variant, {"source_rank": 16, "mode": "energy", "energy": 0.6, "continue_fraction": 0.2})
    assert totals[15] == 8 * 16 and totals[16] < 8 * 16  # squeezed after step 16 of 20, then trained on
    config = export_and_reload(variant, model, tmp_path)
    assert max(exported_ranks(config).values()) < 16 and differs(config, 8)


def test_lora_squeeze_in_squeeze_anneals_the_rank_during_training(tmp_path):
    """``schedule: in-squeeze`` lowers the rank in stages while training (16 → 13 → 10 → 7 → 4 at steps 4, 8,
    12, 16 of 20) and exports exactly the target rank. Catches: in-squeeze falling back to one post-hoc
    compression (a single drop), or annealing that never reaches the target."""
    variant = LoRASqueeze()
    params = {"source_rank": 16, "target_rank": 4, "mode": "rank", "schedule": "in-squeeze", "continue_fraction": 0.2}
    model, _, totals = train(variant, params)
    per_module = [total // 8 for total in totals]
    assert per_module[3] == 16 and per_module[4] == 13 and per_module[8] == 10 and per_module[12] == 7 and per_module[16:] == [4] * 5
    config = export_and_reload(variant, model, tmp_path)
    assert set(exported_ranks(config).values()) == {4}


def test_lora_squeeze_keeps_the_best_rank_k_approximation_of_each_update():
    """The compressed update is the best rank-2 approximation (Eckart–Young) of the trained one, and the
    exported rank equals the target. Catches: a truncation other than the top singular triplets."""
    variant = LoRASqueeze()
    base = tiny_model()
    targets = [s.name for s in select_sites(adapter_sites(base), "q,v")]
    context = AttachContext(task=CLS, peft_task_type="SEQ_CLS", target_modules=targets, total_steps=10, seed=0)
    space = variant.search_space()
    _, values = decode(defaults(variant.name, space), {variant.name: space})
    model = variant.attach(base, {**values, "source_rank": 8, "target_rank": 2}, context)
    layers = masked_lora.slot_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            masked_lora.factor_weights(layer)[1].normal_()
        before = {name: masked_lora.delta_weight(layer) for name, layer in layers.items()}
        variant.settle(model)
        for name, layer in layers.items():
            u, sigma, vh = torch.linalg.svd(before[name])
            best = (u[:, :2] * sigma[:2]) @ vh[:2]
            assert int(masked_lora.gate_of(layer).active().sum()) == 2
            assert torch.allclose(masked_lora.delta_weight(layer), best, atol=1e-4)


def test_diffora_keeps_the_module_whose_update_lowers_the_held_out_loss():
    """Only the last candidate module (in module order) has a non-zero update, fitted to the held-out batch that
    the α steps see; every other module's update is zero, so its α gets no gradient. With ρ = 1/8 the α steps
    must select that last module. Catches: deleting the α optimizer step (every σ(α) stays 0.5 and the first
    module by order is kept)."""
    variant = DiffoRA()
    held_out = tiny_batch(CLS, seed=4321)
    model, context, _ = attach(variant, {"rho": 0.125, "rank": 4, "search_fraction": 0.5}, steps=10, calibration=lambda i: held_out)
    layers = masked_lora.slot_layers(model)
    last = list(layers)[-1]
    fitted = torch.optim.Adam(masked_lora.factor_weights(layers[last]), lr=1e-2)
    for _ in range(10):
        model(**held_out).loss.backward()
        fitted.step()
        model.zero_grad(set_to_none=True)
    for number in range(1, 6):
        variant.on_step(model, number, context)
    assert {name for name, rank in masked_lora.active_ranks(model).items() if rank} == {last}


def test_diffora_keeps_the_top_fraction_of_modules(tmp_path):
    variant = DiffoRA()
    model, _, totals = train(variant, {"rho": 0.5, "rank": 4, "search_fraction": 0.3})
    assert totals[0] == 8 * 4 and totals[-1] == 4 * 4
    config = export_and_reload(variant, model, tmp_path)
    assert len(config["target_modules"]) == 4 and set(exported_ranks(config).values()) == {4}


def test_bayesian_lora_learns_ranks_and_exports_weights_on_the_recorded_grid(tmp_path):
    """Ranks and bits are learned, the export lies on the recorded grid, and the trial's ``bops_per_token`` and
    ``adapter_bytes`` (measured as the trial runner does, after ``bake_adapter_bits``) use the learned bits.
    Catches: finalize not putting the learned bits on the model (the costs would be those of 32-bit weights)."""
    variant = BayesianLoRA()
    params = {"lambda_rank": 0.02, "lambda_bits": 0.02, "gate_lr_multiplier": 100.0, "prior_warmup_fraction": 0.3}
    model, _, totals = train(variant, params, steps=30, same_batch=True)
    assert totals[0] == 64 and totals[-1] < 64
    learned = bake_adapter_bits(model)
    sites = select_sites(adapter_sites(tiny_model()), "q,k,v,o")
    costs = measure(model, sites, learned, 16, torch.float32)
    ranks, by_name = masked_lora.final_ranks(model), {s.name: s for s in sites}
    adapter = sum(r * (by_name[n].in_features + by_name[n].out_features) * learned.get(n, 32) * 32 for n, r in ranks.items())
    assert learned and costs["bops_per_token"] == sum(s.in_features * s.out_features for s in sites) * 32 * 32 + adapter
    assert costs["bops_per_token"] < measure(model, sites, {}, 16, torch.float32)["bops_per_token"]
    config = export_and_reload(variant, model, tmp_path)
    assert differs(config, 8)
    bits = json.loads((tmp_path / "adapter_bits.json").read_text())
    assert set(bits) <= set(config["target_modules"]) and bits and all(b in (2, 4, 8) for b in bits.values())
    weights = load_file(tmp_path / "adapter_model.safetensors")
    for name, module_bits in bits.items():
        levels = 2 ** (module_bits - 1) - 1
        for factor in ("lora_A", "lora_B"):
            weight = weights[f"base_model.model.{name}.{factor}.weight"].double()
            scale = weight.abs().amax(-1, keepdim=True) / levels
            steps = weight[scale[:, 0] > 0] / scale[scale[:, 0] > 0]
            assert torch.allclose(steps, steps.round(), atol=1e-3), (name, factor, module_bits)


# --------------------------------------------------------------------------------------------------------------
# masked_lora itself
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["increlora", "bayesian-lora"])
def test_detach_mid_training_restores_the_base_bitwise(name):
    variant = ALLOCATORS[name]()
    space = variant.search_space()
    _, values = decode(defaults(variant.name, space), {variant.name: space})
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    targets = [s.name for s in adapter_sites(base)]
    context = AttachContext(task=CLS, peft_task_type="SEQ_CLS", total_steps=10, seed=0, target_modules=targets)
    model = variant.attach(base, values, context)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):  # stopped (pruned) long before the last step: the model is still slot-gated
        model(**tiny_batch(seed=step)).loss.backward()
        optimizer.step()
        variant.on_step(model, step, context)
        optimizer.zero_grad()
    assert masked_lora.slot_layers(model)
    restored = variant.detach(model).state_dict()
    assert restored.keys() == before.keys() and all(torch.equal(before[k], restored[k]) for k in before)


def test_finalize_drops_rank_zero_modules_and_folds_gates_exactly(tmp_path):
    base = tiny_model()
    targets = [s.name for s in select_sites(adapter_sites(base), "q,k,v,o")]
    context = AttachContext(task=CLS, peft_task_type="SEQ_CLS", target_modules=targets, total_steps=1, seed=0)
    trainable = lambda linear: masked_lora.SlotGate(linear, trainable_gate=True)  # noqa: E731
    model = masked_lora.attach(base, context, r_max=4, alpha_ratio=2.0, gate_factory=trainable)
    torch.manual_seed(1)
    with torch.no_grad():
        for i, (name, layer) in enumerate(masked_lora.slot_layers(model).items()):
            a, b = masked_lora.factor_weights(layer)
            b.normal_()
            gate = masked_lora.gate_of(layer)
            gate.gate.uniform_(0.5, 2.0)
            gate.mask[: i % 4] = 0  # ranks 4, 3, 2, 1, 4, 3, 2, 1
            gate.multiplier.fill_(1.5)
        masked_lora.gate_of(masked_lora.slot_layers(model)[targets[0]]).mask.zero_()  # this module drops out
    batch = tiny_batch(seed=3)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    ranks = masked_lora.export(model, tmp_path)
    assert ranks[targets[0]] == 0 and sorted(r for r in ranks.values() if r) == [1, 1, 2, 2, 3, 3, 4]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert targets[0] not in config["target_modules"] and exported_ranks(config) == {n: r for n, r in ranks.items() if r}
    reloaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, before, atol=1e-5)


def test_a_search_over_all_allocators_exports_a_ready_adapter_with_final_costs(tmp_path, tiny_bert, sentiment_csv):
    spec = write_spec(
        tmp_path,
        model={"id": str(tiny_bert), "task": "sequence-classification"},
        data={"source": str(sentiment_csv)},
        search={"variants": list(ALLOCATORS), "n_trials": 5, "seed": 0, "space": {"learning_rate": 1e-2, "target_modules": "q,k,v,o"}},
        training={"max_steps": 10, "batch_size": 8, "eval_every": 10, "eval_batch_size": 40},
    )
    assert main(["search", str(spec)]) == 0
    with open(tmp_path / "run" / "trials.csv") as handle:
        rows = {r["variant"]: r for r in csv.DictReader(handle)}
    assert set(rows) == set(ALLOCATORS) and all(r["state"] == "COMPLETE" for r in rows.values())
    # Costs are those of the final adapter: DiffoRA keeps half of the 8 modules at rank 8 (plus the 66-weight head).
    assert int(rows["diffora"]["trainable_params"]) == 4 * 8 * (32 + 32) + 66
    info = json.loads((tmp_path / "run" / "best" / "autopeft.json").read_text())
    assert info["variant"] in ALLOCATORS and any(m["rank"] for m in info["modules"])


# --------------------------------------------------------------------------------------------------------------
# Adapter-bit quantization in training
# --------------------------------------------------------------------------------------------------------------


def test_adapter_fake_quantization_shapes_the_training_forward_with_straight_through_gradients():
    """With 2 adapter bits, the forward pass in training uses weights on the 3-level grid (not the raw weights),
    and the raw weights still get gradients. Catches: in-training fake quantization disabled
    (``apply_adapter_bits`` registering nothing: the loss is that of the raw weights) and the straight-through
    estimator removed (rounding has no gradient: the raw weights get none)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model()
    targets = [s.name for s in select_sites(adapter_sites(base), "q,v")]
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=targets, r=4, lora_alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    batch = tiny_batch(seed=5)
    model.train()
    with torch.no_grad():
        raw_loss = float(model(**batch).loss)
    apply_adapter_bits(model, {f"base_model.model.{name}": 2 for name in targets})
    loss = model(**batch).loss
    assert abs(float(loss) - raw_loss) > 1e-4
    loss.backward()
    for name in targets:
        factor = model.get_submodule(f"base_model.model.{name}").lora_B["default"]
        used, raw = factor.weight, factor.parametrizations.weight.original
        scale = raw.detach().abs().amax(-1, keepdim=True)
        assert torch.allclose(used.detach().abs(), scale.expand_as(used) * (used.detach() != 0))  # levels {-s, 0, s}
        assert raw.grad is not None and raw.grad.abs().sum() > 0


def test_bayesian_bits_rounding_passes_gradients_straight_through():
    """Bayesian-LoRA with every residual bit gate off quantizes ``A`` to the 2-bit base grid (3 levels per row)
    in the forward pass, and ``A`` still gets a gradient. Catches: plain ``round`` in place of the
    straight-through rounding (no gradient reaches ``A``) and the quantizer being bypassed (more than 3 levels)."""
    variant = BayesianLoRA()
    model, context, _ = attach(variant, {"max_rank": 4}, steps=10)
    with torch.no_grad():
        for gate in masked_lora.gates(model).values():
            gate.bits_theta.fill_(-100.0)
        for layer in masked_lora.slot_layers(model).values():
            masked_lora.factor_weights(layer)[1].normal_()
    model.eval()
    model(**tiny_batch(seed=2)).loss.backward()
    for layer in masked_lora.slot_layers(model).values():
        gate = masked_lora.gate_of(layer)
        used = gate.factor_a().detach()
        assert all(len(torch.unique(row)) <= 3 for row in used)
        assert gate.linear.weight.grad is not None and gate.linear.weight.grad.abs().sum() > 0
