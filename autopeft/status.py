"""Live views of a run read from its study storage alone: ``autopeft status`` and ``autopeft dashboard``.

Nothing here loads a model or a data set, and the study is only read (the dashboard's own editing features
aside), so both commands are safe to use while a search is writing to the same ``study.db``.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, NamedTuple

from autopeft.errors import AutoPeftError
from autopeft.rundir import INTERRUPTED, STUDY_NAME, RunDir, interrupted_reason, read_study, trial_state

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import optuna

    from autopeft.spec import Spec

# No "autopeft[dashboard]" here: the CLI prints errors as rich markup, which would swallow "[dashboard]".
DASHBOARD_HINT = "optuna-dashboard is not installed: pip install optuna-dashboard (it is autopeft's 'dashboard' extra)"


class Objective(NamedTuple):
    name: str
    direction: str  # "maximize" or "minimize"


def objectives(study: optuna.Study, spec: Spec) -> list[Objective]:
    """The study's objectives in order: from its "objectives" attribute, else the spec's metric."""
    directions = [d.name.lower() for d in study.directions]
    declared = study.user_attrs.get("objectives")
    if isinstance(declared, list) and len(declared) == len(directions):
        return [Objective(str(o.get("name", f"objective {i}")), directions[i]) for i, o in enumerate(declared)]
    if len(directions) == 1:
        return [Objective(spec.metric, directions[0])]
    return [Objective(f"objective {i}", d) for i, d in enumerate(directions)]


def best_trials(study: optuna.Study, spec: Spec) -> list[optuna.trial.FrozenTrial]:
    """The trial ``best/`` holds, or the feasible Pareto-optimal trials of a multi-objective study.

    Chosen exactly as the search chooses them (constraints and ``search.select`` included); empty before any
    trial completes.
    """
    from autopeft.objectives import pareto_front, select_best

    if len(study.directions) > 1:
        return [study.trials[n] for n in pareto_front(study, spec)]
    best = select_best(study, spec)
    return [] if best is None else [study.trials[best]]


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """How many trials are in each state, named as in trials.csv (``fail`` as ``failed``); a trial stopped by
    Ctrl-C or a killed process counts as interrupted, not failed."""
    counts = dict.fromkeys(("complete", "pruned", "failed", "interrupted", "running", "waiting"), 0)
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        state = trial_state(trial).lower()
        state = "failed" if state == "fail" else state
        counts[state] = counts.get(state, 0) + 1
    counts["total"] = len(trials)
    return counts


def run_status(run_dir: RunDir) -> dict[str, Any]:
    """The state of a running or finished run: trial counts, the target ``n_trials`` and the best so far."""
    spec = run_dir.load_spec()
    study = read_study(run_dir)
    goals = objectives(study, spec)
    counts = trial_counts(study)
    return {
        "run_dir": str(run_dir.path),
        "study": STUDY_NAME,
        "objectives": [o._asdict() for o in goals],
        "n_trials": spec.search.n_trials,
        # The same count the search compares with n_trials.
        "finished": counts["complete"] + counts["pruned"] + counts["failed"],
        "trials": counts,
        "interrupted": [
            {"number": t.number, "reason": interrupted_reason(t)} for t in study.get_trials(deepcopy=False) if trial_state(t) == INTERRUPTED
        ],
        "best": [_trial_summary(t, goals) for t in best_trials(study, spec)],
    }


def _trial_summary(trial: optuna.trial.FrozenTrial, goals: list[Objective]) -> dict[str, Any]:
    return {
        "number": trial.number,
        "values": {goal.name: value for goal, value in zip(goals, trial.values or [])},
        "variant": trial.user_attrs.get("variant", ""),
        "params": dict(trial.params),
    }


def format_value(value: Any) -> str:
    """A number short enough for one line: 4 significant digits, thousands separated for large integers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.4g}"


def format_params(params: dict[str, Any]) -> str:
    return " ".join(f"{name}={format_value(value)}" for name, value in params.items())


def format_status(status: dict[str, Any]) -> str:
    """The text ``autopeft status`` prints."""
    counts = status["trials"]
    goals = ", ".join(f"{o['direction']} {o['name']}" for o in status["objectives"])
    lines = [
        f"run {status['run_dir']} (study {status['study']}: {goals})",
        f"trials: {status['finished']} of {status['n_trials']} finished: {counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['failed']} failed; {counts['running']} running, {counts['waiting']} waiting"
        + "".join(f", {n} {reason}" for reason, n in Counter(t["reason"] for t in status.get("interrupted", [])).items()),
    ]
    best = status["best"]
    if not best:
        lines.append("best so far: none (no trial has completed yet)")
    described = [
        f"trial {t['number']}, " + ", ".join(f"{name} {format_value(value)}" for name, value in t["values"].items())
        + f"; {t['variant']} {format_params(t['params'])}".rstrip()
        for t in best
    ]
    if len(status["objectives"]) == 1:
        lines += [f"best so far: {text}" for text in described]
    elif best:
        lines.append(f"Pareto front so far ({len(best)} trials):")
        lines += [f"  {text}" for text in described]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The dashboard
# --------------------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_server(run_dir: RunDir, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """An optuna-dashboard server for the run's study, bound but not yet serving (call ``serve_forever``).

    Port 0 picks a free port: read it back from ``server.server_port``.
    """
    import socket
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    try:
        import optuna_dashboard
    except ImportError:
        raise AutoPeftError(DASHBOARD_HINT) from None

    class QuietHandler(WSGIRequestHandler):
        # The dashboard polls every few seconds; one log line per request would bury the URL.
        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    app = optuna_dashboard.wsgi(run_dir.open_storage())  # a reader: never writes the schema
    try:
        return make_server(host, port, app, server_class=Server, handler_class=QuietHandler)
    except OSError as exc:
        raise AutoPeftError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from None


def server_url(server: WSGIServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
