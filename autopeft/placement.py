"""Where adapters go: the linear modules of a model's transformer blocks, each with a role and a layer.

Roles give one vocabulary across architectures: ``q``, ``k``, ``v``, ``o`` (attention) and ``up``, ``down``,
``gate`` (MLP). ``target_modules: "q,v"`` means the query and value projections of every block whether the
model calls them ``query``/``value`` (BERT) or ``q_proj``/``v_proj`` (Llama).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROLES = ("q", "k", "v", "o", "up", "down", "gate")

# Checked in order: the first pattern that matches the end of a module's name gives its role.
ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (role, re.compile(pattern))
    for role, pattern in (
        ("q", r"(^|\.)(query|q_proj|q_lin|q)$"),
        ("k", r"(^|\.)(key|k_proj|k_lin|k)$"),
        ("v", r"(^|\.)(value|v_proj|v_lin|v)$"),
        ("o", r"(attention\.output\.dense|o_proj|out_proj|out_lin|self_attn\.dense|attn\.c_proj|(^|\.)o)$"),
        ("gate", r"(^|\.)(gate_proj|w1)$"),
        ("up", r"(intermediate\.dense|up_proj|fc1|c_fc|lin1|w3)$"),
        ("down", r"(output\.dense|down_proj|fc2|mlp\.c_proj|lin2|w2)$"),
    )
)
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class AdapterSite:
    """A linear module an adapter can attach to."""

    name: str
    role: str
    """One of :data:`ROLES`, or ``"other"`` for a linear layer of a block that matches no role."""
    layer: int
    in_features: int
    out_features: int


def adapter_sites(model: torch.nn.Module) -> list[AdapterSite]:
    """Every linear module inside the model's numbered transformer blocks (heads and poolers excluded)."""
    import torch

    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        layer = _LAYER_INDEX.search(f".{name}.")
        if layer is None:
            continue
        role = next((r for r, pattern in ROLE_PATTERNS if pattern.search(name)), "other")
        sites.append(AdapterSite(name, role, int(layer.group(1)), module.in_features, module.out_features))
    return sites


def parse_roles(value: str) -> list[str]:
    """``"q,v"`` -> ``["q", "v"]``; ``"all"`` stays ``["all"]``. Raises ``ValueError`` on an unknown role."""
    roles = [part.strip() for part in str(value).split(",") if part.strip()]
    unknown = [r for r in roles if r not in ROLES and r != "all"]
    if unknown or not roles:
        raise ValueError(f"unknown module role(s) {unknown or value!r}; roles are {', '.join(ROLES)} or 'all'")
    return roles


def select_sites(sites: list[AdapterSite], target_modules: str) -> list[AdapterSite]:
    """The sites a ``target_modules`` value selects. Raises ``ValueError`` when a role matches nothing."""
    roles = parse_roles(target_modules)
    if "all" in roles:
        return list(sites)
    present = sorted({s.role for s in sites})
    missing = [r for r in roles if r not in present]
    if missing:
        raise ValueError(f"this model has no module with role(s) {', '.join(missing)}; it has {', '.join(present)}")
    return [s for s in sites if s.role in roles]
