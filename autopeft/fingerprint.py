"""Fingerprints that keep one study comparable: the resolved search space and the prepared data.

The spec file alone does not decide what a study searches: a preset file, a plugin's declared space and the data
files behind ``data.source`` can change between two runs of the same spec. Both are recorded in the study's
user attributes when it starts, and a resumed search whose space or data differs is refused with the names of
what changed, exactly as for a changed spec key.

- ``space``: every searched parameter (qualified name as sampled) with its type, range or choices and default.
- ``data``: per split, the number of prepared examples and a SHA-256 of their token ids and labels, plus the
  label names. Anything that changes what trials train or are scored on changes it.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from autopeft.errors import RunDirError
from autopeft.space import qualified_name

if TYPE_CHECKING:
    import optuna

    from autopeft.data import PreparedData
    from autopeft.plan import Plan
    from autopeft.rundir import RunDir
    from autopeft.spec import Spec

SPEC_KEY = "fingerprint_spec"
SPACE_KEY = "fingerprint_space"
DATA_KEY = "fingerprint_data"


# Keys that name places on one machine (files, folders, servers): workers on other machines name them otherwise.
MACHINE_KEYS = (("data", "source"), ("plugins",), ("output",), ("storage",), ("ray",), ("search", "preset"))


def spec_fingerprint(spec: Spec) -> dict[str, Any]:
    """The spec's settings that decide what a trial measures, without paths that differ between machines (the
    data and the resolved space have fingerprints of their own)."""
    from autopeft.models import looks_like_local_path

    out = spec.model_dump(mode="json")
    for path in MACHINE_KEYS:
        parent = out
        for key in path[:-1]:
            parent = parent.get(key, {})
        parent.pop(path[-1], None)
    if looks_like_local_path(spec.model.id):
        out["model"].pop("id", None)
    return out


def check_spec(study: optuna.Study, spec: Spec) -> None:
    """Record the spec's fingerprint in a new study, or refuse a spec that differs (keys that may change between
    runs, such as ``n_trials``, excepted): a study shared by workers must be one search."""
    from autopeft.rundir import _differences

    current = spec_fingerprint(spec)
    recorded = study.user_attrs.get(SPEC_KEY)
    if recorded is None:
        study.set_user_attr(SPEC_KEY, current)
        return
    changed = _differences(recorded, current)
    if changed:
        raise RunDirError(
            f"the study was started with a different spec (changed: {', '.join(changed)[:1500]}). "
            "Joining it would mix incomparable trials: use the same spec, or another study."
        )


def space_fingerprint(plan: Plan) -> dict[str, str]:
    """``{parameter: description}`` of the resolved space of every searched variant."""
    out = {}
    for variant, space in plan.spaces.items():
        for name, param in space.items():
            condition = f" when {json.dumps(param.condition, sort_keys=True, default=str)}" if param.condition else ""
            out[f"{variant}:{qualified_name(variant, name)}"] = f"{param.describe()} default {param.default!r}{condition}"
    return dict(sorted(out.items()))


def data_fingerprint(data: PreparedData) -> dict[str, Any]:
    """Sizes and content hashes of the prepared splits, and the label names."""
    out: dict[str, Any] = {"labels": data.label_names}
    for split in ("train", "validation", "test"):
        examples = getattr(data, split)
        digest = hashlib.sha256()
        for example in examples:
            digest.update(json.dumps([example["input_ids"], example["labels"]], separators=(",", ":")).encode())
        out[split] = {"examples": len(examples), "sha256": digest.hexdigest()}
    return out


def check_space(study: optuna.Study, plan: Plan) -> None:
    """Record the resolved space in a new study, or refuse one whose recorded space differs."""
    current = space_fingerprint(plan)
    recorded = study.user_attrs.get(SPACE_KEY)
    if recorded is None:
        study.set_user_attr(SPACE_KEY, current)
        return
    changed = [
        f"{key.split(':', 1)[1]} ({recorded.get(key, 'absent')} -> {current.get(key, 'absent')})"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]
    if changed:
        raise RunDirError(
            f"the search space of {plan.spec.run_dir} changed since its trials ran (a preset file or a plugin's declared "
            f"space): {'; '.join(changed)[:1500]}. Resuming would mix incomparable trials: set output.dir to a new folder."
        )


def check_data(study: optuna.Study, run_dir: RunDir, current: dict[str, Any]) -> None:
    """Record the prepared data's fingerprint (:func:`data_fingerprint`, computed wherever the data was prepared)
    in a new study, or refuse one whose recorded data differs."""
    recorded = study.user_attrs.get(DATA_KEY)
    if recorded is None:
        study.set_user_attr(DATA_KEY, current)
        return
    changed = []
    if recorded.get("labels") != current["labels"]:
        changed.append(f"label names ({recorded.get('labels')} -> {current['labels']})")
    for split in ("train", "validation", "test"):
        before, now = recorded.get(split) or {}, current[split]
        if before.get("examples") != now["examples"]:
            changed.append(f"{split} split ({before.get('examples')} -> {now['examples']} examples)")
        elif before.get("sha256") != now["sha256"]:
            changed.append(f"{split} split (same size, different texts or labels)")
    if changed:
        raise RunDirError(
            f"the data of {run_dir.path} changed since its trials ran: {'; '.join(changed)}. "
            "Resuming would compare trials trained or scored on different data: set output.dir to a new folder."
        )
