"""One malformed plugin declaration is reported by the plugin's name; every other plugin and command keeps working.

Each case is a plugin file in tmp_path whose declaration is malformed in a way the space checker used to trip over
(TypeError or AttributeError while plugins load, which took `plugins`, `validate` and `search` down with it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autopeft.cli import main
from autopeft.registry import load_registry
from conftest import write_spec

HEADER = "from autopeft import CategoricalParam, Corpus, FloatParam, IntParam, ModelSource, Variant, hookimpl, shared\n"

VARIANT = HEADER + """
class Broken(Variant):
    name = "broken-one"
    summary = "declares a malformed space"

    def search_space(self):
        return {{"learning_rate": shared("learning_rate"), {params}}}

    def attach(self, model, params, context):
        raise NotImplementedError

@hookimpl
def autopeft_variants():
    return [Broken()]
"""

# name of the case -> (plugin source, a fragment of the reason that names what is wrong)
CASES = {
    "non_string_key": (VARIANT.format(params='1: IntParam(2, 8, default=4)'), "parameter name 1 is not a non-empty string"),
    "string_bounds": (VARIANT.format(params='"r": IntParam("2", "8", default=4)'), "low '2' is not an integer"),
    "choices_none": (VARIANT.format(params='"mode": CategoricalParam(None, default=None)'), "choices None is not a tuple"),
    "condition_list": (
        VARIANT.format(params='"r": IntParam(2, 8, default=4), "extra": IntParam(1, 2, default=1, condition=["r"])'),
        "condition ['r'] is not a mapping",
    ),
    "nan_bound": (VARIANT.format(params='"drop": FloatParam(0.0, float("nan"), default=0.0)'), "high nan is not a finite number"),
    "unhashable_corpus_name": (
        HEADER + "@hookimpl\ndef autopeft_corpora():\n"
        "    return [Corpus(name=['x'], summary='', task='causal-lm', columns=('text',), load=lambda: None)]\n",
        "corpus name ['x'] is not a non-empty string",
    ),
    "model_source_without_id": (
        HEADER + "@hookimpl\ndef autopeft_model_sources():\n    return [ModelSource(model_id=None, summary='', locate=lambda: None)]\n",
        "model_id None is not a non-empty string",
    ),
    "exits_on_import": (HEADER + "import sys\nsys.exit(3)\n", "SystemExit"),
    "property_raises": (
        VARIANT.format(params='"r": IntParam(2, 8, default=4)').replace(
            '    summary = "declares a malformed space"\n',
            '    summary = "declares a malformed space"\n    export_format = property(lambda self: 1 / 0)\n',
        ),
        "raised ZeroDivisionError",
    ),
}


def plugin_file(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.py"
    path.write_text(CASES[case][0])
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_declaration_is_a_broken_plugin_and_the_others_load(tmp_path, case):
    """Catches removing the type checks in Param.problems / check_space / the model-source and corpus checks,
    the catch-all in registry._checked, or SystemExit in the import guard: load_registry then raises."""
    path = plugin_file(tmp_path, case)
    registry = load_registry((str(path),))
    reasons = {b.plugin: b.reason for b in registry.broken}
    assert case in reasons, reasons
    assert CASES[case][1] in reasons[case]
    assert {"lora", "dora", "adalora"} <= set(registry.variants)
    assert "broken-one" not in registry.variants
    assert "rotten-tomatoes" in registry.corpora


@pytest.mark.parametrize("case", sorted(CASES))
def test_plugins_command_lists_everything_and_names_the_broken_plugin(tmp_path, case, capsys):
    """Catches the same removals through the `plugins` command (it exited with a traceback)."""
    path = plugin_file(tmp_path, case)
    assert main(["plugins", "--plugin", str(path)]) == 0
    output = " ".join(capsys.readouterr().out.split())
    assert f"broken plugin {case}" in output and CASES[case][1] in output
    assert main(["plugins", "--json", "--plugin", str(path)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert case in {b["plugin"] for b in listing["broken"]}
    assert "lora" in {v["name"] for v in listing["variants"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_names_a_broken_plugin_the_spec_lists(tmp_path, tiny_bert, sentiment_csv, case, capsys):
    """Catches removing the check in make_plan that reports a spec-listed plugin that is broken (validate then
    said OK for a spec whose plugin cannot load), and the registry guards (validate died with a traceback)."""
    path = plugin_file(tmp_path, case)
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, plugins=[str(path)])
    assert main(["validate", str(spec)]) == 2
    output = " ".join(capsys.readouterr().err.split())
    assert output.startswith("error:") and "plugins[0]" in output and "the plugin is broken" in output
    assert CASES[case][1] in output and "Traceback" not in output


def test_validate_names_the_broken_plugin_of_an_unknown_variant(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches dropping the broken-plugin hint from the unknown-variant message."""
    path = plugin_file(tmp_path, "string_bounds")
    spec = write_spec(
        tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)},
        search={"variants": ["broken-one"], "space": {}}, plugins=[str(path)],
    )
    assert main(["validate", str(spec)]) == 2
    output = " ".join(capsys.readouterr().err.split())
    assert "search.variants[0]" in output and "unknown variant" in output
    assert "plugin string_bounds" in output and "low '2' is not an integer" in output


def test_a_spec_without_the_broken_plugin_still_validates(tmp_path, tiny_bert, sentiment_csv, capsys):
    """The broken plugin loaded earlier in this process does not leak into specs that do not list it."""
    load_registry((str(plugin_file(tmp_path, "choices_none")),))
    spec = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)})
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
