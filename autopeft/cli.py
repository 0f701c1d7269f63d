"""The ``autopeft`` command line: search, validate, export, plugins.

User errors (a bad spec, a missing model, a run folder of another spec) print one message and exit with code 2;
Ctrl-C exits with 130 after saving what finished. Heavy libraries are imported inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _console(stderr: bool = False):
    from rich.console import Console

    # No source location (``progress.py:54``) at the end of log lines: it means nothing to a user.
    return Console(stderr=stderr, highlight=False, log_path=False)


def _plan(spec_path: str, output: str | None = None):
    from autopeft.plan import make_plan
    from autopeft.spec import load_spec

    spec = load_spec(spec_path)
    if output:
        spec.output.dir = output
    return make_plan(spec)


def cmd_validate(args: argparse.Namespace) -> int:
    plan = _plan(args.spec)
    spec = plan.spec
    variants = ", ".join(f"{name} ({len(space)} parameters)" for name, space in plan.spaces.items())
    _console().print(
        f"[green]OK[/] {args.spec}: {spec.model.task} on {spec.model.id}; data {spec.data.source}; "
        f"variants {variants}; {spec.search.n_trials} trials of {spec.training.max_steps} steps -> {spec.run_dir}"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    plan = _plan(args.spec, args.output)
    if args.threads is not None:
        plan.spec.training.threads = args.threads
    if plan.spec.search.backend == "ray":
        from autopeft.orchestrators.ray_tune import run_search
    else:
        from autopeft.orchestrators.local import run_search
    result = run_search(plan, _console(), n_trials=args.n_trials, timeout=args.timeout)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return 0 if result.best_trial is not None else 1


def cmd_worker(args: argparse.Namespace) -> int:
    from autopeft.orchestrators.worker import run_worker
    from autopeft.storage import StorageError

    plan = _plan(args.spec, args.output)
    if args.threads is not None:
        plan.spec.training.threads = args.threads
    storage = args.storage or plan.spec.storage
    if not storage:
        raise StorageError(f"{args.spec}: storage: got None; a worker joins a shared study: give --storage URL or storage: in the spec")
    result = run_worker(
        plan, _console(), storage, n_trials=args.n_trials, timeout=args.timeout,
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
    )
    if result.interrupted:
        return EXIT_INTERRUPTED
    return 0 if result.best_trial is not None else 1


def cmd_export(args: argparse.Namespace) -> int:
    from autopeft.export import check_target, export_trial
    from autopeft.plan import make_plan
    from autopeft.rundir import RunDir, open_study
    from autopeft.trial import Workbench

    run_dir = RunDir(args.run_dir, storage=args.storage)
    spec = run_dir.load_spec()
    out = Path(args.out)
    check_target(out, run_dir, args.force)  # refuse before the model loads
    plan = make_plan(spec)
    study = open_study(run_dir, spec.direction)
    console = _console()
    workbench = Workbench(plan, console.log)
    info = export_trial(study, plan, workbench, run_dir, args.trial, out, force=args.force)
    console.print(f"Exported trial {args.trial} to {out}: validation {spec.metric} {info['validation'][spec.metric]:.4f}, test {info['test'][spec.metric]:.4f}")
    return 0


def variant_kind(variant) -> str:
    """``allocator`` for variants whose size is settled while training (they grow or prune ranks), else ``variant``."""
    return "allocator" if variant.size_decided_in_training else "variant"


def _plugin_listing(extra: tuple[str, ...]) -> dict:
    from autopeft.plan import preset_names
    from autopeft.registry import load_registry

    registry = load_registry(extra)
    variants = []
    for name, found in sorted(registry.variants.items()):
        variant = found.item
        space = {
            param_name: {"type": type(param).__name__.removesuffix("Param").lower(), "range": param.describe(), "default": param.default, "help": param.help, "condition": param.condition}
            for param_name, param in variant.search_space().items()
        }
        variants.append({
            "name": name, "source": found.source, "summary": variant.summary, "paper": variant.paper, "export_format": variant.export_format,
            "kind": variant_kind(variant), "supports_allocation": variant.supports_module_ranks, "space": space,
        })
    return {
        "variants": variants,
        "models": [{"model_id": f.item.model_id, "summary": f.item.summary, "source": f.source, "installed": _installed(f.item)} for f in registry.model_sources],
        "corpora": [{"name": n, "summary": f.item.summary, "task": f.item.task, "source": f.source} for n, f in sorted(registry.corpora.items())],
        "presets": preset_names(),
        "unavailable": [{"name": n, "source": f.source, "reason": f.item.reason} for n, f in sorted(registry.unavailable.items())],
        "broken": [{"plugin": b.plugin, "source": b.source, "reason": b.reason} for b in registry.broken],
    }


def _installed(source) -> bool:
    # A source that prepares its files on first use (a GGUF conversion) answers cheaply through is_installed.
    return source.is_installed() if source.is_installed is not None else source.locate() is not None


def _space_table(variant: dict):
    from rich.table import Table

    table = Table(title=f"[bold]{variant['name']}[/] — {variant['summary']} ({variant['source']})", title_justify="left", caption=variant["paper"], caption_justify="left")
    for column in ("parameter", "range", "default", "meaning"):
        table.add_column(column)
    for name, param in variant["space"].items():
        condition = " (when " + ", ".join(f"{k} in {v}" for k, v in param["condition"].items()) + ")" if param["condition"] else ""
        table.add_row(name, param["range"], repr(param["default"]), param["help"] + condition)
    return table


def cmd_plugins(args: argparse.Namespace) -> int:
    """A compact table of the variants by default; ``NAME`` or ``--details`` for search spaces; ``--json`` for all."""
    from autopeft.errors import PluginError

    listing = _plugin_listing(tuple(str(Path(p).resolve()) for p in args.plugin))
    if args.json:
        print(json.dumps(listing, indent=2, default=str))
        return 0
    from rich.table import Table

    console = _console()
    if args.name:
        chosen = [v for v in listing["variants"] if v["name"] == args.name]
        unavailable = [v for v in listing["unavailable"] if v["name"] == args.name]
        if unavailable:
            raise PluginError(f"autopeft plugins: variant {args.name!r} is not available ({unavailable[0]['source']}): {unavailable[0]['reason']}")
        if not chosen:
            names = ", ".join(v["name"] for v in listing["variants"])
            raise PluginError(f"autopeft plugins: no variant named {args.name!r}; available: {names}")
        console.print(_space_table(chosen[0]))
        return 0
    if args.details:
        for variant in listing["variants"]:
            console.print(_space_table(variant))
    else:
        table = Table(title="variants", title_justify="left", caption="autopeft plugins NAME: one variant's search space; --details: all of them", caption_justify="left")
        for column in ("name", "kind", "allocation", "export", "source"):
            table.add_column(column)
        # Families named "<family>:<method>" (one per PEFT tuner) take one line each, not a row per method.
        families: dict[str, list[dict]] = {}
        for variant in listing["variants"]:
            family, colon, method = variant["name"].partition(":")
            if colon:
                families.setdefault(family, []).append(variant)
            else:
                table.add_row(variant["name"], variant["kind"], "yes" if variant["supports_allocation"] else "no", variant["export_format"], variant["source"])
        console.print(table)
        for family, members in families.items():
            console.print(f"[bold]{family}:<method>[/] ({members[0]['source']}): " + ", ".join(v["name"].partition(":")[2] for v in members))
    if listing["unavailable"]:
        # Grouped by reason: several methods often share one (every prompt-learning method, say).
        by_reason: dict[str, list[str]] = {}
        for variant in listing["unavailable"]:
            by_reason.setdefault(f"{variant['reason']} ({variant['source']})", []).append(variant["name"])
        console.print("[bold]unavailable variants[/] (a spec cannot search them):")
        for reason, names in by_reason.items():
            console.print(f"  {', '.join(names)}: {reason}")
    console.print("[bold]models[/]: " + "; ".join(f"{m['model_id']} ({'installed' if m['installed'] else 'not installed'}, {m['source']})" for m in listing["models"]))
    console.print("[bold]corpora[/]: " + "; ".join(f"{c['name']} ({c['task']}, {c['source']})" for c in listing["corpora"]))
    console.print("[bold]presets[/]: " + ", ".join(listing["presets"]))
    for broken in listing["broken"]:
        console.print(f"[red]broken plugin[/] {broken['plugin']} ({broken['source']}): {broken['reason']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autopeft.report import write_report
    from autopeft.rundir import RunDir

    path = write_report(RunDir(args.run_dir, storage=args.storage))
    _console().print(f"Report: {path} (figures in {path.parent / 'report'})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from autopeft.rundir import RunDir
    from autopeft.status import format_status, run_status

    status = run_status(RunDir(args.run_dir, storage=args.storage))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from autopeft.rundir import RunDir
    from autopeft.status import dashboard_server, is_loopback, server_url

    server = dashboard_server(RunDir(args.run_dir, storage=args.storage), args.host, args.port)
    if not is_loopback(args.host):
        _console(stderr=True).print(f"[yellow]warning:[/] serving on {args.host}: anyone who can reach it can read and delete this study")
    print(f"optuna-dashboard for {args.run_dir}: {server_url(server)} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops the dashboard, not an interruption of work
    finally:
        server.server_close()
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; a whole number of at least 1")
    return value


def _version() -> str:
    """The installed distribution's version (what pip reports), else the source tree's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autopeft")
    except PackageNotFoundError:
        from autopeft import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autopeft", description="Search LoRA-family adapter configurations and export the best as a PEFT adapter.")
    parser.add_argument("--version", action="version", version=f"autopeft {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = commands.add_parser("search", help="run or resume the search a spec describes")
    search.add_argument("spec", help="path to the spec YAML file")
    search.add_argument("--n-trials", type=int, help="override search.n_trials (a larger number extends a finished run)")
    search.add_argument("--timeout", type=float, help="override search.timeout, in seconds")
    search.add_argument("--output", help="override output.dir")
    search.add_argument("--threads", type=_positive_int, help="override training.threads: CPU threads torch uses")
    search.set_defaults(func=cmd_search)

    worker = commands.add_parser("worker", help="join a study shared in a database and run its trials (start several, on any machines)")
    worker.add_argument("spec", help="path to the spec YAML file (the same for every worker)")
    worker.add_argument("--storage", help="the shared study: postgresql+psycopg2://user@host/db (any machines) or journal:PATH (one host); default: storage: in the spec")
    worker.add_argument("--n-trials", type=int, help="override search.n_trials: finished trials the study needs")
    worker.add_argument("--timeout", type=float, help="override search.timeout, in seconds")
    worker.add_argument("--output", help="override output.dir: this worker's folder for adapters, logs and best/")
    worker.add_argument("--threads", type=_positive_int, help="override training.threads: CPU threads torch uses")
    worker.add_argument("--heartbeat-interval", type=_positive_int, default=10, help="seconds between a running trial's heartbeats (default 10)")
    worker.add_argument("--grace-period", type=_positive_int, default=30, help="seconds without a heartbeat after which a trial's worker is taken as dead and the trial runs again (default 30)")
    worker.set_defaults(func=cmd_worker)

    validate = commands.add_parser("validate", help="check a spec without loading any model")
    validate.add_argument("spec")
    validate.set_defaults(func=cmd_validate)

    export = commands.add_parser("export", help="export a finished trial as a PEFT adapter folder")
    export.add_argument("run_dir", help="the run folder (output.dir of the search)")
    export.add_argument("--trial", type=int, required=True, help="trial number (see trials.csv)")
    export.add_argument("--out", required=True, help="folder to write the adapter to: new, empty, or an earlier export (replaced)")
    export.add_argument("--force", action="store_true", help="replace --out even if it holds other files (never the run folder or a folder holding a study)")
    export.add_argument("--storage", help="a shared study's URL (autopeft worker --storage); default: the run folder's study.db")
    export.set_defaults(func=cmd_export)

    plugins = commands.add_parser("plugins", help="list variants, models, corpora and presets the installed plugins provide")
    plugins.add_argument("name", nargs="?", help="show this variant's search space")
    plugins.add_argument("--details", action="store_true", help="show every variant's search space")
    plugins.add_argument("--json", action="store_true", help="machine-readable output (everything, search spaces included)")
    plugins.add_argument("--plugin", action="append", default=[], help="also load this plugin file or folder")
    plugins.set_defaults(func=cmd_plugins)

    report = commands.add_parser("report", help="write RUN_DIR/report.html: figures, best trial and all trials of a run")
    report.add_argument("run_dir", help="the run folder (output.dir of the search)")
    report.add_argument("--storage", help="a shared study's URL (autopeft worker --storage); default: the run folder's study.db")
    report.set_defaults(func=cmd_report)

    status = commands.add_parser("status", help="show the trials and the best so far of a running or finished run")
    status.add_argument("run_dir", help="the run folder (output.dir of the search)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--storage", help="a shared study's URL (autopeft worker --storage); default: the run folder's study.db")
    status.set_defaults(func=cmd_status)

    dashboard = commands.add_parser("dashboard", help="open the run's study in optuna-dashboard (pip install 'autopeft[dashboard]')")
    dashboard.add_argument("run_dir", help="the run folder (output.dir of the search)")
    dashboard.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free port; default 8080)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    dashboard.add_argument("--storage", help="a shared study's URL (autopeft worker --storage); default: the run folder's study.db")
    dashboard.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autopeft`` console script."""
    from autopeft.errors import AutoPeftError

    for stream in (sys.stdout, sys.stderr):
        # A path or value the terminal's encoding cannot show is printed escaped, not raised as a traceback.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoPeftError as exc:
        from rich.markup import escape

        # Messages are already one readable line per problem (values cut and escaped by autopeft.errors).
        _console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _console(stderr=True).print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
