"""Plugin discovery: built-ins through the entry-point group, spec-listed files, and broken plugins isolated."""

from __future__ import annotations

import json

from autopeft.cli import main
from autopeft.registry import load_registry


def test_builtins_are_found_through_the_entry_point_group():
    registry = load_registry()
    assert registry.variants["lora"].source == "built-in"
    assert {"rotten-tomatoes", "bbc-news"} <= set(registry.corpora)
    assert "sentence-transformers/all-MiniLM-L6-v2" in {f.item.model_id for f in registry.model_sources}


def test_a_broken_plugin_is_reported_and_the_others_keep_working(tmp_path):
    (tmp_path / "bad_import.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "bad_space.py").write_text(
        "from autopeft import Variant, IntParam, hookimpl\n"
        "class Bad(Variant):\n"
        "    name = 'bad'\n"
        "    def search_space(self):\n"
        "        return {'r': IntParam(10, 1, default=4)}\n"
        "@hookimpl\n"
        "def autopeft_variants():\n"
        "    return [Bad()]\n"
    )
    registry = load_registry((str(tmp_path / "bad_import.py"), str(tmp_path / "bad_space.py")))
    reasons = {b.plugin: b.reason for b in registry.broken}
    assert "ModuleNotFoundError" in reasons["bad_import"]
    assert "low 10 is above high 1" in reasons["bad_space"]
    assert "bad" not in registry.variants and "lora" in registry.variants


def test_plugins_command_lists_variants_and_their_space_as_json(capsys):
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    lora = next(v for v in listing["variants"] if v["name"] == "lora")
    assert lora["source"] == "built-in"
    assert {"learning_rate", "target_modules", "r", "alpha_ratio", "dropout"} == set(lora["space"])
    assert lora["space"]["r"]["default"] == 8
    assert "lora-rank-placement" in listing["presets"]


def test_a_third_party_package_is_listed_and_searchable(tmp_path, tiny_bert, sentiment_csv, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from conftest import write_spec

    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    lora_fa = next(v for v in listing["variants"] if v["name"] == "lora-fa")
    assert lora_fa["source"].startswith("autopeft-lora-fa")

    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, search={"variants": ["lora-fa"], "n_trials": 1, "space": {}})
    assert main(["search", str(spec)]) == 0
    best = tmp_path / "run" / "best"
    assert json.loads((best / "autopeft.json").read_text())["variant"] == "lora-fa"
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), best)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_every_preset_builds_a_plan_and_the_spec_overrides_it():
    from autopeft.plan import make_plan, preset_names
    from autopeft.spec import parse_spec

    assert {"compare-variants", "lora-rank-placement", "rank-allocators", "small-adapters"} <= set(preset_names())
    for preset in preset_names():
        spec = parse_spec({"model": {"id": "sentence-transformers/all-MiniLM-L6-v2"}, "data": {"source": "rotten-tomatoes"}, "search": {"preset": preset}})
        plan = make_plan(spec)
        assert plan.spaces and all("learning_rate" in space for space in plan.spaces.values())

    spec = parse_spec({
        "model": {"id": "sentence-transformers/all-MiniLM-L6-v2"}, "data": {"source": "rotten-tomatoes"},
        "search": {"preset": "lora-rank-placement", "space": {"lora.r": [4]}},
    })
    space = make_plan(spec).spaces["lora"]
    assert space["r"].choices == (4,)  # the spec wins
    assert space["learning_rate"].low == 1e-4  # the preset still applies elsewhere
