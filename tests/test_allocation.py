"""Outer-loop allocation: per-module ranks and bits, a quantized base, cost measures, and their export."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from autopeft.allocation import allocation_groups
from autopeft.cli import main
from autopeft.placement import adapter_sites
from autopeft.spec import AllocationSpec
from autopeft.testing import tiny_model
from conftest import write_spec


def allocation_spec(tmp_path, tiny_bert, sentiment_csv, **search):
    return write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        search={"variants": ["lora"], "n_trials": 3, "space": {"learning_rate": 1e-2}, **search},
    )


def test_groups_follow_the_granularity():
    sites = adapter_sites(tiny_model())  # BERT: 2 layers x (q, k, v, o, up, down)
    assert list(allocation_groups(AllocationSpec(granularity="role"), sites)) == ["q", "k", "v", "o", "up", "down"]
    assert len(allocation_groups(AllocationSpec(granularity="role-band", bands=2), sites)) == 12
    module = allocation_groups(AllocationSpec(granularity="module", roles=["q", "v"]), sites)
    assert list(module) == ["q.l0", "v.l0", "q.l1", "v.l1"] and all(len(m) == 1 for m in module.values())


def test_per_module_ranks_are_searched_and_exported_as_a_plain_peft_lora(tmp_path, tiny_bert, sentiment_csv):
    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, allocation={"granularity": "module", "ranks": [0, 2, 4], "roles": ["q", "k", "v", "o"]})
    assert main(["search", str(spec)]) == 0
    run = tmp_path / "run"
    with open(run / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {"param_rank.q.l0", "param_rank.o.l1"} <= set(rows[0]) and "param_lora.r" not in rows[0]

    best = run / "best"
    info = json.loads((best / "autopeft.json").read_text())
    trial = next(r for r in rows if int(r["number"]) == info["trial"])
    intended = {m["name"]: int(trial[f"param_rank.{m['role']}.l{m['layer']}"]) for m in info["modules"] if m["role"] in "qkvo"}
    assert {m["name"]: m["rank"] for m in info["modules"] if m["name"] in intended} == intended

    config = json.loads((best / "adapter_config.json").read_text())
    module_names = [name for name, _ in tiny_model().named_modules()]
    for key in list(config["rank_pattern"]) + list(config["alpha_pattern"]):
        matches = [n for n in module_names if re.match(rf"(.*\.)?({key})$", n)]
        assert len(matches) == 1, f"pattern key {key!r} matches {matches}"
    assert sorted(config["target_modules"]) == sorted(n for n, r in intended.items() if r > 0)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, best)
    ranks = {name.removeprefix("base_model.model."): module.r["default"] for name, module in model.named_modules() if hasattr(module, "r") and isinstance(module.r, dict)}
    assert ranks == {n: r for n, r in intended.items() if r > 0}


def test_adapter_bits_put_exported_weights_on_the_grid_and_shrink_the_adapter(tmp_path, tiny_bert, sentiment_csv):
    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=1, baseline=False, allocation={"granularity": "role", "ranks": [4], "bits": [4], "roles": ["q", "v"]})
    assert main(["search", str(spec)]) == 0
    best = tmp_path / "run" / "best"
    info = json.loads((best / "autopeft.json").read_text())
    assert {m["bits"] for m in info["modules"] if m["rank"]} == {4}
    assert json.loads((best / "adapter_bits.json").read_text()) == {m["name"]: 4 for m in info["modules"] if m["rank"]}
    for key, weight in load_file(best / "adapter_model.safetensors").items():
        if "lora_" in key:
            scale = weight.abs().amax(dim=-1, keepdim=True) / 7
            assert torch.allclose((weight / scale).round() * scale, weight, atol=1e-6), key
            assert (weight / scale).round().abs().max() <= 7
    costs, weights = info["costs"], load_file(best / "adapter_model.safetensors")
    lora_params = sum(w.numel() for k, w in weights.items() if "lora_" in k)
    lora_rows = sum(w.shape[0] for k, w in weights.items() if "lora_" in k)  # one 16-bit scale per row
    head_params = sum(w.numel() for k, w in weights.items() if "lora_" not in k)
    assert costs["adapter_bytes"] == (lora_params * 4 + lora_rows * 16) // 8 + head_params * 4


def test_adapter_bytes_count_the_per_row_scales_of_quantized_factors():
    """A 2-bit rank-4 LoRA on a 32 × 32 module: A (4 × 32) and B (32 × 4) hold 256 entries at 2 bits (64 bytes)
    and 36 rows, each with a 16-bit scale (72 bytes): B's scales outweigh its payload. Catches: counting the
    payload only (64 bytes)."""
    from autopeft.costs import _bytes

    tensors = {"base_model.model.q.lora_A.weight": torch.zeros(4, 32), "base_model.model.q.lora_B.weight": torch.zeros(32, 4)}
    assert _bytes(tensors, {"q": 2}) == 64 + 72
    assert _bytes(tensors, {}) == 256 * 4


def test_a_quantized_base_is_searched_and_recorded(tmp_path, tiny_bert, sentiment_csv):
    # One fixed adapter, so the bit operations differ only by the base's bits; seed 0 samples both bit widths.
    fixed = {"learning_rate": 1e-2, "lora.r": 4, "target_modules": "q,v", "lora.alpha_ratio": 2.0, "lora.dropout": 0.0}
    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, n_trials=2, baseline=False, base_bits=[4, 16], sampler="random", seed=0, space=fixed)
    assert main(["search", str(spec)]) == 0
    run = tmp_path / "run"
    with open(run / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["param_base_bits"] for r in rows} <= {"4", "16"} and all(r["state"] == "COMPLETE" for r in rows)
    bops = {int(r["param_base_bits"]): float(r["bops_per_token"]) for r in rows}
    assert set(bops) == {4, 16} and bops[4] < bops[16]
    info = json.loads((run / "best" / "autopeft.json").read_text())
    bits = info["base_bits"]
    assert info["base_model"]["quantization"] == ({"bits": 4, "method": "hqq"} if bits == 4 else None)
    card = (run / "best" / "README.md").read_text()
    assert ("quantized to 4 bits (hqq)" in card) == (bits == 4)


def test_quantized_base_is_a_copy_and_trains(classification_spec):
    from autopeft.plan import make_plan
    from autopeft.spec import load_spec
    from autopeft.trial import TrialConfig, Workbench

    workbench = Workbench(make_plan(load_spec(classification_spec)))
    before = {k: v.clone() for k, v in workbench.base_model.state_dict().items()}
    params = {"learning_rate": 1e-2, "target_modules": "q,v", "r": 4, "alpha_ratio": 2.0, "dropout": 0.0}
    quantized = workbench.run_trial(TrialConfig("lora", params, base_bits=4), seed=0)
    full = workbench.run_trial(TrialConfig("lora", params, base_bits=16), seed=0)
    assert quantized.costs["bops_per_token"] < full.costs["bops_per_token"]
    assert quantized.metrics != full.metrics
    assert all(torch.equal(before[k], v) for k, v in workbench.base_model.state_dict().items())


def test_allocation_needs_a_variant_that_takes_module_ranks(tmp_path, tiny_bert, sentiment_csv, capsys):
    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, variants=["lora-fa"], space={}, allocation={"granularity": "role"})
    assert main(["validate", str(spec)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "search.variants[0]" in err and "cannot take per-module ranks" in err and "lora" in err


def test_allocation_roles_the_model_lacks_are_a_spec_error(tmp_path, tiny_bert, sentiment_csv, capsys):
    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, allocation={"granularity": "role", "roles": ["q", "gate"]})
    assert main(["search", str(spec)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "search.allocation.roles" in err and "gate" in err


@pytest.mark.parametrize("ranks", [[0], [-1, 4]])
def test_rank_choices_are_validated(tmp_path, tiny_bert, sentiment_csv, capsys, ranks):
    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, allocation={"ranks": ranks})
    assert main(["validate", str(spec)]) == 2
    assert "search.allocation.ranks" in capsys.readouterr().err


def test_every_variant_trains_on_a_quantized_base_or_is_refused_at_validate(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Every variant that declares ``supports_quantized_base`` trains on a 4-bit HQQ base; asking a 4-bit base of
    one that does not (lora-xs, nola: they read the base ``weight``, which HQQ layers lack) is refused by
    ``validate`` naming the key, the variant and the reason, and the same spec with a 16-bit base is accepted.
    Catches: the plan check removed (lora-xs passes validate, then every trial crashes), and a variant declared
    capable that fails on an HQQ base."""
    from autopeft.plan import make_plan
    from autopeft.registry import load_registry
    from autopeft.space import decode, defaults
    from autopeft.spec import load_spec
    from autopeft.trial import TrialConfig, Workbench

    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, variants=["lora-xs", "nola"], space={}, base_bits=[4, 16])
    assert main(["validate", str(spec)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "search.variants[0]" in err and "search.variants[1]" in err and "cannot train on a quantized base" in err
    spec = allocation_spec(tmp_path, tiny_bert, sentiment_csv, variants=["lora-xs", "nola"], space={}, base_bits=[16])
    assert main(["validate", str(spec)]) == 0

    registry = load_registry()
    capable = sorted(n for n, f in registry.variants.items() if f.item.supports_quantized_base)
    assert {"lora", "sora", "increlora", "lora-squeeze", "diffora", "bayesian-lora"} <= set(capable)
    assert not {"lora-xs", "nola"} & set(capable)
    spec = write_spec(
        tmp_path, model={"id": str(tiny_bert), "task": "sequence-classification"}, data={"source": str(sentiment_csv)},
        training={"max_steps": 2, "batch_size": 8, "eval_every": 2, "eval_batch_size": 40},
    )
    workbench = Workbench(make_plan(load_spec(spec)))
    for name in capable:
        space = registry.variant(name).search_space()
        _, values = decode(defaults(name, space), {name: space})
        outcome = workbench.run_trial(TrialConfig(name, values, base_bits=4), seed=0)
        assert outcome.costs["bops_per_token"] > 0, name
