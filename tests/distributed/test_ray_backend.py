"""The Ray backend on a real two-node Ray cluster: trials on both nodes at once, early stopping by the scheduler,
a worker process killed mid-trial, and the search process killed mid-search and started again.

Trials use ``paced`` variants (LoRA that sleeps after each step, loaded from a plugin file like any user plugin) so
that a trial lasts long enough to overlap another one or to be killed while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import optuna

from autopeft.cli import main
from autopeft.rundir import RunDir
from conftest import plain_peft_test_predictions, write_spec

PACED_PLUGIN = '''
import time

from autopeft import FloatParam, IntParam, Variant, hookimpl, shared


class Paced(Variant):
    summary = "LoRA that sleeps after every optimizer step"

    def __init__(self, name, default_r):
        self.name = name
        self.default_r = default_r
        self.pace = 0.0

    def search_space(self):
        return {
            "learning_rate": shared("learning_rate"),
            "r": IntParam(2, 64, default=self.default_r, log=True),
            "pace": FloatParam(0.0, 2.0, default=0.0, help="seconds to sleep after each step"),
        }

    def attach(self, model, params, context):
        from peft import LoraConfig, get_peft_model

        self.pace = params["pace"]
        return get_peft_model(model, LoraConfig(task_type=context.peft_task_type, target_modules=context.target_modules, r=params["r"]))

    def on_step(self, model, step, context):
        time.sleep(self.pace)


class Broken(Paced):
    summary = "a variant whose every configuration fails"

    def attach(self, model, params, context):
        raise RuntimeError("boom: this variant cannot attach")


@hookimpl
def autopeft_variants():
    # Two small ones and a wide one: LoRA r=16 on a hidden size of 32 has 4162 trainable parameters.
    return [Paced("paced", 2), Paced("paced-again", 2), Paced("paced-wide", 16), Broken("broken", 2)]
'''


def paced_spec(tmp_path: Path, tiny_bert: Path, sentiment_csv: Path, address: str, variants: list[str], pace: float, n_trials: int, **sections) -> Path:
    plugin = tmp_path / "paced.py"
    plugin.write_text(PACED_PLUGIN)
    space = {"learning_rate": {"low": 5e-3, "high": 2e-2}}
    for variant in variants:
        space[f"{variant}.pace"] = pace
        space[f"{variant}.r"] = {"low": 2, "high": 8} if variant in ("paced", "paced-again") else 16
    search = {"variants": variants, "n_trials": n_trials, "seed": 0, "backend": "ray", "space": space, **sections.pop("search", {})}
    return write_spec(
        tmp_path,
        model={"id": str(tiny_bert)},
        data={"source": str(sentiment_csv)},
        search=search,
        ray={"address": address, "max_concurrent": 2, "max_failures": 1, **sections.pop("ray", {})},
        plugins=[str(plugin)],
        **sections,
    )


def study_trials(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="autopeft", storage=RunDir(run_dir).storage_url).get_trials(deepcopy=False)


def live_trials(run_dir: Path) -> dict[int, tuple[str, dict]]:
    """``{trial number: (state, user attributes)}``, read as a separate reader would while the search writes:
    empty before the search created its study, retried while SQLite is busy."""
    database = run_dir / "study.db"
    for _ in range(100):
        if not database.is_file():
            return {}
        try:
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as connection:
                rows = connection.execute(
                    "SELECT t.number, t.state, a.key, a.value_json FROM trials t "
                    "LEFT JOIN trial_user_attributes a ON a.trial_id = t.trial_id"
                ).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return {}  # the study is being created
            time.sleep(0.1)
            continue
        out: dict[int, tuple[str, dict]] = {}
        for number, state, key, value in rows:
            attrs = out.setdefault(number, (state, {}))[1]
            if key is not None:
                attrs[key] = json.loads(value)
        return out
    raise AssertionError(f"{database} stayed locked")


def training_now(run_dir: Path) -> dict[int, dict]:
    """``{trial number: its "ray" attribute}`` of the ``paced`` trials a worker is training right now: attached
    (where it runs is known), not yet finished."""
    return {
        number: attrs["ray"]
        for number, (state, attrs) in live_trials(run_dir).items()
        if state == "RUNNING" and attrs.get("variant") == "paced" and "ray" in attrs and "ended" not in attrs["ray"]
    }


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_trials_run_on_both_nodes_at_once_the_scheduler_prunes_and_best_loads_in_plain_peft(tmp_path, tiny_bert, sentiment_csv, ray_cluster):
    """Four trials, two at a time, on a head and a worker node.

    Catches: the scheduler not stopping a trial its report condemns (``StudyScheduler.on_trial_result`` returning
    CONTINUE: the wide baseline trains to the end and is recorded COMPLETE), ``max_concurrent_trials`` not taken
    from ``ray.max_concurrent`` (one trial at a time: no overlap, one node), trials Tune holds not counted toward
    ``n_trials`` (a fifth trial), ``reuse_actors`` dropped or the per-process workbench cache removed (a new
    process, or a second load, per trial), and adapter files not written back to ``adapters/trial-N`` (export
    then trains the best trial again instead of using what the worker trained).
    """
    spec = paced_spec(
        tmp_path, tiny_bert, sentiment_csv, ray_cluster, ["paced", "paced-again", "paced-wide"], pace=0.15, n_trials=4,
        search={"constraints": ["trainable_params <= 2500"]},
    )
    assert main(["search", str(spec)]) == 0
    run_dir = tmp_path / "run"
    trials = study_trials(run_dir)

    assert sorted(t.state.name for t in trials).count("FAIL") == 0 and len(trials) == 4
    # The wide baseline (trial 2) breaks the size constraint: the scheduler stops it at attach, before any step.
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert 2 in [t.number for t in pruned]
    for trial in pruned:
        assert trial.user_attrs["variant"] == "paced-wide"
        assert trial.user_attrs["pruned_reason"].startswith("violates trainable_params <= 2500")
        assert trial.user_attrs["steps"] == 0
    assert all(t.user_attrs["variant"] != "paced-wide" for t in trials if t.state.name == "COMPLETE")

    where = {t.number: t.user_attrs["ray"] for t in trials}
    assert len({w["node"] for w in where.values()}) == 2, where
    # The two small baselines started together, one on each node, and their runs overlapped.
    first, second = where[0], where[1]
    assert first["node"] != second["node"]
    assert first["started"] < second["ended"] and second["started"] < first["ended"], (first, second)
    # Every trial found its worker's workbench loaded once, and some worker ran more than one trial.
    assert all(w["loads"] == 1 for w in where.values()), where
    pids = [w["pid"] for w in where.values()]
    assert len(set(pids)) < len(pids), where

    best = run_dir / "best"
    number = json.loads((best / "autopeft.json").read_text())["trial"]
    assert (run_dir / "adapters" / f"trial-{number}" / "adapter_model.safetensors").is_file()
    predicted, recorded = plain_peft_test_predictions(best, tiny_bert, spec)
    assert predicted == recorded


def test_a_killed_worker_costs_only_its_run_and_a_failing_configuration_is_not_retried(tmp_path, tiny_bert, sentiment_csv, ray_cluster):
    """SIGKILL the worker process of a running trial: Tune runs the trial again on a new worker and it completes.
    A configuration that raises fails once, with its own error as the reason, and is not run again.

    Catches: ``FailureConfig(max_failures=ray.max_failures)`` dropped (the killed trial is recorded failed, "worker
    died"), a re-run not counted in the trial's ``ray.restarts``, and the trainable letting a configuration's
    exception escape instead of reporting it (Tune then retries it as if its worker had died, and the reason
    recorded is Ray's, not the configuration's).
    """
    spec = paced_spec(tmp_path, tiny_bert, sentiment_csv, ray_cluster, ["paced", "broken"], pace=0.3, n_trials=3)
    run_dir = tmp_path / "run"
    killed: dict = {}

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for number, worker in training_now(run_dir).items():
                os.kill(worker["pid"], signal.SIGKILL)
                killed.update(number=number, pid=worker["pid"])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    assert main(["search", str(spec)]) == 0
    killer.join(timeout=5)
    assert killed, "no running trial was seen"

    trials = study_trials(run_dir)
    assert len(trials) == 3
    assert {t.state.name for t in trials if t.user_attrs["variant"] == "paced"} == {"COMPLETE"}
    broken = [t for t in trials if t.user_attrs["variant"] == "broken"]
    assert 1 in [t.number for t in broken]  # the broken variant's baseline
    for trial in broken:
        assert trial.state.name == "FAIL"
        assert trial.user_attrs["failure_reason"] == "RuntimeError: boom: this variant cannot attach"
    again = trials[killed["number"]].user_attrs["ray"]
    assert again["restarts"] == 1 and again["pid"] != killed["pid"]
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()


def test_the_search_process_killed_mid_search_resumes_with_a_fresh_tuner(tmp_path, tiny_bert, sentiment_csv, ray_cluster):
    """``autopeft search`` joins the cluster as its own process and is killed with SIGKILL while trials run; the same
    command run again keeps every finished trial, runs the interrupted configurations again and stops at n_trials.

    Catches: the searcher not counting the trials Tune holds toward ``n_trials`` (``wants_more`` asked without
    ``running``: the resumed search, starting with two retries at once, overshoots to five complete trials).
    """
    spec = paced_spec(tmp_path, tiny_bert, sentiment_csv, ray_cluster, ["paced"], pace=0.3, n_trials=4)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "autopeft", "search", str(spec)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        wait_for(
            lambda: any(state == "COMPLETE" for state, _ in live_trials(run_dir).values()) and training_now(run_dir), 240, "a finished trial and a running one"
        )
    finally:
        first.kill()  # SIGKILL: no cleanup of any kind
        output = first.communicate(timeout=60)[0]
    before = {t.number: t for t in study_trials(run_dir)}
    finished_before = {n: t for n, t in before.items() if t.state.name == "COMPLETE"}
    # A trial killed before its configuration was wholly sampled ran nothing and is not run again (driver.requeue_dead).
    interrupted = [n for n, t in before.items() if t.state.name == "RUNNING" and "config" in t.user_attrs]
    assert finished_before and interrupted, output

    second = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    after = study_trials(run_dir)
    by_number = {t.number: t for t in after}
    for number, trial in finished_before.items():
        assert by_number[number].state.name == "COMPLETE" and by_number[number].values == trial.values
    retried = {t.user_attrs.get("retry_of"): t for t in after if t.user_attrs.get("retry_of") is not None}
    for number in interrupted:
        assert retried[number].state.name == "COMPLETE" and retried[number].params == before[number].params
    assert sum(t.state.name == "COMPLETE" for t in after) == 4
    assert (run_dir / "best" / "adapter_model.safetensors").is_file()


def test_ray_settings_are_checked_before_anything_starts(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Bad ``ray`` settings exit 2 with one line naming the file, key, value and what is allowed; a spec written
    for the old ``backend: optuna`` still loads as the local backend.

    Catches: the ``optuna`` alias dropped (old specs refused), the Ray Client address check dropped (a ray://
    search would run Tune's loop on the head node, away from the study), the whole-GPU check dropped, and the
    reachability check dropped (Ray retries an address where nothing listens for minutes).
    """
    import socket

    from autopeft.spec import load_spec

    def spec_with(name: str, **sections) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        return write_spec(folder, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)}, **sections)

    assert load_spec(spec_with("old", search={"backend": "optuna"})).search.backend == "local"

    client = spec_with("client", search={"backend": "ray"}, ray={"address": "ray://head:10001"})
    assert main(["validate", str(client)]) == 2
    error = capsys.readouterr().err
    assert f"{client}: ray.address: got 'ray://head:10001'; Ray Client addresses (ray://) are not supported" in error.replace("\n", "")

    gpus = spec_with("gpus", search={"backend": "ray"}, ray={"resources_per_trial": {"gpu": 1.5}})
    assert main(["validate", str(gpus)]) == 2
    assert "ray.resources_per_trial.gpu: got 1.5; more than one GPU per trial must be a whole number" in capsys.readouterr().err.replace("\n", "")

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nowhere = spec_with("nowhere", search={"backend": "ray"}, ray={"address": f"127.0.0.1:{port}"})
    # Its own process, with a deadline: without the check, Ray keeps retrying the address for minutes.
    result = subprocess.run(
        [sys.executable, "-m", "autopeft", "search", str(nowhere)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"},
    )
    assert result.returncode == 2
    assert f"ray.address: got '127.0.0.1:{port}'; no Ray head node answers there" in result.stderr
