"""`autopeft export` never deletes or overwrites what autopeft did not write, and works from any working folder.

Every test runs the real command (`autopeft.cli.main`) on one real finished search of a tiny BERT, with real
folders, files and symbolic links, and checks byte for byte that nothing outside the export target changed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from autopeft.cli import main
from autopeft.export import replace_folder
from conftest import sentiment_rows, snapshot, write_spec


def write_reviews(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["review", "sentiment"])
        writer.writeheader()
        writer.writerows(sentiment_rows(240))
    return path


class Finished:
    """A finished 2-trial search: the spec in ``root/project`` names its data as ``../data/reviews.csv``."""

    def __init__(self, root: Path, spec: Path, run: Path) -> None:
        self.root, self.spec, self.run = root, spec, run
        self.best = json.loads((run / "best" / "autopeft.json").read_text())["trial"]
        self.other = 1 - self.best  # its adapter was not kept: exporting it trains it again


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert) -> Finished:
    root = tmp_path_factory.mktemp("study")
    write_reviews(root / "data" / "reviews.csv")
    project = root / "project"
    project.mkdir()
    spec = write_spec(project, model={"id": str(tiny_bert)}, data={"source": "../data/reviews.csv"}, output={"dir": str(root / "run")})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)  # as the README shows: run from the spec's folder
        assert main(["search", "spec.yaml"]) == 0
    return Finished(root, spec, root / "run")


def export(finished: Finished, out: Path | str, *extra: str, trial: int | None = None) -> int:
    number = finished.best if trial is None else trial
    return main(["export", str(finished.run), "--trial", str(number), "--out", str(out), *extra])


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------------
# What is refused
# ----------------------------------------------------------------------------------------------------------------


def test_a_folder_autopeft_did_not_write_is_refused_and_left_as_it_was(finished, tmp_path, capsys):
    """Catches: removing the 'not empty and not an earlier export' check in check_target (the old export deleted
    the folder), and treating any folder with an autopeft.json as an export (its other files would be lost)."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("my notes")
    (mine / "sub" / "data.bin").write_bytes(b"\x00\x01")
    mixed = tmp_path / "mixed"  # an earlier export a user added a file to
    assert export(finished, mixed) == 0
    (mixed / "my-eval.txt").write_text("keep me")
    before = snapshot(tmp_path)

    assert export(finished, mine) == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "--force" in err and "not an earlier autopeft export" in err
    assert export(finished, mixed) == 2
    assert "my-eval.txt" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", ["{run}", "{run}/..", "{run}/adapters/../.."])
def test_the_run_folder_and_folders_holding_it_are_refused_even_with_force(finished, out, capsys):
    """Catches: removing the run-folder check in check_target (with --force, `--out RUN` destroyed the study and
    `--out RUN/..` emptied the parent folder)."""
    before = snapshot(finished.root)
    target = out.format(run=finished.run, root=finished.root)
    assert export(finished, target, "--force") == 2
    err = capsys.readouterr().err
    assert "run folder" in err and target in err
    assert snapshot(finished.root) == before


def test_a_folder_holding_a_study_is_refused_even_with_force(finished, tmp_path, capsys):
    """Catches: removing the search for a study.db under the target (_find_study) in check_target."""
    other = tmp_path / "other"
    (other / "deep" / "run").mkdir(parents=True)
    shutil.copy2(finished.run / "study.db", other / "deep" / "run" / "study.db")
    (other / "readme.txt").write_text("another project")
    before = snapshot(tmp_path)
    assert export(finished, other, "--force") == 2
    assert "study.db" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_a_link_as_out_is_refused_and_nothing_is_written_through_it(finished, tmp_path, capsys):
    """Catches: removing the symbolic-link check in check_target (the path was resolved and the folder the link
    points to was replaced)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("precious")
    earlier = tmp_path / "earlier"
    assert export(finished, earlier) == 0
    (tmp_path / "link").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "link-to-export").symlink_to(earlier, target_is_directory=True)
    before = snapshot(tmp_path)

    assert export(finished, tmp_path / "link", "--force") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert export(finished, tmp_path / "link-to-export") == 2
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------
# What is written, and how
# ----------------------------------------------------------------------------------------------------------------


def test_force_replaces_the_named_folder_and_nothing_beside_it(finished, tmp_path):
    """Catches: staging or moving the old folder aside anywhere but a hidden sibling that is removed afterwards
    (leftovers in the parent), and --force not being honoured."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("replace me")
    (tmp_path / "beside.txt").write_text("leave me")
    (tmp_path / "mine.old").mkdir()
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("mine/") and k != "mine"}

    assert export(finished, mine, "--force") == 0
    assert json.loads((mine / "autopeft.json").read_text())["trial"] == finished.best
    assert not (mine / "notes.txt").exists()
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("mine/") and k != "mine"}
    assert after == before and hidden_leftovers(tmp_path) == []


def test_an_earlier_export_is_kept_until_the_new_one_is_complete(finished, tmp_path, monkeypatch):
    """Catches: deleting the earlier export before the new one is built (or building it in place), and leaving
    the hidden staging folder behind when an export fails."""
    import autopeft.export

    out = tmp_path / "adapter"
    assert export(finished, out) == 0
    before = snapshot(tmp_path)

    def broken_card(*args, **kwargs):
        raise RuntimeError("the model card could not be written")

    monkeypatch.setattr(autopeft.export, "model_card", broken_card)
    with pytest.raises(RuntimeError, match="model card"):
        export(finished, out, trial=finished.other)
    assert snapshot(tmp_path) == before  # the earlier export whole, and no staging or retraining folder left
    monkeypatch.undo()

    assert export(finished, out, trial=finished.other) == 0  # an earlier export is replaced without --force
    assert json.loads((out / "autopeft.json").read_text())["trial"] == finished.other
    assert hidden_leftovers(tmp_path) == []


def test_a_failed_rename_puts_the_earlier_folder_back(tmp_path, monkeypatch):
    """Catches: removing the restore in replace_folder (the earlier export was left renamed aside, i.e. gone)."""
    target, staging = tmp_path / "adapter", tmp_path / ".adapter.partial.x"
    for folder, text in ((target, "old"), (staging, "new")):
        folder.mkdir()
        (folder / "autopeft.json").write_text(json.dumps({"trial": text}))
    before = snapshot(target)
    real_rename = os.rename

    def rename(source, destination):
        if Path(source) == staging:
            raise OSError(28, "No space left on device")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        replace_folder(staging, target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.partial.x", "adapter"]


def test_staging_never_replaces_a_users_folder_of_the_same_name(finished, tmp_path):
    """Catches: fixed staging names (`OUT.partial`, `OUT.retrain`, which were deleted first) instead of unique ones."""
    out = tmp_path / "adapter"
    for name in ("adapter.partial", "adapter.retrain", ".adapter.partial", ".adapter.retrain"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text(name)
    before = snapshot(tmp_path)
    assert export(finished, out, trial=finished.other) == 0  # retrains: uses both staging folders
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("adapter/") and k != "adapter"} == before


# ----------------------------------------------------------------------------------------------------------------
# Relative paths in the spec
# ----------------------------------------------------------------------------------------------------------------


def test_export_works_from_another_folder_for_a_spec_with_relative_data(finished, tmp_path, monkeypatch):
    """Catches: saving data.source as written (`../data/reviews.csv`) in RUN/spec.yaml, which export resolved
    against the run folder and refused with exit 2 even for adapters on disk."""
    saved = yaml.safe_load((finished.run / "spec.yaml").read_text())
    assert saved["data"]["source"] == str((finished.root / "data" / "reviews.csv").resolve())
    monkeypatch.chdir(tmp_path)
    assert export(finished, "kept") == 0
    assert export(finished, "retrained", trial=finished.other) == 0
    assert json.loads((tmp_path / "retrained" / "autopeft.json").read_text())["trial"] == finished.other


def test_resume_compares_resolved_paths(finished, tmp_path, monkeypatch, capsys):
    """Catches: comparing data.source as written instead of resolved. The same spec run from another working
    folder resumes, a spec saved with relative paths (older runs) resumes, and a copy of the spec in another
    folder, whose `../data/reviews.csv` is another file, is refused."""
    trials = (finished.run / "trials.csv").read_bytes()
    monkeypatch.chdir(finished.root)
    assert main(["search", "project/spec.yaml"]) == 0
    assert (finished.run / "trials.csv").read_bytes() == trials

    older = tmp_path / "a" / "b" / "older-run"  # a different depth: relative paths mean something else here
    shutil.copytree(finished.run, older)
    saved = yaml.safe_load((older / "spec.yaml").read_text())
    saved["data"]["source"] = "../data/reviews.csv"
    (older / "spec.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert main(["search", str(finished.spec), "--output", str(older)]) == 0

    elsewhere = tmp_path / "elsewhere" / "project"
    elsewhere.mkdir(parents=True)
    write_reviews(tmp_path / "elsewhere" / "data" / "reviews.csv")
    shutil.copy2(finished.spec, elsewhere / "spec.yaml")
    capsys.readouterr()
    assert main(["search", str(elsewhere / "spec.yaml"), "--output", str(older)]) == 2
    assert "changed: data.source" in capsys.readouterr().err
