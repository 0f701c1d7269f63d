"""LoRA-family methods that Hugging Face PEFT implements, wrapped as searchable variants with curated spaces.

Every PEFT method is also searchable as ``peft:<method>`` with a space derived from its config fields
(:mod:`autopeft_plugins.peft_bridge`); the short names here keep their spaces (alphas as ratios of the rank,
ranges chosen per method) and add what a config class cannot say. Each variant maps its sampled parameters to
config fields and the bridge's :func:`~autopeft_plugins.peft_bridge.peft_config` fills in the task, the placement
and the seeds. What PEFT leaves to the
caller is handled here: the data-aware LoRA inits (EVA, LoRA-GA, CorDA) get their calibration passes, the inits
that rewrite the base weights (PiSSA, OLoRA, LoRA-GA, CorDA) are exported as plain LoRA and their base weights are
put back on detach, AdaLoRA gets its rank allocation every step, and shape constraints (VB-LoRA, FourierFT, PiSSA)
become a :class:`~autopeft.errors.TrialFailed` with a reason instead of an error deep inside PEFT.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path
from typing import Any

from autopeft import AttachContext, CategoricalParam, FloatParam, IntParam, Variant, hookimpl, shared
from autopeft.errors import TrialFailed
from autopeft.space import PROBABILITY, RANK

# PEFT folds these inits into the base weights (W_res = W - s·B0·A0): exported adapters need converting.
MUTATING_INITS = ("pissa", "olora", "lora_ga", "corda")
# PEFT's CorDA imports the `attrs` package, which PEFT does not declare as a dependency: offer it where installed.
INITS = ("gaussian", "pissa", "olora", "eva", "lora_ga") + (("corda",) if importlib.util.find_spec("attr") else ())
CALIBRATION_BATCHES = 8
EVA_MAX_PASSES = 200


def _shapes(model, names: list[str]) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of the target linear layers."""
    shapes = {}
    for name in names:
        weight = model.get_submodule(name).weight
        shapes[name] = (int(weight.shape[0]), int(weight.shape[1]))
    return shapes


def _require_rank_fits(model, names: list[str], rank: int, what: str) -> None:
    too_small = {n: s for n, s in _shapes(model, names).items() if min(s) < rank}
    if too_small:
        name, shape = next(iter(too_small.items()))
        raise TrialFailed(f"{what} needs rank {rank} <= min(out, in) of every target, but {name} is {shape[0]}x{shape[1]}")


class PeftVariant(Variant):
    """A variant PEFT implements: subclasses name the method (:attr:`peft_type`) and map the sampled parameters to
    its config fields (:meth:`config_fields`); the task type, the placement and the seed fields are filled in the
    way every ``peft:<method>`` variant fills them (:func:`autopeft_plugins.peft_bridge.peft_config`)."""

    peft_type: str = ""
    """PEFT's name of the method (a ``peft.PeftType`` member name such as ``"VERA"``)."""

    def config_fields(self, model, params: dict[str, Any], context: AttachContext) -> dict[str, Any]:
        """The config fields this trial sets (raise :class:`TrialFailed` for a configuration the model cannot take)."""
        raise NotImplementedError

    def build_config(self, model, params: dict[str, Any], context: AttachContext):
        """Return the PEFT config for this trial."""
        from autopeft_plugins.peft_bridge import peft_config

        return peft_config(self.peft_type, model, context, **self.config_fields(model, params, context))

    def attach(self, model, params: dict[str, Any], context: AttachContext):
        return _get_peft_model(model, self.build_config(model, params, context))


def _get_peft_model(model, config):
    """``get_peft_model``, but if PEFT fails half-way the layers it already wrapped are unwrapped again.

    The base model is shared by every trial of a worker: a failed trial must not leave adapters in it.
    """
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    try:
        return get_peft_model(model, config)
    except BaseException:
        for name, module in list(model.named_modules()):
            if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                original = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module
                setattr(parent, child, original)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        raise


def _lora_space(**extra) -> dict:
    return {
        "learning_rate": shared("learning_rate"),
        "target_modules": shared("target_modules"),
        "r": IntParam(2, 64, default=8, log=True, legal=RANK, help="rank of the update"),
        **extra,
    }


class RsLoRA(PeftVariant):
    name = "rslora"
    summary = "LoRA scaled by alpha/sqrt(r) so that higher ranks keep learning"
    paper = "Kalajdzievski, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA, arXiv:2312.03732"
    supports_quantized_base = True

    def search_space(self):
        return _lora_space(
            alpha=CategoricalParam((2, 4, 8, 16, 32), default=8, help="lora_alpha; the update is scaled by alpha/sqrt(r)"),
            dropout=FloatParam(0.0, 0.2, default=0.05, legal=PROBABILITY, help="dropout on the adapter's input"),
        )

    peft_type = "LORA"

    def config_fields(self, model, params, context):
        return {"r": params["r"], "lora_alpha": params["alpha"], "lora_dropout": params["dropout"], "use_rslora": True}


class DoRA(PeftVariant):
    name = "dora"
    summary = "LoRA on the direction of each weight column plus a trained magnitude vector"
    paper = "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv:2402.09353"
    supports_quantized_base = True

    def search_space(self):
        return _lora_space(
            alpha_ratio=CategoricalParam((0.5, 1.0, 2.0, 4.0), default=2.0, help="lora_alpha = alpha_ratio × r"),
            dropout=FloatParam(0.0, 0.2, default=0.05, legal=PROBABILITY, help="dropout on the adapter's input"),
        )

    peft_type = "LORA"

    def config_fields(self, model, params, context):
        return {"r": params["r"], "lora_alpha": params["alpha_ratio"] * params["r"], "lora_dropout": params["dropout"], "use_dora": True}


class LoRAInit(PeftVariant):
    """LoRA whose initialisation is searched: random, from the weights' SVD or QR, or from calibration data.

    PiSSA, OLoRA, LoRA-GA and CorDA move a rank-r part of each base weight into the adapter (PEFT subtracts
    ``s·B0·A0`` from W). The base weights are saved at attach and written back at detach, and the export is the
    plain LoRA adapter of the same update on the original weights: ``ΔW = s·(B·A - B0·A0)``, of rank 2r.
    """

    name = "lora-init"
    summary = "LoRA with a searched initialisation: gaussian, PiSSA, OLoRA, EVA, LoRA-GA or CorDA"
    paper = (
        "Meng et al., PiSSA, arXiv:2404.02948; Büyükakyüz, OLoRA, arXiv:2406.01775; Paischer et al., EVA, "
        "arXiv:2410.07170; Wang et al., LoRA-GA, arXiv:2407.05000; Yang et al., CorDA, arXiv:2406.05223"
    )

    def search_space(self):
        space = {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 32, default=8, log=True, help="rank of the update"),
            "alpha_ratio": CategoricalParam((0.5, 1.0, 2.0, 4.0), default=2.0, help="lora_alpha = alpha_ratio × r"),
            "init": CategoricalParam(INITS, default="gaussian", help="how A and B start (gaussian: A random, B zero)"),
            "eva_rho": CategoricalParam(
                (1.0, 2.0), default=2.0, condition={"init": ["eva"]}, help="EVA may give a module up to rho × r ranks"
            ),
        }
        if "corda" in INITS:
            space["corda_method"] = CategoricalParam(
                ("ipm", "kpm"), default="ipm", condition={"init": ["corda"]},
                help="CorDA: ipm adapts the components the data uses most, kpm those it uses least",
            )
        return space

    peft_type = "LORA"

    def config_fields(self, model, params, context):
        from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraGAConfig

        init, r = params["init"], params["r"]
        if init != "gaussian":
            # Components each init takes from an SVD: LoRA-GA splits 2r of the gradient's, EVA up to rho·r of the inputs'.
            needed = {"lora_ga": 2 * r, "eva": math.ceil(r * params.get("eva_rho", 1.0))}.get(init, r)
            _require_rank_fits(model, context.target_modules, needed, f"init={init}")
        extra: dict[str, Any] = {}
        if init == "eva":
            # A classification label is one per sequence, not per token: it cannot mask tokens.
            extra["eva_config"] = EvaConfig(rho=params["eva_rho"], use_label_mask=context.task == "causal-lm")
        elif init == "lora_ga":
            extra["lora_ga_config"] = LoraGAConfig()
        elif init == "corda":
            extra["corda_config"] = CordaConfig(corda_method=params["corda_method"])
        return {"r": r, "lora_alpha": params["alpha_ratio"] * r, "init_lora_weights": init, **extra}

    def attach(self, model, params, context):
        from peft.utils import get_peft_model_state_dict

        init = params["init"]
        config = self.build_config(model, params, context)
        snapshot = _BaseSnapshot(model, context.target_modules) if init in MUTATING_INITS else None
        try:
            if init == "lora_ga":
                from peft.tuners.lora.loraga import preprocess_loraga

                preprocess_loraga(model, config, train_step=lambda: _backward_on(model, context))
            elif init == "corda":
                from peft.tuners.lora.corda import preprocess_corda

                preprocess_corda(model, config, run_model=lambda: _forward_each(model, context))
            peft_model = _get_peft_model(model, config)
        except BaseException:
            if snapshot:
                snapshot.restore(model)
            raise
        peft_model._autopeft_snapshot = snapshot
        try:
            if init == "eva":
                _eva_init(peft_model, context)
            if snapshot:
                # The adapter as initialised: the export subtracts it to express the update on the original W.
                peft_model._autopeft_initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        except BaseException:
            self.detach(peft_model)
            raise
        return peft_model

    def export(self, model, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        initial = getattr(model, "_autopeft_initial", None)
        if initial:
            _convert_to_plain_lora(out_dir, initial)

    def detach(self, model):
        from autopeft.adapters import detach_peft_model

        snapshot = getattr(model, "_autopeft_snapshot", None)
        base = detach_peft_model(model)
        if snapshot:
            snapshot.restore(base)
        return base


class _BaseSnapshot:
    """The target layers' weights (kept on the CPU) and hooks, to undo what a mutating init does to them."""

    # What PEFT's LoRA-GA and CorDA preprocessing attach to the base layers (get_peft_model normally removes them).
    ATTRIBUTES = ("_peft_loraga_grad", "_peft_loraga_grad_count", "eigens", "covariance_matrix", "sample_count", "corda_method", "rank")

    def __init__(self, model, names: list[str]) -> None:
        modules = {name: model.get_submodule(name) for name in names}
        self.weights = {name: m.weight.detach().to("cpu", copy=True) for name, m in modules.items()}
        self.hooks = {name: (set(m._forward_hooks), set(m._backward_hooks)) for name, m in modules.items()}

    def restore(self, model) -> None:
        """Write the weights back bitwise and drop hooks and attributes a failed preprocessing left behind."""
        import torch

        with torch.no_grad():
            for name, weight in self.weights.items():
                module = model.get_submodule(name)
                module.weight.data.copy_(weight)
                module.weight.requires_grad_(False)
                module.weight.grad = None
                forward, backward = self.hooks[name]
                for key in set(module._forward_hooks) - forward:
                    del module._forward_hooks[key]
                for key in set(module._backward_hooks) - backward:
                    del module._backward_hooks[key]
                for attribute in self.ATTRIBUTES:
                    if attribute in module.__dict__:
                        delattr(module, attribute)


def _forward_each(model, context: AttachContext) -> None:
    """One unpadded sequence per forward pass: PEFT's CorDA hooks expect a batch of one."""
    import torch

    with torch.no_grad():
        for batch in context.calibration_batches(CALIBRATION_BATCHES):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                model(input_ids=ids[mask.bool()][None])


def _backward_on(model, context: AttachContext) -> None:
    with warnings.catch_warnings():
        # PEFT counts backward passes with full backward hooks; torch warns that the inputs need no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for batch in context.calibration_batches(CALIBRATION_BATCHES):
            model(**batch).loss.backward()


def _eva_init(peft_model, context: AttachContext) -> None:
    from peft import initialize_lora_eva_weights

    batches = list(context.calibration_batches(CALIBRATION_BATCHES))
    passes = 0

    # PEFT cycles over the batches until every SVD has converged; bound it so a trial cannot hang.
    def forward(model, inputs):
        nonlocal passes
        passes += 1
        if passes > EVA_MAX_PASSES:
            raise TrialFailed(f"EVA's incremental SVD did not converge in {EVA_MAX_PASSES} forward passes")
        return model(**inputs)

    initialize_lora_eva_weights(peft_model, dataloader=batches, forward_fn=forward, show_progress_bar=False)


def _convert_to_plain_lora(out_dir: Path, initial: dict) -> None:
    """Rewrite a saved PiSSA-style adapter as plain LoRA for the original base weights.

    ``s·B·A - s·B0·A0 = s·[B, -B0]·[A; A0]``: rank 2r with alpha doubled keeps the scaling s = alpha/r. PEFT's own
    ``path_initial_model_for_weight_conversion`` does the same but drops ``modules_to_save`` (the task head).
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    weights_file = out_dir / "adapter_model.safetensors"
    state = load_file(str(weights_file))
    for key, start in initial.items():
        if ".lora_A." in key:
            state[key] = torch.cat([state[key], start.to(state[key])], dim=0).contiguous()
        elif ".lora_B." in key:
            state[key] = torch.cat([state[key], -start.to(state[key])], dim=1).contiguous()
    save_file(state, str(weights_file), metadata={"format": "pt"})

    config = LoraConfig.from_pretrained(str(out_dir))
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= 2
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: 2 * v for k, v in (config.alpha_pattern or {}).items()}
    config.save_pretrained(str(out_dir))


class AdaLoRA(PeftVariant):
    """AdaLoRA: SVD-shaped LoRA whose rank budget shrinks from ``init_r`` to ``target_r`` per module on average.

    The schedule is given in fractions of the trial's steps so one space suits any training length: no pruning for
    the first ``tinit`` steps, a cubic budget decrease until ``total - tfinal``, a fixed allocation afterwards.

    The singular values E get their own learning rate, ``singular_lr_scale · √out_features`` times the trial's.
    With P and Q held orthonormal by the penalty, Adam moves each singular value by about the learning rate per
    step, while a LoRA factor B moves all its ``out × r`` entries by that much, changing ΔW about ``√out`` times
    faster. At one shared learning rate E stays near its zero start in a short trial, the gradient on P and Q
    (proportional to E) stays hundreds of times smaller than the penalty's, P and Q never turn towards the task,
    and the model predicts the majority class (BENCHMARKS.md, allocation section).
    """

    name = "adalora"
    size_decided_in_training = True
    summary = "LoRA as P·Λ·Q whose singular values are pruned by importance to a rank budget"
    paper = "Zhang et al., AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, arXiv:2303.10512"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "init_r": IntParam(4, 32, default=12, log=True, help="rank every module starts with"),
            "target_ratio": FloatParam(0.15, 0.75, default=0.5, help="target average rank = target_ratio × init_r"),
            "alpha_ratio": CategoricalParam((0.5, 1.0, 2.0), default=1.0, help="lora_alpha = alpha_ratio × init_r"),
            "tinit": FloatParam(0.0, 0.3, default=0.1, help="fraction of the steps trained before pruning starts"),
            "tfinal": FloatParam(0.0, 0.5, default=0.2, help="fraction of the steps trained after the ranks are fixed"),
            "delta_t": FloatParam(0.005, 0.1, default=0.02, log=True, help="fraction of the steps between two budget updates"),
            "orth_reg_weight": CategoricalParam((0.1, 0.5), default=0.5, help="weight of the orthogonality penalty on P and Q"),
            "singular_lr_scale": CategoricalParam(
                (1.0, 2.0, 4.0), default=2.0, help="the singular values E learn at singular_lr_scale × √out_features × learning_rate"
            ),
        }

    peft_type = "ADALORA"

    def config_fields(self, model, params, context):
        total = max(int(context.total_steps), 1)
        init_r = params["init_r"]
        target_r = max(1, round(params["target_ratio"] * init_r))
        tinit, tfinal = int(params["tinit"] * total), int(params["tfinal"] * total)
        # PEFT needs at least one step of budgeting between them: shorten the ends on very short trials.
        tfinal = min(tfinal, max(total - tinit - 1, 0))
        tinit = min(tinit, total - tfinal - 1)
        return {
            "init_r": init_r, "target_r": target_r, "lora_alpha": params["alpha_ratio"] * init_r, "tinit": tinit, "tfinal": tfinal,
            # PEFT adds its penalty to every loss the model returns, evaluation included, which would skew eval_loss
            # against other variants: it is added in regularizer() instead, during training only.
            "deltaT": max(1, round(params["delta_t"] * total)), "orth_reg_weight": 0.0, "total_step": total,
        }

    def attach(self, model, params, context):
        peft_model = super().attach(model, params, context)
        peft_model._autopeft_orth_reg_weight = params["orth_reg_weight"]
        peft_model._autopeft_singular_lr_scale = params["singular_lr_scale"]
        return peft_model

    def optimizer(self, model, trainable, learning_rate, weight_decay, context):
        """AdamW with each module's singular values E in a group at ``singular_lr_scale · √out_features`` times
        the learning rate (the schedule scales every group alike); P, Q and the task head at the learning rate."""
        import torch
        from peft.tuners.adalora import AdaLoraLayer

        ratios = {
            id(module.lora_E["default"]): model._autopeft_singular_lr_scale * math.sqrt(module.out_features)
            for module in model.modules()
            if isinstance(module, AdaLoraLayer) and "default" in module.lora_E
        }
        groups: dict[float, list] = {}
        for parameter in trainable:
            groups.setdefault(ratios.get(id(parameter), 1.0), []).append(parameter)
        return torch.optim.AdamW(
            [{"params": group, "lr": learning_rate * ratio} for ratio, group in groups.items()], lr=learning_rate, weight_decay=weight_decay
        )

    def regularizer(self, model, step, context):
        """PEFT's orthogonality penalty, mean over factors of ‖PᵀP - I‖_F and ‖QQᵀ - I‖_F, times its weight."""
        import torch

        norms = []
        for name, factor in model.named_parameters():
            if factor.requires_grad and (".lora_A." in name or ".lora_B." in name):
                gram = factor @ factor.T if ".lora_A." in name else factor.T @ factor
                identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                norms.append(torch.linalg.matrix_norm(gram - identity))
        return model._autopeft_orth_reg_weight * torch.stack(norms).mean() if norms else None

    def on_step(self, model, step, context):
        # After optimizer.step() and before zero_grad(): the allocator scores parameters by weight × gradient.
        model.base_model.update_and_allocate(step)


class VeRA(PeftVariant):
    name = "vera"
    summary = "frozen random A and B shared by all layers; only two scaling vectors per layer are trained"
    paper = "Kopiczko et al., VeRA: Vector-based Random Matrix Adaptation, arXiv:2310.11454"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(32, 1024, default=256, log=True, help="rank of the shared random projections"),
            "d_initial": CategoricalParam((0.01, 0.1, 1.0), default=0.1, help="initial value of the d scaling vector"),
        }

    peft_type = "VERA"

    def config_fields(self, model, params, context):
        # The shared projections are cut to each layer's size, so differently shaped targets are fine.
        return {"r": params["r"], "d_initial": params["d_initial"], "save_projection": True}


class RandLoRA(PeftVariant):
    name = "randlora"
    summary = "full-rank update as a sum of frozen random low-rank bases with trained diagonal scalings"
    paper = "Albert et al., RandLoRA: Full-rank parameter-efficient fine-tuning of large models, arXiv:2502.00987"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "target_modules": shared("target_modules"),
            "r": IntParam(4, 64, default=32, log=True, help="rank of each random basis (fewer bases, fewer parameters when larger)"),
            "alpha_ratio": CategoricalParam((5.0, 10.0, 20.0), default=20.0, help="randlora_alpha = alpha_ratio × r"),
            "sparse": CategoricalParam((False, True), default=False, help="ternary sparse random bases"),
        }

    peft_type = "RANDLORA"

    def config_fields(self, model, params, context):
        return {"r": params["r"], "randlora_alpha": params["alpha_ratio"] * params["r"], "sparse": params["sparse"], "save_projection": True}


class LoHa(PeftVariant):
    name = "loha"
    summary = "update as the Hadamard product of two low-rank products (rank up to r²)"
    paper = "Hyeon-Woo et al., FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning, arXiv:2108.06098"

    def search_space(self):
        return _lora_space(
            r=IntParam(2, 32, default=8, log=True, help="rank of each factor"),
            alpha_ratio=CategoricalParam((0.5, 1.0, 2.0), default=1.0, help="alpha = alpha_ratio × r"),
            rank_dropout=FloatParam(0.0, 0.2, default=0.0, legal=PROBABILITY, help="dropout over the rank dimension"),
        )

    peft_type = "LOHA"

    def config_fields(self, model, params, context):
        return {"r": params["r"], "alpha": params["alpha_ratio"] * params["r"], "rank_dropout": params["rank_dropout"]}


class LoKr(PeftVariant):
    name = "lokr"
    summary = "update as a Kronecker product of a small matrix and a low-rank matrix"
    paper = "Yeh et al., Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation, arXiv:2309.14859"

    def search_space(self):
        return _lora_space(
            r=IntParam(2, 32, default=8, log=True, help="rank of the low-rank Kronecker factor"),
            alpha_ratio=CategoricalParam((0.5, 1.0, 2.0), default=1.0, help="alpha = alpha_ratio × r"),
            decompose_both=CategoricalParam((False, True), default=False, help="also factor the small Kronecker factor"),
            decompose_factor=CategoricalParam((-1, 4, 8), default=-1, help="size of the small factor (-1: near square)"),
        )

    peft_type = "LOKR"

    def config_fields(self, model, params, context):
        return {
            "r": params["r"], "alpha": params["alpha_ratio"] * params["r"], "decompose_both": params["decompose_both"],
            "decompose_factor": params["decompose_factor"],
        }


class FourierFT(PeftVariant):
    name = "fourierft"
    summary = "train n spectral coefficients at fixed random frequencies; ΔW is their inverse 2-D DFT"
    paper = "Gao et al., Parameter-Efficient Fine-Tuning with Discrete Fourier Transform, arXiv:2405.03003"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "n_frequency": IntParam(64, 4096, default=1000, log=True, help="trained coefficients per module"),
            "scaling": CategoricalParam((50.0, 150.0, 300.0), default=150.0, help="scale of ΔW (like lora_alpha)"),
        }

    peft_type = "FOURIERFT"

    def config_fields(self, model, params, context):
        n = params["n_frequency"]
        small = {name: s for name, s in _shapes(model, context.target_modules).items() if s[0] * s[1] < n}
        if small:
            name, (out, inp) = next(iter(small.items()))
            raise TrialFailed(f"FourierFT n_frequency={n} exceeds the {out}x{inp}={out * inp} entries of {name}")
        return {"n_frequency": n, "scaling": params["scaling"]}


class VBLoRA(PeftVariant):
    name = "vblora"
    summary = "LoRA factors assembled from top-k mixtures of a shared bank of sub-vectors"
    paper = "Li et al., VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks, arXiv:2405.15179"

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate", default=5e-3),
            "target_modules": shared("target_modules"),
            "r": IntParam(2, 8, default=4, legal=RANK, help="rank of the update"),
            "num_vectors": IntParam(16, 512, default=128, log=True, help="vectors in the shared bank"),
            "vector_length": CategoricalParam(
                (64, 128, 256), default=256, help="upper bound: the longest length dividing every target's dimensions is used"
            ),
            "topk": CategoricalParam((2, 4), default=2, help="bank vectors mixed per sub-vector"),
        }

    peft_type = "VBLORA"

    def config_fields(self, model, params, context):
        from autopeft_plugins.peft_bridge import fit_divisor_fields

        # Sub-vectors tile every weight exactly, so their length must divide all target dimensions.
        length = fit_divisor_fields(model, context.target_modules, {"vector_length": params["vector_length"]})["vector_length"]
        if length < 4:
            dims = sorted({d for shape in _shapes(model, context.target_modules).values() for d in shape})
            raise TrialFailed(f"VB-LoRA: the targets' dimensions {dims} share no vector length above {length}")
        if params["topk"] > params["num_vectors"]:
            raise TrialFailed(f"VB-LoRA: topk={params['topk']} exceeds num_vectors={params['num_vectors']}")
        return {"r": params["r"], "num_vectors": params["num_vectors"], "vector_length": length, "topk": params["topk"]}


@hookimpl
def autopeft_variants() -> list[Variant]:
    return [RsLoRA(), DoRA(), LoRAInit(), AdaLoRA(), VeRA(), RandLoRA(), LoHa(), LoKr(), FourierFT(), VBLoRA()]
