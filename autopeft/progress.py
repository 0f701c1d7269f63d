"""Live progress of a search on the terminal (trials and steps), and the closing table of the best trials.

Everything here fits an 80-column terminal: the bars have fixed widths and the status text gets the rest,
cut with an ellipsis rather than squeezing the numbers a user watches (the loss, the metric).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from autopeft.trial import StepListener

if TYPE_CHECKING:
    import optuna

    from autopeft.spec import Spec

# Sampled allocation parameters are ``rank.<group>`` and ``bits.<group>`` (autopeft.allocation), where a group is
# ``<role>``, ``<role>.b<band>`` or ``<role>.l<layer>``.
ALLOCATION_KINDS = ("rank", "bits")
GROUP_PARTS = {"b": "band", "l": "layer"}


def param_label(key: str) -> str:
    """A short, unambiguous label for a sampled parameter: ``lr``, ``r``, ``rank[q,band0]``, ``bits[v,layer3]``."""
    if key == "learning_rate":
        return "lr"
    kind, _, group = key.partition(".")
    if kind in ALLOCATION_KINDS and group:
        role, _, part = group.partition(".")
        where = [role] + ([GROUP_PARTS.get(part[:1], part[:1]) + part[1:]] if part else [])
        return f"{kind}[{','.join(where)}]"
    return key.rpartition(".")[2]


def describe_params(params: dict[str, Any]) -> str:
    """``lr=1.20e-03 r=8 rank[q,band0]=8 bits[q,band0]=4``: a one-line summary of a configuration."""
    parts = []
    for key, value in params.items():
        if isinstance(value, float):
            text = f"{value:.2e}" if key == "learning_rate" else f"{value:.3g}"
        else:
            text = str(value)
        parts.append(f"{param_label(key)}={text}")
    return " ".join(parts)


class SearchProgress(StepListener):
    """Two bars (trials of the search, steps of the running trial) and a log line per trial.

    Give it a ``Console(log_path=False)``: log lines then carry a time and no source location.

    While the model loads, the trials bar shows what is being loaded; the first trial clears it. Status texts are
    cut to the space an 80-column terminal leaves, never the bars' numbers.
    """

    def __init__(self, console: Console, n_trials: int | None, finished: int, metric: str) -> None:
        self.console = console
        self.metric = metric
        self.loading = False
        self.progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(width=9, no_wrap=True)),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            # The only column that may shrink: a long status is cut, the numbers before it are not.
            TextColumn("{task.fields[status]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=10)),
            console=console,
            expand=True,
        )
        self.trials = self.progress.add_task("trials", total=n_trials, completed=finished, status="")
        self.steps = self.progress.add_task("steps", total=1, visible=False, status="")

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def message(self, text: str) -> None:
        """Show what is being loaded (until the first trial starts)."""
        self.loading = True
        self.progress.update(self.trials, status=escape(text))

    def start_trial(self, number: int, variant: str, params: dict[str, Any]) -> None:
        if self.loading:  # loading is done once a trial starts: a stale "loading ..." must not stay on screen
            self.loading = False
            self.progress.update(self.trials, status="")
        self.progress.reset(self.steps, total=1, visible=True, description=f"trial {number}", status="")
        self.console.log(f"trial {number} started: {variant} {escape(describe_params(params))}")

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.progress.update(self.steps, total=total, completed=step, status=f"loss {loss:.4f}")

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.update(self.steps, status=f"{self.metric} {metrics[self.metric]:.4f} @{step}")

    def end_trial(self, number: int, outcome: str, best: str) -> None:
        self.progress.update(self.steps, visible=False)
        self.progress.advance(self.trials)
        self.progress.update(self.trials, status=best)
        self.console.log(f"trial {number} {outcome}")


def best_trials_table(study: optuna.Study, spec: Spec, limit: int = 5) -> Table:
    """The complete trials, the one ``best/`` holds first (chosen by :func:`autopeft.objectives.select_best`),
    then the others by validation metric; a trial that breaks a constraint is marked and listed last."""
    import optuna

    from autopeft.objectives import measured, select_best, violations

    metric, direction = spec.objectives()[0]
    sign = -1.0 if direction == "maximize" else 1.0
    chosen = select_best(study, spec)
    trials = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if metric in measured(t, spec)]
    broken = {t.number: violations(spec, measured(t, spec)) for t in trials}
    trials.sort(key=lambda t: (t.number != chosen, bool(broken[t.number]), sign * measured(t, spec)[metric], t.number))

    table = Table(title=f"best trials by validation {metric}", caption="best/ holds the first row" if chosen is not None else "no trial meets the constraints")
    for column in ("trial", "variant", metric, "params", "s", "note", "parameters"):
        table.add_column(column, justify="right" if column in ("trial", metric, "params", "s") else "left", overflow="fold")
    for trial in trials[:limit]:
        values = measured(trial, spec)
        seconds = trial.duration.total_seconds() if trial.duration else None
        note = "[red]violates " + escape("; ".join(broken[trial.number])) + "[/]" if broken[trial.number] else "[green]best/[/]" if trial.number == chosen else ""
        table.add_row(
            str(trial.number),
            str(trial.user_attrs.get("variant", "")),
            f"{values[metric]:.4f}",
            f"{trial.user_attrs['trainable_params']:,}" if trial.user_attrs.get("trainable_params") else "",
            f"{seconds:.0f}" if seconds is not None else "",
            note,
            escape(describe_params({k: v for k, v in trial.params.items() if k != "variant"})),
            style="red" if broken[trial.number] else "bold" if trial.number == chosen else None,
        )
    return table
