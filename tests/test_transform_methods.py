"""Variants whose update is not a LoRA product: LoCA (sparse DCT spectrum), QWHA (sparse Walsh–Hadamard
coefficients), SLTrain (low-rank plus sparse) and LQ-LoRA (quantized base plus low-rank).

Each conforms on both tasks (attach, train, export as a plain PEFT LoRA of the exact rank of ΔW, reload with the
same predictions, detach bitwise), and each has its defining mechanism checked: where the coefficients live and
whether they move, what the initialisation cancels, what the export holds, what the decomposition achieves.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autopeft import AttachContext
from autopeft.models import quantize_base
from autopeft.placement import adapter_sites, select_sites
from autopeft.testing import PEFT_TASK_TYPES, check_variant, tiny_batch, tiny_model
from autopeft.transforms import dct_matrix, exact_lora_factors, hadamard_matrix, layer_delta, lora_layers, random_support, support_mask
from autopeft_plugins.loca import LoCA
from autopeft_plugins.lq_lora import LQLoRA, decompose
from autopeft_plugins.qwha import QWHA
from autopeft_plugins.sltrain import SLTrain

TASKS = ("sequence-classification", "causal-lm")
SMALL = {
    "loca": {"n_coefficients": 64, "relocate_every": 1},
    "qwha": {"n_coefficients": 64},
    "sltrain": {"r": 4, "density": 0.05},
    "lq-lora": {"r": 4, "bits": 4, "rounds": 2},
}
VARIANT_CLASSES = {cls.name: cls for cls in (LoCA, QWHA, SLTrain, LQLoRA)}
ADAPTER = "default"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: synchronising torch's threads costs more than the arithmetic, many times over on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context_for(model, task: str = "sequence-classification", total_steps: int = 4, seed: int = 0) -> AttachContext:
    targets = [s.name for s in select_sites(adapter_sites(model), "q,v")]
    return AttachContext(task, PEFT_TASK_TYPES[task], targets, total_steps, seed, lambda n: (tiny_batch(task, seed=i + 1) for i in range(n)))


def params_for(variant, **changes):
    """The variant's default parameters with ``changes``."""
    return {**{name: param.default for name, param in variant.search_space().items()}, **changes}


def train(variant, model, context: AttachContext, steps: int, learning_rate: float = 1e-2) -> None:
    """The trial loop in small: step, then the variant's ``on_step``, then ``zero_grad``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    model.train()
    for step in range(1, steps + 1):
        model(**tiny_batch(context.task, seed=100 + step)).loss.backward()
        optimizer.step()
        variant.on_step(model, step, context)
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def logits(model, task: str = "sequence-classification") -> torch.Tensor:
    batch = tiny_batch(task)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def exported_updates(folder: Path) -> dict[str, torch.Tensor]:
    """``{base module name: ΔW}`` as the exported file holds it (B·A times each module's scaling)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config["use_rslora"], "the export must be a LoRA at scaling lora_alpha / r"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    updates = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            escaped = next((k for k in config["rank_pattern"] if k.replace("\\", "") == name), None)
            r = config["rank_pattern"].get(escaped, config["r"])
            alpha = config["alpha_pattern"].get(escaped, config["lora_alpha"])
            assert a.shape[0] == r, f"{name}: stored rank {a.shape[0]} differs from the configured rank {r}"
            updates[name] = tensors[key.replace("lora_A", "lora_B")].float() @ a.float() * (alpha / r)
    return updates


# ----------------------------------------------------------------------------------------------------------------
# Conformance
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", sorted(VARIANT_CLASSES))
def test_conforms(name, task):
    """Attach, train, export as plain PEFT LoRA (same predictions to 1e-4 on reload), detach bitwise."""
    check_variant(VARIANT_CLASSES[name](), params=SMALL[name], task=task)


# ----------------------------------------------------------------------------------------------------------------
# The shared transforms and the exact export
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 32, 48, 384])
def test_transforms_are_orthonormal_and_the_dct_is_the_dct(n):
    """Orthonormal transforms keep ‖F‖ = ‖ΔW‖ and rank(F) = rank(ΔW), which the exports' rank bound relies on.

    Catches: a DCT or Hadamard matrix without its normalisation, or a DCT with the wrong frequencies (the DCT of
    a cosine at frequency 3 must be a single spike at 3)."""
    identity = torch.eye(n, dtype=torch.float64)
    for matrix in (dct_matrix(n, torch.float64), hadamard_matrix(n, torch.float64)):
        assert torch.allclose(matrix @ matrix.T, identity, atol=1e-12)
    hadamard = hadamard_matrix(n, torch.float64)
    assert torch.allclose(hadamard, hadamard.T) and set(hadamard.abs().unique().tolist()) <= {0.0, float(hadamard.abs().max())}
    i = torch.arange(n, dtype=torch.float64)
    spectrum = dct_matrix(n, torch.float64) @ torch.cos(torch.pi * (2 * i + 1) * 3 / (2 * n))
    assert spectrum.abs().argmax() == 3 and torch.allclose(spectrum[torch.arange(n) != 3], torch.zeros(n - 1, dtype=torch.float64), atol=1e-10)


def test_random_support_is_distinct_seeded_and_exact_factors_have_the_true_rank():
    """Supports are reproducible from the seed and never repeat an entry; exact factors reproduce ΔW at its rank.

    Catches: a support drawn from the global RNG (not reproducible), repeated indices (fewer coefficients than
    asked), factors truncated below ΔW's rank or kept at full rank when ΔW is low-rank."""
    first = random_support(40, 50, 300, torch.Generator().manual_seed(3))
    again = random_support(40, 50, 300, torch.Generator().manual_seed(3))
    other = random_support(40, 50, 300, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.unique().numel() == 300 and int(first.max()) < 2000
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 5, generator=generator) @ torch.randn(5, 50, generator=generator)
    b, a = exact_lora_factors(delta)
    assert a.shape[0] == 5 and torch.allclose(b @ a, delta, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# LoCA
# ----------------------------------------------------------------------------------------------------------------


def _loca_run(relocate_every: int):
    model = tiny_model()
    variant = LoCA()
    context = context_for(model, total_steps=12)
    peft_model = variant.attach(model, params_for(variant, n_coefficients=48, relocate_every=relocate_every), context)
    spectra = {name: layer.lora_B[ADAPTER] for name, layer in lora_layers(peft_model).items()}
    start = {name: module.support.clone() for name, module in spectra.items()}
    train(variant, peft_model, context, steps=8)
    return peft_model, spectra, start


def test_loca_coefficients_live_on_their_support_which_moves_only_when_locations_are_learned():
    """ΔW's 2-D DCT spectrum is zero off the n-entry support; with location learning the supports move (and stay
    n distinct entries), with ``relocate_every: 0`` they stay where they started.

    Catches: location learning removed (``relocate`` not called, or its move left out: no support moves), moves
    that collide (duplicate locations), and coefficients that leak off their support."""
    peft_model, spectra, start = _loca_run(relocate_every=1)
    moved = 0
    for name, layer in lora_layers(peft_model).items():
        module = spectra[name]
        out_features, in_features = module.shape
        spectrum = dct_matrix(out_features, torch.float64) @ layer_delta(layer).double() @ dct_matrix(in_features, torch.float64).T
        on = support_mask(module.support, out_features, in_features)
        assert module.support.unique().numel() == 48
        assert spectrum[on].abs().max() > 1e-4, f"{name}: the coefficients did not train"
        assert spectrum[~on].abs().max() < 1e-6 * spectrum.abs().max(), f"{name}: ΔW has spectrum off its support"
        moved += int((module.support.sort().values != start[name].sort().values).sum())
    assert moved > 0, "location learning is on but no coefficient changed location"

    _, fixed, fixed_start = _loca_run(relocate_every=0)
    assert all(torch.equal(module.support, fixed_start[name]) for name, module in fixed.items())


# ----------------------------------------------------------------------------------------------------------------
# QWHA
# ----------------------------------------------------------------------------------------------------------------


def test_qwha_initialisation_cancels_quantization_error_and_starts_at_zero_on_a_full_base(tmp_path):
    """On a 4-bit HQQ base, QWHA's initial ΔW brings Q + ΔW much closer to the unquantized W than Q alone (zero
    init); on an unquantized base ΔW starts at exactly zero. It trains on the quantized base and its export, loaded
    on a fresh quantized base, predicts what the trained model predicts.

    Catches: the error-cancelling initialisation removed (zero or random values: no reduction), its selection
    made blind to the error (random locations: far smaller reduction), and an init applied on a full base."""
    base = tiny_model()
    quantized = quantize_base(base, 4)
    context = context_for(base)
    variant = QWHA()
    weights = {name: base.get_submodule(name).weight.detach().float() for name in context.target_modules}
    dequantized = {name: quantized.get_submodule(name).dequantize().float() for name in context.target_modules}
    before = {name: q.clone() for name, q in dequantized.items()}
    peft_model = variant.attach(quantized, params_for(variant, n_coefficients=256), context)
    for name, layer in lora_layers(peft_model).items():
        zero_init = torch.linalg.matrix_norm(weights[name] - dequantized[name])
        ours = torch.linalg.matrix_norm(weights[name] - (dequantized[name] + layer_delta(layer)))
        assert ours < 0.75 * zero_init, f"{name}: ‖W − (Q + ΔW)‖ = {ours:.4f} against {zero_init:.4f} at zero init"

    train(variant, peft_model, context, steps=3)
    expected = logits(peft_model)
    variant.export(peft_model, tmp_path)
    restored = variant.detach(peft_model)
    assert all(torch.equal(restored.get_submodule(n).dequantize(), before[n]) for n in before)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(quantize_base(tiny_model(), 4), str(tmp_path)).eval()
    assert torch.allclose(logits(reloaded), expected, atol=1e-4)

    full = tiny_model()
    full_model = variant.attach(full, params_for(variant, n_coefficients=256), context_for(full))
    assert all(bool((layer_delta(layer) == 0).all()) for layer in lora_layers(full_model).values())


# ----------------------------------------------------------------------------------------------------------------
# SLTrain
# ----------------------------------------------------------------------------------------------------------------


def test_sltrain_sparse_support_is_seeded_and_fixed_and_the_export_is_exactly_ba_plus_s(tmp_path):
    """The sparse part trains only on a support drawn from the trial's seed and never moved; the exported LoRA's
    B·A equals the trained B·A + S of every module (to float rounding), S being a large part of it.

    Catches: S dropped (or B·A dropped) at export, a support redrawn or moved during training, a support drawn
    from anything but the trial's seed."""
    variant = SLTrain()
    params = params_for(variant, r=4, density=0.05)

    context = context_for(tiny_model())

    def supports(seed):
        peft_model = variant.attach(tiny_model(), params, context_for(tiny_model(), seed=seed))
        return peft_model, {name: layer.lora_A[ADAPTER].support.clone() for name, layer in lora_layers(peft_model).items()}

    peft_model, start = supports(0)
    _, same = supports(0)
    _, other = supports(1)
    assert all(torch.equal(start[n], same[n]) for n in start) and not all(torch.equal(start[n], other[n]) for n in start)

    train(variant, peft_model, context, steps=4)
    updates = {}
    for name, layer in lora_layers(peft_model).items():
        module = layer.lora_A[ADAPTER]
        assert torch.equal(module.support, start[name]), f"{name}: the sparse support moved during training"
        sparse = module.sparse().detach()
        out_features, in_features = sparse.shape
        assert sparse[~support_mask(module.support, out_features, in_features)].abs().max() == 0
        low_rank = (module.b @ module.a).detach()
        assert torch.linalg.matrix_norm(sparse) > 0.2 * torch.linalg.matrix_norm(low_rank), f"{name}: S barely trained"
        updates[name] = (low_rank + sparse) * layer.scaling[ADAPTER]

    variant.export(peft_model, tmp_path)
    exported = exported_updates(tmp_path)
    assert set(exported) == set(updates)
    for name, update in updates.items():
        assert torch.allclose(exported[name], update, atol=1e-6), f"{name}: the export is not B·A + S"


# ----------------------------------------------------------------------------------------------------------------
# LQ-LoRA
# ----------------------------------------------------------------------------------------------------------------


def test_lq_lora_alternating_rounds_lower_the_reconstruction_error_below_one_round():
    """More rounds of quantize / SVD leave a smaller ‖W − (Q + L1·L2)‖ than one round, measured here from the
    returned Q (dequantized) and factors.

    Catches: the alternation cut to one round (the errors are then equal)."""
    for linear in (tiny_model("causal-lm").model.layers[0].self_attn.q_proj, tiny_model().bert.encoder.layer[1].attention.self.value):
        weight = linear.weight.detach().float()

        def error(rounds):
            quantized, b, a, _ = decompose(linear, 4, 3, rounds)
            return float(torch.linalg.matrix_norm(weight - quantized.dequantize().float() - b.float() @ a.float()))

        assert error(4) < 0.97 * error(1)


def test_lq_lora_trains_on_a_quantized_base_from_its_decomposition_and_detach_puts_the_linears_back():
    """After attach every adapted layer computes from a frozen 4-bit HQQ weight Q (at most 16 levels per
    quantization group, not W itself) plus LoRA factors starting at the best rank-r fit of W − Q; training leaves
    Q as it was; detach puts the very same nn.Linear modules back.

    Catches: a base left unquantized (or quantized at other bits), LoRA factors not initialised from the
    decomposition, and a detach that leaves the HQQ layers in place."""
    from hqq.core.quantize import HQQLinear

    model = tiny_model()
    variant = LQLoRA()
    context = context_for(model)
    linears = {name: model.get_submodule(name) for name in context.target_modules}
    peft_model = variant.attach(model, params_for(variant, r=4, bits=4, rounds=2), context)
    quantized = {}
    for name, layer in lora_layers(peft_model).items():
        base = layer.get_base_layer()
        assert isinstance(base, HQQLinear), f"{name}: the base layer is a {type(base).__name__}, not quantized"
        q = base.dequantize().float()
        weight = linears[name].weight.detach().float()
        assert not torch.allclose(q, weight)
        groups = q.reshape(-1, base.meta["group_size"])
        assert max(row.unique().numel() for row in groups) <= 16
        u, s, vh = torch.linalg.svd(weight - q)
        assert torch.allclose(layer_delta(layer), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
        quantized[name] = q
    train(variant, peft_model, context, steps=2)
    for name, layer in lora_layers(peft_model).items():
        assert torch.equal(layer.get_base_layer().dequantize().float(), quantized[name])
    restored = variant.detach(peft_model)
    assert all(restored.get_submodule(name) is linear for name, linear in linears.items())
