"""The methods of the papers that PEFT does not have, one module each, offered through one entry point.

Each module in :data:`METHOD_MODULES` defines its variant classes and a ``VARIANTS`` list of them; the module
docstring names the paper, what the implementation follows and what it simplifies. Modules import torch and
PEFT only inside methods, so listing them stays fast.
"""

from __future__ import annotations

import importlib

from autopeft import Variant, hookimpl

METHOD_MODULES: tuple[str, ...] = (
    "svfit",
    "loldu",
    "lora_sb",
    "comp_lora",
    "block_lora",
    "s2_lora",
    "codyra",
    "allora",
    "altlora",
    "lora_ggpo",
    "loca",
    "sltrain",
    "qwha",
    "lq_lora",
)
"""Modules under ``autopeft_plugins`` holding one method (or a small family) each."""


@hookimpl
def autopeft_variants() -> list[Variant]:
    variants: list[Variant] = []
    for module_name in METHOD_MODULES:
        module = importlib.import_module(f"autopeft_plugins.{module_name}")
        variants += [variant_class() for variant_class in module.VARIANTS]
    return variants
