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

from autopeft.adapters import trainable_parameters
from autopeft.data import PreparedData, batches, load_raw, prepare
from autopeft.errors import TrialFailed
from autopeft.hookspecs import AttachContext
from autopeft.models import ResolvedModel, load_base_model, load_tokenizer, pick_device, pick_dtype, resolve_model
from autopeft.placement import AdapterSite, adapter_sites, select_sites
from autopeft.plan import Plan

if TYPE_CHECKING:
    import torch

PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: list[int] | None = None
    """Predicted class per example (classification only)."""


@dataclass
class TrialOutcome:
    metrics: dict[str, float]
    """Validation metrics after the last step."""
    steps: int
    seconds: float
    trainable_params: int
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)


class StepListener:
    """Receives progress from a running trial. ``on_evaluate`` may raise ``optuna.TrialPruned`` to stop it."""

    def on_step(self, step: int, total: int, loss: float) -> None:
        """Called after every optimizer step."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """Called after every validation evaluation."""


class Workbench:
    """What one worker loads once per run and reuses across trials."""

    def __init__(self, plan: Plan, load_message: Callable[[str], None] = lambda message: None) -> None:
        import datasets
        import torch
        import transformers

        # Our own progress display replaces the libraries' bars and notices.
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        self.plan = plan
        spec = plan.spec
        load_message("resolving the model")
        self.resolved: ResolvedModel = resolve_model(spec.model, plan.registry, spec.base_dir)
        self.device = pick_device(spec.model.device)
        self.dtype = pick_dtype(spec.model.dtype, self.device)
        self.tokenizer = load_tokenizer(self.resolved, spec)
        load_message("reading and tokenizing the data")
        self.data: PreparedData = prepare(load_raw(spec, plan.registry), self.tokenizer, spec)
        load_message(f"loading {spec.model.id} ({self.resolved.origin}) on {self.device}")
        # The task head is initialised from the global RNG: seed it so every process builds the same base.
        torch.manual_seed(spec.search.seed)
        self.base_model = load_base_model(self.resolved, spec, self.data.label_names, self.tokenizer.pad_token_id, self.device, self.dtype)
        self.sites: list[AdapterSite] = adapter_sites(self.base_model)

    # ----------------------------------------------------------------------------------------------------------

    def _batches(self, examples: list[dict], batch_size: int, seed: int | None):
        import torch

        for batch in batches(examples, batch_size, self.tokenizer.pad_token_id, seed):
            yield {k: v.to(self.device) for k, v in batch.items()} if self.device != torch.device("cpu") else batch

    def context(self, params: dict[str, Any], seed: int) -> AttachContext:
        """The attach context of a trial: targets resolved from ``target_modules``, steps and a data sampler."""
        spec = self.plan.spec
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
        )

    def run_trial(
        self,
        variant_name: str,
        params: dict[str, Any],
        seed: int,
        listener: StepListener | None = None,
        save_to: Path | None = None,
    ) -> TrialOutcome:
        """Train one configuration and return its validation metrics; save the adapter to ``save_to`` if given.

        Raises :class:`TrialFailed` for a NaN loss or a configuration the model cannot take. The base model is
        restored afterwards whatever happens.
        """
        import torch
        from transformers import get_linear_schedule_with_warmup

        spec = self.plan.spec
        training = spec.training
        listener = listener or StepListener()
        variant = self.plan.registry.variant(variant_name)
        context = self.context(params, seed)
        torch.manual_seed(seed)
        started = time.perf_counter()
        model = variant.attach(self.base_model, params, context)
        try:
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not trainable:
                raise TrialFailed(f"variant {variant_name!r} left no parameter to train")
            optimizer = torch.optim.AdamW(trainable, lr=params["learning_rate"], weight_decay=training.weight_decay)
            schedule = get_linear_schedule_with_warmup(optimizer, int(training.warmup_ratio * training.max_steps), training.max_steps)
            eval_every = training.eval_every or training.max_steps
            history: list[tuple[int, dict[str, float]]] = []
            train_batches = self._batches(self.data.train, training.batch_size, seed)
            model.train()
            for step in range(1, training.max_steps + 1):
                loss = model(**next(train_batches)).loss
                penalty = variant.regularizer(model, step, context)
                if penalty is not None:
                    loss = loss + penalty
                if not torch.isfinite(loss):
                    raise TrialFailed(f"the training loss became {loss.item()} at step {step}")
                loss.backward()
                if training.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
                optimizer.step()
                variant.on_step(model, step, context)
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                listener.on_step(step, training.max_steps, loss.item())
                if step % eval_every == 0 or step == training.max_steps:
                    metrics = self.evaluate(model, self.data.validation).metrics
                    history.append((step, metrics))
                    listener.on_evaluate(step, metrics)
                    model.train()
            model.eval()
            if save_to is not None:
                variant.export(model, save_to)
            return TrialOutcome(history[-1][1], training.max_steps, time.perf_counter() - started, trainable_parameters(model), history)
        finally:
            self.base_model = variant.detach(model)
            self.base_model.eval()

    def evaluate(self, model: torch.nn.Module, examples: list[dict]) -> Evaluation:
        """Metrics of ``model`` on ``examples``: accuracy and macro-F1 (classification) or loss and perplexity."""
        import torch

        model.eval()
        classification = self.plan.spec.model.task == "sequence-classification"
        total_loss, total_count, predictions, labels = 0.0, 0, [], []
        with torch.no_grad():
            for batch in self._batches(examples, self.plan.spec.training.eval_batch_size, seed=None):
                output = model(**batch)
                if classification:
                    n = batch["labels"].numel()
                    predictions += output.logits.argmax(-1).tolist()
                    labels += batch["labels"].tolist()
                else:
                    # Models average over predicted tokens; weight by them so the mean is over the whole split.
                    n = int((batch["labels"][:, 1:] != -100).sum())
                total_loss += float(output.loss) * n
                total_count += n
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
