"""Outer-loop allocation: a rank (and adapter bits) per module type, per band of layers, or per module.

The groups come from the model's adapter sites, so the number of searched dimensions is what the spec's
granularity says: ``role`` gives one rank per module type (6 for BERT), ``role-band`` one per type and band of
consecutive layers, ``module`` one per module. Sampled parameters are named ``rank.<group>`` and
``bits.<group>``; a group with rank 0 gets no adapter and no bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autopeft.errors import SpecError
from autopeft.placement import ROLES, AdapterSite
from autopeft.spec import AllocationSpec

if TYPE_CHECKING:
    import optuna


def allocation_groups(allocation: AllocationSpec, sites: list[AdapterSite]) -> dict[str, list[AdapterSite]]:
    """Group key -> the sites sharing one searched rank, in model order."""
    roles = allocation.roles or [r for r in ROLES if any(s.role == r for s in sites)]
    n_layers = max((s.layer for s in sites), default=0) + 1
    groups: dict[str, list[AdapterSite]] = {}
    for site in sites:
        if site.role not in roles:
            continue
        if allocation.granularity == "role":
            key = site.role
        elif allocation.granularity == "role-band":
            key = f"{site.role}.b{site.layer * allocation.bands // n_layers}"
        else:
            key = f"{site.role}.l{site.layer}"
        groups.setdefault(key, []).append(site)
    return groups


def check_allocation(allocation: AllocationSpec, sites: list[AdapterSite], file: str) -> list[SpecError]:
    """Problems with ``search.allocation`` that need the model: roles it lacks, more bands than layers."""
    present = sorted({s.role for s in sites if s.role != "other"})
    errors = []
    missing = [r for r in allocation.roles or [] if r not in present]
    if missing:
        errors.append(SpecError(file, "search.allocation.roles", missing, f"the model has no such modules; its roles: {', '.join(present)}"))
    n_layers = max((s.layer for s in sites), default=0) + 1
    if allocation.granularity == "role-band" and allocation.bands > n_layers:
        errors.append(SpecError(file, "search.allocation.bands", allocation.bands, f"the model has only {n_layers} layers"))
    return errors


def sample_allocation(trial: optuna.Trial, allocation: AllocationSpec, sites: list[AdapterSite]) -> tuple[dict[str, int], dict[str, int]]:
    """Sample ``({module: rank}, {module: bits})`` for every candidate module (rank 0: no adapter)."""
    ranks: dict[str, int] = {}
    bits: dict[str, int] = {}
    for key, members in allocation_groups(allocation, sites).items():
        rank = trial.suggest_categorical(f"rank.{key}", allocation.ranks)
        group_bits = trial.suggest_categorical(f"bits.{key}", allocation.bits) if allocation.bits and rank > 0 else None
        for site in members:
            ranks[site.name] = rank
            if group_bits is not None:
                bits[site.name] = group_bits
    return ranks, bits
