"""Live progress of a search on the terminal (trials and steps), and the closing table of the best trials."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from autopeft.trial import StepListener


def describe_params(params: dict[str, Any]) -> str:
    """``lr=1.2e-03 r=8 ...``: a short one-line summary of a configuration."""
    parts = []
    for key, value in params.items():
        short = "lr" if key == "learning_rate" else key.rpartition(".")[2]
        parts.append(f"{short}={value:.2e}" if isinstance(value, float) and key == "learning_rate" else f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)


class SearchProgress(StepListener):
    """Two bars (trials of the search, steps of the running trial) and a log line per finished trial."""

    def __init__(self, console: Console, n_trials: int, finished: int, metric: str) -> None:
        self.console = console
        self.metric = metric
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.trials = self.progress.add_task("trials", total=n_trials, completed=finished, status="")
        self.steps = self.progress.add_task("steps", total=1, visible=False, status="")

    def __enter__(self) -> SearchProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def message(self, text: str) -> None:
        self.progress.update(self.trials, status=text)

    def start_trial(self, number: int, variant: str, params: dict[str, Any]) -> None:
        self.progress.reset(self.steps, total=1, visible=True, description=f"trial {number}", status="")
        self.console.log(f"trial {number} started: {variant} {describe_params(params)}")

    def on_step(self, step: int, total: int, loss: float) -> None:
        self.progress.update(self.steps, total=total, completed=step, status=f"loss {loss:.4f}")

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.update(self.steps, status=f"step {step}: {self.metric} {metrics[self.metric]:.4f}")

    def end_trial(self, number: int, outcome: str, best: str) -> None:
        self.progress.update(self.steps, visible=False)
        self.progress.advance(self.trials)
        self.progress.update(self.trials, status=best)
        self.console.log(f"trial {number} {outcome}")


def best_trials_table(rows: list[dict[str, Any]], metric: str, direction: str, limit: int = 5) -> Table:
    """The finished trials ranked by the objective metric, best first."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get(f"val_{metric}") is not None]
    done.sort(key=lambda r: r[f"val_{metric}"], reverse=direction == "maximize")
    table = Table(title=f"best trials by validation {metric}")
    for column in ("trial", "variant", metric, "trainable params", "seconds", "parameters"):
        table.add_column(column, justify="right" if column not in ("variant", "parameters") else "left")
    for row in done[:limit]:
        params = {k.removeprefix("param_"): v for k, v in row.items() if k.startswith("param_") and k != "param_variant"}
        table.add_row(
            str(row["number"]),
            str(row.get("variant", "")),
            f"{row[f'val_{metric}']:.4f}",
            f"{row['trainable_params']:,}" if row.get("trainable_params") else "",
            f"{row['seconds']:.0f}" if row.get("seconds") is not None else "",
            describe_params(params),
        )
    return table
