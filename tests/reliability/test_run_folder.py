"""The run folder trusts nothing it finds: links, folders and files it did not make are never deleted or written
through, run files are written whole or not at all, and a cut-short spec.yaml or an interrupted trial is named
as such. Real searches (`autopeft.cli.main`) on a tiny BERT, real links and files, compared byte for byte."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from autopeft.cli import main
from autopeft.rundir import INTERRUPTED_REASON, RunDir, write_trials_csv
from autopeft.runlock import LOCK_NAME
from autopeft.spec import load_spec
from conftest import sentiment_rows, snapshot, write_spec


def user_folder(path: Path) -> Path:
    """A folder of a user's own files (and a subfolder)."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text(f"notes in {path.name}")
    (path / "sub" / "weights.bin").write_bytes(os.urandom(64))
    return path


def fake_export(path: Path, trial: int) -> Path:
    path.mkdir(parents=True)
    (path / "autopeft.json").write_text(json.dumps({"trial": trial}))
    (path / "adapter_config.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert) -> tuple[Path, Path]:
    """(spec, run) of a finished 2-trial search; tests work on copies of the run (see ``copy_run``)."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "reviews.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "sentiment"])
        writer.writeheader()
        writer.writerows(sentiment_rows(240))
    spec = write_spec(root, model={"id": str(tiny_bert)}, data={"source": str(data)})
    assert main(["search", str(spec)]) == 0
    return spec, root / "run"


@pytest.fixture
def copy_run(finished, tmp_path):
    """A private copy of the finished run: ``(spec, run)``; search it with ``--output run``."""
    spec, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return spec, copy


def search(spec: Path, run: Path, *extra: str) -> int:
    return main(["search", str(spec), "--output", str(run), *extra])


def trial_table(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "trials.csv").read_text().splitlines()))


# ----------------------------------------------------------------------------------------------------------------
# Links and names autopeft did not make
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adapters", "best", "pareto", "logs"])
def test_a_link_in_place_of_a_run_folder_is_refused_at_start(copy_run, tmp_path, name, capsys):
    """Catches: removing the link check in RunDir.start (a linked adapters/ let cleanup delete a folder outside
    the run; a linked best/ gave a traceback)."""
    spec, run = copy_run
    outside = user_folder(tmp_path / "outside")
    (outside / "trial-0").mkdir()  # what cleanup would have deleted through a linked adapters/
    if (run / name).exists():
        shutil.rmtree(run / name)
    (run / name).symlink_to(outside, target_is_directory=True)
    before = snapshot(tmp_path, ignore=(LOCK_NAME,))
    assert search(spec, run, "--n-trials", "3") == 2
    err = capsys.readouterr().err
    assert str(run / name) in err and "symbolic link" in err
    assert snapshot(tmp_path, ignore=(LOCK_NAME,)) == before


def test_cleanup_deletes_only_real_trial_folders_it_made(tmp_path):
    """Catches: removing the link check on adapters/ in keep_adapters (cleanup listed the folder a link points to
    and deleted its trial-N folders), and matching names loosely (`trial-03`, other digits)."""
    outside = tmp_path / "outside"
    (outside / "trial-5").mkdir(parents=True)
    (outside / "trial-5" / "adapter_config.json").write_text("{}")
    linked = tmp_path / "linked-run"
    linked.mkdir()
    (linked / "adapters").symlink_to(outside, target_is_directory=True)
    run = tmp_path / "run"
    adapters = run / "adapters"
    for name in ("trial-0", "trial-1", "trial-03", "trial-\u0663", "trial-final"):
        (adapters / name).mkdir(parents=True)
        (adapters / name / "adapter_config.json").write_text(name)
    (adapters / "trial-9").symlink_to(outside / "trial-5", target_is_directory=True)
    (adapters / "notes.txt").write_text("mine")
    before = snapshot(tmp_path, ignore=(LOCK_NAME,))

    RunDir(linked).keep_adapters({0})
    RunDir(run).keep_adapters({0})
    after = snapshot(tmp_path, ignore=(LOCK_NAME,))
    assert not (adapters / "trial-1").exists()
    assert after == {k: v for k, v in before.items() if not k.startswith("run/adapters/trial-1")}


def test_a_users_folder_in_adapters_does_not_stop_the_search(copy_run, capsys):
    """Catches: parsing every `trial-*` name as a number (int("final") crashed the search after every trial)."""
    spec, run = copy_run
    mine = user_folder(run / "adapters" / "trial-final")
    before = snapshot(mine, ignore=(LOCK_NAME,))
    assert search(spec, run, "--n-trials", "3") == 0
    assert snapshot(mine, ignore=(LOCK_NAME,)) == before
    assert [r["state"] for r in trial_table(run)].count("COMPLETE") == 3


def test_pruning_the_pareto_folder_deletes_only_stale_exports(tmp_path):
    """Catches: deleting pareto/trial-N without checking it is still exactly an export (is_export), or by a loose
    name, or through a link."""
    run = tmp_path / "run"
    pareto = run / "pareto"
    fake_export(pareto / "trial-1", 1)  # stale: deleted
    fake_export(pareto / "trial-2", 2)  # on the front: kept
    fake_export(pareto / "trial-3", 3)
    (pareto / "trial-3" / "my-eval.txt").write_text("a user's file in a stale export")
    user_folder(pareto / "trial-4")  # the right name, but not an export
    user_folder(pareto / "trial-x")
    outside = fake_export(tmp_path / "outside" / "export", 5)
    (pareto / "trial-5").symlink_to(outside, target_is_directory=True)
    before = snapshot(tmp_path, ignore=(LOCK_NAME,))

    RunDir(run).prune_pareto({2})
    assert snapshot(tmp_path, ignore=(LOCK_NAME,)) == {k: v for k, v in before.items() if not k.startswith("run/pareto/trial-1")}
    assert not (pareto / "trial-1").exists()


def test_a_best_folder_of_a_users_files_is_refused_before_the_search(copy_run, capsys):
    """Catches: removing the best/ check in RunDir.start (only the export at the end of the search would refuse,
    after every trial had run)."""
    spec, run = copy_run
    shutil.rmtree(run / "best")
    user_folder(run / "best")
    before = snapshot(run / "best", ignore=(LOCK_NAME,))
    assert search(spec, run, "--n-trials", "3") == 2
    err = capsys.readouterr().err
    assert str(run / "best") in err and "did not write" in err
    assert snapshot(run / "best", ignore=(LOCK_NAME,)) == before


def test_an_output_folder_of_other_files_is_refused(finished, tmp_path, capsys):
    """Catches: removing the 'not empty and holds no study' check in RunDir.start (a search would write spec.yaml,
    trials.csv, best/ and report.html over a user's files)."""
    spec, _ = finished
    folder = user_folder(tmp_path / "project")
    (folder / "trials.csv").write_text("my own table")
    before = snapshot(tmp_path, ignore=(LOCK_NAME,))
    assert search(spec, folder) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "not empty" in err
    assert snapshot(tmp_path, ignore=(LOCK_NAME,)) == before


# ----------------------------------------------------------------------------------------------------------------
# Writing run files
# ----------------------------------------------------------------------------------------------------------------


def test_ctrl_c_while_spec_yaml_is_written_leaves_the_previous_one(copy_run, tmp_path, monkeypatch):
    """Catches: writing spec.yaml in place (the old file is gone before the new one is safe on disk), and
    leaving the temporary file behind."""
    spec, run = copy_run
    raw = yaml.safe_load(spec.read_text())
    raw["search"]["timeout"] = 3600  # resumable: the search goes on and rewrites spec.yaml
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    before = snapshot(run, ignore=(LOCK_NAME,))

    def interrupted_sync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted_sync)
    assert search(changed, run) == 130
    monkeypatch.undo()
    assert snapshot(run, ignore=(LOCK_NAME,)) == before
    # Without the interruption the new spec (a resumable change) is written.
    assert search(changed, run) == 0
    assert "timeout: 3600" in (run / "spec.yaml").read_text()


def test_a_users_file_named_like_a_temporary_file_is_left_alone(copy_run):
    """Catches: a fixed temporary name for trials.csv (`trials.csv.tmp` was overwritten and renamed away)."""
    spec, run = copy_run
    for name in ("trials.csv.tmp", "spec.yaml.tmp", ".trials.csv.tmp"):
        (run / name).write_text(f"my {name}")
    before = {name: (run / name).read_bytes() for name in ("trials.csv.tmp", "spec.yaml.tmp", ".trials.csv.tmp")}
    assert search(spec, run, "--n-trials", "3") == 0
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp") and p.name not in before]


@pytest.mark.parametrize("cut", ["empty", "mid-line", "line-end"])
def test_a_cut_short_spec_yaml_is_named_as_such(copy_run, cut, capsys):
    """Catches: removing the unreadable-spec check (an empty spec.yaml made resume refuse with "changed: " and no
    key; a cut one gave a schema error or a list of keys that never changed)."""
    spec, run = copy_run
    text = (run / "spec.yaml").read_text()
    lines = text.splitlines(keepends=True)
    cut_text = {
        "empty": "",
        "mid-line": text[: len(text) * 2 // 3].rstrip("\n") + "x",
        # Valid YAML and a valid spec (the rest takes defaults): only the missing last newline tells.
        "line-end": "".join(lines[: len(lines) // 2]).rstrip("\n"),
    }[cut]
    (run / "spec.yaml").write_text(cut_text)
    study = (run / "study.db").read_bytes()
    for command in (["search", str(spec), "--output", str(run)], ["export", str(run), "--trial", "0", "--out", str(run.parent / "x")], ["status", str(run)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{run / 'spec.yaml'} is unreadable (" in err and "may have been cut short" in err, command
        assert "changed:" not in err
    assert (run / "study.db").read_bytes() == study
    (run / "spec.yaml").unlink()  # what the message says to do: the run resumes and spec.yaml is written again
    assert search(spec, run) == 0
    rewritten, saved = yaml.safe_load((run / "spec.yaml").read_text()), yaml.safe_load(text)
    assert rewritten.pop("output") != saved.pop("output") and rewritten == saved


# ----------------------------------------------------------------------------------------------------------------
# Interrupted trials
# ----------------------------------------------------------------------------------------------------------------


def test_an_interrupted_trial_reads_the_same_in_trials_csv_and_status(tmp_path, tiny_bert, sentiment_csv, capsys):
    """Catches: removing the INTERRUPTED state from trial_rows/trial_state (trials.csv said FAIL with an empty
    reason while status said interrupted). The trial is left as a killed process leaves it: FAIL, no reason."""
    spec_path = write_spec(tmp_path, model={"id": str(tiny_bert)}, data={"source": str(sentiment_csv)})
    run_dir = RunDir(tmp_path / "run")
    run_dir.start(load_spec(spec_path))
    study = optuna.create_study(study_name="autopeft", storage=run_dir.storage_url, direction="maximize")
    study.tell(study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-3, 1e-2)}), state=optuna.trial.TrialState.FAIL)
    write_trials_csv(study, run_dir.trials_csv)

    [row] = trial_table(run_dir.path)
    assert (row["state"], row["failure_reason"]) == ("INTERRUPTED", INTERRUPTED_REASON)
    assert main(["status", str(run_dir.path)]) == 0
    assert f"1 {INTERRUPTED_REASON}" in capsys.readouterr().out
    assert main(["status", str(run_dir.path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["trials"]["interrupted"] == 1 and status["trials"]["failed"] == 0
    assert status["interrupted"] == [{"number": 0, "reason": INTERRUPTED_REASON}]
