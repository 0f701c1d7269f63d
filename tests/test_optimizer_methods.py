"""Methods that change the optimizer step, not the layer: ALLoRA, AltLoRA and LoRA-GGPO.

Each trains a plain PEFT LoRA with its own ``torch.optim.Optimizer`` returned by ``Variant.optimizer``; these
tests check the conformance of each variant, the mechanism of each update rule against AdamW, and that a
Workbench trial really trains with the variant's optimizer.
"""

from __future__ import annotations

import pytest
import torch

from autopeft import AttachContext
from autopeft.optim import lora_factors
from autopeft.placement import adapter_sites, select_sites
from autopeft.testing import PEFT_TASK_TYPES, check_variant, tiny_batch, tiny_model
from autopeft_plugins.allora import ALLoRA
from autopeft_plugins.altlora import AltLoRA
from autopeft_plugins.lora_ggpo import LoRAGGPO

VARIANTS = [ALLoRA, AltLoRA, LoRAGGPO]


def attached(variant, params: dict, task: str = "sequence-classification", ranks: dict | None = None):
    """``(model, context, trainable)``: ``variant`` attached to a tiny random model with ``params``."""
    base = tiny_model(task)
    targets = list(ranks) if ranks else [s.name for s in select_sites(adapter_sites(base), params["target_modules"])]
    context = AttachContext(task=task, peft_task_type=PEFT_TASK_TYPES[task], target_modules=targets, total_steps=4, seed=0, ranks=ranks)
    torch.manual_seed(0)
    model = variant.attach(base, params, context)
    return model, context, [p for p in model.parameters() if p.requires_grad]


def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    """Where one plain AdamW step from ``params`` with ``grads`` lands (on copies)."""
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for copy, grad in zip(copies, grads):
        copy.grad = grad.clone()
    torch.optim.AdamW(copies, lr=lr, weight_decay=0.0).step()
    return [c.detach() for c in copies]


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
@pytest.mark.parametrize("variant_class", VARIANTS, ids=lambda v: v.name)
def test_variant_conforms(variant_class, task):
    """Trains with its own optimizer, exports a plain PEFT LoRA that predicts the same, detaches bitwise."""
    check_variant(variant_class(), {"r": 4}, task=task)


@pytest.mark.parametrize("variant_class", VARIANTS, ids=lambda v: v.name)
def test_per_module_ranks_from_the_outer_search_are_honoured(variant_class):
    """Catches attach() ignoring ``context.ranks`` (``supports_module_ranks`` is declared)."""
    from autopeft.adapters import verify_ranks

    ranks = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.1.attention.self.value": 4}
    params = {"learning_rate": 1e-3, "target_modules": "q,v", "r": 8, "eta": 1.0, "second_moment": True, "sigma": 0.05, "beta": 1.0}
    model, _, _ = attached(variant_class(), params, ranks=ranks)
    verify_ranks(model, ranks)


def test_allora_has_no_dropout_and_no_scaling():
    """Catches ALLoRA keeping LoRA's α/r scale or its dropout."""
    model, _, _ = attached(ALLoRA(), {"learning_rate": 1e-3, "target_modules": "q,v", "r": 4, "eta": 1.0})
    factors = lora_factors(model)
    assert len(factors) == 4  # q and v of two layers
    for f in factors:
        assert f.scale == 1.0
        assert isinstance(f.layer.lora_dropout["default"], torch.nn.Identity)


def test_allora_a_row_with_a_larger_norm_moves_less_than_under_adamw():
    """Each row moves by AdamW's step times 1/√(1 + η²‖row‖²); the task head moves exactly as under AdamW.

    Catches removing the per-row rate (RowNormAdamW stepping like AdamW), or scaling whole matrices alike."""
    eta, lr = 2.0, 1e-2
    model, context, trainable = attached(ALLoRA(), {"learning_rate": lr, "target_modules": "q,v", "r": 4, "eta": eta})
    a = lora_factors(model)[0].a
    with torch.no_grad():
        a[0].mul_(0.01)  # a small row
        a[1].mul_(20.0)  # a large row
    for p in trainable:
        p.grad = torch.ones_like(p)  # the same gradient everywhere
    before = [p.detach().clone() for p in trainable]
    expected = adamw_step(before, [p.grad for p in trainable], lr)
    optimizer = ALLoRA().optimizer(model, trainable, lr, 0.0, context)
    optimizer.step()

    index = next(i for i, p in enumerate(trainable) if p is a)
    moved = (a.detach() - before[index]).norm(dim=1)
    adamw_moved = (expected[index] - before[index]).norm(dim=1)
    ratio = moved / adamw_moved
    norms = before[index].norm(dim=1)
    torch.testing.assert_close(ratio, torch.rsqrt(1 + (eta * norms) ** 2), rtol=1e-4, atol=1e-6)
    assert ratio[1] < 0.1 < 0.95 < ratio[0]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    head = [i for i, name in enumerate(names) if "lora_" not in name]
    assert head
    for i in head:
        torch.testing.assert_close(trainable[i].detach(), expected[i])


def _train_steps(model, optimizer, task: str, steps: int, record=None) -> None:
    model.train()
    for step in range(1, steps + 1):
        if record:
            record(step, "before")
        model(**tiny_batch(task, seed=100 + step)).loss.backward()
        if record:
            record(step, "gradient")
        optimizer.step()
        if record:
            record(step, "after")
        optimizer.zero_grad(set_to_none=True)


def test_altlora_moves_only_b_on_odd_steps_and_only_a_on_even_steps():
    """Catches removing the alternation: both factors moving at every step (the head still moves every step)."""
    model, context, trainable = attached(AltLoRA(), {"learning_rate": 1e-2, "target_modules": "q,v", "r": 4, "second_moment": True})
    optimizer = AltLoRA().optimizer(model, trainable, 1e-2, 0.0, context)
    factors = lora_factors(model)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    snapshots = {}

    def record(step, when):
        if when == "before":
            snapshots["a"] = [f.a.detach().clone() for f in factors]
            snapshots["b"] = [f.b.detach().clone() for f in factors]
            snapshots["head"] = [p.detach().clone() for p in head]
        elif when == "after":
            a_moved = [not torch.equal(f.a, old) for f, old in zip(factors, snapshots["a"])]
            b_moved = [not torch.equal(f.b, old) for f, old in zip(factors, snapshots["b"])]
            if step % 2 == 1:
                assert all(b_moved) and not any(a_moved), (step, b_moved, a_moved)
            else:
                assert all(a_moved) and not any(b_moved), (step, b_moved, a_moved)
            assert all(not torch.equal(p, old) for p, old in zip(head, snapshots["head"]))

    _train_steps(model, optimizer, "sequence-classification", 4, record)


def test_altlora_steps_along_the_projection_of_the_full_weight_gradient():
    """With momentum alone, B's first step is the least-squares best fit of the full-weight gradient G in A's row
    space, ``s·ΔB·A = −lr·G·Aᵀ(AAᵀ)⁻¹A``, and A's first step the fit in B's column space, ``s·B·ΔA =
    −lr·B(BᵀB)⁻¹Bᵀ·G``. G is taken by autograd on the base weight itself.

    Catches removing the projection (stepping along PEFT's raw ∇B = s·G·Aᵀ and ∇A = s·Bᵀ·G)."""
    lr = 1e-2
    model, context, trainable = attached(AltLoRA(), {"learning_rate": lr, "target_modules": "q,v", "r": 4, "second_moment": False})
    optimizer = AltLoRA().optimizer(model, trainable, lr, 0.0, context)
    factors = lora_factors(model)
    weights = [f.layer.get_base_layer().weight for f in factors]
    for w in weights:
        w.requires_grad_(True)  # the model is thrown away afterwards: only to read G
    seen = {}

    def record(step, when):
        if when == "before":
            seen["a"] = [f.a.detach().clone() for f in factors]
            seen["b"] = [f.b.detach().clone() for f in factors]
        elif when == "gradient":
            seen["g"] = [w.grad.clone() for w in weights]
            for w in weights:
                w.grad = None
        else:
            for f, a, b, g in zip(factors, seen["a"], seen["b"], seen["g"]):
                a, b, g = a.double(), b.double(), g.double()
                if step == 1:
                    change = f.scale * (f.b.detach().double() - b) @ a
                    fit = g @ a.T @ torch.linalg.solve(a @ a.T, a)
                else:
                    change = f.scale * b @ (f.a.detach().double() - a)
                    fit = b @ torch.linalg.solve(b.T @ b, b.T @ g)
                error = float((change + lr * fit).norm() / (lr * fit).norm())
                assert error < 1e-2, (step, f.name, error)

    _train_steps(model, optimizer, "sequence-classification", 2, record)


def _ggpo(sigma: float, beta: float):
    params = {"learning_rate": 1e-2, "target_modules": "q,v", "r": 4, "sigma": sigma, "beta": beta}
    model, context, trainable = attached(LoRAGGPO(), params, task="causal-lm")  # Llama: no dropout of its own
    with torch.no_grad():
        for f in lora_factors(model):
            f.b.normal_(std=0.1)  # a non-zero update, so the merged weight is not the base weight
    return model, trainable, LoRAGGPO().optimizer(model, trainable, 1e-2, 0.0, context)


def _gradients(model, trainable, seed: int, train: bool) -> list[torch.Tensor]:
    model.train(train)
    model(**tiny_batch("causal-lm", seed=seed)).loss.backward()
    grads = [p.grad.clone() for p in trainable]
    for p in trainable:
        p.grad = None
    return grads


def test_ggpo_gradients_are_taken_at_perturbed_weights_and_the_step_is_adamws_on_the_unperturbed_ones():
    """In training mode the gradients differ from those at the unperturbed weights; after ``step()`` the
    parameters are exactly AdamW's update of the unperturbed parameters with those gradients, and a forward in
    eval mode sees no perturbation.

    Catches: no perturbation during training (the gradients would match), a perturbation written into the
    weights and left there, and a perturbation applied in eval mode (evaluation and export would see it)."""
    model, trainable, optimizer = _ggpo(sigma=0.2, beta=1.0)
    base = {name: w.clone() for name, w in model.base_model.model.state_dict().items() if "lora_" not in name}
    clean = _gradients(model, trainable, seed=1, train=False)
    before = [p.detach().clone() for p in trainable]
    model.train()
    model(**tiny_batch("causal-lm", seed=1)).loss.backward()
    perturbed = [p.grad.clone() for p in trainable]
    assert max(float((c - g).abs().max()) for c, g in zip(clean, perturbed)) > 1e-3

    expected = adamw_step(before, perturbed, 1e-2)
    optimizer.step()
    for p, e in zip(trainable, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-7)
    after = model.base_model.model.state_dict()
    assert all(torch.equal(w, after[name]) for name, w in base.items())

    model.eval()
    batch = tiny_batch("causal-lm", seed=2)
    with torch.no_grad():
        seen = model(input_ids=batch["input_ids"]).logits
        optimizer.remove_hooks()
        plain = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(seen, plain, rtol=0, atol=0)


def test_ggpo_perturbation_is_guided_by_the_previous_gradient():
    """The first step has no gradient to go by, so β changes nothing there; from the second step on, the
    gradient's row norms enlarge the perturbation, and the gradients differ with β.

    Catches dropping the gradient term (the perturbation sized by the weight norms alone)."""
    runs = {}
    for beta in (0.0, 4.0):
        model, trainable, optimizer = _ggpo(sigma=0.1, beta=beta)
        first = _gradients(model, trainable, seed=1, train=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runs[beta] = first, _gradients(model, trainable, seed=2, train=True)
    for a, b in zip(runs[0.0][0], runs[4.0][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max(float((a - b).abs().max()) for a, b in zip(runs[0.0][1], runs[4.0][1])) > 1e-4


def counting_lora():
    """A LoRA variant whose optimizer records the learning rate of every step it takes."""
    from autopeft_plugins.lora import LoRA

    class Counting(torch.optim.AdamW):
        def step(self, closure=None):
            variant.rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    class OwnStep(LoRA):
        name = "own-step"

        def optimizer(self, model, trainable, learning_rate, weight_decay, context):
            return Counting(trainable, lr=learning_rate, weight_decay=weight_decay)

    variant = OwnStep()
    variant.rates = []
    return variant


def test_check_variant_trains_with_the_variants_optimizer():
    """Catches check_variant ignoring ``Variant.optimizer`` (it would then check a rule the variant never uses)."""
    variant = counting_lora()
    check_variant(variant, {"r": 2}, steps=3)
    assert len(variant.rates) == 3


def test_a_workbench_trial_trains_with_the_variants_optimizer(classification_spec, monkeypatch):
    """Every training step goes through the optimizer ``Variant.optimizer`` returns, and the trial's learning-rate
    schedule drives it.

    Catches trial.py ignoring ``Variant.optimizer`` (training with its default AdamW instead)."""
    from autopeft.plan import make_plan
    from autopeft.spec import load_spec
    from autopeft.trial import TrialConfig, Workbench

    variant = counting_lora()
    workbench = Workbench(make_plan(load_spec(classification_spec)))
    found = type(workbench.plan.registry.variants["lora"])(variant, "test", "test")
    monkeypatch.setitem(workbench.plan.registry.variants, "own-step", found)  # the registry is shared: undo after
    params = {"learning_rate": 1e-2, "target_modules": "q,v", "r": 2, "alpha_ratio": 2.0, "dropout": 0.0}
    outcome = workbench.run_trial(TrialConfig("own-step", params), seed=0)
    rates = variant.rates
    assert outcome.steps == workbench.plan.spec.training.max_steps == len(rates)
    assert max(rates) <= 1e-2 and rates[-1] < max(rates)  # the warm-up and decay scaled this optimizer's rate
