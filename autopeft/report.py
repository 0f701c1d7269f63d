"""The run report: ``RUN_DIR/report.html``, with its figures as PNG files in ``RUN_DIR/report/``.

The page is self-contained: styles are inline and figures are embedded as ``data:`` URIs, so it opens offline,
from an e-mail attachment or an artifact store, exactly as it was written. Everything comes from the run folder
(the study, ``spec.yaml`` and ``best/autopeft.json``); no model is loaded. A figure that cannot be drawn yet (too
few trials, no intermediate values, ...) is replaced by a note saying why, so a report can be written at any
point of a run.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from autopeft.costs import COST_NAMES
from autopeft.progress import param_label
from autopeft.rundir import RunDir, trial_rows
from autopeft.status import Objective, best_trials, format_params, format_value, objectives, read_study, trial_counts

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

    from autopeft.spec import Spec

REPORT_FILE = "report.html"
FIGURES_DIR = "report"
OTHER_ROLE = "other"


@dataclass
class Section:
    id: str
    title: str
    intro: str = ""
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (PNG file, caption)
    notes: list[str] = field(default_factory=list)
    body: str = ""  # extra HTML: tables


def write_report(run_dir: RunDir) -> Path:
    """Write ``report.html`` and its figures for the run in ``run_dir``; return the path of the page.

    Safe to call while a search is writing to the study, and at any stage of a run: sections that cannot be
    drawn yet say why. Raises :class:`~autopeft.errors.RunDirError` when the folder is not a run.
    """
    spec = run_dir.load_spec()
    study = read_study(run_dir)
    goals = objectives(study, spec)
    info = _best_info(run_dir)
    figures = run_dir.path / FIGURES_DIR
    figures.mkdir(exist_ok=True)
    for stale in figures.glob("*.png"):  # a figure that cannot be drawn this time must not linger from last time
        stale.unlink()

    sections = [_summary(run_dir, spec, study, goals, info)]
    for section_id, title, build in (
        ("history", "Optimisation history", lambda s: _history(s, study, goals, figures)),
        ("pareto", "Pareto front", lambda s: _pareto(s, study, goals, figures, spec)),
        ("importances", "Parameter importances", lambda s: _importances(s, study, goals, figures)),
        ("intermediate", "Intermediate values and pruning", lambda s: _intermediate(s, study, figures)),
        ("modules", "Ranks per module of the best adapter", lambda s: _modules(s, info, figures)),
    ):
        section = Section(section_id, title)
        try:
            build(section)
        except Exception as exc:  # one figure that fails must not cost the user the rest of the report
            section.notes.append(f"This figure could not be drawn: {type(exc).__name__}: {exc}")
        sections.append(section)
    sections.append(_trials_table(study, goals, spec))

    path = run_dir.path / REPORT_FILE
    temporary = path.with_suffix(".html.tmp")
    temporary.write_text(_page(run_dir, spec, sections), encoding="utf-8")
    temporary.replace(path)  # a reader (or a browser reloading) never sees a half-written page
    return path


def _best_info(run_dir: RunDir) -> dict[str, Any] | None:
    path = run_dir.best / "autopeft.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------


def _draw(path: Path, plot: Callable[[], Axes | MplFigure]) -> Path:
    """Run ``plot`` (which draws one figure with pyplot) and save that figure as a PNG at ``path``."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        # Headless by default; a process that already chose a backend (a notebook) keeps it.
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Optuna's plots switch the global style to ggplot; keep that change inside this figure.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning on every matplotlib plot
        drawn = plot()
        figure = drawn if hasattr(drawn, "savefig") else drawn.figure
        try:
            figure.savefig(path, dpi=110, bbox_inches="tight")
        finally:
            plt.close(figure)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "objective"


def _target(goals: list[Objective], index: int) -> Callable[[optuna.trial.FrozenTrial], float] | None:
    # Optuna's plots take a study's single objective as is, and need a target to pick one of several.
    return None if len(goals) == 1 else (lambda trial: trial.values[index])


def _history(section: Section, study: optuna.Study, goals: list[Objective], folder: Path) -> None:
    from optuna.visualization.matplotlib import plot_optimization_history

    if not _complete(study):
        section.notes.append("No trial has completed yet.")
        return
    for index, goal in enumerate(goals):
        name = "history.png" if len(goals) == 1 else f"history-{_slug(goal.name)}.png"
        png = _draw(folder / name, lambda: _integer_x(plot_optimization_history(study, target=_target(goals, index), target_name=goal.name)))
        best_line = "; the line is the best so far" if len(goals) == 1 else ""
        section.figures.append((png, f"{objective_label(goal).capitalize()} of each complete trial, in the order the trials ran{best_line}."))


def _integer_x(ax: Axes) -> Axes:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers, not 0.25 of a trial
    return ax


def objective_label(goal: Objective) -> str:
    """How an objective reads on an axis: ``validation accuracy (maximize)``, ``trainable params (minimize)``."""
    return f"{_objective_name(goal.name)} ({goal.direction})"


def _objective_name(name: str) -> str:
    # Costs are measured on the adapter, not on the validation split; only the task metric is a validation score.
    return name.replace("_", " ") if name in COST_NAMES else f"validation {name}"


def _pareto(section: Section, study: optuna.Study, goals: list[Objective], folder: Path, spec: Spec) -> None:
    """The task metric against each cost; the front highlighted and the trial in ``best/`` marked as chosen.

    With one objective the cost is the number of trainable parameters, and the front is the trials no smaller
    trial beats.
    """
    from autopeft.objectives import measured, pareto_front, select_best

    metric = goals[0]
    if len(goals) > 1:
        costs = goals[1:]
        values = {t.number: measured(t, spec) for t in _complete(study)}
        front = pareto_front(study, spec)
    else:
        costs = [Objective("trainable_params", "minimize")]
        values = {t.number: {metric.name: t.value, "trainable_params": t.user_attrs["trainable_params"]} for t in _complete(study) if t.user_attrs.get("trainable_params")}
        front = [n for _, _, n in _size_front([(v["trainable_params"], v[metric.name], n) for n, v in values.items()], metric.direction)]
    if not values:
        section.notes.append("No trial has completed yet." if len(goals) > 1 else "No complete trial has recorded its number of trainable parameters yet.")
        return
    chosen = select_best(study, spec)
    png = _draw(folder / "pareto.png", lambda: plot_front(values, metric, costs, front, chosen))
    against = " and ".join(objective_label(c) for c in costs)
    marked = f" The star is trial {chosen}, the one chosen for best/ (search.select: {spec.search.select.rule})." if chosen is not None else " No trial meets the constraints, so none is chosen."
    section.figures.append((png, f"{objective_label(metric).capitalize()} of each complete trial against {against}. "
                                 f"The Pareto front (trials {', '.join(map(str, front)) or 'none'}) is highlighted: no other trial is at least as good on every objective and better on one.{marked}"))


def _size_front(points: list[tuple[int, float, int]], direction: str) -> list[tuple[int, float, int]]:
    """The trials no trial at most as large scores better than: smallest first."""
    sign = 1 if direction == "maximize" else -1
    front: list[tuple[int, float, int]] = []
    for size, value, number in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * value > sign * front[-1][1]:
            front.append((size, value, number))
    return front


def plot_front(values: dict[int, dict[str, float]], metric: Objective, costs: list[Objective], front: list[int], chosen: int | None) -> MplFigure:
    """One panel per cost: the metric of each trial (``{number: {objective: value}}``) against that cost, the
    front joined, and the chosen trial starred."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(costs), figsize=(7 * len(costs), 4.2), squeeze=False)
    for ax, cost in zip(axes[0], costs):
        numbers = [n for n in values if cost.name in values[n] and metric.name in values[n]]
        xs, ys = [values[n][cost.name] for n in numbers], [values[n][metric.name] for n in numbers]
        ax.scatter(xs, ys, color="#9aa5b1", label="trial", zorder=2)
        on_front = sorted((values[n][cost.name], values[n][metric.name]) for n in front if n in numbers)
        style = "-o" if len(costs) == 1 else "o"  # with several costs a panel shows a projection: no line
        ax.plot([x for x, _ in on_front], [y for _, y in on_front], style, color="#2f6fde", label="Pareto front", zorder=3)
        for number, x, y in zip(numbers, xs, ys):
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color="#333333")
        if chosen in numbers:
            ax.scatter([values[chosen][cost.name]], [values[chosen][metric.name]], marker="*", s=260, color="#f2a900", edgecolor="#333333", label=f"chosen: trial {chosen} (best/)", zorder=4)
        if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(objective_label(cost))
        ax.set_ylabel(objective_label(metric))
        ax.set_title(f"{_objective_name(metric.name)} against {_objective_name(cost.name)}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return figure


def _importances(section: Section, study: optuna.Study, goals: list[Objective], folder: Path) -> None:
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    complete = _complete(study)
    if len(complete) < 2:
        section.notes.append(f"Parameter importances need at least two complete trials; this run has {len(complete)}.")
        return
    varying = sorted(name for name in {n for t in complete for n in t.params} if len({repr(t.params.get(name)) for t in complete}) > 1)
    if not varying:
        section.notes.append("Parameter importances need parameters that vary: every complete trial used the same values.")
        return
    goal = goals[0]
    # PED-ANOVA needs no scikit-learn (Optuna's default evaluator, fANOVA, does).
    png = _draw(folder / "importances.png", lambda: plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target=_target(goals, 0), target_name=goal.name))
    rough = " With this few trials they are rough guides only." if len(complete) < 10 else ""
    section.figures.append((png, f"How much each parameter accounts for the spread of validation {goal.name} across the {len(complete)} complete trials (PED-ANOVA).{rough}"))


def _intermediate(section: Section, study: optuna.Study, folder: Path) -> None:
    import optuna
    from optuna.visualization.matplotlib import plot_intermediate_values

    trials = study.get_trials(deepcopy=False)
    pruned = sorted(t.number for t in trials if t.state == optuna.trial.TrialState.PRUNED)
    if any(t.user_attrs.get("rungs") for t in trials):
        # Multi-objective studies cannot report to Optuna; their rungs (metric first) are in a user attribute.
        png = _draw(folder / "intermediate.png", lambda: _mark_pruned(_plot_rungs(trials), set(pruned)))
    elif any(t.intermediate_values for t in trials):
        png = _draw(folder / "intermediate.png", lambda: _mark_pruned(plot_intermediate_values(study), set(pruned)))
    else:
        section.notes.append("No trial has reported intermediate values: trials report them at every evaluation (training.eval_every).")
        return
    marked = f"Pruned trials ({', '.join(map(str, pruned))}) are red, dashed, and end in a cross where they were stopped." if pruned else "No trial was pruned."
    section.figures.append((png, f"The value each trial reported while training, by step. {marked}"))


def _plot_rungs(trials: list[optuna.trial.FrozenTrial]) -> Axes:
    """The metric each trial had at each rung, drawn like Optuna's intermediate-values plot."""
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    for trial in trials:
        rungs = sorted((int(step), point[0]) for step, point in trial.user_attrs.get("rungs", {}).items())
        if rungs:
            ax.plot([s for s, _ in rungs], [v for _, v in rungs], marker="o", label=f"Trial{trial.number}")
    ax.set_title("Intermediate Values Plot")
    ax.set_xlabel("Step")
    ax.set_ylabel("Intermediate Value")
    return ax


def _mark_pruned(ax: Axes, pruned: set[int]) -> Axes:
    """Draw the curves of pruned trials red and dashed, with a cross where each was stopped."""
    for line in list(ax.get_lines()):
        match = re.fullmatch(r"Trial\s*(\d+)", str(line.get_label()))
        if match and int(match.group(1)) in pruned:
            line.set_linestyle("--")
            line.set_color("#d62728")
            line.set_alpha(0.8)
            line.set_label(f"Trial{match.group(1)} (pruned)")
            xs, ys = line.get_data()
            ax.plot([xs[-1]], [ys[-1]], marker="X", markersize=10, color="#d62728", linestyle="none", label="_nolegend_")
    ax.legend(bbox_to_anchor=(1.05, 1), loc="upper left", borderaxespad=0.0)
    return ax


def _modules(section: Section, info: dict[str, Any] | None, folder: Path) -> None:
    if info is None:
        section.notes.append("There is no exported adapter yet (best/autopeft.json); the heat map shows its ranks once it exists.")
        return
    modules = info.get("modules") or []
    if not modules:
        section.notes.append("best/autopeft.json does not list per-module ranks for this adapter.")
        return
    has_bits = any(m.get("bits") is not None for m in modules)
    png = _draw(folder / "modules.png", lambda: _plot_modules(modules, has_bits))
    adapted = [m for m in modules if m.get("rank")]
    bits = " The right panel shows the bits each module is stored with." if has_bits else ""
    section.figures.append((png, f"Rank of each adapted module of the best adapter (trial {info.get('trial', '?')}) by layer and role: "
                                 f"{len(adapted)} of {len(modules)} modules adapted, total rank {sum(m['rank'] for m in adapted)}. "
                                 f"Grey cells have no adapter; a cell holding several modules shows the largest value.{bits}"))


def _module_grid(modules: list[dict[str, Any]], key: str) -> tuple[list[Any], list[str], list[list[float]]]:
    """Rows (layers), columns (roles) and the largest ``key`` value of the modules in each cell (NaN: none)."""
    from autopeft.placement import ROLES

    layers = sorted({m.get("layer") for m in modules}, key=lambda layer: (layer is None, layer if layer is not None else 0))
    present = {m.get("role") or OTHER_ROLE for m in modules}
    roles = [r for r in (*ROLES, OTHER_ROLE) if r in present] + sorted(present - set(ROLES) - {OTHER_ROLE})
    grid = [[math.nan] * len(roles) for _ in layers]
    for m in modules:
        value = m.get(key)
        if value is None:
            continue
        row, column = layers.index(m.get("layer")), roles.index(m.get("role") or OTHER_ROLE)
        grid[row][column] = value if math.isnan(grid[row][column]) else max(grid[row][column], value)
    return layers, roles, grid


def _plot_modules(modules: list[dict[str, Any]], has_bits: bool) -> MplFigure:
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("rank", "rank", "viridis")] + ([("bits", "bits", "magma")] if has_bits else [])
    layers, roles, _ = _module_grid(modules, "rank")
    height = max(2.8, 0.38 * len(layers) + 1.6)
    figure, axes = plt.subplots(1, len(panels), figsize=(max(4.2, 0.75 * len(roles) + 2.2) * len(panels), height), squeeze=False)
    for ax, (key, title, colours) in zip(axes[0], panels):
        _, _, grid = _module_grid(modules, key)
        values = np.array(grid, dtype=float)
        # A rank of 0 means "no adapter here": grey, like a module that is not listed.
        masked = np.ma.masked_where(~np.isfinite(values) | ((values == 0) if key == "rank" else False), values)
        cmap = plt.get_cmap(colours).copy()
        cmap.set_bad("#e6e6e6")
        image = ax.imshow(masked, cmap=cmap, aspect="auto", vmin=0 if key == "rank" else None)
        for (row, column), value in np.ndenumerate(values):
            if np.isfinite(value) and not (key == "rank" and value == 0):
                shade = image.norm(value) if image.norm.vmax != image.norm.vmin else 0.5
                ax.text(column, row, f"{value:g}", ha="center", va="center", fontsize=8, color="black" if shade > 0.6 else "white")
        ax.set_xticks(range(len(roles)), roles)
        ax.set_yticks(range(len(layers)), [f"layer {layer}" if layer is not None else "no layer" for layer in layers])
        ax.set_xlabel("module role")
        ax.set_title(f"{title} per module")
        figure.colorbar(image, ax=ax, shrink=0.8, label=title)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def _summary(run_dir: RunDir, spec: Spec, study: optuna.Study, goals: list[Objective], info: dict[str, Any] | None) -> Section:
    counts = trial_counts(study)
    finished = counts["complete"] + counts["pruned"] + counts["failed"]
    source = spec.data.source if isinstance(spec.data.source, str) else ", ".join(f"{k}: {v}" for k, v in spec.data.source.items())
    facts = [
        ("Run folder", str(run_dir.path.resolve())),
        ("Model", f"{spec.model.id} ({spec.model.task})"),
        ("Data", source),
        ("Variants", ", ".join(spec.search.variants) + (f" (preset {spec.search.preset})" if spec.search.preset else "")),
        ("Search", f"{spec.search.sampler} sampler, seed {spec.search.seed}; {spec.training.max_steps} training steps per trial"),
        ("Objectives" if len(goals) > 1 else "Objective", ", ".join(f"{g.direction} {_objective_name(g.name)}" for g in goals)),
        ("Trials", f"{finished} of {spec.search.n_trials} finished: {counts['complete']} complete, {counts['pruned']} pruned, "
                   f"{counts['failed']} failed; {counts['running']} running, {counts['waiting']} waiting"
                   + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")),
    ]
    body = _definition_list(facts) + _best_block(study, goals, spec) + _exported_block(info)
    return Section("summary", "Summary", body=body)


def _best_block(study: optuna.Study, goals: list[Objective], spec: Spec) -> str:
    best = best_trials(study, spec)
    if not best:
        return "<h3>Best trial</h3><p class='note'>No trial has completed yet.</p>"
    if len(goals) == 1:
        trial = best[0]
        rows = [("trial", str(trial.number)), ("variant", trial.user_attrs.get("variant", ""))]
        rows += [(name, format_value(value)) for name, value in trial.params.items() if name != "variant"]
        rows += [(f"validation {name}", format_value(value)) for name, value in trial.user_attrs.get("metrics", {}).items()]
        if trial.user_attrs.get("trainable_params") is not None:
            rows.append(("trainable parameters", format_value(trial.user_attrs["trainable_params"])))
        return "<h3>Best trial</h3>" + _table(["", ""], rows, show_header=False)
    header = ["trial", *[f"{g.name} ({g.direction})" for g in goals], "variant", "parameters"]
    rows = [(str(t.number), *[format_value(v) for v in t.values], t.user_attrs.get("variant", ""), format_params({k: v for k, v in t.params.items() if k != "variant"})) for t in best]
    return f"<h3>Pareto-optimal trials ({len(best)})</h3>" + _table(header, rows)


def _exported_block(info: dict[str, Any] | None) -> str:
    if info is None:
        return "<h3>Exported adapter</h3><p class='note'>best/ holds no exported adapter yet.</p>"
    validation, test = info.get("validation") or {}, info.get("test") or {}
    rows = [(name, format_value(validation.get(name, "")), format_value(test.get(name, ""))) for name in list(dict.fromkeys([*validation, *test]))]
    intro = (f"<p>best/ holds trial {html.escape(str(info.get('trial', '?')))} ({html.escape(str(info.get('variant', '')))}), measured as PEFT "
             "loads it. Trials were compared on the validation split; the test split was used once, here.</p>")
    return "<h3>Exported adapter</h3>" + intro + _table(["metric", "validation", "test"], rows)


def _trial_columns(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """Columns as a reader compares trials: which trial, how it scored, what it cost, then what was tried."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    leading, closing = ["number", "state", "variant"], ["steps", "seconds"]
    metrics = sorted((c for c in columns if c.startswith("val_")), key=lambda c: (c != f"val_{metric}", c))
    params = sorted(c for c in columns if c.startswith("param_"))
    costs = sorted((c for c in columns if c not in {*leading, *closing, *metrics, *params, "failure_reason"}), key=lambda c: (c != "trainable_params", c))
    return leading + metrics + costs + [c for c in closing if c in columns] + params + [c for c in ("failure_reason",) if c in columns]


def _column_header(column: str) -> str:
    if column.startswith("param_"):
        return param_label(column.removeprefix("param_"))
    if column.startswith("val_"):
        return "val. " + column.removeprefix("val_").replace("_", " ")
    return column.replace("_", " ")


def _trials_table(study: optuna.Study, goals: list[Objective], spec: Spec) -> Section:
    rows = trial_rows(study)
    section = Section("trials", "All trials", intro="Every trial of the study, as in trials.csv. Failed trials give their reason; their tracebacks are in logs/.")
    if not rows:
        section.notes.append("The study holds no trial yet.")
        return section
    columns = _trial_columns(rows, goals[0].name)
    best = {t.number for t in best_trials(study, spec)}
    lines = []
    for row in rows:
        if row["state"] == "FAIL" and not row.get("failure_reason"):
            row["failure_reason"] = "interrupted (runs again first when the search resumes)"
        classes = f"state-{row['state'].lower()}" + (" best" if row["number"] in best else "")
        cells = "".join(f"<td>{html.escape(format_value(row.get(c)) if row.get(c) is not None else '')}</td>" for c in columns)
        lines.append(f"<tr class='{classes}'>{cells}</tr>")
    heads = "".join(f"<th>{html.escape(_column_header(c))}</th>" for c in columns)
    section.body = f"<div class='scroll'><table class='trials'><thead><tr>{heads}</tr></thead><tbody>{''.join(lines)}</tbody></table></div>"
    if best:
        section.notes.append("Highlighted rows are the best trial" + ("s (Pareto-optimal)." if len(goals) > 1 else "."))
    return section


def _definition_list(facts: list[tuple[str, str]]) -> str:
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
    return f"<dl class='facts'>{items}</dl>"


def _table(columns: list[str], rows: list[tuple[str, ...]], show_header: bool = True) -> str:
    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in columns) + "</tr></thead>" if show_header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='small'>{head}<tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1f2328;
       max-width: 1240px; margin: 0 auto; padding: 24px 32px 64px; line-height: 1.45; background: #fff; }
header { border-bottom: 1px solid #d0d7de; margin-bottom: 8px; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
.subtitle { color: #57606a; margin: 0 0 12px; }
nav { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid #eaeef2; z-index: 1; }
nav a { margin-right: 16px; color: #0969da; text-decoration: none; font-size: 0.95em; }
section { margin-top: 28px; }
h2 { font-size: 1.3em; border-bottom: 1px solid #eaeef2; padding-bottom: 4px; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 4px 18px; margin: 0; }
dl.facts dt { font-weight: 600; color: #57606a; }
dl.facts dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.86em; }
th, td { border: 1px solid #d0d7de; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
table.small td:first-child { font-weight: 600; }
.scroll { overflow-x: auto; }
table.trials td { white-space: nowrap; font-variant-numeric: tabular-nums; }
table.trials td:last-child { white-space: normal; min-width: 240px; color: #a40e26; }
tr.best td { background: #fff8c5; font-weight: 600; }
tr.state-fail td:nth-child(2) { color: #cf222e; font-weight: 600; }
tr.state-pruned td:nth-child(2) { color: #bc4c00; font-weight: 600; }
tr.state-running td:nth-child(2), tr.state-waiting td:nth-child(2) { color: #0969da; }
tr.state-complete td:nth-child(2) { color: #1a7f37; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.92em; margin-top: 4px; max-width: 900px; }
p.note { background: #f6f8fa; border-left: 4px solid #d0d7de; padding: 8px 12px; color: #57606a; }
footer { margin-top: 40px; color: #8c959f; font-size: 0.85em; }
"""


def _page(run_dir: RunDir, spec: Spec, sections: list[Section]) -> str:
    title = f"autopeft report: {spec.name or run_dir.path.resolve().name}"
    generated = datetime.now().astimezone().isoformat(timespec="seconds")
    nav = "".join(f"<a href='#{s.id}'>{html.escape(s.title.split(':')[0])}</a>" for s in sections)
    versions = ", ".join(f"{name} {version}" for name, version in _versions().items())
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p class='subtitle'>{html.escape(str(run_dir.path))} &middot; written {html.escape(generated)}</p></header>"
        f"<nav>{nav}</nav>"
        + "".join(_section_html(s) for s in sections)
        + f"<footer>Written by autopeft from the run folder ({html.escape(versions)}). Figures are also in {html.escape(FIGURES_DIR)}/.</footer>"
        "</body></html>\n"
    )


def _versions() -> dict[str, str]:
    # Not autopeft.export.package_versions: importing that module loads torch and transformers.
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("autopeft", "optuna", "matplotlib"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _section_html(section: Section) -> str:
    parts = [f"<section id='{section.id}'><h2>{html.escape(section.title)}</h2>"]
    if section.intro:
        parts.append(f"<p>{html.escape(section.intro)}</p>")
    parts.append(section.body)
    for path, caption in section.figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption, quote=True)}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in section.notes]
    parts.append("</section>")
    return "".join(parts)
