"""Variants built on a factorization of each weight or of its first gradient: SVFit, LoLDU, LoRA-SB, Comp-LoRA.

Each conforms on both tasks (attach, train, export as plain PEFT LoRA, reload with the same predictions, detach
bitwise), and each has its defining mechanism checked against a factorization this file computes itself from
the base weights, so a variant that factorized something else, or trained more than it should, fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autopeft import AttachContext
from autopeft.placement import adapter_sites, select_sites
from autopeft.testing import PEFT_TASK_TYPES, check_variant, tiny_batch, tiny_model
from autopeft_plugins.comp_lora import CompLoRA
from autopeft_plugins.frozen_basis import GRADIENT_BATCHES, _lora_layers
from autopeft_plugins.lora_sb import LoRASB
from autopeft_plugins.loldu import LoLDU
from autopeft_plugins.svfit import SVFit

TASKS = ("sequence-classification", "causal-lm")
SMALL = {
    "svfit": {"r": 4},
    "loldu": {"r": 4},
    "lora-sb": {"r": 4},
    "comp-lora": {"r": 4, "protected_rank": 6},
}
VARIANT_CLASSES = {cls.name: cls for cls in (SVFit, LoLDU, LoRASB, CompLoRA)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: synchronising torch's threads costs more than the arithmetic, many times over on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context_for(model, task: str = "sequence-classification", target_modules: str = "q,v") -> AttachContext:
    targets = [s.name for s in select_sites(adapter_sites(model), target_modules)]
    return AttachContext(task, PEFT_TASK_TYPES[task], targets, 4, 0, lambda n: (tiny_batch(task, seed=i + 1) for i in range(n)))


def params_for(variant, **changes):
    """The variant's default parameters with ``changes``."""
    values = {name: param.default for name, param in variant.search_space().items()}
    return {**values, **changes}


def train(model, task: str, steps: int = 4, learning_rate: float = 1e-2) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    model.train()
    for step in range(steps):
        model(**tiny_batch(task, seed=100 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def exported_updates(variant, model, folder: Path) -> dict[str, torch.Tensor]:
    """``{base module name: ΔW}`` of the adapter as exported (B·A times PEFT's scaling), read from the file."""
    import json

    variant.export(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    prefix = "base_model.model."
    updates = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix(prefix).removesuffix(".lora_A.weight")
            updates[name] = tensors[key.replace("lora_A", "lora_B")].float() @ a.float() * scaling
    return updates


def adapter_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trained parameters of the adapter, without the task head PEFT trains alongside it."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n and "score" not in n}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", sorted(VARIANT_CLASSES))
def test_factorized_variants_conform(name, task):
    report = check_variant(VARIANT_CLASSES[name](), params=SMALL[name], task=task)
    assert report.max_reload_difference <= 1e-4


def test_svfit_trains_only_r_singular_values_and_moves_w_along_its_own_singular_vectors(tmp_path):
    """Per module, exactly r numbers train, and the exported ΔW is ``U_r·diag(δ)·V_rᵀ`` for W's own top-r
    singular vectors: ``U_rᵀ·ΔW·V_r`` is diagonal and holds all of ΔW.

    Catches: bases taken from anything but W's top-r singular vectors (random orthonormal bases, or W's bottom-r
    ones), or a trained basis (the parameter count).
    """
    variant, r = SVFit(), 4
    base = tiny_model()
    weights = {name: base.get_submodule(name).weight.detach().clone() for name in context_for(base).target_modules}
    model = variant.attach(base, params_for(variant, r=r), context_for(base))
    adapter = adapter_parameters(model)
    assert sum(p.numel() for p in adapter.values()) == r * len(weights)
    train(model, "sequence-classification")
    updates = exported_updates(variant, model, tmp_path)
    assert updates.keys() == weights.keys()
    for name, weight in weights.items():
        u, _, vh = torch.linalg.svd(weight, full_matrices=False)
        u_r, v_r = u[:, :r], vh[:r].T
        delta = updates[name]
        inner = u_r.T @ delta @ v_r
        assert torch.linalg.norm(delta) > 1e-4, name
        assert torch.allclose(u_r @ inner @ v_r.T, delta, atol=1e-5), f"{name}: ΔW leaves W's top-{r} singular subspaces"
        off_diagonal = inner - torch.diag(torch.diagonal(inner))
        assert off_diagonal.abs().max() <= 1e-5 * inner.abs().max(), f"{name}: ΔW mixes singular directions"
    variant.detach(model)


def test_loldu_trains_only_the_diagonal_and_a_scale_between_ws_own_lu_slices(tmp_path):
    """Per module, r diagonal entries and one scale train, and the exported ΔW is ``P·L_r·diag(c)·U_r`` for the
    pivoted LU of W itself: solving for the middle matrix gives a diagonal that reproduces ΔW.

    Catches: slices from another factorization (the LU of W with its rows reordered, other columns of L), or a
    missing scale (the parameter count).
    """
    variant, r = LoLDU(), 4
    base = tiny_model()
    weights = {name: base.get_submodule(name).weight.detach().clone() for name in context_for(base).target_modules}
    model = variant.attach(base, params_for(variant, r=r), context_for(base))
    adapter = adapter_parameters(model)
    assert sorted(p.numel() for p in adapter.values()) == sorted([1, r] * len(weights))
    train(model, "sequence-classification")
    updates = exported_updates(variant, model, tmp_path)
    assert updates.keys() == weights.keys()
    for name, weight in weights.items():
        p, lower, upper = torch.linalg.lu(weight)
        left = p @ lower[:, :r]
        right = upper[:r] / torch.diagonal(upper)[:r, None]
        delta = updates[name]
        middle = torch.linalg.pinv(left) @ delta @ torch.linalg.pinv(right)
        assert torch.linalg.norm(delta) > 1e-4, name
        assert torch.allclose(left @ middle @ right, delta, atol=1e-5), f"{name}: ΔW leaves the span of W's LU slices"
        off_diagonal = middle - torch.diag(torch.diagonal(middle))
        assert off_diagonal.abs().max() <= 1e-4 * middle.abs().max(), f"{name}: more than a diagonal moved"
    variant.detach(model)


def test_loldu_starts_at_zero_with_the_diagonal_at_ws_pivots():
    """The trained diagonal starts at W's LU pivots D_r (the paper's initialisation), the scale at 1, and the
    update at exactly zero, so the adapted model starts as the base model.

    Catches: a diagonal started anywhere else (e.g. at ones).
    """
    variant, r = LoLDU(), 4
    base = tiny_model()
    batch = tiny_batch()
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"]).logits
    context = context_for(base)
    model = variant.attach(base, params_for(variant, r=r), context)
    layers = _lora_layers(model)
    assert len(layers) == len(context.target_modules)
    for name, layer in layers.items():
        _, _, upper = torch.linalg.lu(layer.get_base_layer().weight.detach())
        module = layer.lora_A["default"]
        assert torch.allclose(module.diagonal[0], torch.diagonal(upper)[:r]), name
        assert module.scale.item() == 1.0
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(before, after)
    variant.detach(model)


def estimated_first_steps(model, targets: list[str], learning_rate: float, task: str) -> dict[str, torch.Tensor]:
    """Adam's first full fine-tuning step ``−η·sign(mean gradient)`` of each target weight, computed here from
    the same calibration batches the variant is given."""
    weights = {name: model.get_submodule(name).weight for name in targets}
    for weight in weights.values():
        weight.requires_grad_(True)
    for i in range(GRADIENT_BATCHES):
        model(**tiny_batch(task, seed=i + 1)).loss.backward()
    steps = {name: -learning_rate * torch.sign(w.grad) for name, w in weights.items()}
    for weight in weights.values():
        weight.requires_grad_(False)
        weight.grad = None
    return steps


@pytest.mark.parametrize("task", TASKS)
def test_lora_sb_starts_at_the_best_rank_r_approximation_of_the_estimated_first_step(task):
    """Right after attach, each module's update B·R·A equals the best rank-r approximation of the first full
    fine-tuning step estimated from the calibration batches (``−η·sign(ḡ)``), and R is its r × r core.

    Catches: a W-derived initialisation (LoRA-XS's SVD of W), bases from the raw gradient instead of Adam's
    estimated update (no sign), a zero core, a learning rate other than the trial's, or trained bases (the
    parameter count).
    """
    variant, r, learning_rate = LoRASB(), 4, 3e-3
    base = tiny_model(task)
    context = context_for(base, task)
    expected = estimated_first_steps(base, context.target_modules, learning_rate, task)
    model = variant.attach(base, params_for(variant, r=r, learning_rate=learning_rate), context)
    adapter = adapter_parameters(model)
    assert sum(p.numel() for p in adapter.values()) == r * r * len(expected)
    for name, first_step in expected.items():
        layer = model.base_model.model.get_submodule(name)
        update = layer.get_delta_weight("default").detach()
        u, s, vh = torch.linalg.svd(first_step, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert torch.linalg.norm(update - best) <= 1e-4 * torch.linalg.norm(best), name
    variant.detach(model)


def test_lora_sb_trains_along_the_first_steps_subspaces():
    """After training, the update still lies in the left and right rank-r subspaces of the estimated first
    step: only the r × r core moves.

    Catches: a trained basis.
    """
    variant, r, learning_rate, task = LoRASB(), 4, 1e-2, "sequence-classification"
    base = tiny_model(task)
    context = context_for(base, task)
    expected = estimated_first_steps(base, context.target_modules, learning_rate, task)
    model = variant.attach(base, params_for(variant, r=r, learning_rate=learning_rate), context)
    start = {name: model.base_model.model.get_submodule(name).get_delta_weight("default").detach().clone() for name in expected}
    train(model, task)
    for name, first_step in expected.items():
        update = model.base_model.model.get_submodule(name).get_delta_weight("default").detach()
        u, _, vh = torch.linalg.svd(first_step, full_matrices=False)
        u_r, v_r = u[:, :r], vh[:r].T
        assert torch.linalg.norm(update - start[name]) > 1e-5, name
        assert torch.allclose(u_r @ (u_r.T @ update @ v_r) @ v_r.T, update, atol=1e-6), name
    variant.detach(model)


def test_comp_lora_updates_are_orthogonal_to_ws_top_k_singular_directions(tmp_path):
    """The exported ΔW has no component along W's top-k left or right singular vectors, so those singular
    triples of W survive training, while the update itself is not zero.

    Catches: removing either projection or both (plain LoRA), or projecting on the wrong vectors (W's bottom-k).
    Projecting only at export time, not in the forward pass, is caught by the conformance test above (the
    reloaded export then predicts differently).
    """
    variant, r, k = CompLoRA(), 4, 6
    base = tiny_model()
    weights = {name: base.get_submodule(name).weight.detach().clone() for name in context_for(base).target_modules}
    model = variant.attach(base, params_for(variant, r=r, protected_rank=k), context_for(base))
    train(model, "sequence-classification", steps=6)
    updates = exported_updates(variant, model, tmp_path)
    assert updates.keys() == weights.keys()
    for name, weight in weights.items():
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        delta = updates[name]
        assert torch.linalg.norm(delta) > 1e-3, name
        assert (u[:, :k].T @ delta).abs().max() <= 1e-5, f"{name}: ΔW moves W's top-{k} output directions"
        assert (delta @ vh[:k].T).abs().max() <= 1e-5, f"{name}: ΔW reads W's top-{k} input directions"
        adapted = weight + delta
        for i in range(k):
            assert torch.allclose(adapted @ vh[i], s[i] * u[:, i], atol=1e-5), f"{name}: singular triple {i} changed"
    variant.detach(model)


def test_a_rank_the_weights_cannot_hold_fails_the_trial_and_leaves_the_base_alone():
    """A rank above min(out, in), or a protected subspace that leaves no complement, fails the trial with the
    module named, before anything is attached."""
    from autopeft.errors import TrialFailed

    cases = [(SVFit(), {"r": 64}), (LoLDU(), {"r": 64}), (LoRASB(), {"r": 64}), (CompLoRA(), {"protected_rank": 32})]
    for variant, changes in cases:
        base = tiny_model()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(TrialFailed, match="query"):
            variant.attach(base, params_for(variant, **changes), context_for(base))
        after = base.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(type(m).__module__.startswith("peft") for m in base.modules())


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("name", sorted(VARIANT_CLASSES))
def test_factorized_variants_handle_weights_stored_transposed(tmp_path, name):
    """On GPT-2, whose ``Conv1D`` layers store W as in × out (PEFT's ``fan_in_fan_out``), each variant factorizes
    W the right way round: it attaches to the non-square ``c_attn`` (32 → 96), and its export reloads with the
    trained model's predictions.

    Catches: factorizing the stored matrix without transposing it (``autopeft.factorize.as_out_in``).
    """
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
        model = GPT2LMHeadModel(config).eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    variant = VARIANT_CLASSES[name]()
    base = gpt2()
    targets = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    context = AttachContext("causal-lm", "CAUSAL_LM", targets, 4, 0, lambda n: (tiny_batch("causal-lm", seed=i + 1) for i in range(n)))
    model = variant.attach(base, params_for(variant, **SMALL[name]), context)
    train(model, "causal-lm")
    batch = tiny_batch("causal-lm")
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"]).logits
    variant.export(model, tmp_path)
    variant.detach(model)
    reloaded = PeftModel.from_pretrained(gpt2(), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=batch["input_ids"]).logits, trained, atol=1e-4)


def test_a_bfloat16_model_is_factorized_in_float32():
    """On a bfloat16 model, the frozen bases are the float32 factorization of the bfloat16 weights (within
    float32 rounding), not a factorization at the model's precision, and training and export still match.

    Catches: factorizing at the model's dtype (removing the float32 casts of ``autopeft.factorize``).
    """
    variant, r = SVFit(), 4
    base = tiny_model().to(torch.bfloat16)
    context = context_for(base)
    model = variant.attach(base, params_for(variant, r=r), context)
    for name, layer in _lora_layers(model).items():
        u, _, _ = torch.linalg.svd(layer.get_base_layer().weight.float(), full_matrices=False)
        frozen = layer.lora_B["default"].weight
        assert frozen.dtype == torch.float32
        assert torch.allclose((u[:, :r].T @ frozen).abs(), torch.eye(r), atol=1e-5), name
    variant.detach(model)
