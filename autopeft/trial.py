"""Running one trial: attach a variant to the shared base model, train, evaluate, save, detach.

A :class:`Workbench` holds what a worker process loads once and reuses for every trial: the tokenizer, the
tokenized splits and the frozen base model. Backends (Optuna here, Ray later) call :meth:`Workbench.run_trial`
with a variant and its sampled parameters; nothing in this module knows which backend is calling.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from autopeft.adapters import strip_tuner_layers, verify_ranks
from autopeft.costs import exported_bytes, measure, peak_memory_mb, reported_sizes
from autopeft.data import PreparedData, batches, prepare_apart
from autopeft.errors import TrialFailed
from autopeft.hookspecs import AttachContext
from autopeft.models import ResolvedModel, load_base_model, load_tokenizer, pick_device, pick_dtype, quantize_base, resolve_model
from autopeft.placement import AdapterSite, adapter_sites, select_sites
from autopeft.plan import Plan
from autopeft.pruning import evaluation_steps
from autopeft.quantize import apply_adapter_bits, bake_adapter_bits, write_adapter_bits

if TYPE_CHECKING:
    import torch

PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
LOSS_READ_EVERY = 16
"""On an accelerator, steps between two reads of the training loss (each read waits for the device)."""


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: list[int] | None = None
    """Predicted class per example (classification only)."""


@dataclass
class TrialConfig:
    """Everything sampled for one trial: what the runner needs to train it (again)."""

    variant: str
    params: dict[str, Any]
    """The variant's parameters, bare names (``learning_rate``, ``r``, ...)."""
    ranks: dict[str, int] | None = None
    """A rank per module from the outer allocation search, or None."""
    bits: dict[str, int] = field(default_factory=dict)
    """Adapter weight bits per module (absent: full precision)."""
    base_bits: int = 16
    """Bits of the frozen base model's block weights (16: not quantized)."""

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "params": self.params, "ranks": self.ranks, "bits": self.bits, "base_bits": self.base_bits}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialConfig:
        return cls(data["variant"], data["params"], data.get("ranks"), data.get("bits") or {}, data.get("base_bits", 16))


@dataclass
class TrialOutcome:
    metrics: dict[str, float]
    """Validation metrics after the last step."""
    costs: dict[str, float]
    """Cost measures (see :mod:`autopeft.costs`), ``train_seconds`` included."""
    steps: int
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


class StepListener:
    """Receives progress from a running trial. ``on_evaluate`` may raise ``optuna.TrialPruned`` to stop it."""

    def on_attach(self, costs: dict[str, float]) -> None:
        """Called once the adapter is attached, with the costs known before training (size, bit operations)."""

    def on_step(self, step: int, total: int, loss: float) -> None:
        """Called after every optimizer step."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """Called after every validation evaluation."""


class Workbench:
    """What one worker loads once per run and reuses across trials."""

    def __init__(self, plan: Plan, load_message: Callable[[str], None] = lambda message: None) -> None:
        import torch
        import transformers

        # Our own progress display replaces the libraries' bars and notices.
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        self.plan = plan
        spec = plan.spec
        if spec.training.threads is not None:
            torch.set_num_threads(spec.training.threads)
        load_message("resolving the model")
        self.resolved: ResolvedModel = resolve_model(spec.model, plan.registry, spec.base_dir)
        self.device = pick_device(spec.model.device)
        self.dtype = pick_dtype(spec.model.dtype, self.device)
        self.tokenizer = load_tokenizer(self.resolved, spec)
        load_message("reading and tokenizing the data")
        self.data: PreparedData = prepare_apart(spec, plan.registry, self.tokenizer)
        load_message(f"loading {spec.model.id} ({self.resolved.origin}) on {self.device}")
        # The task head is initialised from the global RNG: seed it so every process builds the same base.
        torch.manual_seed(spec.search.seed)
        self.base_model = load_base_model(self.resolved, spec, self.data.label_names, self.tokenizer.pad_token_id, self.device, self.dtype)
        self.sites: list[AdapterSite] = adapter_sites(self.base_model)
        self._quantized_bases: dict[int, torch.nn.Module] = {}

    def base_for(self, bits: int) -> torch.nn.Module:
        """The base model at ``bits`` (16: the loaded model; fewer: a quantized copy, made once and kept)."""
        if bits >= 16:
            return self.base_model
        if bits not in self._quantized_bases:
            self._quantized_bases[bits] = quantize_base(self.base_model, bits)
        return self._quantized_bases[bits]

    def put_back(self, bits: int, model: torch.nn.Module) -> None:
        """Keep ``model`` (a detached base) as the base at ``bits`` for the next trial."""
        if bits >= 16:
            self.base_model = model
        else:
            self._quantized_bases[bits] = model

    # ----------------------------------------------------------------------------------------------------------

    def _batches(self, examples: list[dict], batch_size: int, seed: int | None):
        import torch

        for batch in batches(examples, batch_size, self.tokenizer.pad_token_id, seed):
            yield {k: v.to(self.device) for k, v in batch.items()} if self.device != torch.device("cpu") else batch

    def context(self, config: TrialConfig, seed: int) -> AttachContext:
        """The attach context of a trial: targets (from the allocation or ``target_modules``), steps, data."""
        spec = self.plan.spec
        params = config.params
        if config.ranks is not None:
            targets = [name for name, rank in config.ranks.items() if rank > 0]
            if not targets:
                raise TrialFailed("the allocation gave every module rank 0: no adapter to train")
        else:
            try:
                targets = [s.name for s in select_sites(self.sites, params.get("target_modules", "q,v"))]
            except ValueError as exc:
                raise TrialFailed(f"target_modules={params.get('target_modules')!r}: {exc}") from None

        def calibration_batches(n: int):
            iterator = self._batches(self.data.train, spec.training.batch_size, seed)
            return (next(iterator) for _ in range(n))

        return AttachContext(
            task=spec.model.task,
            peft_task_type=PEFT_TASK_TYPES[spec.model.task],
            target_modules=targets,
            total_steps=spec.training.max_steps,
            seed=seed,
            calibration_batches=calibration_batches,
            ranks=config.ranks,
        )

    def run_trial(
        self,
        config: TrialConfig,
        seed: int,
        listener: StepListener | None = None,
        save_to: Path | None = None,
    ) -> TrialOutcome:
        """Train one configuration and return its validation metrics and costs; save the adapter to ``save_to``.

        Raises :class:`TrialFailed` for a NaN loss or a configuration the model cannot take. The base model is
        restored afterwards whatever happens.
        """
        import torch
        from transformers import get_linear_schedule_with_warmup

        spec = self.plan.spec
        training = spec.training
        listener = listener or StepListener()
        variant = self.plan.registry.variant(config.variant)
        params = config.params
        context = self.context(config, seed)
        base = self.base_for(config.base_bits)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        torch.manual_seed(seed)
        started = time.perf_counter()
        try:
            model = variant.attach(base, params, context)
        except BaseException:
            self.put_back(config.base_bits, strip_tuner_layers(base))
            raise
        try:
            if config.ranks is not None:
                try:
                    verify_ranks(model, config.ranks)
                except ValueError as exc:
                    raise TrialFailed(f"variant {config.variant!r} did not apply the per-module ranks: {exc}") from None
            if config.bits:
                apply_adapter_bits(model, {f"base_model.model.{name}": b for name, b in config.bits.items()})
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not trainable:
                raise TrialFailed(f"variant {config.variant!r} left no parameter to train")
            listener.on_attach(self._attach_costs(variant, model, config))
            optimizer = variant.optimizer(model, trainable, params["learning_rate"], training.weight_decay, context)
            if optimizer is None:
                optimizer = torch.optim.AdamW(trainable, lr=params["learning_rate"], weight_decay=training.weight_decay)
            schedule = get_linear_schedule_with_warmup(optimizer, int(training.warmup_ratio * training.max_steps), training.max_steps)
            evaluate_at = set(evaluation_steps(training, self.plan.spec.search.pruner))
            history: list[tuple[int, dict[str, float]]] = []
            train_batches = self._batches(self.data.train, training.batch_size, seed)
            model.train()
            # Reading the loss makes the host wait for an accelerator: there it is read every LOSS_READ_EVERY
            # steps (to show it and to stop on a non-finite value) rather than every step.
            read_every = 1 if self.device.type == "cpu" else LOSS_READ_EVERY
            for step in range(1, training.max_steps + 1):
                loss = model(**next(train_batches)).loss
                penalty = variant.regularizer(model, step, context)
                if penalty is not None:
                    loss = loss + penalty
                read_loss = step % read_every == 0 or step in evaluate_at
                if read_loss and not math.isfinite(loss_value := loss.item()):
                    raise TrialFailed(f"the training loss became {loss_value} at step {step}")
                loss.backward()
                if training.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
                optimizer.step()
                variant.on_step(model, step, context)
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if read_loss:
                    listener.on_step(step, training.max_steps, loss_value)
                if step in evaluate_at:
                    metrics = self.evaluate(model, self.data.validation).metrics
                    history.append((step, metrics))
                    listener.on_evaluate(step, metrics)
                    model.train()
            model.eval()
            seconds = time.perf_counter() - started
            baked_bits = bake_adapter_bits(model)
            reported = reported_sizes(variant, model)
            costs = measure(model, self.sites, baked_bits, config.base_bits, self.dtype, reported)
            costs.update(peak_memory_mb=peak_memory_mb(self.device), train_seconds=seconds)
            if save_to is not None:
                variant.export(model, save_to)
                write_adapter_bits(baked_bits, save_to)
                if "adapter_bytes" not in reported:
                    # What is stored may differ from what trained (frozen bases materialised, inits converted).
                    costs["adapter_bytes"] = exported_bytes(save_to, baked_bits)
            return TrialOutcome(history[-1][1], costs, training.max_steps, history)
        finally:
            restored = variant.detach(model)
            restored.eval()
            self.put_back(config.base_bits, restored)

    def _attach_costs(self, variant, model: torch.nn.Module, config: TrialConfig) -> dict[str, float]:
        """Costs known before training. When a constraint bounds ``adapter_bytes``, the adapter is exported once
        to a temporary folder and measured there: variants that convert on export (frozen bases materialised as
        plain LoRA) store more than they train, and a size constraint must judge what will be stored. Sizes the
        variant reports (:meth:`Variant.sizes`) are taken as they are."""
        import tempfile

        reported = reported_sizes(variant, model)
        costs = measure(model, self.sites, config.bits, config.base_bits, self.dtype, reported)
        if "adapter_bytes" not in reported and any(name == "adapter_bytes" for name, _, _ in self.plan.spec.constraints()):
            with tempfile.TemporaryDirectory(prefix="autopeft-size-") as folder:
                variant.export(model, Path(folder))
                costs["adapter_bytes"] = exported_bytes(Path(folder), config.bits)
        return costs

    def evaluate(self, model: torch.nn.Module, examples: list[dict]) -> Evaluation:
        """Metrics of ``model`` on ``examples``: accuracy and macro-F1 (classification) or loss and perplexity."""
        import torch

        model.eval()
        classification = self.plan.spec.model.task == "sequence-classification"
        total_loss, total_count, predictions, labels = 0.0, 0, [], []
        with torch.no_grad():
            for batch in self._batches(examples, self.plan.spec.training.eval_batch_size, seed=None):
                # The loss is computed here, not by the model: some adapters (AdaLoRA loaded for inference)
                # add training-only terms when given labels, and a sum over the split is exact.
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                targets = batch["labels"]
                if classification:
                    predictions += logits.argmax(-1).tolist()
                    labels += targets.tolist()
                else:
                    logits, targets = logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten()
                total_loss += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
                total_count += int((targets != -100).sum())
        eval_loss = total_loss / max(total_count, 1)
        if not classification:
            return Evaluation({"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))})
        accuracy = sum(p == t for p, t in zip(predictions, labels)) / max(len(labels), 1)
        return Evaluation({"accuracy": accuracy, "macro_f1": macro_f1(labels, predictions), "eval_loss": eval_loss}, predictions)


def macro_f1(labels: list[int], predictions: list[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    classes = set(labels) | set(predictions)
    scores = []
    for c in classes:
        tp = sum(1 for t, p in zip(labels, predictions) if t == c and p == c)
        fp = sum(1 for t, p in zip(labels, predictions) if t != c and p == c)
        fn = sum(1 for t, p in zip(labels, predictions) if t == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)
