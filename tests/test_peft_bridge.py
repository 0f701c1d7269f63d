"""Every PEFT tuner method installed is a ``peft:<method>`` variant, searchable, or listed unavailable with why.

The conformance test runs on every bridged method and both tiny models; the methods it does not run are exactly
those the registry declares unavailable, and that set is compared with an explicit expected list, so a method
that starts crashing cannot hide as a skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Literal, Optional

import optuna
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from autopeft import AttachContext
from autopeft.cli import main
from autopeft.errors import TrialFailed
from autopeft.placement import adapter_sites, select_sites
from autopeft.plan import make_plan
from autopeft.registry import load_registry
from autopeft.space import CategoricalParam, FloatParam, IntParam, decode, sample
from autopeft.spec import load_spec
from autopeft.testing import PEFT_TASK_TYPES, check_variant, tiny_batch, tiny_model
from autopeft_plugins import peft_bridge
from conftest import write_spec

REGISTRY = load_registry()
BRIDGED = sorted(name for name, found in REGISTRY.variants.items() if found.plugin == "peft_bridge")
TASKS = ("sequence-classification", "causal-lm")

# Methods not run, with a word of the reason each must give (PEFT 0.21). A method missing here that the registry
# declares unavailable, or one listed here that became available, fails test_the_skipped_methods_are_exactly_these.
EXPECTED_UNAVAILABLE = {
    "peft:adalora": "use the adalora variant",
    "peft:adamss": "scikit-learn",
    "peft:adaption_prompt": "adaption prompt",
    "peft:cartridge": "prompt learning",
    "peft:cpt": "prompt learning",
    "peft:ln_tuning": "LayerNorm",
    "peft:multitask_prompt_tuning": "prompt learning",
    "peft:p_tuning": "prompt learning",
    "peft:poly": "task id",
    "peft:prefix_tuning": "prompt learning",
    "peft:prompt_tuning": "prompt learning",
    "peft:shadow": "ShadowCarrier",
    "peft:trainable_tokens": "embedding",
    "peft:xlora": "no target_modules",
}
# PEFT's defaults that do not fit a 32-wide tiny model, and values that do (a real model takes the defaults).
TINY_PARAMS = {
    "peft:miss": {"r": 16},
    "peft:road": {"group_size": 16},
    "peft:shira": {"r": 4},
    "peft:waveft": {"n_frequency": 256},
}


def test_every_installed_peft_method_is_a_variant_or_listed_unavailable():
    """Catches discovery that misses a config class of PEFT's mapping, or a name that is not PeftType lowercased."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    expected = {f"peft:{peft_type.value.lower()}" for peft_type in PEFT_TYPE_TO_CONFIG_MAPPING}
    assert set(BRIDGED) | set(REGISTRY.unavailable) == expected
    assert not set(BRIDGED) & set(REGISTRY.unavailable)
    assert {"peft:hra", "peft:boft", "peft:ia3", "peft:lora"} <= set(BRIDGED)
    # The hand-written short names stay as they are, next to the bridged ones.
    assert {"lora", "dora", "vera", "loha", "lokr", "adalora", "fourierft", "vblora"} <= set(REGISTRY.variants)


def test_the_skipped_methods_are_exactly_these_with_their_reasons():
    """Catches a method that crashes being declared unavailable to hide it (or an unavailable one silently offered)."""
    unavailable = {name: found.item.reason for name, found in REGISTRY.unavailable.items() if found.plugin == "peft_bridge"}
    assert set(unavailable) == set(EXPECTED_UNAVAILABLE)
    for name, word in EXPECTED_UNAVAILABLE.items():
        assert word in unavailable[name], (name, unavailable[name])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", BRIDGED)
def test_every_bridged_method_conforms_on_the_tiny_models(name, task):
    """Attach, train, export, reload with PeftModel.from_pretrained, base restored bitwise (autopeft.testing)."""
    check_variant(REGISTRY.variant(name), TINY_PARAMS.get(name), task=task, steps=2)


def _non_default_inits():
    cases = []
    for name in BRIDGED:
        space = REGISTRY.variant(name).search_space()
        for field in peft_bridge.INIT_FIELDS:
            param = space.get(field)
            if isinstance(param, CategoricalParam):
                cases += [(name, {**TINY_PARAMS.get(name, {}), field: c}) for c in param.choices if c != param.default]
    return cases


@pytest.mark.parametrize("name,params", _non_default_inits())
def test_every_searched_initialisation_conforms(name, params):
    """Catches an init choice offered from a Literal type that breaks training, export or the base model."""
    check_variant(REGISTRY.variant(name), params, steps=2)


def test_the_init_choices_leave_out_the_data_and_base_rewriting_inits():
    """Catches offering PiSSA/EVA/CorDA bare (they rewrite the base or need calibration data)."""
    choices = REGISTRY.variant("peft:lora").search_space()["init_lora_weights"].choices
    assert {True, "gaussian", "orthogonal"} == set(choices)
    assert len(_non_default_inits()) >= 6


def test_the_space_comes_from_the_config_fields_through_one_table():
    """Catches a field rule removed from FIELD_RULES: the field would stay fixed at PEFT's default."""
    hra = REGISTRY.variant("peft:hra").search_space()
    assert hra["r"] == IntParam(2, 32, default=8, log=True, legal=hra["r"].legal, help=hra["r"].help)
    assert hra["apply_GS"].choices == (False,)  # not in the table: fixed at PEFT's default, overridable
    boft = REGISTRY.variant("peft:boft").search_space()
    assert isinstance(boft["boft_block_size"], IntParam) and isinstance(boft["boft_dropout"], FloatParam)
    lora = REGISTRY.variant("peft:lora").search_space()
    assert lora["lora_alpha"].choices == (4, 8, 16) and lora["lora_dropout"].high == 0.2
    assert REGISTRY.variant("peft:fourierft").search_space()["n_frequency"].default == 1000
    assert set(REGISTRY.variant("peft:c3a").search_space()["init_weights"].choices) == {"xavier_uniform", "gaussian", "kaiming_uniform"}
    for name in BRIDGED:
        space = REGISTRY.variant(name).search_space()
        assert list(space)[:2] == ["learning_rate", "target_modules"], name
        assert not {"bias", "modules_to_save", "layers_to_transform"} & set(space), name


def test_a_new_peft_method_becomes_a_variant_without_an_autopeft_change(monkeypatch):
    """Catches a hard-coded method list: a config class added to PEFT's mapping is bridged with its derived space."""
    from peft import LoraConfig, PEFT_TYPE_TO_CONFIG_MAPPING

    @dataclasses.dataclass
    class NewConfig(LoraConfig):
        rank: int = 16
        new_dropout: float = 0.1
        init_weights: Optional[Literal["spectral", "zeros"]] = "zeros"
        mode: str = "fast"

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, "NEWMETHOD", NewConfig)
    declared = {d.name: d for d in peft_bridge.bridged(peft_bridge.describe_installed())}
    space = declared["peft:newmethod"].search_space()
    assert space["rank"].low == 4 and space["rank"].high == 64 and space["rank"].default == 16
    assert space["new_dropout"].default == 0.1
    assert set(space["init_weights"].choices) == {"spectral", "zeros"}
    assert space["mode"].choices == ("fast",)


def test_plugins_load_from_the_cached_description_without_importing_peft(tmp_path):
    """Catches dropping the cache: every `autopeft validate` and `autopeft plugins` would import PEFT and torch.
    The cache file is named by PEFT's version, and a fresh process reads it instead of importing PEFT."""
    from importlib.metadata import version

    env = {**os.environ, "AUTOPEFT_CACHE": str(tmp_path)}
    script = (
        "import sys; from autopeft.registry import load_registry; r = load_registry(); "
        "print('peft' in sys.modules, 'peft:hra' in r.variants, r.unavailable['peft:poly'].item.reason)"
    )
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300) for _ in range(2)]
    assert [run.stdout.split()[:2] for run in runs] == [["True", "True"], ["False", "True"]], [r.stderr[-2000:] for r in runs]
    assert runs[0].stdout == runs[1].stdout.replace("False", "True", 1)  # the same declarations, reasons included
    files = list((tmp_path / "peft-bridge").iterdir())
    assert len(files) == 1 and files[0].name.startswith(f"peft-{version('peft')}-")


def _context(model, task="sequence-classification"):
    targets = [s.name for s in select_sites(adapter_sites(model), "q,v")]
    return AttachContext(task, PEFT_TASK_TYPES[task], targets, 2, 0, lambda n: (tiny_batch(task, seed=i + 1) for i in range(n)))


@pytest.mark.parametrize("name", sorted(TINY_PARAMS))
def test_a_default_the_model_cannot_take_fails_the_trial_with_peft_reason_and_leaves_the_base_alone(name):
    """Catches removing the ValueError -> TrialFailed conversion in BridgedVariant.attach (a crash, not a failed
    trial), and TINY_PARAMS hiding a method whose defaults do fit."""
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    variant = REGISTRY.variant(name)
    params = {k: p.default for k, p in variant.search_space().items()}
    with pytest.raises(TrialFailed, match=name):
        variant.attach(model, params, _context(model))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "name,field,sampled,fitted",
    [
        ("peft:c3a", "block_size", 256, 32), ("peft:c3a", "block_size", 24, 16), ("peft:c3a", "block_size", 8, 8),
        ("peft:boft", "boft_block_size", 5, 4), ("peft:vblora", "vector_length", 256, 32),
        ("peft:gralora", "r", 35, 34), ("peft:gralora", "r", 1, 2), ("peft:gralora", "r", 16, 16),
    ],
)
def test_a_block_size_that_does_not_divide_the_layers_is_rounded_down_to_one_that_does(name, field, sampled, fitted):
    """Catches dropping fit_divisor_fields or an entry of DIVISOR_FIELDS or MULTIPLE_FIELDS: C3A's and VB-LoRA's
    defaults (256) and most sampled BOFT block sizes do not divide MiniLM's 384-wide layers, and GraLoRA's rank must
    be a multiple of its gralora_k (2); every such trial failed. A size that fits is kept as it is; the attached
    model holds the size trained (here 32 = gcd of the tiny model's 32 and 64 wide targets)."""
    model = tiny_model()
    variant = REGISTRY.variant(name)
    params = {k: p.default for k, p in variant.search_space().items()} | {field: sampled}
    config = variant.build_config(model, params, _context(model))
    assert getattr(config, field) == fitted
    peft_model = variant.attach(model, params, _context(model))
    try:
        assert getattr(peft_model.peft_config["default"], field) == fitted
    finally:
        variant.detach(peft_model)


@given(number=st.integers(1, 5000), limit=st.integers(-3, 6000))
def test_largest_divisor_at_most_is_the_largest_divisor_not_above_the_limit(number, limit):
    divisor = peft_bridge.largest_divisor_at_most(number, limit)
    assert number % divisor == 0 and (divisor <= limit or divisor == 1)
    assert not any(number % d == 0 for d in range(divisor + 1, min(number, limit) + 1))


@pytest.mark.parametrize("name,field", [("peft:vera", "projection_prng_key"), ("peft:fourierft", "random_loc_seed"), ("vera", "projection_prng_key"), ("fourierft", "random_loc_seed")])
def test_the_trial_seed_reaches_every_seed_field(name, field):
    """Catches peft_config dropping the seeds: every trial would draw the same random projections or frequencies."""
    model = tiny_model()
    variant = REGISTRY.variant(name)
    context = dataclasses.replace(_context(model), seed=123)
    config = variant.build_config(model, {k: p.default for k, p in variant.search_space().items()}, context)
    assert getattr(config, field) == 123


def test_ia3_feedforward_modules_follow_the_placement():
    """Catches dropping the derived feedforward_modules: PEFT then names MLP layers that are not targets."""
    model = tiny_model()
    variant = REGISTRY.variant("peft:ia3")
    targets = [s.name for s in select_sites(adapter_sites(model), "q,v,o,up,down")]
    context = AttachContext("sequence-classification", "SEQ_CLS", targets, 2, 0, None)
    config = variant.build_config(model, {}, context)
    assert config.feedforward_modules == {t for t in targets if t.endswith("output.dense") and "attention" not in t}
    check_variant(variant, {"target_modules": "q,v,o,up,down"}, steps=2)


def test_a_spec_searches_a_bridged_variant_with_a_colon_in_its_keys(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches a variant name with ':' breaking spec keys (variant.param), Optuna parameter names or the search."""
    spec_path = write_spec(
        tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"variants": ["peft:hra", "lora"], "n_trials": 3, "seed": 0, "space": {"peft:hra.r": [4, 6], "peft:hra.apply_GS": True, "lora.r": [2]}},
    )
    plan = make_plan(load_spec(str(spec_path)))
    assert plan.spaces["peft:hra"]["r"].choices == (4, 6)
    assert plan.spaces["peft:hra"]["apply_GS"].choices == (True,)

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        trial = study.ask()
        variant, values = sample(trial, plan.spaces)
        study.tell(trial, 0.0)
        if variant == "peft:hra":
            assert {"peft:hra.r", "peft:hra.apply_GS"} <= set(trial.params)
            assert decode(trial.params, plan.spaces) == (variant, values) and values["r"] in (4, 6)

    spec_path = write_spec(
        tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"variants": ["peft:hra"], "n_trials": 1, "seed": 0, "space": {"peft:hra.r": [4]}},
    )
    assert main(["search", str(spec_path)]) == 0, capsys.readouterr()
    info = json.loads((tmp_path / "run" / "best" / "autopeft.json").read_text())
    assert info["variant"] == "peft:hra"
    assert json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())["peft_type"] == "HRA"


def test_a_spec_key_naming_an_unknown_field_of_a_bridged_variant_is_refused(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches the spec key's ':' confusing the qualified-name split: the error names the key and the parameters."""
    spec_path = write_spec(
        tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"variants": ["peft:hra"], "space": {"peft:hra.nope": 3}},
    )
    assert main(["validate", str(spec_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "search.space.peft:hra.nope" in err and "peft:hra.r" in err


def test_validate_refuses_an_unavailable_variant_naming_the_reason(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches plan.py treating an unavailable variant as merely unknown (or as available)."""
    spec_path = write_spec(
        tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"variants": ["peft:prefix_tuning"], "space": {}},
    )
    assert main(["validate", str(spec_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "search.variants[0]" in err and "peft:prefix_tuning" in err and "not available" in err and "prompt learning" in err


def test_plugins_lists_the_unavailable_variants_apart_with_their_reasons(capsys):
    """Catches the CLI dropping the unavailable section (text and JSON) or offering such a variant's space."""
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = {v["name"] for v in listing["variants"]}
    unavailable = {v["name"]: v["reason"] for v in listing["unavailable"]}
    assert "peft:hra" in names and "peft:prefix_tuning" not in names
    assert unavailable["peft:prefix_tuning"].startswith("prompt learning")

    assert main(["plugins"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "unavailable variants" in out and "peft:poly" in out.split("unavailable variants", 1)[1]
    assert "peft:<method>" in out and " hra," in out.split("unavailable variants", 1)[0]  # one line for the family

    assert main(["plugins", "peft:hra"]) == 0
    assert "apply_GS" in capsys.readouterr().out
    assert main(["plugins", "peft:poly"]) == 2
    assert "task id" in " ".join(capsys.readouterr().err.split())
