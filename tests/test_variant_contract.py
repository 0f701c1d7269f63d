"""A variant whose trainable state lives outside PEFT's layers reports its own sizes, and the search uses them.

This module is also the plugin file the specs below list under ``plugins:``, exactly as a user's file would be:
it defines the variants and the ``autopeft_variants`` hook.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import optuna
import pytest

from autopeft import IntParam, Variant, hookimpl, shared
from autopeft.errors import TrialFailed
from autopeft.plan import make_plan
from autopeft.rundir import RunDir
from autopeft.spec import load_spec
from autopeft.trial import StepListener, TrialConfig, Workbench
from conftest import write_spec

THIS_PLUGIN = str(Path(__file__).resolve())
README = Path(__file__).parent.parent / "README.md"


def _add_update(tied, index: int, module, args, output):
    """Forward hook of adapted module ``index``: add ``B_index · A · x`` to its output."""
    return output + (args[0] @ tied.A.T) @ tied.B[index].T


class TiedLoRA(Variant):
    """LoRA whose down-projection A is one matrix tied across every adapted module; each module keeps its own B.

    The adapter is a module of its own registered on the model (``model.tied_lora``) and applied by forward hooks:
    the model is not a PEFT model, so autopeft cannot measure it and :meth:`sizes` reports it. The export is a
    plain PEFT LoRA (A copied into every module) with the classifier head under ``modules_to_save``.
    """

    name = "tied-lora"
    summary = "LoRA with one down-projection shared by every adapted module"
    export_format = "lora"

    def search_space(self):
        return {"learning_rate": shared("learning_rate"), "target_modules": shared("target_modules"), "r": IntParam(1, 16, default=2)}

    def attach(self, model, params, context):
        import torch

        if context.task != "sequence-classification":
            raise TrialFailed("tied-lora is written for sequence classification")
        linears = [model.get_submodule(name) for name in context.target_modules]
        widths = {linear.in_features for linear in linears}
        if len(widths) != 1:
            raise TrialFailed(f"tied-lora ties A across modules of one input width; these have {sorted(widths)}")
        tied = torch.nn.Module()
        tied.A = torch.nn.Parameter(torch.randn(params["r"], widths.pop()) * 0.1)
        tied.B = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(linear.out_features, params["r"])) for linear in linears])
        tied.names = list(context.target_modules)
        # The head trains in place; detach puts its original values back.
        tied.head_before = {key: value.clone() for key, value in model.classifier.state_dict().items()}
        tied.hooks = [linear.register_forward_hook(partial(_add_update, tied, i)) for i, linear in enumerate(linears)]
        model.classifier.requires_grad_(True)
        model.tied_lora = tied
        return model

    def sizes(self, model):
        tied = model.tied_lora
        head = sum(p.numel() for p in model.classifier.parameters())
        b = sum(p.numel() for p in tied.B)
        # Stored as PEFT stores a LoRA: one copy of A per module, since PEFT has no tied A.
        stored = len(tied.B) * tied.A.numel() + b + head
        return {"trainable_params": tied.A.numel() + b + head, "adapter_bytes": stored * tied.A.element_size()}

    def export(self, model, out_dir):
        from peft import LoraConfig
        from safetensors.torch import save_file

        tied = model.tied_lora
        out_dir.mkdir(parents=True, exist_ok=True)  # autopeft may hand a folder that does not exist yet
        tensors = {}
        for name, b in zip(tied.names, tied.B):
            tensors[f"base_model.model.{name}.lora_A.weight"] = tied.A.detach().clone()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().clone()
        tensors.update({f"base_model.model.classifier.{key}": value.clone() for key, value in model.classifier.state_dict().items()})
        save_file(tensors, str(out_dir / "adapter_model.safetensors"))
        r = tied.A.shape[0]
        LoraConfig(task_type="SEQ_CLS", target_modules=tied.names, r=r, lora_alpha=r, modules_to_save=["classifier"]).save_pretrained(str(out_dir))

    def detach(self, model):
        tied = model.tied_lora
        for hook in tied.hooks:
            hook.remove()
        del model.tied_lora
        model.classifier.load_state_dict(tied.head_before)
        model.classifier.requires_grad_(False)
        return model


class ReportedLoRA(Variant):
    """A PEFT LoRA that reports sizes of a test's choosing (``reported``), to see which numbers are recorded."""

    name = "reported-lora"
    reported: object = None

    def search_space(self):
        return {"learning_rate": shared("learning_rate"), "target_modules": shared("target_modules")}

    def attach(self, model, params, context):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=2))

    def sizes(self, model):
        return self.reported


@hookimpl
def autopeft_variants():
    return [TiedLoRA(), ReportedLoRA()]


# --------------------------------------------------------------------------------------------------------------


def tied_lora_sizes(r: int, modules: int = 4, hidden: int = 32, labels: int = 2) -> tuple[int, int]:
    """Trainable parameters and stored bytes of tied-lora on q and v of the tiny 2-layer BERT, counted by hand."""
    a, b, head = r * hidden, modules * hidden * r, hidden * labels + labels
    return a + b + head, (modules * a + b + head) * 4


def test_a_variant_outside_peft_reports_its_sizes_and_the_search_records_and_constrains_them(tmp_path, tiny_bert, sentiment_csv):
    """The tied adapter is no PEFT model: were its reported sizes ignored (at attach or after training), measuring
    PEFT's state dict would fail the trial, and the constraint would judge no reported number."""
    from safetensors.torch import load_file

    from autopeft.cli import main

    trainable_2, bytes_2 = tied_lora_sizes(2)
    trainable_8, bytes_8 = tied_lora_sizes(8)
    assert trainable_2 <= 1000 < trainable_8 and bytes_2 <= 4000 < bytes_8  # the constraints split the two trials
    spec_path = write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        plugins=[THIS_PLUGIN],
        search={
            "variants": ["tied-lora"], "n_trials": 2, "baseline": False,
            "space": {"learning_rate": 1e-2, "target_modules": "q,v", "tied-lora.r": [2, 8]},
            "constraints": ["trainable_params <= 1000", "adapter_bytes <= 4000"],
        },
    )
    run_dir = RunDir(load_spec(spec_path).run_dir)
    run_dir.path.mkdir(parents=True)
    study = optuna.create_study(study_name="autopeft", storage=run_dir.storage_url, direction="maximize")
    for r in (2, 8):
        study.enqueue_trial({"tied-lora.r": r})

    assert main(["search", str(spec_path)]) == 0
    small, large = study.trials
    assert small.state == optuna.trial.TrialState.COMPLETE
    assert (small.user_attrs["costs"]["trainable_params"], small.user_attrs["costs"]["adapter_bytes"]) == (trainable_2, bytes_2)
    # The numbers are the variant's, and true: best/ holds exactly that many bytes of adapter and head.
    best = run_dir.best
    stored = load_file(str(best / "adapter_model.safetensors"))
    assert sum(t.numel() * t.element_size() for t in stored.values()) == bytes_2
    assert json.loads((best / "autopeft.json").read_text())["trainable_params"] == trainable_2

    # Enforced at attach time, on the reported numbers: the r=8 trial never trained.
    assert large.state == optuna.trial.TrialState.PRUNED
    assert (large.user_attrs["costs"]["trainable_params"], large.user_attrs["costs"]["adapter_bytes"]) == (trainable_8, bytes_8)
    reason = large.user_attrs["pruned_reason"]
    assert f"trainable_params <= 1000 (it is {trainable_8})" in reason and f"adapter_bytes <= 4000 (it is {bytes_8})" in reason


class AttachCosts(StepListener):
    def on_attach(self, costs):
        self.costs = dict(costs)


@pytest.fixture
def reported_workbench(tmp_path, tiny_bert, sentiment_csv) -> Workbench:
    spec_path = write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        plugins=[THIS_PLUGIN],
        search={"variants": ["reported-lora"], "space": {}, "constraints": ["adapter_bytes <= 1000000"]},
    )
    return Workbench(make_plan(load_spec(spec_path)))


def report_sizes(workbench: Workbench, monkeypatch, sizes) -> None:
    """Make reported-lora report ``sizes`` (on the instance the registry loaded from this file as a plugin)."""
    monkeypatch.setattr(workbench.plan.registry.variant("reported-lora"), "reported", sizes)


def test_reported_sizes_replace_the_measured_ones_at_attach_and_after_export(reported_workbench, tmp_path, monkeypatch):
    """Catches trial.py measuring over a report: at attach (the ``adapter_bytes`` constraint would otherwise export
    and measure the file) and after training (the exported file would otherwise overwrite ``adapter_bytes``)."""
    config = TrialConfig("reported-lora", {"learning_rate": 1e-2, "target_modules": "q,v"})
    measured = reported_workbench.run_trial(config, seed=0, save_to=tmp_path / "measured").costs
    report_sizes(reported_workbench, monkeypatch, {"trainable_params": measured["trainable_params"] + 1, "adapter_bytes": measured["adapter_bytes"] + 3})
    listener = AttachCosts()
    outcome = reported_workbench.run_trial(config, seed=0, listener=listener, save_to=tmp_path / "reported")
    for costs in (listener.costs, outcome.costs):
        assert costs["trainable_params"] == measured["trainable_params"] + 1
        assert costs["adapter_bytes"] == measured["adapter_bytes"] + 3
    assert outcome.costs["bops_per_token"] == measured["bops_per_token"]  # what a variant cannot report is measured

    # One reported size leaves the other measured.
    report_sizes(reported_workbench, monkeypatch, {"trainable_params": 5})
    outcome = reported_workbench.run_trial(config, seed=0, save_to=tmp_path / "partly")
    assert (outcome.costs["trainable_params"], outcome.costs["adapter_bytes"]) == (5, measured["adapter_bytes"])


@pytest.mark.parametrize(
    "report, words",
    [
        ({"adapter_megabytes": 1.0}, ["'adapter_megabytes'", "trainable_params", "adapter_bytes"]),
        ({"trainable_params": -4}, ["trainable_params=-4", ">= 0"]),
        ({"adapter_bytes": float("nan")}, ["adapter_bytes=nan", "finite"]),
        ({"trainable_params": "12"}, ["trainable_params='12'"]),
        ([("trainable_params", 12)], ["returned list", "dict"]),
    ],
)
def test_a_malformed_size_report_fails_the_trial_saying_what_is_wrong(reported_workbench, monkeypatch, report, words):
    """Catches reported_sizes accepting any report: a wrong key or value would be recorded as a size."""
    report_sizes(reported_workbench, monkeypatch, report)
    with pytest.raises(TrialFailed) as failure:
        reported_workbench.run_trial(TrialConfig("reported-lora", {"learning_rate": 1e-2, "target_modules": "q,v"}), seed=0)
    assert "'reported-lora'" in failure.value.reason
    assert all(word in failure.value.reason for word in words), failure.value.reason


def test_the_readme_variant_and_its_conformance_test_run_as_printed():
    """Catches a "Writing a variant" example that no longer runs: an import, a hook or a check_variant argument
    the contract changed."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    [variant] = [b for b in blocks if "class MyLoRA(Variant)" in b]
    [check] = [b for b in blocks if "def test_my_lora_conforms" in b]
    namespace: dict = {}
    exec(compile(variant + check, "README.md", "exec"), namespace)
    namespace["test_my_lora_conforms"]()
