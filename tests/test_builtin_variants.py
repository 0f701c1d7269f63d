"""Every built-in variant conforms (attach, train, export, reload, detach) and the search runs across several.

Conformance is checked on tiny random models for each built-in variant's defaults, on both tasks, and for a few
non-default choices per variant (wider placement, other ranks, every LoRA init). The rest checks what users rely
on beyond conformance: AdaLoRA really prunes ranks, impossible configurations fail as a trial with a reason and
leave the base model alone, the frozen-basis variants train only a handful of numbers and export plain LoRA.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from autopeft import AttachContext
from autopeft.cli import main
from autopeft.errors import TrialFailed
from autopeft.placement import adapter_sites, select_sites
from autopeft.registry import load_registry
from autopeft.testing import PEFT_TASK_TYPES, check_variant, tiny_batch, tiny_model
from conftest import plain_peft_test_predictions, write_spec

REGISTRY = load_registry()
# The PEFT methods bridged as peft:<method> have their own conformance test (test_peft_bridge.py).
BUILTIN = sorted(name for name, found in REGISTRY.variants.items() if found.source == "built-in" and found.plugin != "peft_bridge")
TASKS = ("sequence-classification", "causal-lm")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: synchronising torch's threads costs more than the arithmetic, many times over on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def variant(name: str):
    return REGISTRY.variant(name)


def context_for(model, target_modules: str = "q,v", task: str = "sequence-classification", steps: int = 4) -> AttachContext:
    targets = [s.name for s in select_sites(adapter_sites(model), target_modules)]
    return AttachContext(task, PEFT_TASK_TYPES[task], targets, steps, 0, lambda n: (tiny_batch(task, seed=i + 1) for i in range(n)))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_variant_conforms_with_its_defaults(name, task):
    check_variant(variant(name), task=task)


def _non_default_choices():
    inits = [c for c in variant("lora-init").search_space()["init"].choices if c != "gaussian"]
    cases = [
        ("rslora", {"r": 16, "target_modules": "all"}, "sequence-classification"),
        ("dora", {"r": 4, "target_modules": "q,k,v,o,up,down"}, "causal-lm"),
        *[("lora-init", {"init": init, "r": 4}, "sequence-classification") for init in inits],
        ("lora-init", {"init": "pissa", "target_modules": "all"}, "causal-lm"),
        ("lora-init", {"init": "eva", "eva_rho": 1.0}, "causal-lm"),
        ("adalora", {"init_r": 4, "target_ratio": 0.25, "target_modules": "all"}, "sequence-classification"),
        # VeRA and RandLoRA share one projection across differently shaped layers (32x32, 64x32, 32x64).
        ("vera", {"r": 32, "d_initial": 1.0, "target_modules": "all"}, "causal-lm"),
        ("randlora", {"r": 4, "sparse": True, "target_modules": "all"}, "sequence-classification"),
        ("loha", {"r": 2, "target_modules": "all"}, "sequence-classification"),
        ("lokr", {"decompose_both": True, "decompose_factor": 4, "target_modules": "all"}, "causal-lm"),
        ("fourierft", {"n_frequency": 64, "scaling": 300.0, "target_modules": "all"}, "sequence-classification"),
        ("vblora", {"num_vectors": 16, "topk": 4, "r": 2, "target_modules": "all"}, "causal-lm"),
        ("lora-xs", {"basis": "gradient", "r": 4, "target_modules": "all"}, "sequence-classification"),
        ("lora-xs", {"r": 8}, "causal-lm"),
        ("nola", {"num_bases": 16, "r": 2, "target_modules": "all"}, "sequence-classification"),
    ]
    return [pytest.param(name, params, task, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items())}") for name, params, task in cases]


@pytest.mark.parametrize("name,params,task", _non_default_choices())
def test_non_default_choices_conform(name, params, task):
    report = check_variant(variant(name), params=params, task=task)
    assert {k: report.params[k] for k in params} == params


def test_adalora_prunes_ranks_to_the_target_budget_during_training():
    base = tiny_model()
    steps = 10
    context = context_for(base, "q,v", steps=steps)
    adalora = variant("adalora")
    params = {"init_r": 8, "target_ratio": 0.25, "alpha_ratio": 1.0, "tinit": 0.0, "tfinal": 0.2, "delta_t": 0.1, "orth_reg_weight": 0.5, "singular_lr_scale": 2.0}
    model = adalora.attach(base, params, context)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def active_ranks() -> int:
        return sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)

    history = []
    model.train()
    for step in range(1, steps + 1):
        model(**tiny_batch(seed=100 + step)).loss.backward()
        optimizer.step()
        adalora.on_step(model, step, context)
        optimizer.zero_grad(set_to_none=True)
        history.append(active_ranks())

    modules = len(context.target_modules)
    # From 8 ranks per module down to the target of 2 per module on average, never growing on the way.
    assert history[0] > 2 * modules and history == sorted(history, reverse=True)
    assert history[-1] == 2 * modules
    rank_pattern = model.peft_config["default"].rank_pattern
    assert sum(sum(kept) for kept in rank_pattern.values()) == 2 * modules
    # The orthogonality penalty is a training term only: the loss the model reports is the task loss alone.
    assert adalora.regularizer(model, steps, context) > 0
    model.eval()
    batch = tiny_batch(seed=7)
    with torch.no_grad():
        output = model(**batch)
    assert torch.allclose(output.loss, torch.nn.functional.cross_entropy(output.logits, batch["labels"]))
    adalora.detach(model)


def test_a_peft_failure_half_way_through_wrapping_leaves_the_base_model_unwrapped():
    from peft import FourierFTConfig

    from autopeft_plugins.peft_variants import _get_peft_model

    base = tiny_model()
    # 1500 frequencies fit the 64x32 and 32x64 MLP layers of block 0 but not block 1's 32x32 query: PEFT fails there.
    targets = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.self.query"]
    with pytest.raises(ValueError, match="n_frequency"):
        _get_peft_model(base, FourierFTConfig(task_type="SEQ_CLS", target_modules=targets, n_frequency=1500))
    assert not any(type(m).__module__.startswith("peft") for m in base.modules())
    assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(
    "name,params,reason",
    [
        ("fourierft", {"n_frequency": 2000}, "exceeds the 32x32=1024 entries"),
        ("lora-init", {"init": "lora_ga", "r": 32}, "needs rank 64"),
        ("lora-init", {"init": "pissa", "r": 64}, "needs rank 64"),
        ("lora-xs", {"r": 64}, "rank 64 exceeds"),
    ],
)
def test_a_configuration_the_model_cannot_take_fails_the_trial_with_a_reason_and_leaves_the_base_alone(name, params, reason):
    base = tiny_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    space = variant(name).search_space()
    values = {k: p.default for k, p in space.items() if not p.condition} | params
    with pytest.raises(TrialFailed, match=reason):
        variant(name).attach(base, values, context_for(base))
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m).__module__.startswith("peft") for m in base.modules())


def test_pissa_exports_a_plain_lora_adapter_for_the_original_weights(tmp_path):
    lora_init = variant("lora-init")
    base = tiny_model()
    original = base.bert.encoder.layer[0].attention.self.query.weight.clone()
    model = lora_init.attach(base, {"r": 4, "alpha_ratio": 2.0, "init": "pissa"}, context_for(base))
    # PiSSA moves the principal part of W into the adapter: the base weight itself changes while attached.
    assert not torch.equal(model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight, original)
    lora_init.export(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["init_lora_weights"] is True
    assert config["r"] == 8 and config["lora_alpha"] / config["r"] == 2.0  # rank 2r, same scaling
    restored = lora_init.detach(model)
    assert torch.equal(restored.bert.encoder.layer[0].attention.self.query.weight, original)


@pytest.mark.parametrize("name,params,per_module", [("lora-xs", {"r": 4, "basis": "svd"}, 16), ("nola", {"r": 4, "num_bases": 8}, 16)])
def test_frozen_basis_variants_train_only_their_coefficients_and_export_plain_lora(tmp_path, name, params, per_module):
    from safetensors.torch import load_file

    frozen = variant(name)
    base = tiny_model()
    context = context_for(base)
    model = frozen.attach(base, {"learning_rate": 1e-3, "target_modules": "q,v", **params}, context)
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    assert adapter == per_module * len(context.target_modules)

    frozen.export(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == params["r"] and frozen.export_format == "lora"
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) or ".classifier." in k for k in keys)
    # Exporting leaves the trainable modules in place: training could go on, and the adapter still detaches.
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n) == adapter
    frozen.detach(model)
    assert not any(type(m).__module__.startswith("peft") for m in base.modules())


def test_a_search_across_several_variants_runs_and_exports_a_loadable_best(tmp_path, tiny_bert, sentiment_csv):
    variants = ["lora", "dora", "adalora", "vera", "lora-xs", "nola", "fourierft"]
    spec = write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        # n_frequency 2000 cannot fit the tiny 32x32 layers: that trial fails with its reason, the others go on.
        search={
            "variants": variants, "n_trials": len(variants), "seed": 0,
            "space": {"learning_rate": {"low": 5e-3, "high": 2e-2}, "fourierft.n_frequency": 2000},
        },
        training={"max_steps": 6, "batch_size": 8, "eval_every": 6, "eval_batch_size": 40},
    )
    assert main(["search", str(spec)]) == 0
    run = tmp_path / "run"
    with open(run / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    states = {row["param_variant"]: row["state"] for row in rows}
    assert set(states) == set(variants)  # each variant's default configuration ran first, as a baseline
    assert states.pop("fourierft") == "FAIL" and set(states.values()) == {"COMPLETE"}
    assert "n_frequency=2000 exceeds" in next(r["failure_reason"] for r in rows if r["param_variant"] == "fourierft")

    best = run / "best"
    info = json.loads((best / "autopeft.json").read_text())
    assert info["variant"] in variants
    # A user's fresh process: plain transformers + PEFT predict exactly what the search recorded for the test split.
    predictions, recorded = plain_peft_test_predictions(best, tiny_bert, spec)
    assert predictions == recorded

BUILTIN = sorted(name for name, found in load_registry().variants.items() if found.source == "built-in" and found.plugin != "peft_bridge")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_variant_runs_in_a_search_and_exports_what_plain_peft_predicts(tmp_path, tiny_bert, sentiment_csv, name):
    spec = write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        search={"variants": [name], "n_trials": 1, "seed": 0, "space": {"learning_rate": 1e-2}},
        training={"max_steps": 4, "batch_size": 8, "eval_every": 4, "eval_batch_size": 40},
    )
    assert main(["search", str(spec)]) == 0
    best = tmp_path / "run" / "best"
    assert json.loads((best / "autopeft.json").read_text())["variant"] == name
    predictions, recorded = plain_peft_test_predictions(best, tiny_bert, spec)
    assert predictions == recorded
