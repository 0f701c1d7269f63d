"""`autopeft report`, `status` and `dashboard` on the run folders of tiny searches."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import optuna
import yaml
import pytest
from PIL import Image

from autopeft.cli import main
from autopeft.report import write_report
from autopeft.rundir import RunDir
from conftest import sentiment_rows, write_spec

PLUGIN = Path(__file__).parent / "plugins" / "test_variants.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("summary", "history", "pareto", "importances", "intermediate", "modules", "trials")


def _data(folder: Path) -> Path:
    path = folder / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "sentiment"])
        writer.writeheader()
        writer.writerows(sentiment_rows(240))
    return path


@pytest.fixture(scope="module")
def lora_search(tmp_path_factory, tiny_bert) -> Path:
    """A finished search of 3 LoRA trials; tests change copies of it (see ``lora_run``)."""
    root = tmp_path_factory.mktemp("lora-search")
    spec = write_spec(root, model={"id": str(tiny_bert)}, data={"source": str(_data(root))}, search={"n_trials": 3})
    assert main(["search", str(spec)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def flaky_search(tmp_path_factory, tiny_bert) -> Path:
    """A finished search whose first two trials failed (an exception, then a NaN loss) and whose third completed."""
    root = tmp_path_factory.mktemp("flaky-search")
    spec = write_spec(
        root,
        model={"id": str(tiny_bert)},
        data={"source": str(_data(root))},
        plugins=[str(PLUGIN)],
        search={"variants": ["flaky"], "n_trials": 3, "baseline": False, "space": {}},
    )
    (root / "run").mkdir()
    study = optuna.create_study(study_name="autopeft", storage=RunDir(root / "run").storage_url, direction="maximize")
    for mode in ("raise", "nan", "ok"):
        study.enqueue_trial({"flaky.mode": mode, "learning_rate": 1e-2})
    assert main(["search", str(spec)]) == 0
    return root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture
def lora_run(lora_search, tmp_path) -> Path:
    return _copy(lora_search, tmp_path)


@pytest.fixture
def flaky_run(flaky_search, tmp_path) -> Path:
    return _copy(flaky_search, tmp_path)


def _study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="autopeft", storage=RunDir(run).storage_url)


def _add_pruned_trial(study: optuna.Study, like: optuna.trial.FrozenTrial) -> None:
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED, params=like.params, distributions=like.distributions, intermediate_values={6: 0.5, 12: 0.45}
        )
    )


def _embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def _assert_valid_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE), path
        with Image.open(path) as image:
            image.verify()


def _status(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def test_the_report_is_one_offline_page_with_every_section_and_its_figures_embedded(lora_run, tiny_bert, capsys):
    assert main(["report", str(lora_run)]) == 0
    assert str(lora_run / "report.html") in capsys.readouterr().out
    page = (lora_run / "report.html").read_text()

    for section in SECTIONS:
        assert f"<section id='{section}'>" in page
    figures = sorted((lora_run / "report").glob("*.png"))
    assert {"history.png", "pareto.png", "importances.png"} <= {p.name for p in figures}
    _assert_valid_pngs(figures)
    # Every figure is in the page itself, byte for byte, so the page needs none of the files next to it.
    assert sorted(_embedded_images(page)) == sorted(p.read_bytes() for p in figures)

    # Nothing is fetched from anywhere: no script, stylesheet, font or image from the network.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not re.search(r"<script|<link|<iframe|@import|url\(", page, re.IGNORECASE)

    info = json.loads((lora_run / "best" / "autopeft.json").read_text())
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    assert str(tiny_bert) in summary and "3 of 3 finished: 3 complete, 0 pruned, 0 failed" in summary
    assert f"best/ holds trial {info['trial']}" in summary
    assert f"<td>accuracy</td><td>{info['validation']['accuracy']:.4g}</td><td>{info['test']['accuracy']:.4g}</td>" in summary
    assert page.count("<tr class='state-complete") == 3 and page.count(" best'>") == 1


def test_write_report_is_the_function_a_search_calls_and_can_run_again(lora_run):
    first = write_report(RunDir(lora_run))
    assert first == lora_run / "report.html"
    assert write_report(RunDir(lora_run)) == first
    assert not list(lora_run.glob("*.tmp"))


def test_failed_and_pruned_trials_are_shown_and_missing_figures_are_explained(flaky_run):
    study = _study(flaky_run)
    _add_pruned_trial(study, study.trials[2])

    assert main(["report", str(flaky_run)]) == 0
    page = (flaky_run / "report.html").read_text()
    trials = page.split("<section id='trials'>")[1]
    assert "RuntimeError: the adapter could not be built" in trials and "loss became nan" in trials
    assert trials.count("<tr class='state-fail") == 2 and trials.count("<tr class='state-pruned") == 1
    # The pruned trial's curve is drawn and marked as pruned.
    assert (flaky_run / "report" / "intermediate.png").is_file()
    assert "Pruned trials (3) are red, dashed, and end in a cross" in page
    # One complete trial: no importances, and the page says why instead of showing an empty plot.
    assert "Parameter importances need at least two complete trials; this run has 1." in page
    assert not (flaky_run / "report" / "importances.png").exists()


def _modules(bits: bool) -> list[dict]:
    modules = []
    for layer in (0, 1):
        for role, rank in (("q", 4 * (layer + 1)), ("k", 0), ("v", 8)):
            name = f"bert.encoder.layer.{layer}.attention.self.{ {'q': 'query', 'k': 'key', 'v': 'value'}[role] }"
            modules.append({"name": name, "role": role, "layer": layer, "rank": rank, "bits": (4 if role == "q" else 8) if bits and rank else None})
    return modules


def _write_modules(run: Path, modules: list[dict] | None) -> None:
    path = run / "best" / "autopeft.json"
    info = json.loads(path.read_text())
    info.pop("modules", None)
    if modules is not None:
        info["modules"] = modules
    path.write_text(json.dumps(info))


def test_the_heat_map_shows_the_rank_and_bits_of_each_module_of_the_best_adapter(lora_run):
    heat_map = lora_run / "report" / "modules.png"
    _write_modules(lora_run, _modules(bits=True))
    write_report(RunDir(lora_run))
    page = (lora_run / "report.html").read_text()
    assert "4 of 6 modules adapted, total rank 28" in page and "bits each module is stored with" in page
    _assert_valid_pngs([heat_map])
    assert heat_map.read_bytes() in _embedded_images(page)
    with Image.open(heat_map) as image:
        width_with_bits = image.width

    _write_modules(lora_run, _modules(bits=False))
    write_report(RunDir(lora_run))
    assert "bits each module is stored with" not in (lora_run / "report.html").read_text()
    with Image.open(heat_map) as image:
        assert image.width < 0.7 * width_with_bits  # one panel (ranks) instead of two

    _write_modules(lora_run, None)
    write_report(RunDir(lora_run))
    assert not heat_map.exists()  # no stale figure from the previous report
    assert "does not list per-module ranks" in (lora_run / "report.html").read_text()


@pytest.fixture
def multi_objective_run(lora_search, tmp_path) -> Path:
    """A study of accuracy (maximize) against trainable parameters (minimize), as a multi-objective search writes it."""
    run = tmp_path / "run"
    run.mkdir()
    spec = yaml.safe_load((lora_search / "spec.yaml").read_text())
    spec["search"]["objectives"] = ["accuracy", "trainable_params"]
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    study = optuna.create_study(study_name="autopeft", storage=RunDir(run).storage_url, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", [{"name": "accuracy", "direction": "maximize"}, {"name": "trainable_params", "direction": "minimize"}])
    distribution = optuna.distributions.FloatDistribution(5e-3, 2e-2, log=True)
    for accuracy, size, lr in ((0.6, 1000, 5e-3), (0.7, 4000, 8e-3), (0.65, 5000, 1e-2), (0.8, 16000, 2e-2)):
        study.add_trial(optuna.trial.create_trial(
            values=[accuracy, size], params={"learning_rate": lr}, distributions={"learning_rate": distribution},
            user_attrs={"variant": "lora", "metrics": {"accuracy": accuracy}, "costs": {"trainable_params": size}, "trainable_params": size},
        ))
    return run


def test_a_multi_objective_study_gets_its_pareto_front_and_a_history_per_objective(multi_objective_run, capsys):
    assert main(["report", str(multi_objective_run)]) == 0
    page = (multi_objective_run / "report.html").read_text()
    figures = {p.name for p in (multi_objective_run / "report").glob("*.png")}
    assert {"pareto.png", "history-accuracy.png", "history-trainable-params.png", "importances.png"} <= figures
    assert "maximize validation accuracy, minimize trainable params" in page
    assert "Pareto-optimal trials (3)" in page
    assert "There is no exported adapter yet" in page
    assert "No trial has reported intermediate values" in page

    status = _status(multi_objective_run, capsys)
    assert [t["number"] for t in status["best"]] == [0, 1, 3]
    assert status["best"][1]["values"] == {"accuracy": 0.7, "trainable_params": 4000}
    assert main(["status", str(multi_objective_run)]) == 0
    assert "Pareto front so far (3 trials):\n  trial 0, accuracy 0.6, trainable_params 1,000;" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------------------


def test_status_counts_trials_in_every_state_and_shows_the_best_so_far(flaky_run, capsys):
    assert main(["status", str(flaky_run)]) == 0
    text = capsys.readouterr().out
    assert "3 of 3 finished: 1 complete, 0 pruned, 2 failed; 0 running, 0 waiting" in text
    assert "best so far: trial 2, accuracy" in text and "flaky.mode=ok" in text

    study = _study(flaky_run)
    _add_pruned_trial(study, study.trials[2])
    study.ask()  # a trial a search is running right now
    study.enqueue_trial(study.trials[2].params)  # a configuration queued to run next
    status = _status(flaky_run, capsys)
    assert status["trials"] == {"complete": 1, "pruned": 1, "failed": 2, "interrupted": 0, "running": 1, "waiting": 1, "total": 6}
    assert status["finished"] == 4 and status["n_trials"] == 3
    assert status["objectives"] == [{"name": "accuracy", "direction": "maximize"}]
    [best] = status["best"]
    assert best["number"] == 2 and best["values"] == {"accuracy": study.best_value}
    assert best["params"]["flaky.mode"] == "ok" and best["variant"] == "flaky"


WRITER = """
import sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="autopeft", storage=sys.argv[1])
for i in range(25):
    trial = study.ask()
    time.sleep(0.02)
    study.tell(trial, 0.5)
"""


def test_status_reads_a_study_while_another_process_writes_to_it(lora_run, capsys):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, RunDir(lora_run).storage_url])
    totals = []
    while writer.poll() is None:
        totals.append(_status(lora_run, capsys)["trials"]["total"])
    assert writer.wait() == 0
    totals.append(_status(lora_run, capsys)["trials"]["total"])
    assert totals == sorted(totals) and totals[-1] == 3 + 25


def test_status_and_report_refuse_a_folder_that_is_not_a_run(tmp_path, capsys):
    for command in ("status", "report"):
        assert main([command, str(tmp_path)]) == 2
        assert "is not an autopeft run folder" in capsys.readouterr().err
    assert not (tmp_path / "study.db").exists()  # reading must not create a study


# --------------------------------------------------------------------------------------------------------------
# dashboard
# --------------------------------------------------------------------------------------------------------------


def test_the_dashboard_serves_the_study_on_loopback(lora_run):
    process = subprocess.Popen(
        [sys.executable, "-m", "autopeft", "dashboard", str(lora_run), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(60, process.kill)  # never hang the test suite on a server that does not start
    watchdog.start()
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"no URL printed: {line!r} {process.stderr.read() if process.poll() is not None else ''}"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
        with direct.open(match.group(0) + "api/studies", timeout=30) as response:
            studies = json.loads(response.read())["study_summaries"]
        assert [s["study_name"] for s in studies] == ["autopeft"]
    finally:
        watchdog.cancel()
        process.terminate()
        process.wait(timeout=30)


def test_the_dashboard_says_how_to_install_it_when_it_is_missing(lora_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # makes `import optuna_dashboard` fail
    assert main(["dashboard", str(lora_run), "--port", "0"]) == 2
    assert "optuna-dashboard is not installed: pip install optuna-dashboard" in capsys.readouterr().err


def _drawn_figures(monkeypatch) -> dict:
    """Capture every figure the report draws, by file name (the PNGs hold no text to check)."""
    import autopeft.report as report

    drawn, original = {}, report._draw

    def spy(path, plot):
        def keep():
            figure = plot()
            drawn[path.name] = figure if hasattr(figure, "savefig") else figure.figure
            return figure

        return original(path, keep)

    monkeypatch.setattr(report, "_draw", spy)
    return drawn


def _legend_and_star(figure) -> tuple[list[str], list[tuple[float, float]]]:
    [ax] = figure.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    stars = [tuple(c.get_offsets()[0]) for c in ax.collections if str(c.get_label()).startswith("chosen")]
    return labels, stars


def test_the_pareto_plot_marks_the_chosen_trial_and_names_costs_as_costs(multi_objective_run, monkeypatch):
    """Catches: Optuna's plot (every front point labelled "Best Trial"), a star on the best metric instead of the
    trial search.select puts in best/, and cost axes called "validation trainable_params"."""
    drawn = _drawn_figures(monkeypatch)
    write_report(RunDir(multi_objective_run))
    figure = drawn["pareto.png"]
    labels, stars = _legend_and_star(figure)
    assert "Best Trial" not in labels and "chosen: trial 3 (best/)" in labels and "Pareto front" in labels
    assert stars == [(16000, 0.8)]
    [ax] = figure.axes
    assert ax.get_xlabel() == "trainable params (minimize)" and ax.get_ylabel() == "validation accuracy (maximize)"
    page = (multi_objective_run / "report.html").read_text()
    assert "The star is trial 3, the one chosen for best/" in page and "validation trainable" not in page

    # best/ chosen by another rule: the star follows it (trial 1 is the smallest within 0.15 of the best).
    spec = yaml.safe_load((multi_objective_run / "spec.yaml").read_text())
    spec["search"]["select"] = {"rule": "smallest-within", "tolerance": 0.15}
    (multi_objective_run / "spec.yaml").write_text(yaml.safe_dump(spec))
    write_report(RunDir(multi_objective_run))
    labels, stars = _legend_and_star(drawn["pareto.png"])
    assert "chosen: trial 1 (best/)" in labels and stars == [(4000, 0.7)]


def test_the_single_objective_size_plot_stars_the_trial_in_best(lora_run, monkeypatch):
    """Catches: a star that is not the trial best/ holds."""
    drawn = _drawn_figures(monkeypatch)
    write_report(RunDir(lora_run))
    info = json.loads((lora_run / "best" / "autopeft.json").read_text())
    labels, stars = _legend_and_star(drawn["pareto.png"])
    assert f"chosen: trial {info['trial']} (best/)" in labels
    assert stars == [(info["trainable_params"], info["validation"]["accuracy"])]


def test_the_trials_table_leads_with_the_metric_then_costs_then_parameters(lora_run):
    """Catches: parameter columns sorted first and the metric pushed to the far right."""
    write_report(RunDir(lora_run))
    page = (lora_run / "report.html").read_text()
    table = page.split("<section id='trials'>")[1].split("</thead>")[0]
    headers = re.findall(r"<th>([^<]*)</th>", table)
    assert headers[:4] == ["number", "state", "variant", "val. accuracy"]
    assert headers.index("trainable params") < headers.index("lr") < headers.index("failure reason")
    assert headers.index("seconds") < headers.index("lr") and headers[-1] == "failure reason"
    assert not any(h.startswith("param") for h in headers)
